"""Real throwaway servers for the cluster tests: a PostgreSQL server and a local multi-node Ray cluster.

Both listen on loopback only, on free ports, in temporary folders, and are stopped at teardown.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PASSWORD = "tokennas-secret-7f2b"  # the tests grep run folders for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed; `make test` installs Debian's postgresql")
    return found


def postgres_installed() -> bool:
    try:
        _pg_bin("initdb")
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on 127.0.0.1:PORT with role ``tokennas`` (password auth) and database ``tokennas``.

    Yields the URL with the password. ``initdb`` refuses to run as root, so as root the server runs as the
    ``postgres`` user that Debian's package creates.
    """
    root = Path(tempfile.mkdtemp(prefix="tokennas-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
            "-E", "UTF8", "--no-instructions")
        run(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off", "start")
        try:
            psql = [_pg_bin("psql"), "-h", str(root), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
            run(*psql, "-c", f"CREATE ROLE tokennas LOGIN PASSWORD '{PASSWORD}'")
            run(*psql, "-c", "CREATE DATABASE tokennas OWNER tokennas")
            yield f"postgresql://tokennas:{PASSWORD}@127.0.0.1:{port}/tokennas"
        finally:
            run(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(workers: int = 2):
    """A head node without CPUs (drivers and the object store only) and ``workers`` nodes of 1 CPU each,
    as separate raylets on this machine, dashboard off. Yields ``ray.cluster_utils.Cluster``."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "include_dashboard": False,
            "object_store_memory": 200 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0})
    try:
        for _ in range(workers):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
