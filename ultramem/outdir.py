"""The ``--out`` directory of a command (``data prepare``, ``train``): created with its parents,
or a one-line error when it cannot hold the output; and :func:`fsync_dir`, which makes the
renames inside a directory durable (data shards, checkpoints). Imports only :mod:`ultramem.errors`."""

from __future__ import annotations

import os
from pathlib import Path

from ultramem.errors import UltramemError


def make_out_dir(path: str | Path, error: type[UltramemError]) -> Path:
    """Create ``path`` (and its parents) and return it; raise ``error`` (the command's error
    class: DataError for ``data prepare``, ConfigError for ``train``) naming ``--out`` and the
    fix when it is a file, cannot be created or is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"--out {path}: exists and is not a directory; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"--out {path}: cannot create it ({e.strerror}); choose another --out") from None
    if not os.access(path, os.W_OK):
        raise error(f"--out {path}: not writable; choose another --out")
    return path


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` itself, so the entries renamed into it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
