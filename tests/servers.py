"""`dagster dev` for the tests that talk to the web UI: on a free port on 127.0.0.1, in its own process
group (so stopping it stops the webserver, the daemon and the code server together)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCATION = "fineinstructions_dagster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DagsterDev:
    url: str
    port: int
    log_path: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


@contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Let the child start with the default SIGINT handling. dagster dev maps SIGTERM to its SIGINT
    handler, so a SIGINT ignored by inheritance (pytest started as a background job of a non-interactive
    shell) would make it, its webserver and its daemon ignore SIGTERM too. exec resets a caught signal
    to the default; an ignored one stays ignored."""
    main = threading.current_thread() is threading.main_thread()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN or not main:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def start_dagster_dev(env: Mapping[str, str], log_path: Path, timeout: float = 180) -> Iterator[DagsterDev]:
    """Start `dagster dev -w workspace.yaml` from the repo root with `env` added to this process's
    environment (DAGSTER_HOME among it); yield once /server_info answers; stop the whole process group
    (SIGTERM, then SIGKILL after 30 s) on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = DagsterDev(url, port, log_path)
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    with _sigint_not_ignored():
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
             "-p", str(port)], cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError as e:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"dagster dev did not start ({log_path}):\n{server.log_tail()}") from e
                time.sleep(1)
        yield server
    finally:
        stop_group(proc)
        log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process group `proc` leads; SIGKILL to whatever of it is left after `grace` s."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(pgid) and time.time() < deadline:  # the daemon and code server exit after the leader
        time.sleep(0.5)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
