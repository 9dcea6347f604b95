"""Durable file operations: the write-back hint taken by a regular file and refused, without an error, by what is not
one."""
from __future__ import annotations

import os
from pathlib import Path

from indexer.durable import start_write_back


def test_write_back_is_started_on_a_file_and_refused_quietly_on_a_pipe(tmp_path: Path) -> None:
    with (tmp_path / "received.dcm").open("wb") as handle:
        handle.write(b"\0" * (1 << 20))
        handle.flush()
        assert start_write_back(handle.fileno())
        os.fsync(handle.fileno())
    assert (tmp_path / "received.dcm").stat().st_size == 1 << 20
    reader, writer = os.pipe()
    try:
        assert not start_write_back(reader)
    finally:
        os.close(reader)
        os.close(writer)
