"""Freshness: seconds from C-STORE success to the study being returned by a similar-case query.

Starts `mmdl-node serve` on a temporary data dir (the shipped model unless --model), sends --seed
warm-up studies and waits until they are returned (the model is loaded lazily), then sends one DX
study at a time at --rate studies/s for --duration seconds on one association, as a modality or PACS
would. Studies go in pairs (A, B) carrying the same pixels, a different image for every pair: once B
is in the index, a similar-case query on A returns B first (score ~1), so one top-1 query tells
whether B can be found. B's freshness is from its C-STORE success to the arrival of that answer. A
poller keeps one association to the similar-case title and asks, oldest first, for each B not yet
returned, stopping at the first that is not (the job embeds in arrival order); its socket has
TCP_NODELAY so its own round trips stay short, and their median is reported as the resolution.
The node's log gives the embedding runs (images per run, seconds). Prints one JSON line and a
Markdown table. Run from the repository root:

    .venv/bin/python -m bench.freshness --images ../shared/data/nih-cxr14-1000/images
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, StudyRootQueryRetrieveInformationModelFind

from bench.query import load, machine
from dicom_node.similar import MIN_SCORE, PRIVATE_CREATOR, PRIVATE_GROUP, TOP_K
from dicom_node.status import Status
from tests.dicom_node.builders import dx_from_pixels
from tests.helpers import free_port, port_open

FIND = StudyRootQueryRetrieveInformationModelFind
EMBEDDED = re.compile(r"embedded (\d+) images, \d+ reports \((\d+) failed\), \d+ studies updated in ([\d.]+) s")


def no_delay(event: evt.Event) -> None:
    """Turn Nagle's algorithm off on the poller's socket (each query would otherwise stall ~40 ms)."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def top_match(assoc: Association, study_uid: str) -> str | None:
    """The StudyInstanceUID of the most similar study to ``study_uid`` with score >= 0.99, if any."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    block = query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(TOP_K, "IS", "1")
    block.add_new(MIN_SCORE, "DS", "0.99")
    found = [str(i.StudyInstanceUID) for s, i in assoc.send_c_find(query, FIND) if s and s.Status == Status.PENDING]
    return found[0] if found else None


@dataclass
class Stream:
    """What the sender stored and the poller saw; B studies are keyed by UID, with their twin A."""

    twin: dict[str, str] = field(default_factory=dict)  # B -> A
    stored: dict[str, float] = field(default_factory=dict)  # B -> monotonic time of C-STORE success
    seen: dict[str, float] = field(default_factory=dict)  # B -> monotonic time the answer arrived
    query_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def waiting(self) -> list[tuple[str, str, float]]:
        """(B, A, stored time) of the Bs not yet returned, oldest first."""
        with self.lock:
            return [(b, self.twin[b], t) for b, t in self.stored.items() if b not in self.seen]


def poll(port: int, stream: Stream, stop: threading.Event, give_up_s: float, every_s: float) -> None:
    """Every ``every_s``, ask for the waiting Bs, oldest first, until ``stop`` and nothing waits (or too long)."""
    ae = AE("BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR", evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    try:
        while True:
            waiting = stream.waiting()
            now = time.monotonic()
            if stop.is_set() and all(now - t > give_up_s for _, _, t in waiting):
                return
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR",
                                     evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
            for b, a, stored in waiting:
                start = time.monotonic()
                found = top_match(assoc, a)
                stream.query_s.append(time.monotonic() - start)
                if found == b:
                    with stream.lock:
                        stream.seen[b] = time.monotonic()
                elif time.monotonic() - stored < give_up_s:
                    break  # the job embeds in arrival order: later ones are not in yet either
            time.sleep(every_s)
    finally:
        if assoc.is_established:
            assoc.release()


def send_pair(assoc: Association, pixels: np.ndarray, tag: str) -> tuple[str, str, float, float]:
    """Store A then B with the same pixels; their UIDs and the times of the two successes (0 if refused)."""
    times = []
    uids = []
    for part in "AB":
        uid = generate_uid()
        status = assoc.send_c_store(dx_from_pixels(pixels, uid, f"{tag}{part}", f"{tag}{part}"))
        times.append(time.monotonic() if status and status.Status == Status.SUCCESS else 0.0)
        uids.append(uid)
    return uids[0], uids[1], times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of PNG chest X-rays to send")
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=4, help="warm-up pairs, sent and returned before timing")
    parser.add_argument("--rate", type=float, default=5.0, help="studies (images) per second")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the steady stream")
    parser.add_argument("--interval-s", type=float, help="the node's scheduler.interval_s (default: its own)")
    parser.add_argument("--batch", type=int, help="the node's scheduler.batch_size (default: its own)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="pause between the poller's rounds")
    parser.add_argument("--give-up-s", type=float, default=60.0, help="a B not returned after this is counted lost")
    args = parser.parse_args()
    if args.seed < 1:
        raise SystemExit("--seed must be at least 1: the model loads while the warm-up studies embed")

    pngs = sorted(args.images.glob("*.png"))
    pairs_needed = args.seed + int(args.rate * args.duration / 2) + 1
    if len(pngs) < pairs_needed:
        raise SystemExit(f"need {pairs_needed} PNG files (one per pair), found {len(pngs)} in {args.images}")
    folder = Path(tempfile.mkdtemp(prefix="mmdl-freshness-"))
    port = free_port()
    scheduler = "".join(f"{key} = {value}\n" for key, value in (("interval_s", args.interval_s),
                                                                ("batch_size", args.batch)) if value is not None)
    model = f'path = "{args.model.resolve()}"' if args.model else ""
    (folder / "node.toml").write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "data"\n'
                                      f"[scheduler]\n{scheduler}[model]\n{model}\n")
    pixels = (np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16 for p in pngs)
    node = subprocess.Popen([str(Path(sys.executable).parent / "mmdl-node"), "serve", "--config",
                             str(folder / "node.toml")], stdout=open(folder / "node.log", "wb"), stderr=subprocess.STDOUT)
    stream = Stream()
    try:
        while not port_open(port):
            if node.poll() is not None:
                raise SystemExit(f"the node exited: see {folder / 'node.log'}")
            time.sleep(0.1)
        ae = AE("BENCH")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_NODE")
        similar = AE("BENCH")
        similar.add_requested_context(FIND)
        for i in range(args.seed):
            a, b, _, _ = send_pair(assoc, next(pixels), f"SEED{i}")
        check = similar.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR")
        deadline = time.monotonic() + 600
        while top_match(check, a) != b:  # the last warm-up pair: the model is loaded and embedding
            if time.monotonic() > deadline:
                raise SystemExit(f"the warm-up studies were not returned in 600 s: see {folder / 'node.log'}")
            time.sleep(0.2)
        check.release()

        stop = threading.Event()
        poller = threading.Thread(target=poll, args=(port, stream, stop, args.give_up_s, args.poll_s))
        poller.start()
        load_before, started = load(), datetime.now(timezone.utc)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < args.duration:
            a, b, _, stored_b = send_pair(assoc, next(pixels), f"P{sent}")
            sent += 2
            if stored_b:
                with stream.lock:
                    stream.twin[b] = a
                    stream.stored[b] = stored_b
            time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
        elapsed = time.monotonic() - start
        stop.set()
        poller.join(timeout=args.give_up_s + 120)
        load_after = load()
        assoc.release()
    finally:
        node.terminate()
        node.wait(timeout=60)
    latencies = np.array([stream.seen[b] - stream.stored[b] for b in stream.stored if b in stream.seen])
    if len(latencies) == 0:
        raise SystemExit(f"no timed study was returned: see {folder / 'node.log'}")
    runs = [tuple(float(x) for x in m.groups()) for m in EMBEDDED.finditer((folder / "node.log").read_text())]
    timed = [r for r in runs if r[0] > 0]
    figures = {
        "bench": "freshness", "machine": machine(), "rate_per_s": args.rate, "duration_s": args.duration,
        "sent": sent, "achieved_rate_per_s": round(sent / elapsed, 2), "timed_b_studies": len(stream.stored),
        "returned": len(latencies), "lost": len(stream.stored) - len(latencies),
        "p50_s": round(float(np.percentile(latencies, 50)), 3), "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "max_s": round(float(latencies.max()), 3),
        "poll_query_p50_ms": round(1000 * float(np.median(stream.query_s)), 1),
        "node_runs": len(timed), "images_per_run": round(float(np.mean([r[0] for r in timed])), 1) if timed else 0,
        "run_s_mean": round(float(np.mean([r[2] for r in timed])), 2) if timed else 0,
        "failed_in_node": int(sum(r[1] for r in runs)),
        "interval_s": args.interval_s or "default", "batch": args.batch or "default",
        "start_utc": f"{started:%H:%M:%S}", "load": f"{load_before} -> {load_after}",
    }
    print(json.dumps(figures))
    print("\n| UTC | rate | sent | B timed / returned | p50 (s) | p99 (s) | max (s) | poll query p50 (ms) | load |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {figures['start_utc']} | {args.rate}/s ({figures['achieved_rate_per_s']}) | {sent} "
          f"| {figures['timed_b_studies']} / {figures['returned']} | {figures['p50_s']} | {figures['p99_s']} "
          f"| {figures['max_s']} | {figures['poll_query_p50_ms']} | {figures['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
