"""Durable file operations shared by the file store and the index snapshots."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file's data, or a directory's entries) to disk, through a bare descriptor: no buffered
    file object, none of the system calls that opening one makes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a crash (the entry itself is fsynced)."""
    fsync_path(directory)
