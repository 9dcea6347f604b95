"""Freshness: seconds from C-STORE success to the study being returned by a similar-case query.

Starts `mmdl-node serve` on a temporary data dir (the shipped model unless --model), seeds it with
--seed studies, then sends one DX study at a time at --rate studies/s for --duration seconds and polls
the similar-case query of a reference study until each new study appears in its answers.
Prints one JSON line per figure and a Markdown table. Run from the repository root:

    .venv/bin/python -m bench.freshness --images ../shared/data/nih-cxr14-1000/images
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, StudyRootQueryRetrieveInformationModelFind

from dicom_node.similar import PRIVATE_CREATOR, PRIVATE_GROUP, TOP_K
from tests.dicom_node.builders import dx_from_png
from tests.helpers import free_port, port_open

FIND = StudyRootQueryRetrieveInformationModelFind


def similar_uids(port: int, study_uid: str, k: int) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(TOP_K, "IS", str(k))
    ae = AE("BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR")
    found = {str(i.StudyInstanceUID) for s, i in assoc.send_c_find(query, FIND) if s and s.Status == 0xFF00}
    assoc.release()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of PNG chest X-rays to send")
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=120.0)
    args = parser.parse_args()

    pngs = sorted(args.images.glob("*.png"))
    folder = Path(tempfile.mkdtemp(prefix="mmdl-freshness-"))
    port = free_port()
    model = f'path = "{args.model.resolve()}"' if args.model else ""
    (folder / "node.toml").write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "data"\n'
                                      f'[query]\nmax_top_k = 1000\n[model]\n{model}\n')
    node = subprocess.Popen([str(Path(sys.executable).parent / "mmdl-node"), "serve", "--config",
                             str(folder / "node.toml")], stdout=open(folder / "node.log", "wb"), stderr=subprocess.STDOUT)
    try:
        while not port_open(port):
            time.sleep(0.1)
        ae = AE("BENCH")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_NODE")
        studies = []
        for i in range(args.seed):
            uid = generate_uid()
            assoc.send_c_store(dx_from_png(pngs[i % len(pngs)], uid, f"SEED{i}", f"S{i}"))
            studies.append(uid)
        reference = studies[0]
        while len(similar_uids(port, reference, 1000)) < args.seed - 1:
            time.sleep(0.2)

        stored: dict[str, float] = {}
        seen: dict[str, float] = {}
        done = threading.Event()

        def poll() -> None:
            while not done.is_set() or len(seen) < len(stored):
                found = similar_uids(port, reference, 1000)
                now = time.monotonic()
                for uid in list(stored):
                    if uid in found and uid not in seen:
                        seen[uid] = now
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        start = time.monotonic()
        i = args.seed
        while time.monotonic() - start < args.duration:
            uid = generate_uid()
            status = assoc.send_c_store(dx_from_png(pngs[i % len(pngs)], uid, f"P{i}", f"A{i}"))
            if status and status.Status == 0:
                stored[uid] = time.monotonic()
            i += 1
            time.sleep(max(0.0, start + (i - args.seed) / args.rate - time.monotonic()))
        done.set()
        poller.join(timeout=300)
        assoc.release()
    finally:
        node.terminate()
        node.wait(timeout=60)
    latencies = np.array([seen[u] - stored[u] for u in stored if u in seen])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    figures = {"bench": "freshness", "machine": machine, "rate_per_s": args.rate, "duration_s": args.duration,
               "sent": len(stored), "returned": len(latencies),
               "p50_s": round(float(np.percentile(latencies, 50)), 3), "p99_s": round(float(np.percentile(latencies, 99)), 3),
               "max_s": round(float(latencies.max()), 3)}
    print(json.dumps(figures))
    print("\n| rate | sent | returned | p50 (s) | p99 (s) | max (s) |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.rate}/s | {figures['sent']} | {figures['returned']} | {figures['p50_s']} | {figures['p99_s']} | {figures['max_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
