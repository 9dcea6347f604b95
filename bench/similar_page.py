"""Similar-cases page: time from request to a rendered page for a top-10 answer, in headless Chromium.

Stores --studies NIH ChestX-ray14 radiographs (as DX, with storescu) into a node running the shipped model,
each with a Basic Text SR that states the dataset's own labels for the image (NIH has no reports), waits
until they are indexed, then opens the page of --queries random studies twice: thumbnails cold (the
node's cache emptied first) and warm (rendered on disk). The browser's cache is off, so every page load
fetches the page and its eleven thumbnails from the node. "Rendered" is the load event: the HTML and
every image fetched and decoded. Prints one JSON line per figure and a Markdown table; --screenshot
keeps a picture of the last page. Run from the repository root:

    .venv/bin/python -m bench.similar_page --studies 40 --queries 10 --screenshot docs/similar-page.png
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.query import load, machine
from config import settings_from_mapping
from dicom_node.server import Node
from tests.browser import Browser
from tests.conftest import SHARED_DATA
from tests.dicom_node.builders import ROOT, basic_text_sr, dx_from_png, save
from tests.dicom_node.peers import indexed
from tests.helpers import dcmtk, free_port, wait_until

NAVIGATION_MS = "performance.getEntriesByType('navigation')[0].loadEventEnd"


def store_nih(node: Node, folder: Path, count: int) -> list[str]:
    """``count`` NIH studies (one image, one SR of its labels each), sent with storescu; their UIDs."""
    rows = random.Random(0).sample(list(csv.DictReader((SHARED_DATA / "nih-cxr14-1000" / "labels.csv").open())), count)
    files, uids = [], []
    for i, row in enumerate(rows):
        uid = f"{ROOT}{90000 + i}"
        patient = f"NIH{row['patient_id']}"
        image = dx_from_png(SHARED_DATA / "nih-cxr14-1000" / row["image"], uid, patient, f"B{i:05d}")
        image.StudyDate = f"2024{1 + i % 12:02d}{1 + int(row['follow_up']) % 28:02d}"
        labels = row["labels"].replace("|", ", ")
        report = basic_text_sr(uid, patient, f"B{i:05d}", f"NIH ChestX-ray14 labels: {labels}.", labels + ".")
        report.StudyDate = image.StudyDate
        files += [save(image, folder), save(report, folder)]
        uids.append(uid)
    sent = dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files, timeout=600)
    if sent.returncode != 0:
        raise SystemExit(f"storescu failed: {sent.stderr}")
    return uids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-page-") as work:
        folder = Path(work)
        settings = settings_from_mapping({
            "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(folder / "data")},
            "model": {"device": "cpu"},
            "web": {"enabled": True, "port": free_port(), "ohif_url": "http://localhost:3000",
                    "stone_url": "http://localhost:8042/stone-webviewer",
                    "weasis_dicomweb_url": "http://localhost:8080/dicomweb"},
        })
        node = Node(settings)
        node.start()
        try:
            uids = store_nih(node, folder / "send", args.studies)
            wait_until(indexed(node, len(uids)), 1800, "the studies to be indexed")
            assert node.web is not None
            cache = settings.node.data_dir / "thumbnails"
            queries = random.Random(0).sample(uids, args.queries)
            times: dict[str, dict[str, list[float]]] = {kind: {"wall_ms": [], "browser_ms": []}
                                                       for kind in ("cold", "warm")}
            with Browser(folder / "profile", width=1280, height=1000) as browser:
                browser.call("Network.setCacheDisabled", {"cacheDisabled": True}, session=True)
                for uid in queries:
                    url = f"{node.web.url}/studies/{uid}/similar?top_k={args.top_k}"
                    for kind in ("cold", "warm"):
                        if kind == "cold":
                            shutil.rmtree(cache)
                            cache.mkdir()
                        started = time.perf_counter()
                        browser.goto(url)
                        times[kind]["wall_ms"].append((time.perf_counter() - started) * 1000)
                        times[kind]["browser_ms"].append(float(browser.evaluate(NAVIGATION_MS)))
                        widths = browser.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
                        if len(widths) != args.top_k + 1 or min(widths) == 0:
                            raise SystemExit(f"page of {uid} did not render {args.top_k + 1} thumbnails: {widths}")
                if args.screenshot:
                    browser.screenshot(args.screenshot, full_page=True)
        finally:
            node.stop()
    print(f"machine: {machine()}, load {load()}; {args.studies} studies, top-{args.top_k}, {args.queries} pages each")
    print("| thumbnails | median (ms) | p90 (ms) | browser load event median (ms) |")
    print("| --- | --- | --- | --- |")
    for kind, figures in times.items():
        wall = np.asarray(figures["wall_ms"])
        browser_ms = np.asarray(figures["browser_ms"])
        result = {"thumbnails": kind, "pages": len(wall), "median_ms": round(float(np.median(wall)), 1),
                  "p90_ms": round(float(np.percentile(wall, 90)), 1),
                  "browser_load_median_ms": round(float(np.median(browser_ms)), 1)}
        print(json.dumps(result))
        print(f"| {kind} | {result['median_ms']} | {result['p90_ms']} | {result['browser_load_median_ms']} |")


if __name__ == "__main__":
    main()
