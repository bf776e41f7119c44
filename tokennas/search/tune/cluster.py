"""Which Ray the search runs on: a local instance, the cluster ``ray start`` set up, or a remote one.

``--ray-address`` is ``local`` (the default: a private Ray instance, as before), ``auto`` (the cluster
that ``ray start`` set up on this machine, or ``RAY_ADDRESS``), ``HOST:PORT`` (a cluster's GCS address,
joined as a driver) or ``ray://HOST:PORT`` (Ray Client). A bad address fails in one line before
anything is written: its form is checked first, then its port is probed, then Ray is joined under a
30 s limit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 30
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def check_address(address: str | None) -> None:
    """Form only, no I/O; a ``ValueError`` names the bad value."""
    if address in (None, "local", "auto"):
        return
    rest = address.removeprefix("ray://")
    match = _HOST_PORT.match(rest)
    if "://" in rest or match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"invalid --ray-address {address!r}; expected local, auto, HOST:PORT or ray://HOST:PORT")


def _probe(address: str) -> None:
    """A TCP connect to the address's port, so an unreachable cluster fails in seconds, not minutes."""
    match = _HOST_PORT.match(address.removeprefix("ray://"))
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        raise ValueError(f"cannot reach --ray-address {address!r}: {err.strerror or err}") from None


def connect(address: str | None, num_gpus: int | None = None) -> None:
    """Join (or start) Ray; raises a one-line ``ValueError`` naming ``--ray-address`` within 30 s."""
    import ray

    check_address(address)
    address = address or "local"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address not in ("local", "auto"):
        _probe(address)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": False}
    if address == "local":  # a private instance: this machine's resources, dashboard off
        kwargs.update(include_dashboard=False, num_gpus=num_gpus)
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        sink = io.StringIO()  # Ray's start-up chatter; the run folder does not exist yet
        try:
            with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
                ray.init(address=address, **kwargs)
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001  (reported below in one line)
            outcome["error"] = err

    if address == "local":
        # In this thread: Ray's own processes die with the thread that started them (PR_SET_PDEATHSIG)
        init()
    else:  # joining only: a silent address must not hang the command
        worker = threading.Thread(target=init, daemon=True)
        worker.start()
        worker.join(CONNECT_TIMEOUT_S)
    if "error" not in outcome:
        raise ValueError(f"cannot join --ray-address {address!r}: no Ray cluster answered within "
                         f"{CONNECT_TIMEOUT_S} s")
    if outcome["error"] is not None:
        reason = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]).strip() else \
            type(outcome["error"]).__name__
        raise ValueError(f"cannot join --ray-address {address!r}: {reason}")


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def has_gpus() -> bool:
    """Whether the Ray cluster this process joined has a GPU anywhere."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def node_cpus(gpus: float = 0.0) -> float | None:
    """The most CPU cores that one alive node of the joined Ray cluster has among those with ``gpus`` GPUs: what a
    single trial can be given and still be placed. None if no node has the GPUs."""
    import ray

    return max((node["Resources"].get("CPU", 0.0) for node in ray.nodes()
                if node["Alive"] and node["Resources"].get("GPU", 0.0) >= gpus), default=None)


def storage_path(ray_storage: str | None) -> str | None:
    """``--ray-storage`` as Ray Tune wants it: a URI as given, a local path made absolute."""
    if ray_storage is None or "://" in ray_storage:
        return ray_storage
    return str(Path(ray_storage).expanduser().resolve())


def node_name() -> str:
    """The node a trial runs on, as ``IP/NODE_ID8`` (two nodes of one machine share an IP)."""
    import ray

    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"


def record_placement(trial: Any, result: dict[str, Any]) -> None:
    """Keep on the Optuna trial where it last ran and the epoch it last resumed from (if it did)."""
    for key in ("node", "resumed_from_epoch"):
        if result.get(key) is not None and trial.user_attrs.get(key) != result[key]:  # one write when it changes
            trial.set_user_attr(key, result[key])


def check_data_dir(data_dir: str | None) -> None:
    """An image folder must exist on every node that may train a trial; a ``ValueError`` names the nodes
    that lack it. Runs one tiny task pinned to each alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not data_dir:
        return

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return os.path.isdir(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    checks = {n["NodeManagerAddress"] + "/" + n["NodeID"][:8]: exists.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote(data_dir)
        for n in nodes}
    try:
        found = dict(zip(checks, ray.get(list(checks.values()), timeout=CONNECT_TIMEOUT_S), strict=True))
    except ray.exceptions.GetTimeoutError:
        raise ValueError(f"could not check --data-dir {data_dir!r} on every node within "
                         f"{CONNECT_TIMEOUT_S} s") from None
    missing = [node for node, ok in found.items() if not ok]
    if missing:
        raise ValueError(f"--data-dir {data_dir!r} does not exist on node(s) {', '.join(missing)}; an image folder "
                         "must be at the same path on every node (a shared filesystem or a copy)")
