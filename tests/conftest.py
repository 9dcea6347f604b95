"""Shared fixtures: where the public sample data lives (beside the checkout, as in CI)."""
from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_process import NodeProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data folder; tests that need it are skipped loudly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"sample data not found at {SHARED_DATA}; CI lays it beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the MMDL architecture with random weights, for tests that embed.

    64-pixel input: the same layers at a twelfth of the cost, so that tests of volume stay quick.
    """
    from models.bundle import create_random_model

    directory = tmp_path_factory.mktemp("model") / "random-mmdl"
    create_random_model(directory, seed=0, device="cpu", image_size=64)
    return directory


@pytest.fixture(scope="session")
def calibrated_model_dir(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model with an identity calibration: a finding is shown when its stored score is >= 0.5
    (calibrated probability = score), and the match probability is (1 + cosine) / 2; for tests of what an
    answer shows whose expected findings follow from the scores they set."""
    import json
    import shutil

    from models.bundle import update_manifest
    from models.bundle_manifest import MANIFEST
    from models.calibration import Calibration, FindingCalibration
    from models.observations import OBSERVATIONS

    directory = tmp_path_factory.mktemp("model") / "calibrated-mmdl"
    shutil.copytree(random_model_dir, directory)
    version = json.loads((directory / MANIFEST).read_text())["version"]
    findings = tuple(FindingCalibration(name, 100, 1.0, 0.0, 0.5) for name in OBSERVATIONS)
    update_manifest(directory, Calibration(version, findings, ((-1.0, 0.0), (1.0, 1.0)), {"test": "identity"}), {})
    return directory


@pytest.fixture(autouse=True, scope="session")
def _quiet_scheduler() -> None:
    """A busy embedding job makes APScheduler note every coalesced run; that is expected, not news."""
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _no_node_outlives_its_test() -> Iterator[None]:
    yield
    while NodeProcess.started:
        NodeProcess.started.pop().stop(signal.SIGKILL)
