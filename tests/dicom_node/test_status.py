"""DICOM statuses: one member per status, even where two services share a code; errors carry theirs."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from dicom_node.errors import NodeError
from dicom_node.server import Node
from dicom_node.similar import NotIndexedError, UnknownStudyError
from dicom_node.status import Status
from tests.dicom_node.peers import find, study_query


@pytest.mark.parametrize(("store", "query_retrieve", "code"), [
    (Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, 0xA900),
    (Status.CANNOT_UNDERSTAND, Status.UNABLE_TO_PROCESS, 0xC000),
])
def test_statuses_that_share_a_code_are_two_members_each_the_code(store: Status, query_retrieve: Status,
                                                                   code: int) -> None:
    assert store is not query_retrieve and store.name != query_retrieve.name
    assert store == query_retrieve == code and int(store) == int(query_retrieve) == code
    assert "0x%04X" % query_retrieve == f"0x{code:04X}"


def test_errors_carry_the_status_a_query_is_refused_with() -> None:
    assert NodeError("bad").status is Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert UnknownStudyError("1.2.3").status is Status.UNKNOWN_STUDY
    assert NotIndexedError("1.2.3").status is Status.STUDY_NOT_INDEXED


def test_a_refused_similar_case_query_is_counted_under_its_own_status(start_node: Callable[..., Node]) -> None:
    node = start_node()
    query = study_query(StudyInstanceUID="1.2.3")
    query.QueryRetrieveLevel = "SERIES"  # similar-case queries are STUDY level
    _, final = find(node, query, called="MMDL_SIMILAR")
    assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

    def failures(reason: str) -> float | None:
        return node.metrics.registry.get_sample_value("mmdl_failures_total", {"reason": reason})

    assert failures("similar_identifier_does_not_match_sop_class") == 1
    assert failures("similar_dataset_does_not_match_sop_class") is None  # the C-STORE status of the same code
