"""Process lifetime: a step process must not outlive the run worker that started it."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG). Only for
    multiprocessing children (Dagster's step processes): a SIGKILLed run worker then takes its steps and
    their in-process LLM engines with it instead of leaving them to hold memory and the `gpu` slot.
    The command-line runner is a top-level process and is left alone. True when set."""
    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None or parent.pid != os.getppid():
        return False  # not a direct child of the run worker (e.g. started by a forkserver): nothing to tie to
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError) as e:
        log.warning("could not tie this process to its parent's lifetime: %s", e)
        return False
    if parent.pid != os.getppid():  # the parent died between the check above and prctl
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, it names one
    process, so a pid reused after a restart (a container's pid 1) is not mistaken for the old one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
