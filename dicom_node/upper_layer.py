"""pynetdicom's acceptor, waiting on its socket instead of polling it.

pynetdicom 3.0 runs two threads per association, and both poll: the upper layer (DUL) reactor sleeps
1 ms whenever a loop found nothing to do, and the association reactor sleeps 1 ms on every loop, so each
message crossing an association waits up to a millisecond per thread it passes, and an idle association
costs two threads waking a thousand times a second each. Socket reads are at most 4 KiB per `recv`.

Subclasses here, used only for the associations the node accepts (through pynetdicom's documented
`AE.make_server(..., request_handler=...)`; the installed package is neither edited nor patched):

- `WaitingDUL` waits in `select` on the peer's socket and on a wake-up socket that every primitive handed
  to it (a response to send, a release, an abort, a stop) rings, and it tells the association reactor
  whenever its state machine moved; once the association is established, it reads P-DATA-TF PDUs itself
  (`StoreReceiving`): C-STORE requests are written to their files and served right there;
- `WaitingAssociation` runs pynetdicom's acceptor reactor loop, waiting on that signal instead of sleeping,
  and sends its messages through `dicom_node.command_sets.EncodingDIMSE`;
- `LargeReadSocket` reads a PDU in as few `recv_into` calls as the kernel allows, into one buffer;
- `WaitingRequestHandler` builds them for each accepted connection, unless the server hands the connection to
  another process first (`WaitingServer.hand_off`, `dicom_node.receivers`);
- `WaitingServer` accepts without pynetdicom's forced `gc.collect()`, and `WaitingAE` starts its servers
  as `WaitingServer`s with `WaitingRequestHandler`;
- `HandedServer`, in a receiver process, serves the connections handed to it, listening nowhere.

Timers (ARTIM, network idle) are checked at least every `TIMER_CHECK_S`. The waiting reactors, made in
pynetdicom itself, are `docs/pynetdicom-event-driven-reactors.patch`; `StoreReceiving` is the node's own.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.command_sets import EncodingDIMSE, file_header
from indexer.durable import start_write_back

LOG = logging.getLogger(__name__)

# How often, at the longest, the reactors look at their timers (ARTIM, network idle, DIMSE).
TIMER_CHECK_S = 0.1
# How much of a data set arrives between two requests to the kernel to start writing it to disk (`StoreReceiving`).
WRITE_BACK_BYTES = 1 << 20

_P_DATA_TF = 0x04
_COMMAND, _LAST = 0x01, 0x02  # message control header bits of a PDV (PS3.8 E.2)
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101


class StoreReceiving:
    """The C-STORE requests of an established association, read by its upper layer reactor (`WaitingDUL`) itself.

    pynetdicom turns each PDU into objects, events, a state machine action and a DIMSE fragment decode (flushing
    the file after each fragment), then hands the whole message to the association's thread: ~4 ms of CPU per
    0.5 MB C-STORE before the handler runs. Here, a P-DATA-TF whose first value is the whole command set of a
    C-STORE request (as every toolkit sends it) is read in this thread: the command set is decoded once, the
    data set written to its file (preamble and file meta as pynetdicom writes them) as it arrives, and the
    request served right away, still in this thread, by pynetdicom's own Storage SCP
    (`Association._serve_request`): the handler bound to EVT_C_STORE, its status checked, the response sent
    through the DIMSE provider. Every other P-DATA-TF (a C-ECHO, a C-FIND, a C-STORE response of a C-GET, a
    command set cut in two) takes pynetdicom's path whole, as do malformed ones, those naming a presentation
    context not accepted, and every PDU before the association is established or on a TLS connection. A value
    that follows the end of a C-STORE in the same PDU is given to pynetdicom's DIMSE provider as its state
    machine would give it (action DT-2).

    While a C-STORE is served here the reactor reads nothing else: an abort from another thread (the watchdog,
    a stop) takes effect when the store ends. A peer that sends a request before the previous one is answered
    (the node negotiates no asynchronous operations window) may have a C-STORE served here while the association's
    thread serves the other one."""

    def __init__(self, dul: WaitingDUL) -> None:
        self.dul = dul
        self._store: C_STORE_RQ | None = None  # the C-STORE request whose data set is arriving
        self._not_written_back = 0  # bytes of its data set written to the file since write-back was last started

    def takes_next_pdu(self) -> bool:
        """Whether the PDU waiting in the socket is a P-DATA-TF of an established association, read here."""
        dul = self.dul
        sock = dul.socket.socket if dul.socket is not None else None
        if dul.state_machine.current_state != "Sta6" or sock is None or isinstance(sock, ssl.SSLSocket):
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == bytes((_P_DATA_TF,))
        except OSError:  # pynetdicom's read sees the same and ends the association
            return False

    def read_pdu(self) -> None:
        """Read one P-DATA-TF; act on its presentation data values here, or hand it to pynetdicom's path."""
        dul = self.dul
        transport = cast(AssociationSocket, dul.socket)
        try:
            header = transport.recv(6)  # a bytearray: header + body is one too, as pynetdicom decodes it
            length = struct.unpack_from(">L", header, 2)[0] if len(header) == 6 else -1
            body = transport.recv(length) if length >= 0 else b""
        except OSError:  # reset, or the network timeout
            body, length = b"", -1
        if len(body) != length:
            LOG.error("the connection closed before a whole PDU was received")
            dul.event_queue.put("Evt17")  # transport connection closed
            return
        values = self._values(body)
        if (values is None or any(context_id not in dul.assoc._accepted_cx for context_id, _, _ in values)
                or (self._store is None and not _starts_store(*values[0][1:]))):
            self._deliver(header + body)
            return
        for context_id, control, value in values:
            if self._store is None:
                if _starts_store(control, value):
                    self._start_store(context_id, value)
                else:
                    self._forward(context_id, control, value)
            elif control & _COMMAND:
                LOG.warning("a command set arrived before the data set of the C-STORE request before it ended")
                dul.event_queue.put("Evt19")  # invalid PDU: A-P-ABORT (the partial file is left to housekeeping)
            else:
                self._write(value)
                if control & _LAST:
                    self._serve_store()
            if not dul.event_queue.empty():  # an error event (17, 19), here or in pynetdicom: the rest is dropped
                return

    def _deliver(self, pdu_data: bytearray) -> None:
        """A P-DATA-TF as pynetdicom's reactor delivers it: decoded, its events triggered, its state machine action
        run (the node's EVT_PDU_RECV handler aborts an association sending data on a context not accepted)."""
        dul = self.dul
        try:
            pdu, event = dul._decode_pdu(pdu_data)
        except Exception:  # noqa: BLE001 (as pynetdicom: an undecodable PDU is event 19, the association aborted)
            LOG.error("a received P-DATA-TF PDU cannot be decoded")
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    @staticmethod
    def _values(body: bytes) -> list[tuple[int, int, memoryview]] | None:
        """(context ID, message control header, fragment) of each PDV item of a P-DATA-TF's ``body``; None when
        the items do not fill it exactly, or there are none."""
        values, offset, view = [], 0, memoryview(body)
        while offset < len(body):
            if offset + 6 > len(body):
                return None
            length, context_id, control = struct.unpack_from(">LBB", body, offset)
            end = offset + 4 + length
            if length < 2 or end > len(body):
                return None
            values.append((context_id, control, view[offset + 6:end]))
            offset = end
        return values or None

    def _write(self, fragment: memoryview) -> None:
        """Append a fragment of the data set to its file; every `WRITE_BACK_BYTES` the kernel is asked to start
        writing what has arrived to disk, so that the fsync before the answer waits for the last part only."""
        handle = cast(Any, cast(C_STORE_RQ, self._store)._data_set_file)
        handle.write(fragment)
        self._not_written_back += len(fragment)
        if self._not_written_back >= WRITE_BACK_BYTES:
            handle.flush()
            start_write_back(handle.fileno())
            self._not_written_back = 0

    def _start_store(self, context_id: int, encoded: memoryview) -> None:
        """Open the file of a C-STORE request's data set, or give the request to pynetdicom when the node does not
        take its command set or its SOP class is not a storage class (pynetdicom then judges it)."""
        try:
            command = decode(BytesIO(encoded), True, True)
            if not issubclass(uid_to_service_class(command.AffectedSOPClassUID), StorageServiceClass):
                raise ValueError("not a storage SOP class")  # pynetdicom answers it (it aborts the association)
            syntax = self.dul.assoc._accepted_cx[context_id].transfer_syntax[0]
            header = file_header(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, syntax)
        except Exception:  # noqa: BLE001
            self._forward(context_id, _COMMAND | _LAST, encoded)
            return
        message = C_STORE_RQ()
        message.context_id = context_id
        message.command_set = command
        handle = NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # as pynetdicom: in tempfile's folder
        handle.write(header)
        message._data_set_file, message._data_set_path = cast(Any, handle), Path(handle.name)
        self._store, self._not_written_back = message, 0

    def _serve_store(self) -> None:
        message, self._store = cast(C_STORE_RQ, self._store), None
        cast(Any, message._data_set_file).close()
        assoc = self.dul.assoc
        evt.trigger(assoc, evt.EVT_DIMSE_RECV, {"message": message})
        try:
            request = message.message_to_primitive()
        except Exception:  # noqa: BLE001 (pynetdicom's receive ends the association the same way)
            LOG.exception("received an invalid C-STORE request")
            self.dul.event_queue.put("Evt19")
            return
        if self._established():
            assoc._serve_request(request, cast(int, message.context_id))
        else:  # aborted meanwhile: not served, as pynetdicom serves no request after an abort
            cast(Path, message._data_set_path).unlink(missing_ok=True)

    def _established(self) -> bool:
        """Whether the association is established, once its thread has marked it so: that thread does it just after
        the A-ASSOCIATE-AC is queued, and a peer may send its first request before that. False once it is being
        aborted or killed (pynetdicom then serves no more requests)."""
        assoc = self.dul.assoc
        deadline = time.monotonic() + (assoc.acse_timeout or 30)
        while not assoc.is_established and time.monotonic() < deadline:
            if assoc._kill or assoc._sent_abort or assoc.is_aborted:
                return False
            time.sleep(0.001)
        return bool(assoc.is_established)

    def _forward(self, context_id: int, control: int, value: memoryview) -> None:
        """Give the fragment to pynetdicom's DIMSE provider (what action DT-2 does) and wake the association."""
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, bytes((control,)) + bytes(value)]]
        self.dul.assoc.dimse.receive_primitive(primitive)
        self.dul.moved.set()


def _starts_store(control: int, value: memoryview) -> bool:
    """Whether a PDV is a whole command set (Implicit VR Little Endian, PS3.7 6.3.1) of a C-STORE request with a
    data set; read without decoding it, so that the other messages go to pynetdicom at no cost."""
    if control & (_COMMAND | _LAST) != _COMMAND | _LAST:
        return False
    field = data_set = None
    offset = 0
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, offset)
        if group != 0x0000:
            return False
        if length == 2 and element in (0x0100, 0x0800) and offset + 10 <= len(value):
            number = struct.unpack_from("<H", value, offset + 8)[0]
            field, data_set = (number, data_set) if element == 0x0100 else (field, number)
        offset += 8 + length
    return field == _C_STORE_RQ and data_set not in (None, _NO_DATA_SET)


class WaitingDUL(DULServiceProvider):
    """The DICOM upper layer reactor of pynetdicom, waiting on its socket and a wake-up socket instead of
    sleeping 1 ms per idle loop. `moved` is set each time the state machine acts (and when the reactor
    ends), for the association reactor to wait on."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.moved = threading.Event()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)  # this thread rings itself too (a response sent by StoreReceiving)
        self.store_receiving = StoreReceiving(self)

    def _read_pdu_data(self) -> None:
        if self.store_receiving.takes_next_pdu():
            self.store_receiving.read_pdu()
        else:
            super()._read_pdu_data()

    def wake(self) -> None:
        """Make the reactor look at its queues now."""
        try:
            self._wake_send.send(b"\0")
        except (BlockingIOError, OSError):  # already ringing, or the reactor has ended
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if the state machine is idle (Sta1); wait for it to end."""
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        if threading.current_thread() is not self:
            self.join()
        return True

    def _wait(self) -> None:
        """Block until the peer sent something, a primitive was handed in, or a timer may have expired."""
        peer = self.socket.socket if self.socket is not None else None
        waiting_on: list[Any] = [self._wake_recv] if peer is None else [self._wake_recv, peer]
        try:
            select.select(waiting_on, [], [], TIMER_CHECK_S)
        except (OSError, ValueError):  # the peer's socket was closed meanwhile: look at the queues again
            return
        try:
            while self._wake_recv.recv(4096):
                pass
        except BlockingIOError:
            pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (one primitive sent or one PDU received, then one state machine event),
        waiting in `_wait` where it would sleep."""
        self._idle_timer.start()
        busy = True
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if not busy:
                    self._wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if not self._process_recv_primitive() and self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    self._abort_on_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    busy = False
                    continue
                self.state_machine.do_action(event)
                self.moved.set()
                busy = True
        finally:
            self.moved.set()
            self._wake_recv.close()
            self._wake_send.close()

    def _abort_on_error(self) -> None:
        """An error in the reactor: send an A-ABORT past the state machine (whose state is then unknown)
        and end both reactors, as pynetdicom does."""
        LOG.exception("error in the upper layer reactor, aborting the association")
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        try:
            self.socket.send(pdu.encode())
        except OSError:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class WaitingAssociation(Association):
    """An acceptor association whose reactor waits for its upper layer to move instead of sleeping 1 ms
    per loop; otherwise pynetdicom's acceptor reactor, step for step."""

    dul: WaitingDUL

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = WaitingDUL(self)
        self.dimse = EncodingDIMSE(self)
        # Association's timeout setters configure the upper layer's timers: configure the new one's.
        self.acse_timeout, self.network_timeout = self.acse_timeout, self.network_timeout

    def run(self) -> None:
        try:
            super().run()
        finally:  # the association has ended: tell a server that counts its connections (a receiver's HandedServer)
            server = self._server
            if isinstance(server, WaitingServer) and server.connection_done is not None:
                server.connection_done()

    def _abort_blocking(self, block: bool = True) -> None:
        """pynetdicom's abort, which never waits from the upper layer's own thread (a C-STORE served there by
        `StoreReceiving`, aborted by pynetdicom's service code): that thread would wait for itself to stop. It
        queues the A-ABORT and returns, as an abort from an event handler does."""
        super()._abort_blocking(block and threading.current_thread() is not self.dul)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self.dul.moved.wait(TIMER_CHECK_S)
            self.dul.moved.clear()
            # Paused while a local send_*() or release() of this association uses the upper layer.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            while True:  # every message already decoded, before looking at the association's state
                context_id, message = self.dimse.get_msg(block=False)
                if message is None:
                    break
                self._serve_request(message, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.warning("network timeout: aborting the association")
                self.abort()
                self.kill()
                return


class LargeReadSocket(AssociationSocket):
    """Reads what was asked for into one buffer, as much per `recv_into` as the kernel has (pynetdicom
    reads at most 4 KiB per `recv`, a 1 MiB PDU in 256 system calls)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        data = bytearray(nr_bytes)
        read = 0
        with memoryview(data) as view:
            while read < nr_bytes:
                got = sock.recv_into(view[read:])
                if not got:  # the peer closed: what was read so far
                    break
                read += got
        del data[read:]
        return data


class WaitingRequestHandler(RequestHandler):
    """Builds a `WaitingAssociation` on a `LargeReadSocket` for each accepted connection, configured as
    pynetdicom configures its own acceptors (titles, limits, contexts, the server's event handlers), except that
    the server's presentation contexts are shared rather than deep-copied (~1.5 ms per association): pynetdicom's
    negotiation only reads them, and the node's EVT_REQUESTED handler replaces a context it changes
    (`dicom_node.retrieve.prefer_stored_syntax`)."""

    server: WaitingServer

    def handle(self) -> None:
        """Serve the connection here, unless the server hands it to another process."""
        if self.server.hand_off is None or not self.server.hand_off(self.request):
            super().handle()

    def _create_association(self) -> Association:
        ae, server = self.ae, self.server
        assoc = WaitingAssociation(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(LargeReadSocket(assoc, client_socket=self.request))
        local = assoc.acceptor
        local.maximum_length = ae.maximum_pdu_size
        local.ae_title = server.ae_title
        local.address_info = self.local
        local.implementation_class_uid = ae.implementation_class_uid
        local.implementation_version_name = ae.implementation_version_name
        local.supported_contexts = list(server.contexts)  # shared: negotiation only reads them
        assoc.requestor.address_info = self.remote
        for event in server.get_events():
            bound = server.get_handlers(event)  # intervention: (handler, args); notification: a list of them
            for handler, args in [bound] if event.is_intervention else bound:
                if handler is not None:
                    assoc.bind(event, handler, args)
        return assoc


class WaitingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server without its forced garbage collection: `service_actions` runs
    `gc.collect()` every 60th accepted connection or half-second poll, a full collection that holds the
    GIL for tens to hundreds of milliseconds with an index and a catalog in memory, stalling every
    association of the process. Python's own collector still collects what associations leave behind.

    ``hand_off``, when set, is offered each accepted connection first; when it returns True it has taken the
    connection (`dicom_node.receivers`). ``connection_done``, when set, is called once per connection served here
    when the server is done with it (its association's thread ends)."""

    hand_off: Callable[[socket.socket], bool] | None = None
    connection_done: Callable[[], None] | None = None

    def service_actions(self) -> None:
        pass


class HandedServer(WaitingServer):
    """A server of connections another process accepted and handed over (`dicom_node.receivers`): it listens
    nowhere; ``process_request`` serves each connection handed to it, as a listening server serves those it
    accepts."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection handed over: its association's thread is started right here (a listening server
        starts a thread to do that). A connection no association could be made for is closed and done."""
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 (as pynetdicom's threaded server: logged, the connection closed)
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            if self.connection_done is not None:
                self.connection_done()


class WaitingAE(AE):
    """An AE whose servers are `WaitingServer`s serving with `WaitingRequestHandler` (`start_server` builds them
    through `make_server`, asking for pynetdicom's class), or the `WaitingServer` subclass asked for."""

    def make_server(self, *args: Any, server_class: type | None = None, **kwargs: Any) -> Any:
        if server_class is None or not issubclass(server_class, WaitingServer):
            server_class = WaitingServer
        kwargs.setdefault("request_handler", WaitingRequestHandler)
        return super().make_server(*args, server_class=server_class, **kwargs)
