"""A similar-case search whose filters pass few or no studies looks through `query.search_depth` of the most
similar studies at most (widening fourfold at a time), and answers with what passed there; deeper, it finds more."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from dicom_node.similar import SimilarRequest, find_similar
from indexer.catalog import Catalog, to_blob
from indexer.schema import Study
from indexer.vector_index import HnswParams, VectorIndex

DIM = 16
STUDIES = 400  # the query's patient's, ever further from the query; then one study of another patient, furthest


class CountingIndex(VectorIndex):
    """Records the k of every search."""

    def __init__(self, params: HnswParams, directory: Path) -> None:
        super().__init__(params, directory)
        self.asked: list[int] = []

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.asked.append(k)
        return super().search(vector, k)


@pytest.fixture()
def searched(tmp_path: Path) -> Iterator[tuple[Catalog, CountingIndex]]:
    rng = np.random.default_rng(7)
    query, away = rng.normal(size=DIM), rng.normal(size=DIM)
    vectors = np.array([query + step * away for step in np.linspace(0, 3, STUDIES + 1)], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    with catalog.engine.begin() as connection:
        connection.execute(insert(Study), [
            {"id": pk, "study_uid": f"1.2.3.{pk}", "patient_id": "OTHER" if pk == STUDIES + 1 else "SAME",
             "accession_number": f"A{pk}", "vector": to_blob(vectors[pk - 1]), "index_seq": 1, "model_version": "v"}
            for pk in range(1, STUDIES + 2)])
    index = CountingIndex(HnswParams(DIM, m=16, ef_construction=200, ef_search=64), tmp_path / "index")
    index.upsert(np.arange(1, STUDIES + 2), vectors)
    yield catalog, index
    catalog.close()


def test_a_filter_that_passes_nothing_near_stops_at_the_search_depth(searched: tuple[Catalog, CountingIndex]) -> None:
    catalog, index = searched
    query = catalog.studies([1])[1]
    request = SimilarRequest(study_uid="1.2.3.1", accession_number="", top_k=5, min_score=-1.0,
                             exclude_same_patient=True, search_depth=100)
    assert find_similar(catalog, index, query, request) == []
    assert index.asked == [6, 24, 96, 100]

    index.asked.clear()
    [hit] = find_similar(catalog, index, query, replace(request, search_depth=STUDIES + 1))
    assert hit.study.patient_id == "OTHER"
    assert max(index.asked) == STUDIES + 1

    index.asked.clear()  # without a filter that removes any, one search of top-k + 1 (the query itself)
    hits = find_similar(catalog, index, query, replace(request, exclude_same_patient=False))
    assert [hit.study.id for hit in hits] == [2, 3, 4, 5, 6] and index.asked == [6]
