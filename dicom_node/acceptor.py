"""The DICOM acceptor the node and its receiver processes share: the application entity and the handlers of the
associations both serve (policy, C-ECHO, C-STORE), so that a receiver negotiates and stores exactly as the node."""
from __future__ import annotations

from typing import Any

from pynetdicom import AE, evt

from config.settings import Settings
from dicom_node.handlers import (
    NO_DELAY,
    Services,
    handle_accepted,
    handle_echo,
    handle_pdu_received,
    handle_requested,
    handle_store,
)
from dicom_node.sop_classes import IMAGE_STORAGE, QUERY_RETRIEVE, REPORT_STORAGE, TRANSFER_SYNTAXES, UNCOMPRESSED, VERIFICATION
from dicom_node.upper_layer import WaitingAE
from dicom_node.watchdog import AssociationWatchdog


def build_ae(settings: Settings) -> AE:
    node = settings.node
    ae = WaitingAE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.require_called_aet = True  # handle_requested sets the acceptor title to the one called, if ours
    for sop_class in (*IMAGE_STORAGE, *REPORT_STORAGE):
        # SCP role to receive; SCU role too, so C-GET can send back on the requestor's association
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in (VERIFICATION, *QUERY_RETRIEVE):
        ae.add_supported_context(sop_class, UNCOMPRESSED)
    return ae


def storage_handlers(services: Services, watchdog: AssociationWatchdog) -> list[tuple[Any, ...]]:
    """The event handlers of every association accepted, by the node or a receiver: TCP_NODELAY, the association
    policy, C-ECHO, C-STORE and the watchdog."""
    return [
        *NO_DELAY,
        (evt.EVT_REQUESTED, handle_requested, [services]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_PDU_RECV, handle_pdu_received),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services]),
        *watchdog.handlers(),
    ]
