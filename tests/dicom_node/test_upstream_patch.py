"""docs/pynetdicom-event-driven-reactors.patch, the upstream form of dicom_node/upper_layer.py, applies to the
installed pynetdicom and its tests pass on the patched copy (pynetdicom's own tests of the upper layer too)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pynetdicom

PATCH = Path(__file__).resolve().parents[2] / "docs" / "pynetdicom-event-driven-reactors.patch"


def test_patch_applies_to_the_installed_pynetdicom_and_its_tests_pass(tmp_path: Path) -> None:
    assert pynetdicom.__version__ == "3.0.4", "the patch is made against pynetdicom 3.0.4 (setup.cfg pins it)"
    shutil.copytree(Path(pynetdicom.__file__).parent, tmp_path / "pynetdicom",
                    ignore=shutil.ignore_patterns("__pycache__"))
    applied = subprocess.run(["git", "apply", "-p1", "--whitespace=nowarn", str(PATCH)], cwd=tmp_path,
                             capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    tests = tmp_path / "pynetdicom" / "tests"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tests / "test_reactor_wait.py"), str(tests / "test_dul.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    # the copy, not the installed package, was tested
    probe = subprocess.run([sys.executable, "-c", "import pynetdicom.dul as d; print(d.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(tmp_path))
