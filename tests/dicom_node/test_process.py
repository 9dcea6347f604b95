"""The process-wide switches: set by configure_process (by each Node), put back by its handle in any order."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import _config as pynetdicom_config

from config import settings_from_mapping
from dicom_node.process import configure_process
from dicom_node.server import Node


def switches() -> tuple[object, ...]:
    return (pynetdicom_config.STORE_RECV_CHUNKED_DATASET, pynetdicom_config.LOG_REQUEST_IDENTIFIERS,
            pynetdicom_config.LOG_RESPONSE_IDENTIFIERS, pynetdicom_config.LOG_HANDLER_LEVEL, tempfile.tempdir, os.environ.get("OMP_WAIT_POLICY"),
            logging.getLogger().level, logging.getLogger("pynetdicom").level, list(logging.getLogger().handlers))


@pytest.fixture()
def no_omp_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def bare_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in `mmdl-node serve`: nothing has set up logging (pytest's handlers, which it adds for each phase of
    a test, are set aside until the test ends)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_configure_sets_every_switch_and_restore_puts_them_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_omp_policy: None) -> None:
    bare_logging(monkeypatch)
    before = switches()
    handle = configure_process(settings_from_mapping({"logging": {"level": "DEBUG"}}), tmp_path)
    assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET is True
    assert (pynetdicom_config.LOG_REQUEST_IDENTIFIERS, pynetdicom_config.LOG_RESPONSE_IDENTIFIERS) == (False, False)
    assert tempfile.tempdir == str(tmp_path)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert logging.getLogger().level == logging.DEBUG and len(logging.getLogger().handlers) == 1
    assert logging.getLogger("pynetdicom").level == logging.WARNING  # DEBUG only with log_phi
    assert pynetdicom_config.LOG_HANDLER_LEVEL == "none"  # its per-message descriptions: nobody would see them
    handle.restore()
    assert switches() == before
    handle.restore()  # a second time: nothing more to put back
    assert switches() == before


def test_logging_the_process_set_up_itself_is_left_alone(tmp_path: Path, no_omp_policy: None) -> None:
    before = switches()
    handle = configure_process(settings_from_mapping({"logging": {"level": "DEBUG"}}), tmp_path)
    assert switches()[6:] == before[6:]  # pytest's handlers, its levels
    assert pynetdicom_config.LOG_REQUEST_IDENTIFIERS is False  # but never patient data unless log_phi
    handle.restore()
    assert switches() == before


def test_pynetdicom_describes_each_message_only_when_debugging_with_phi(tmp_path: Path) -> None:
    for logging_settings, described in (({"level": "DEBUG", "log_phi": True}, "standard"),
                                        ({"level": "DEBUG"}, "none"), ({"level": "INFO", "log_phi": True}, "none")):
        handle = configure_process(settings_from_mapping({"logging": logging_settings}), tmp_path)
        assert pynetdicom_config.LOG_HANDLER_LEVEL == described, logging_settings
        handle.restore()


def test_an_omp_policy_already_set_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    handle = configure_process(settings_from_mapping({}), tmp_path)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    handle.restore()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("order", ["last first", "first first"])
def test_stacked_configurations_restore_in_any_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_omp_policy: None, order: str) -> None:
    bare_logging(monkeypatch)
    before = switches()
    first = configure_process(settings_from_mapping({"logging": {"level": "DEBUG"}}), tmp_path / "first")
    second = configure_process(settings_from_mapping({"logging": {"level": "WARNING", "log_phi": True}}),
                               tmp_path / "second")
    assert logging.getLogger().level == logging.DEBUG  # set up by the first: the second leaves it alone
    if order == "first first":
        first.restore()
        # the second is still in force: its switches stay, and so does the logging the first set up
        assert tempfile.tempdir == str(tmp_path / "second") and pynetdicom_config.LOG_REQUEST_IDENTIFIERS is True
        assert logging.getLogger().level == logging.DEBUG and len(logging.getLogger().handlers) == 1
        second.restore()
    else:
        second.restore()
        assert tempfile.tempdir == str(tmp_path / "first") and pynetdicom_config.LOG_REQUEST_IDENTIFIERS is False
        assert logging.getLogger().level == logging.DEBUG
        first.restore()
    assert switches() == before


def test_each_node_receives_into_its_own_incoming_folder_until_it_stops(
        start_node: Callable[..., Node], no_omp_policy: None) -> None:
    before = switches()
    first = start_node()
    assert tempfile.tempdir == str(first.store.incoming) and pynetdicom_config.STORE_RECV_CHUNKED_DATASET
    second = start_node(node={"data_dir": str(first.settings.node.data_dir.parent / "second")})
    assert tempfile.tempdir == str(second.store.incoming)
    first.stop()  # stopped in the order they started, as the fixture does
    assert tempfile.tempdir == str(second.store.incoming)
    second.stop()
    assert switches() == before


def test_the_node_is_imported_without_torch_so_that_omp_wait_policy_is_set_before_torch_loads() -> None:
    code = "import sys, dicom_node.server; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
