"""The one error type of the indexer package."""
from __future__ import annotations


class IndexerError(RuntimeError):
    """The catalog or the vector index cannot do what was asked (conflict, corrupt snapshot, ...)."""
