"""Durable file operations shared by the file store, the C-STORE receive path and the index snapshots."""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing out the range's dirty pages, do not wait for them


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """The C library's sync_file_range (Linux), or None where it has none."""
    try:
        function = ctypes.CDLL(None).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_write_back(fd: int) -> bool:
    """Have the kernel start writing the dirty pages of file ``fd`` to disk, without waiting for them, so that the
    fsync that must follow has less left to wait for: a large file written while it arrives is mostly on disk by
    the time its last bytes are. A hint, not durability (only the fsync makes the file durable). False where the
    system has no such call or refuses it (not a regular file): nothing is lost but the head start."""
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


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
