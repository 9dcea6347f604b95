"""Durable file operations: the write-back hint taken by a regular file and refused, without an error, by what is not
one."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from indexer.durable import start_write_back


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's; elsewhere the hint is never taken")
def test_write_back_is_started_on_a_file_and_refused_quietly_on_a_pipe(tmp_path: Path) -> None:
    with (tmp_path / "received.dcm").open("wb") as handle:
        handle.write(b"\0" * (1 << 20))
        handle.flush()
        assert start_write_back(handle.fileno())
    reader, writer = os.pipe()
    try:
        assert not start_write_back(reader)
    finally:
        os.close(reader)
        os.close(writer)
