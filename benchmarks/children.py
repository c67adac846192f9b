"""Children in sessions of their own (so that a row's timeout can kill its whole process group)
die with the runner: a SIGTERM or SIGINT to the runner (a call's ``timeout``, Ctrl-C) kills them
first. Otherwise a cut-off row's engine lived on and held the GPU for the next command."""

from __future__ import annotations

import os
import signal
import subprocess

_live: set[subprocess.Popen] = set()


def popen(*args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, killed with the runner."""
    proc = subprocess.Popen(*args, start_new_session=True, **kwargs)
    _live.add(proc)
    return proc


def done(proc: subprocess.Popen) -> None:
    _live.discard(proc)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def kill_children_on_signals() -> None:
    def handler(signum, frame):
        for proc in list(_live):
            kill_group(proc)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
