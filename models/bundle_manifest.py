"""Where the shipped model lives and what its manifest (model.json) says, read without importing torch.

``models.bundle`` writes and checks the whole manifest; the node reads from it only what it needs before
the model is loaded: the size of the embedding space, which sizes the vector index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.errors import ModelError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "mmdl_default"
MANIFEST = "model.json"


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of the model in ``model_dir``, as stored; ModelError when it cannot be read."""
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelError(f"cannot read {path}: not a JSON object")
    return manifest


def embedding_dim(model_dir: str | Path) -> int:
    """The size of the model's embedding space (its study vectors), from its manifest."""
    try:
        return int(read_manifest(model_dir)["embedding_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{Path(model_dir) / MANIFEST} has no valid embedding_dim: {exc!r}") from exc
