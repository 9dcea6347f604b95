"""The report encoder: Doc2Vec (gensim 4) over the Findings + Impression text of a report.

Determinism: training uses one worker and a fixed seed, which makes gensim reproducible. Inference
does not use ``Doc2Vec.infer_vector`` because that seeds its start vector with Python's ``hash()``
(salted per process unless PYTHONHASHSEED is set) and draws from the model's shared RNG, so the
same text could give different vectors in two processes or two calls. ``ReportEncoder.encode``
runs the same gensim training routine with a start vector seeded by a stable digest of the tokens
and a freshly seeded RNG, so one text always gives one vector.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from gensim.models.doc2vec import Doc2Vec, TaggedDocument
from gensim.models.doc2vec_inner import train_document_dbow, train_document_dm
from gensim.utils import simple_preprocess

from models.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_DIM = 300
#: Anonymisation placeholders (the IU reports' "XXXX") carry no meaning; drop them.
_PLACEHOLDER = "xxxx"


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of a report, without anonymisation placeholders."""
    return [t for t in simple_preprocess(text, min_len=1, max_len=30) if _PLACEHOLDER not in t]


class ReportEncoder:
    """A trained Doc2Vec model that turns report text into a fixed-size vector."""

    def __init__(self, model: Doc2Vec, infer_epochs: int = 50, seed: int = 0) -> None:
        self.model = model
        self.infer_epochs = infer_epochs
        self.seed = seed

    @property
    def dim(self) -> int:
        """Length of the vectors ``encode`` returns."""
        return int(self.model.vector_size)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        dim: int = DEFAULT_DIM,
        epochs: int = 40,
        min_count: int = 2,
        seed: int = 0,
        infer_epochs: int = 50,
    ) -> "ReportEncoder":
        """Train Doc2Vec (PV-DM, one worker, seeded) on the reports the user has."""
        corpus = [TaggedDocument(tokenize(t), [i]) for i, t in enumerate(texts) if t and t.strip()]
        corpus = [d for d in corpus if d.words]
        if not corpus:
            raise ModelError("cannot train the report encoder: no report has any words")
        model = Doc2Vec(
            vector_size=dim, window=5, min_count=min_count, epochs=epochs, workers=1, seed=seed, dm=1, negative=5
        )
        model.build_vocab(corpus)
        if not model.wv.key_to_index:
            raise ModelError(f"cannot train the report encoder: no word occurs {min_count} times or more")
        model.train(corpus, total_examples=len(corpus), epochs=epochs)
        log.info("trained Doc2Vec on %d reports, %d words, %d-d", len(corpus), len(model.wv), dim)
        return cls(model, infer_epochs=infer_epochs, seed=seed)

    def encode_one(self, text: str) -> np.ndarray:
        """The vector of one report; empty or unknown text gives the zero vector."""
        words = tokenize(text or "")
        if not any(w in self.model.wv.key_to_index for w in words):
            return np.zeros(self.dim, dtype=np.float32)
        digest = hashlib.sha256(" ".join(words).encode("utf-8")).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])
        vector = ((rng.random(self.dim, dtype=np.float32) - 0.5) / self.dim).reshape(1, self.dim)
        self.model.random = np.random.RandomState(self.seed)
        m = self.model
        alpha, min_alpha, epochs = m.alpha, m.min_alpha, self.infer_epochs
        alpha_delta = (alpha - min_alpha) / max(epochs - 1, 1)
        work = np.zeros(m.layer1_size, dtype=np.float32)
        lockf = np.ones(1, dtype=np.float32)
        for _ in range(epochs):
            if m.sg:
                train_document_dbow(
                    m, words, [0], alpha, work, learn_words=False, learn_hidden=False,
                    doctag_vectors=vector, doctags_lockf=lockf,
                )
            else:
                neu1 = np.zeros(m.layer1_size, dtype=np.float32)
                train_document_dm(
                    m, words, [0], alpha, work, neu1, learn_words=False, learn_hidden=False,
                    doctag_vectors=vector, doctags_lockf=lockf,
                )
            alpha -= alpha_delta
        return vector[0].astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 vectors of the reports, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.encode_one(t) for t in texts])

    def save(self, path: str | Path) -> None:
        """Write the Doc2Vec model as one file (no .npy sidecars, whatever its size)."""
        self.model.save(str(path), separately=[])

    @classmethod
    def load(cls, path: str | Path, infer_epochs: int = 50, seed: int = 0) -> "ReportEncoder":
        """Read a model written by ``save``; ModelError when it is missing or not a Doc2Vec model."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"report encoder file not found: {path}")
        try:
            model = Doc2Vec.load(str(path))
        except Exception as exc:  # gensim raises pickle/OSError/... for a bad file
            raise ModelError(f"cannot read the report encoder {path}: {exc}") from exc
        if not isinstance(model, Doc2Vec):
            raise ModelError(f"{path} holds a {type(model).__name__}, not a Doc2Vec model")
        return cls(model, infer_epochs=infer_epochs, seed=seed)
