"""Receiver processes: storage associations received on every core.

pynetdicom serves each association with threads of one interpreter, so however many associations a PACS opens, one
process receives on one core at a time (the GIL). With ``[node] receivers = N`` the node starts N receiver processes
(``python -m dicom_node.receivers``). The node still accepts every connection on its DICOM port. Before pynetdicom
reads anything, it peeks at the association request (``MSG_PEEK``: the bytes stay in the socket) and hands the
connection itself to a receiver (``SCM_RIGHTS`` over a Unix socket) when a receiver serves that association exactly
as the node would: it calls the node's AE title (not the similar-case one) and proposes no query/retrieve SOP class,
as a PACS forwarding studies does. The receiver reads the request and negotiates it as the node does: the same
settings, AE and policy (calling AE titles, peer hosts, disk watermark) and the same C-ECHO and C-STORE handlers
(`dicom_node.acceptor`), into the same store and catalog. Everything else stays in the node's process: similar-case
and catalog queries, retrieves, HL7, the web, the index and the embedding job.

A receiver tells the node, over the same Unix socket, what it stored and refused (the node's Prometheus counters) and
each new (SOP class, transfer syntax) pair it holds (C-GET negotiation). It is killed when the node dies. The node
hands connections only to receivers that said they are ready; one that exits is left out, and with none left the
node serves every association itself. A hand-off never waits: while a receiver has not taken the 6 connections
already handed to it (it is stalled or stopped), the next receiver or the node serves the association.
``max_associations`` is the node's limit, its receivers' associations included (those 6 too, until the receiver
closes them): a receiver reports each connection it is done with, and the node hands none over once the limit is
reached (it refuses the association itself).
"""
from __future__ import annotations

import array
import gc
import itertools
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ

from config.settings import MAX_ASSOCIATIONS, Settings
from dicom_node.acceptor import build_ae, storage_handlers
from dicom_node.handlers import Services
from dicom_node.ingest import Ingestor
from dicom_node.metrics import Metrics
from dicom_node.process import configure_process
from dicom_node.retrieve import HeldSyntaxes
from dicom_node.sop_classes import QUERY_RETRIEVE
from dicom_node.storage import FileStore
from dicom_node.upper_layer import HandedServer
from dicom_node.watchdog import AssociationWatchdog
from indexer.catalog import Catalog
from indexer.children import die_with

LOG = logging.getLogger(__name__)

_A_ASSOCIATE_RQ = 0x01
_LARGEST_REQUEST = 1 << 20  # an association request longer than this is left to the node (and pynetdicom)
_PEEK_RETRY_S = 0.001  # while a request has arrived in part
STOP_GRACE_S = 10.0  # how long a stopping receiver lets its associations finish before aborting them
# The node's send buffer towards a receiver, the kernel's least: 6 connections handed over and not yet taken. A
# receiver that stalls holds no more than that many, which count against max_associations until it closes them; a
# burst of new associations beyond them goes to the next receiver or the node.
_HAND_OFF_BUFFER = 2048


def associate_request(connection: socket.socket, timeout_s: float) -> A_ASSOCIATE_RQ | None:
    """The A-ASSOCIATE-RQ the peer sent first on ``connection``, decoded from a peek: its bytes stay in the socket
    for whoever serves the connection. None when the first PDU is something else, the peer closed, the request
    is not whole within ``timeout_s`` or cannot be decoded."""
    deadline = time.monotonic() + timeout_s
    wanted = 6  # the PDU header: type, reserved, length
    pause = _PEEK_RETRY_S
    poller = select.poll()
    poller.register(connection, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            data = connection.recv(wanted, socket.MSG_PEEK)
        except OSError:  # reset by the peer: pynetdicom, in the node, sees the same
            return None
        if not data or data[0] != _A_ASSOCIATE_RQ:
            return None
        if len(data) >= 6:
            wanted = 6 + struct.unpack(">L", data[2:6])[0]
            if wanted > _LARGEST_REQUEST:
                return None
            if len(data) >= wanted:
                break
        time.sleep(pause)  # poll would return at once: the part already here is still unread
        pause = min(2 * pause, 0.1)
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(data)
    except Exception:  # noqa: BLE001 (malformed: pynetdicom answers it in the node, as it would without receivers)
        return None
    return request


def receiver_serves(request: A_ASSOCIATE_RQ, ae_title: str) -> bool:
    """Whether a receiver serves the association ``request`` asks for as the node would: one that calls the node's
    AE title and proposes no query/retrieve SOP class (what is left: storage, verification, what the node
    rejects anyway)."""
    return (request.called_ae_title.strip() == ae_title
            and not any(item.abstract_syntax in QUERY_RETRIEVE for item in request.presentation_context))


@dataclass
class _Receiver:
    process: subprocess.Popen[bytes]
    channel: socket.socket  # the node's end: connections out, reports in
    ready: bool = False
    handed: int = 0  # connections handed to it so far
    done: int = 0  # of which it reported it is done (a count, as it reported last)


class Receivers:
    """The node's receiver processes (``settings.node.receivers`` of them) and the hand-off of connections to them;
    what they report goes into ``metrics`` and ``held``. ``associations`` counts the node's acceptor associations,
    its receivers' (``serving``) included: no connection is handed over once it reaches ``max_associations``."""

    def __init__(self, settings: Settings, metrics: Metrics, held: HeldSyntaxes,
                 associations: Callable[[], int]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.held = held
        self.associations = associations
        self._receivers: list[_Receiver] = []
        self._turn = itertools.count()
        self._stopping = False
        self._handing = threading.Lock()

    def ready(self) -> list[int]:
        """The process IDs of the receivers taking connections."""
        return [receiver.process.pid for receiver in self._receivers if receiver.ready]

    @property
    def handed(self) -> int:
        """How many connections were handed to a receiver so far."""
        return sum(receiver.handed for receiver in self._receivers)

    def serving(self) -> int:
        """How many of the connections handed over the receivers are serving or have not taken yet."""
        return sum(receiver.handed - receiver.done for receiver in self._receivers)

    def start(self) -> None:
        """Start the receivers; each takes connections once it said it is ready. A receiver is killed when the
        thread that started it ends (Linux's parent-death signal follows the thread): the node starts them from
        the thread that starts it, which serves until the node stops."""
        configuration = self.settings.model_dump_json().encode()
        for _ in range(self.settings.node.receivers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _HAND_OFF_BUFFER)
            with theirs:
                process = subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.receivers", str(theirs.fileno()), str(os.getpid())],
                    stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
            assert process.stdin is not None
            process.stdin.write(configuration)
            process.stdin.close()
            receiver = _Receiver(process, ours)
            self._receivers.append(receiver)
            threading.Thread(target=self._listen, args=(receiver,), name=f"receiver-{process.pid}",
                             daemon=True).start()

    def _listen(self, receiver: _Receiver) -> None:
        """Apply what ``receiver`` reports, until it exits."""
        while True:
            try:
                message = receiver.channel.recv(4096)
            except OSError:
                message = b""
            if not message:
                break
            report: dict[str, Any] = json.loads(message)
            if "stored" in report:
                self.metrics.stored(*report["stored"])
            elif "failed" in report:
                self.metrics.failed(report["failed"])
            elif "held" in report:
                self.held.add(*report["held"])
            elif "done" in report:  # reports sent by several threads may arrive out of order
                receiver.done = max(receiver.done, report["done"])
            elif "ready" in report:
                receiver.ready = True
                LOG.info("receiver process %d ready", receiver.process.pid)
        if not self._stopping:
            self.metrics.failed("receiver_exit")
            LOG.error("receiver process %d exited (code %s); the node serves its share of associations",
                      receiver.process.pid, receiver.process.wait())
        with self._handing:  # not in the middle of a hand-off to it
            receiver.ready = False
            receiver.done = receiver.handed  # its connections closed with it

    def hand_off(self, connection: socket.socket) -> bool:
        """Hand ``connection``, just accepted, to a ready receiver if one serves the association it requests; True
        when one took it (the node's copy is closed), False to serve it here."""
        if not self.ready():
            return False
        request = associate_request(connection, self.settings.node.acse_timeout_s)
        if request is None or not receiver_serves(request, self.settings.node.ae_title):
            return False
        with self._handing:  # one hand-off at a time: each sees the associations of those before it
            if self.associations() >= self.settings.node.max_associations:
                return False  # the node refuses it (handle_requested): its limit counts the receivers' associations
            start = next(self._turn)
            for offset in range(len(self._receivers)):
                receiver = self._receivers[(start + offset) % len(self._receivers)]
                if not receiver.ready:
                    continue
                receiver.handed += 1  # counted before it can report the connection done
                try:
                    # One packet each (SOCK_SEQPACKET), never waiting; socket.send_fds would ignore the flag
                    # (Python 3.11).
                    receiver.channel.sendmsg([b"C"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", [connection.fileno()]))], socket.MSG_DONTWAIT)
                except OSError as error:
                    receiver.handed -= 1
                    if isinstance(error, BlockingIOError):  # 6 connections wait in its channel unread: stalled
                        LOG.warning("receiver process %d is not taking the connections handed to it; serving "
                                    "elsewhere", receiver.process.pid)
                    else:  # it has just exited (its exit is logged when the node sees it)
                        LOG.warning("receiver process %d takes no connection (%s)", receiver.process.pid,
                                    error.strerror)
                        receiver.ready = False
                    continue
                connection.close()
                return True
        return False

    def stop(self) -> None:
        """Stop the receivers: each finishes its associations (``STOP_GRACE_S`` at most, then aborts them)."""
        self._stopping = True
        for receiver in self._receivers:
            receiver.ready = False
            try:  # the node's side only: what the receiver reports while it finishes is still read
                receiver.channel.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        for receiver in self._receivers:
            try:
                receiver.process.wait(STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                LOG.error("receiver process %d did not stop; killed", receiver.process.pid)
                receiver.process.kill()
                receiver.process.wait()
            receiver.channel.close()
        self._receivers.clear()


class _Reports:
    """A receiver's messages to the node, one JSON object per packet."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self._lock = threading.Lock()

    def send(self, **report: Any) -> None:
        """Send ``report``; waits while the node reads none (its process stalls while the index loads). A report
        that cannot go (the node is gone) is dropped: it must never fail the store it counts."""
        try:
            with self._lock:
                self.channel.send(json.dumps(report).encode())
        except OSError as error:
            LOG.debug("report to the node dropped (%s)", error.strerror)


class ReportedMetrics(Metrics):
    """In a receiver: the node's counters of stored and refused instances, counted by the node."""

    def __init__(self, reports: _Reports) -> None:
        super().__init__()
        self.reports = reports

    def stored(self, calling_ae: str, size: int) -> None:
        self.reports.send(stored=[calling_ae, size])

    def failed(self, reason: str) -> None:
        self.reports.send(failed=reason)


class ReportedHeldSyntaxes(HeldSyntaxes):
    """In a receiver: the pairs held, each new one also reported to the node (whose C-GET negotiation uses them)."""

    def __init__(self, pairs: list[tuple[str, str]], reports: _Reports) -> None:
        self.reports: _Reports | None = None  # the pairs read from the catalog are known to the node already
        super().__init__(pairs)
        self.reports = reports

    def add(self, sop_class: str, syntax: str) -> bool:
        new = super().add(sop_class, syntax)
        if new and self.reports is not None:
            self.reports.send(held=[sop_class, syntax])
        return new


def serve(settings: Settings, channel: socket.socket) -> None:
    """A receiver: serve each connection the node hands over on ``channel`` until the node closes it."""
    node = settings.node
    store = FileStore(node.data_dir / "storage", min_free_bytes=node.min_free_disk_mb * 2**20)
    process = configure_process(settings, store.incoming)
    catalog = Catalog(settings.catalog_url)
    reports = _Reports(channel)
    held = ReportedHeldSyntaxes(catalog.held_syntaxes(), reports)
    ingestor = Ingestor(store, catalog, held, node.data_dir / "locks")
    # No index: it stays in the node's process, and the handlers a receiver binds (storage_handlers) use none.
    services = Services(settings, catalog, store, ingestor, index=None,  # type: ignore[arg-type]
                        metrics=ReportedMetrics(reports), held=held)
    watchdog = AssociationWatchdog(node.message_timeout_s)
    ae = build_ae(settings)
    # The node keeps max_associations across its receivers, counting a connection until its thread here reports
    # it done: pynetdicom's own count here, which sees that thread a moment longer, must not refuse the next one.
    ae.maximum_associations = MAX_ASSOCIATIONS
    server = ae.make_server((node.host, node.port), evt_handlers=storage_handlers(services, watchdog),
                            server_class=HandedServer)
    done = itertools.count(1)

    def connection_done() -> None:  # the node counts the connections its receivers serve
        reports.send(done=next(done))

    server.connection_done = connection_done
    # As the node does after start-up (cli._serve): what start-up loaded, ~90,000 objects, stays out of the
    # collector's sight. A full collection walking them held this process's GIL for ~50 ms, every association here.
    gc.freeze()
    reports.send(ready=os.getpid())
    sweep_every = min(5.0, node.message_timeout_s / 4)  # the watchdog's, as the node's housekeeping job
    swept = time.monotonic()
    try:
        while True:
            # A wait, not a socket timeout: that would apply to the reports sent on the same socket too.
            if select.select([channel], [], [], sweep_every)[0]:
                message, connections, flags, _ = socket.recv_fds(channel, 16, 4)
                if not message:  # the node closed the channel: it is stopping (or has died)
                    break
                if flags & socket.MSG_CTRUNC:  # the kernel closed it: the node counts it done, as it is
                    LOG.error("a connection handed over was lost: no descriptor left in this process")
                    if not connections:  # one connection per packet
                        connection_done()
                for number in connections:
                    connection = socket.socket(fileno=number)
                    try:
                        address = connection.getpeername()
                    except OSError:  # the peer has gone already
                        connection.close()
                        connection_done()
                        continue
                    server.process_request(connection, address)
            if time.monotonic() - swept >= sweep_every:
                watchdog.sweep()
                swept = time.monotonic()
    finally:
        try:  # no more connections: the node's next hand-off fails and goes elsewhere
            channel.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in ae.active_associations:
            assoc.abort()
        server.server_close()
        catalog.close()
        process.restore()


def main(argv: list[str]) -> int:
    """``python -m dicom_node.receivers CHANNEL_FD NODE_PID``, the settings as JSON on stdin (`Receivers.start`)."""
    channel_fd, node_pid = int(argv[1]), int(argv[2])
    die_with(node_pid)
    # The node drives the stop (it closes the channel) and a receiver dies with it: a Ctrl-C or a service
    # manager's SIGTERM to the whole process group must not end a receiver mid-association on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings.model_validate_json(sys.stdin.buffer.read())
    serve(settings, socket.socket(fileno=channel_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
