"""Optuna's dashboard over a run's stored study, served on localhost only.

optuna-dashboard (``pip install 'tokennas[dashboard]'``) is a live web app over the study: every trial with its
intermediate values (the validation accuracy per epoch that ASHA judged), parameters and user attributes
(FLOPs, params, why a trial was infeasible or a repeat), sortable and filterable tables, and plots chosen in
the browser. ``report.html`` is the fixed summary written when the search ends.
"""

from __future__ import annotations

from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .studies.study import storage_url

HOST = "127.0.0.1"  # never another interface: the dashboard can rename and delete studies


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        """One line per request would drown the URL the user needs."""


def dashboard_server(run_dir: Path, port: int = 0) -> WSGIServer:
    """A server for ``run_dir``'s study on 127.0.0.1; ``port`` 0 picks a free one (``server.server_port``)."""
    from .settings import load_settings
    from .studies.storage import open_storage

    settings = load_settings(run_dir)
    if not settings.storage and not (run_dir / "study.db").is_file():
        raise ValueError(f"{str(run_dir)!r} is not a tokennas run folder (expected study.db)")
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid --port {port}; expected 0 (any free port) to 65535")
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise ValueError("optuna-dashboard is not installed; pip install 'tokennas[dashboard]'") from None
    app = wsgi(open_storage(settings.storage, run_dir, settings.heartbeat) if settings.storage
               else storage_url(run_dir))
    try:
        return make_server(HOST, port, app, handler_class=_QuietHandler)
    except OSError as err:
        raise ValueError(f"cannot serve on {HOST}:{port}: {err.strerror}") from None
