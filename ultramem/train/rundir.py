"""The run directory: one writer at a time (a lock file), and ``--restart`` without mixing runs.

Lock: ``RUN/.lock`` holds ``{"pid", "host", "started"}``, created with ``O_EXCL`` (atomic). A
second ``ultramem train`` on the same ``--out`` is refused with the holder's pid and host. A
lock whose pid no longer runs on this host is stale (a killed run): it is taken over, with a
note. A lock from another host cannot be checked and is refused, naming the file to delete.

Restart: the previous run's files are moved, whole, to ``RUN/../<name>.prev-<time>/`` before
anything is written, so checkpoints, metrics and summaries of two runs never share a directory.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ultramem.errors import ConfigError
from ultramem.outdir import make_out_dir

LOCK = ".lock"


class RunLocked(ConfigError):
    """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` -- held for the whole run; released on exit (even on errors)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path, self.enabled, self.held = Path(run_dir) / LOCK, enabled, False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder(me["host"])
                continue  # stale: removed, try again
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLocked(f"{self.path}: could not take the run lock (another process keeps taking it)")

    def _check_holder(self, host: str) -> None:
        try:
            holder: dict[str, Any] = json.loads(self.path.read_text())
            pid, their_host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, their_host = {}, -1, host  # unreadable/half-written: treat as stale
        if their_host != host:
            raise RunLocked(f"{self.path.parent} is in use by pid {pid} on host {their_host} (since "
                            f"{holder.get('started')}); if that run is gone, delete {self.path}")
        if pid > 0 and _alive(pid):
            raise RunLocked(f"{self.path.parent} is in use by another ultramem train (pid {pid} on "
                            f"{their_host}, since {holder.get('started')}); wait for it or use another --out")
        print(f"ultramem: taking over the stale lock of pid {pid} (no longer running) on {self.path.parent}",
              file=sys.stderr)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (a clear error when it is a file or cannot be created/written)."""
    make_out_dir(run_dir, ConfigError)


def move_aside(run_dir: Path) -> Path | None:
    """Move every entry of ``run_dir`` except the lock to a sibling ``<name>.prev-<time>``;
    returns it (None when there was nothing to move)."""
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.parent / f"{run_dir.name}.prev-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.parent / f"{run_dir.name}.prev-{stamp}-{n}"
    dest.mkdir()
    for p in entries:
        os.rename(p, dest / p.name)
    return dest
