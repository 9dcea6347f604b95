"""Reference sheet: time from request to the sheet kept in the node, and the sheet shown in the README.

Starts a node on a temporary data dir with the shipped model (CPU), sends it --studies one-image DX
studies made from the public NIH PNGs over C-STORE, waits until they are indexed, then times
`ReferenceSheets.create` (search, render the top-k tiles, build the Secondary Capture, keep it through
the ingest path; no peer, so no send) for --rounds different query studies, after one untimed warm-up
(which imports highdicom and the decoder). Prints one JSON line per figure; --png writes the last sheet.
Run from the repository root:

    .venv/bin/python -m bench.reference_sheet --images ../shared/data/nih-cxr14-1000/images --png docs/reference-sheet.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from bench.query import load, machine
from config import settings_from_mapping
from dicom_node.server import Node
from tests.dicom_node.builders import dx_from_png
from tests.helpers import free_port, wait_until


def send_studies(node: Node, pngs: list[Path], count: int) -> list[str]:
    """``count`` one-image DX studies over one association; their Study Instance UIDs."""
    ae = AE("BENCH")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.node.ae_title)
    assert assoc.is_established
    uids = []
    for i in range(count):
        ds = dx_from_png(pngs[i % len(pngs)], str(generate_uid()), f"B{i}", f"B{i}")
        assert assoc.send_c_store(ds).Status == 0
        uids.append(str(ds.StudyInstanceUID))
    assoc.release()
    return uids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of chest X-ray PNGs")
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--png", type=Path, help="write the last sheet here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = settings_from_mapping({
            "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": folder},
            "model": {"device": "cpu"},
            "reference_sheet": {"enabled": True, "top_k": args.top_k},
        })
        node = Node(settings)
        node.start()
        try:
            uids = send_studies(node, sorted(args.images.glob("*.png")), args.studies)
            wait_until(lambda: len(node.index) >= args.studies and not node.catalog.pending_images(1)
                       and not node.catalog.dirty_studies(1), 1800, "the studies to be indexed")
            node.sheets.create(uids[-1])  # warm-up
            seconds = []
            for uid in uids[: args.rounds]:
                start = time.perf_counter()
                result = node.sheets.create(uid)
                seconds.append(time.perf_counter() - start)
            print(json.dumps({"figure": "sheet_create_s", "top_k": result.cases, "studies": args.studies,
                              "median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3),
                              "rounds": len(seconds), "machine": machine(), "load": load()}))
            if args.png is not None:
                path = node.store.absolute(node.store.relative_path(result.study_uid, result.series_uid,
                                                                    result.sop_uid))
                Image.fromarray(dcmread(path).pixel_array).save(args.png, optimize=True)
        finally:
            node.stop()


if __name__ == "__main__":
    main()
