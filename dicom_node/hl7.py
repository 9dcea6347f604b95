"""Reports from the RIS: HL7 v2 ORU^R01 over MLLP, answered with an ACK, or a NAK with the reason.

The report text (OBX text: findings and impression) enters the catalog like an SR's text; it is joined to its
study by Study Instance UID (ZDS-1, or an OBX naming it) or by Accession Number (OBR-3 or OBR-18), and held
until the study arrives when it is not here yet. Errors become NAKs in one place: ``handle_message``.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
import socketserver
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import hl7

from config.settings import Hl7Settings
from dicom_node.errors import NodeError
from dicom_node.handlers import host_addresses
from dicom_node.server_thread import ServerThread
from dicom_node.storage import check_uid
from indexer.catalog import Catalog, ReportAttrs

LOG = logging.getLogger(__name__)

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
TEXT_TYPES = {"TX", "FT", "ST"}
# OBX-3 codes and names of the sections wanted (LOINC findings / impression, and the common GDT/IMP suffixes).
WANTED_CODES = {"59776-5", "19005-8", "18782-3", "GDT", "IMP", "&GDT", "&IMP"}
WANTED_WORDS = ("finding", "impression", "conclusion")
STUDY_UID_CODES = {"113014", "110180"}  # DCM: "DICOM Study", "Study Instance UID"


class Hl7Error(NodeError):
    """A message the node cannot use; ``code`` is the MSA-1 answer (AE: fix the content, AR: rejected)."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True)
class OruReport:
    control_id: str
    study_uid: str
    accession_number: str
    report_time: str
    text: str


def _field(segment: hl7.Segment, index: int) -> str:
    """The first component of field ``index`` of ``segment`` (empty when absent)."""
    try:
        value = segment(index)
    except (IndexError, KeyError):
        return ""
    while isinstance(value, list) and value:
        value = value[0]
    return str(value or "").strip()


def _segments(message: hl7.Message, name: str) -> list[hl7.Segment]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


def hl7_time(value: str) -> str:
    """YYYYMMDDHHMMSS[.ffff] from an HL7 DTM (time zone dropped); empty when not a timestamp."""
    match = re.fullmatch(r"(\d{4,14})(\.\d{1,6})?([+-]\d{4})?", value)
    if match is None:
        return ""
    return match.group(1).ljust(14, "0") + (match.group(2) or "")


def _obx_text(message: hl7.Message, obx: hl7.Segment) -> str:
    """OBX-5 text: repetitions are lines, HL7 escapes (\\.br\\, \\F\\, ...) decoded."""
    try:
        raw = str(obx(5))
    except (IndexError, KeyError):
        return ""
    lines = [message.unescape(line) for line in raw.split(message.separators[2])]
    return "\n".join(part.strip() for line in lines for part in line.splitlines() if part.strip())


def _is_wanted(obx: hl7.Segment) -> bool:
    try:
        code = obx(3)(1)
    except (IndexError, KeyError):
        return False
    parts = [str(part).strip() for part in code] if isinstance(code, list) else [str(code)]
    identifier, name = (parts + ["", ""])[:2]
    return identifier.upper() in WANTED_CODES or any(word in name.lower() for word in WANTED_WORDS)


def _study_uid(message: hl7.Message) -> str:
    """ZDS-1, else an OBX whose OBX-3 names the Study Instance UID."""
    for zds in _segments(message, "ZDS"):
        if value := _field(zds, 1):
            return value
    for obx in _segments(message, "OBX"):
        code = _field(obx, 3)
        try:
            name = str(obx(3)(1)(2)).lower()
        except (IndexError, KeyError, TypeError):
            name = ""
        if code in STUDY_UID_CODES or "study instance uid" in name:
            return _field(obx, 5)
    return ""


def parse_oru(text: str, accession_field: str) -> tuple[hl7.Message, OruReport]:
    """Parse and check an ORU^R01; raises Hl7Error with the reason it cannot be used."""
    try:
        message = hl7.parse(text)
        msh = message.segment("MSH")
    except Exception:  # the parser raises many types on bad input
        raise Hl7Error("AR", "not an HL7 v2 message (no parsable MSH segment)") from None
    message_type = f"{_field(msh, 9)}^{str(msh(9)(1)(2)) if len(msh) > 9 else ''}".strip("^")
    if message_type != "ORU^R01":
        raise Hl7Error("AR", f"unsupported message type {message_type or '(empty)'}: only ORU^R01 is accepted")
    control_id = _field(msh, 10)
    if not control_id:
        raise Hl7Error("AR", "MSH-10 (message control id) is empty")
    obrs = _segments(message, "OBR")
    if not obrs:
        raise Hl7Error("AE", "no OBR segment")
    obr = obrs[0]
    accession = _field(obr, 3 if accession_field == "OBR-3" else 18)[:16]
    study_uid = _study_uid(message)
    if study_uid:
        try:
            study_uid = check_uid(study_uid, "Study Instance UID")
        except ValueError as error:
            raise Hl7Error("AE", str(error)) from None
    if not (study_uid or accession):
        raise Hl7Error("AE", f"neither a Study Instance UID (ZDS-1) nor an Accession Number ({accession_field})")
    texts = [(obx, _obx_text(message, obx)) for obx in _segments(message, "OBX") if _field(obx, 2) in TEXT_TYPES]
    texts = [(obx, text) for obx, text in texts if text.strip()]
    chosen = [text for obx, text in texts if _is_wanted(obx)] or [text for _, text in texts]
    if not chosen:
        raise Hl7Error("AE", "no report text (OBX of type TX, FT or ST)")
    report_time = next((t for t in (hl7_time(_field(obr, 22)), hl7_time(_field(obr, 7)), hl7_time(_field(msh, 7)))
                        if t), datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S.%f"))
    return message, OruReport(control_id, study_uid, accession, report_time, "\n".join(chosen))


def _nak_without_message(code: str, reason: str) -> str:
    """An ACK for input too broken to answer from its own MSH."""
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"MSH|^~\\&|MMDL_NODE||||{now}||ACK|{now}|P|2.5\rMSA|{code}||{_clean(reason)}\r"


def _clean(reason: str) -> str:
    """The reason as HL7 text: delimiters escaped (\\F\\, \\S\\, ...), one line, at most 200 characters."""
    escapes = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\", "\r": " ", "\n": " "}
    return "".join(escapes.get(char, char) for char in reason[:200])


def acknowledgement(message: hl7.Message | None, code: str, reason: str = "") -> str:
    """MSA-1 ``code`` (AA, AE, AR); for a NAK the reason goes in MSA-3 and ERR."""
    if message is None:
        return _nak_without_message(code, reason)
    try:
        ack = message.create_ack(code, application="MMDL_NODE")
    except Exception:
        return _nak_without_message(code, reason)
    text = str(ack)
    if code != "AA":
        text = text.rstrip("\r") + f"|{_clean(reason)}\rERR|||207^Application internal error^HL70357|E||||{_clean(reason)}\r"
    return text


def _try_parse(text: str) -> hl7.Message | None:
    try:
        message = hl7.parse(text)
        message.segment("MSH")
        return message
    except Exception:
        return None


def handle_message(text: str, catalog: Catalog, accession_field: str) -> tuple[str, str]:
    """The whole answer to one message, (MSA-1 code, ACK text): store its report and ACK, or NAK with the reason."""
    try:
        message, oru = parse_oru(text, accession_field)
    except Hl7Error as error:
        LOG.warning("HL7 message refused with %s: %s", error.code, error.reason)
        return error.code, acknowledgement(_try_parse(text), error.code, error.reason)
    except Exception as error:  # the hl7 library can fail in many ways on hostile input
        reason = f"the message cannot be parsed ({type(error).__name__})"
        LOG.warning("HL7 message refused with AR: %s", reason)
        return "AR", acknowledgement(_try_parse(text), "AR", reason)
    try:
        outcome = catalog.add_report(oru.study_uid, oru.accession_number, f"hl7:{oru.control_id}",
                                     ReportAttrs(text=oru.text, report_time=oru.report_time, source="hl7"))
    except Exception as error:  # the catalog failed: the sender should try again later
        LOG.error("HL7 message %s not stored: %s", oru.control_id, type(error).__name__)
        return "AR", acknowledgement(message, "AR", f"cannot store the report now ({type(error).__name__})")
    LOG.info("HL7 report %s for study %s: %s", oru.control_id, oru.study_uid or "(by accession)", outcome.value)
    return "AA", acknowledgement(message, "AA")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class SourceFilter:
    """Which peers may connect: those in ``hl7.allowed_hosts`` (addresses, CIDR networks, host names resolved
    once, at start), or loopback peers only when the list is empty."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed_hosts:
            try:
                self.networks.append(ipaddress.ip_network(entry))
                continue
            except ValueError:  # a host name
                pass
            addresses = [ipaddress.ip_network(a) for a in host_addresses(entry) if a != entry]
            if not addresses:
                LOG.error("hl7.allowed_hosts: host name %s does not resolve; it admits nobody", entry)
            self.networks.extend(addresses)
        self.loopback_only = not allowed_hosts

    def admits(self, address: str) -> bool:
        peer = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        if self.loopback_only:
            return peer.is_loopback
        return any(peer in network for network in self.networks)


class _MllpHandler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        """Serve one connection, over TLS when configured (the handshake runs here, not in the accept loop)."""
        sock: socket.socket = self.request
        sock.settimeout(self.server.timeout_s)
        context = self.server.ssl_context
        if context is None:
            self._serve(sock)
            return
        try:
            secured = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            LOG.warning("HL7 connection from %s closed: TLS handshake failed (%s)", self.client_address[0],
                        getattr(error, "reason", None) or type(error).__name__)
            return
        with secured:
            self._serve(secured)

    def _serve(self, sock: socket.socket) -> None:
        """Read MLLP frames and answer each; a frame over the size limit closes the connection."""
        buffer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while END_BLOCK in buffer:
                frame, buffer = buffer.split(END_BLOCK, 1)
                start = frame.find(START_BLOCK)
                answer = self.server.answer(_decode(frame[start + 1:])) if start >= 0 else \
                    self.server.answer("")
                sock.sendall(START_BLOCK + answer.encode("utf-8") + END_BLOCK)
            if len(buffer) > self.server.max_bytes:
                LOG.warning("MLLP connection from %s closed: message over %d bytes", self.client_address[0],
                            self.server.max_bytes)
                return


class MllpServer(socketserver.ThreadingTCPServer):
    """A threaded MLLP listener; ``answer`` turns one message into its ACK. Peers ``sources`` does not admit
    are closed before anything is read from them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], answer: Callable[[str], str], max_bytes: int,
                 timeout_s: float, sources: SourceFilter, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.sources = sources
        self.ssl_context = ssl_context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _MllpHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.sources.admits(client_address[0]):
            return True
        LOG.warning("HL7 connection from %s refused: not in hl7.allowed_hosts", client_address[0])
        return False


class Hl7Listener(ServerThread):
    """The MLLP server, served from a thread; ``ssl_context`` (from ``hl7.tls``) makes it MLLP over TLS."""

    server: MllpServer

    def __init__(self, settings: Hl7Settings, catalog: Catalog, timeout_s: float,
                 count: Callable[[str], None] = lambda code: None, ssl_context: ssl.SSLContext | None = None) -> None:
        def answer(text: str) -> str:
            code, ack = handle_message(text, catalog, settings.accession_field)
            count(code)
            return ack

        super().__init__(MllpServer((settings.host, settings.port), answer, settings.max_message_kb * 1024, timeout_s,
                                    SourceFilter(settings.allowed_hosts), ssl_context), "mllp")

    def start(self) -> None:
        super().start()
        LOG.info("HL7 MLLP listener on %s port %d%s", self.host, self.port, " (TLS)" if self.server.ssl_context else "")
