"""A throwaway PostgreSQL server for tests: initdb in a temp dir, loopback only, a free port, stopped after.

As root (CI), the server runs as the `postgres` user. Skips when the server binaries are not installed
(`.ci/run` installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextmanager
def postgres_server() -> Iterator[tuple[str, Path]]:
    """Yield (URL prefix 'postgresql://postgres@127.0.0.1:PORT', bin folder)."""
    bin_dir = binaries()
    assert bin_dir is not None, "PostgreSQL server binaries are not installed"
    root = Path(tempfile.mkdtemp(prefix="model-opt-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                    "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}", bin_dir
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(prefix: str, bin_dir: Path, name: str) -> str:
    port = prefix.rsplit(":", 1)[1]
    subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", name], check=True,
                   capture_output=True)
    return f"{prefix}/{name}"
