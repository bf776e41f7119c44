"""SIGINT and SIGTERM during a search (Ctrl+C; what SLURM and Kubernetes send before a kill): the running trials
stop and are recorded as INTERRUPTED, the reports are written, and the search ends with ``Interrupted`` (exit 130
or 143, one line saying how to resume). A second SIGINT stops at once.

Ray Tune stops an experiment gracefully on its own SIGUSR1 handler; its SIGINT handler is turned off
(``TUNE_DISABLE_SIGINT_HANDLER``) so that the first Ctrl+C reaches this module, which passes it on. ``ray.init``
installs a SIGTERM handler that exits at once, so the handlers are installed again after joining Ray (``arm``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The search was stopped by a signal; ``code`` is the shell's exit status for it (128 + the signal). Like
    ``KeyboardInterrupt`` it is no ``Exception``: raised from a handler, no ``except Exception`` takes it for a
    failed candidate."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.code = 128 + signum


class GracefulStop:
    """While entered, SIGINT and SIGTERM stop the search: before ``arm`` (nothing runs yet) at once, with
    ``Interrupted``; after it, gracefully: ``signum`` is set and a running Ray Tune experiment is told to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = self.enabled = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> GracefulStop:
        # handlers can only be set from the main thread; a search run from another thread keeps Python's defaults
        self.enabled = threading.current_thread() is threading.main_thread()
        if self.enabled:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            self._install()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def arm(self) -> None:
        """From here on a signal stops the search gracefully (call it after ``ray.init``, which replaces the
        SIGTERM handler)."""
        self.armed = True
        if self.enabled:
            self._install()

    def _install(self) -> None:
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # the second Ctrl+C: stop now
                raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}")
            return
        self.signum = signum
        if not self.armed:
            raise Interrupted(signum, f"stopped by {self.name} before the search started")
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Ray Tune's graceful stop, while an experiment runs
        if callable(tune_stop) and getattr(tune_stop, "__module__", "").startswith("ray."):
            tune_stop(signal.SIGUSR1, frame)
