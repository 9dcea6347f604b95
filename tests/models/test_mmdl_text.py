"""The Doc2Vec report encoder: deterministic training and inference, save/load, bad files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.errors import ModelError
from models.text import ReportEncoder, tokenize

REPORTS = [
    "FINDINGS: The heart is enlarged. Small left pleural effusion. IMPRESSION: Cardiomegaly with effusion.",
    "FINDINGS: Lungs are clear. No pneumothorax. IMPRESSION: No acute cardiopulmonary abnormality.",
    "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia in the right lower lobe.",
    "FINDINGS: Heart size normal. No effusion. XXXX opacity at the base. IMPRESSION: Atelectasis.",
    "FINDINGS: Pulmonary vascular congestion and edema. IMPRESSION: Mild pulmonary edema.",
] * 4
REPO_ROOT = Path(__file__).resolve().parents[2]


def _train() -> ReportEncoder:
    return ReportEncoder.train(REPORTS, dim=24, epochs=10, min_count=1, seed=7, infer_epochs=20)


def test_tokenize_drops_placeholders() -> None:
    assert tokenize("XXXX opacity, LEFT base") == ["opacity", "left", "base"]


def test_same_text_same_vector_and_seeded_training_reproduces() -> None:
    enc = _train()
    first = enc.encode(["small left effusion", "lungs are clear"])
    assert first.shape == (2, 24) and first.dtype == np.float32
    np.testing.assert_array_equal(first, enc.encode(["small left effusion", "lungs are clear"]))
    np.testing.assert_array_equal(first, _train().encode(["small left effusion", "lungs are clear"]))
    assert not np.array_equal(first[0], first[1])


def test_unknown_or_empty_text_is_zero() -> None:
    enc = _train()
    np.testing.assert_array_equal(enc.encode(["", "qwertyuiop"]), np.zeros((2, 24), np.float32))


def test_vectors_do_not_depend_on_python_hash_seed(tmp_path: Path) -> None:
    """gensim's infer_vector seeds with hash(); ours must not, so two processes agree."""
    script = (
        "import sys, numpy as np\n"
        "from tests.models.test_mmdl_text import _train\n"
        "np.save(sys.argv[1], _train().encode(['small left effusion']))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"v{hash_seed}.npy"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=REPO_ROOT)
        outputs.append(np.load(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_save_load_round_trip(tmp_path: Path) -> None:
    enc = _train()
    enc.save(tmp_path / "d2v.model")
    loaded = ReportEncoder.load(tmp_path / "d2v.model", infer_epochs=20, seed=7)
    np.testing.assert_array_equal(enc.encode(REPORTS[:3]), loaded.encode(REPORTS[:3]))


def test_bad_files_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        ReportEncoder.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="cannot read"):
        ReportEncoder.load(junk)
    with pytest.raises(ModelError, match="no report"):
        ReportEncoder.train(["", "   "])
