"""Ingest: the same images by dcmtk `storescu` to the node and to dcmtk `storescp`, alternated in one run,
beside the disk's own rate for writing the same bytes with fsync.

For each round, image size (8 MB: 2048x2048 16-bit DX; 0.5 MB: 512x512) and number of parallel associations
(1, one per core, 4), it writes a fresh set of files (new UIDs, same bytes: the node acknowledges a UID it already
holds without writing it again), then times storescu to the node (and, with --baseline-tree, to a second node
served from an earlier checkout, the two taking turns at going first), storescu to storescp, and writing + fsync
of the same bytes into the node's data dir's file system: as plain files, as the node lays out new studies, and
as the node lays them out with a catalog row committed for each (``durable_writes``; the last, disk_floor, is the
least a receiver keeping the node's layout and committing a catalog row per image must do before it answers
success, with no DICOM and no catalog code: floor_vs_storescp is the most such a receiver can reach against
storescp on this machine, and floor_vs_one_writer what parallel writers gain on this disk). It reads each node's CPU
time per image over its storescu run (its receiver processes' included), storescu's own CPU time per image (on one
machine the senders share the node's cores) and the CPU time per image charged to this process by the plain writes
with fsync (the kernel's work for a durable write is CPU time too; write-back and journal commits done by the
kernel's own threads are not in it). The nodes run with their embedding job held off
(scheduler.interval_s = 1 day) so that the receive path is measured alone. dcmtk tools run with TCP_NODELAY=1.
Each timed step starts after a sync: on ext4 (data=ordered) an fsync also waits for the write-back of other files'
dirty pages, so without it whatever wrote without fsync just before (the input files, storescp) would be paid for
by the next step that fsyncs.
Prints one JSON line per figure (median over rounds) and a Markdown table. Run from the repository root:

    .venv/bin/python -m bench.ingest --rounds 3
    .venv/bin/python -m bench.ingest --rounds 3 --baseline-tree /work/before   # a worktree of an earlier commit
    .venv/bin/python -m bench.ingest --rounds 3 --receivers 2   # the nodes with two receiver processes each
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.uid import generate_uid

from bench.query import cpu_seconds, load, machine, serve
from indexer.durable import fsync_directory
from tests.dicom_node.builders import dx_from_pixels
from tests.helpers import dcmtk_env, free_port, port_open

SIZES = {"8MB": 2048, "0.5MB": 512}
# One association, one per core (the "N associations on N cores"), and four.
PARALLEL = sorted({1, os.cpu_count() or 1, 4})


def write_files(folder: Path, side: int, count: int) -> list[Path]:
    """``count`` DX files of ``side``x``side`` 16-bit noise, each its own study."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(side).integers(0, 4096, size=(side, side), dtype=np.uint16)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.dcm"
        dx_from_pixels(pixels, generate_uid(), f"BENCH{i}", f"B{i}").save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, called: str, files: list[Path], parallel: int) -> tuple[float, float]:
    """(seconds, CPU seconds of the senders) for ``parallel`` storescu processes to send ``files`` (split evenly)
    over loopback."""
    groups = [files[i::parallel] for i in range(parallel)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, group)],
                                  env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for group in groups]
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"storescu to {called} failed: {err.decode(errors='replace')[-2000:]}")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def durable_writes(folder: Path, files: list[Path], parallel: int,
                   kind: Literal["plain", "layout", "floor"] = "plain") -> tuple[float, float]:
    """(seconds, CPU seconds charged to this process, the kernel's work in its threads included) to write each file's
    bytes durably (``parallel`` writers). ``kind``: "plain", to a new file with fsync; "layout", as the node keeps an
    instance of a new study (without its catalog row): written and fsynced in an incoming folder, renamed into new
    study and series folders, then the series folder, the study folder and the root fsynced; "floor", the layout and
    then a row committed to a SQLite database in WAL mode with full fsync, as the node's catalog is: the least a
    receiver keeping the node's layout and a commit per image must do before answering success, with no DICOM and
    no catalog code."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "incoming").mkdir(parents=True)
    payloads = [(folder / f.name, f.read_bytes()) for f in files]
    database = folder / "floor.sqlite3"
    if kind == "floor":
        with closing(sqlite3.connect(database)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("CREATE TABLE instance (uid TEXT PRIMARY KEY, path TEXT)")
    connections = threading.local()
    opened: list[sqlite3.Connection] = []

    def write(item: tuple[Path, bytes]) -> None:
        path, data = item
        written = folder / "incoming" / path.name if kind != "plain" else path
        with written.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if kind == "plain":
            return
        series = folder / path.stem / "series"
        series.mkdir(parents=True)
        os.replace(written, series / path.name)
        for directory in (series, series.parent, folder):
            fsync_directory(directory)
        if kind == "floor":
            if not hasattr(connections, "catalog"):
                connections.catalog = sqlite3.connect(database, timeout=60, check_same_thread=False)
                connections.catalog.execute("PRAGMA synchronous=FULL")
                opened.append(connections.catalog)
            with connections.catalog:
                connections.catalog.execute("INSERT INTO instance VALUES (?, ?)", (path.stem, str(series / path.name)))

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(write, payloads))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    for connection in opened:
        connection.close()
    shutil.rmtree(folder)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of the process and of its children (a node's receiver processes) so far."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.update(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:  # a thread that has just ended
            continue
    total = cpu_seconds(pid)
    for child in children:
        try:
            total += cpu_seconds(child)
        except FileNotFoundError:  # a child that has just ended (a snapshot writer)
            continue
    return total


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 300
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count-8mb", type=int, default=32)
    parser.add_argument("--count-small", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmdl-bench")
    parser.add_argument("--node-tree", type=Path, help="serve from this checkout of the node (before/after runs)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also serve a node from this checkout (an earlier commit) and time both in turns")
    parser.add_argument("--receivers", type=int, default=0,
                        help="[node] receivers of the node; their CPU time is counted")
    parser.add_argument("--baseline-receivers", type=int,
                        help="[node] receivers of the baseline node (default: --receivers; 0 for a checkout older "
                             "than receiver processes)")
    args = parser.parse_args()
    args.work = args.work.resolve()

    folder = args.work / "ingest"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "storescp").mkdir(parents=True)
    trees = {"mmdl-node": args.node_tree, **({"baseline-node": args.baseline_tree} if args.baseline_tree else {})}
    receivers = {"mmdl-node": args.receivers,
                 "baseline-node": args.receivers if args.baseline_receivers is None else args.baseline_receivers}
    nodes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    for name, tree in trees.items():
        port = free_port()
        line = f"receivers = {receivers[name]}\n" if receivers[name] else ""
        (folder / f"{name}.toml").write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{name}-data"\n'
                                           f'{line}[scheduler]\ninterval_s = 86400\n[logging]\nlevel = "WARNING"\n')
        nodes[name] = serve(folder / f"{name}.toml", folder / f"{name}.log", tree), port
    scp_port = free_port()
    scp = subprocess.Popen(["storescp", "-od", str(folder / "storescp"), str(scp_port)], env=dcmtk_env(),
                           stdout=open(folder / "storescp.log", "wb"), stderr=subprocess.STDOUT)
    rates: dict[tuple[str, int, str], list[float]] = {}
    loads: dict[tuple[str, int], list[str]] = {}
    node_cpu: dict[tuple[str, int, str], list[float]] = {}  # each node's CPU ms per image
    sender_cpu: dict[tuple[str, int], list[float]] = {}  # storescu's CPU ms per image, sending to the node
    fsync_cpu: dict[tuple[str, int], list[float]] = {}  # CPU ms per image of writing it with fsync (disk_fsync)
    try:
        for name, (process, port) in nodes.items():
            wait_port(port, process, name)
        wait_port(scp_port, scp, "storescp")
        if any(receivers[name] for name in nodes):
            time.sleep(5)  # receivers take connections ~1.5 s after the port opens (their "ready" line is at INFO)
        for round_number in range(args.rounds):
            for size, side in SIZES.items():
                count = args.count_8mb if size == "8MB" else args.count_small
                for parallel in PARALLEL:
                    files = write_files(folder / "files", side, count)
                    loads.setdefault((size, parallel), []).append(load())
                    timings = {}
                    names = list(nodes)
                    for name in names[round_number % len(names):] + names[:round_number % len(names)]:
                        process, port = nodes[name]
                        os.sync()  # each timed step starts with no dirty pages of the steps before (see below)
                        cpu_before = tree_cpu_seconds(process.pid)
                        timings[name], senders = storescu(port, "MMDL_NODE", files, parallel)
                        node_cpu.setdefault((size, parallel, name), []).append(
                            (tree_cpu_seconds(process.pid) - cpu_before) * 1000 / count)
                        if name == "mmdl-node":
                            sender_cpu.setdefault((size, parallel), []).append(senders * 1000 / count)
                    os.sync()
                    timings["storescp"] = storescu(scp_port, "STORESCP", files, parallel)[0]
                    shutil.rmtree(folder / "storescp")  # unsynced: deleted before their pages are written back
                    (folder / "storescp").mkdir()
                    os.sync()
                    timings["disk_fsync"], disk_cpu = durable_writes(folder / "mmdl-node-data" / "fsync-bench", files,
                                                                     parallel)
                    fsync_cpu.setdefault((size, parallel), []).append(disk_cpu * 1000 / count)
                    for kind in ("layout", "floor"):
                        os.sync()
                        timings[f"disk_{kind}"] = durable_writes(folder / "mmdl-node-data" / "fsync-bench", files,
                                                                 parallel, kind)[0]
                    for target, seconds in timings.items():
                        rates.setdefault((size, parallel, target), []).append(count / seconds)
    finally:
        for process in [scp, *(process for process, _ in nodes.values())]:
            process.terminate()
            process.wait(timeout=300)
    shutil.rmtree(folder / "files", ignore_errors=True)

    rows = []
    targets = [*nodes, "storescp", "disk_fsync", "disk_layout", "disk_floor"]
    for size in SIZES:
        for parallel in PARALLEL:
            median = {t: statistics.median(rates[(size, parallel, t)]) for t in targets}
            figure = {"bench": "ingest", "machine": machine(), "size": size, "associations": parallel,
                      "rounds": args.rounds, "receivers": {name: receivers[name] for name in nodes},
                      **{f"{t}_per_s": round(v, 1) for t, v in median.items()},
                      **{f"{name}_cpu_ms_per_image": round(statistics.median(node_cpu[(size, parallel, name)]), 2)
                         for name in nodes},
                      "storescu_cpu_ms_per_image": round(statistics.median(sender_cpu[(size, parallel)]), 2),
                      "disk_fsync_cpu_ms_per_image": round(statistics.median(fsync_cpu[(size, parallel)]), 2),
                      "node_vs_storescp": round(median["mmdl-node"] / median["storescp"], 2),
                      "node_vs_disk": round(median["mmdl-node"] / median["disk_fsync"], 2),
                      "node_vs_disk_layout": round(median["mmdl-node"] / median["disk_layout"], 2),
                      "node_vs_one_association": round(
                          median["mmdl-node"] / statistics.median(rates[(size, 1, "mmdl-node")]), 2),
                      "floor_vs_storescp": round(median["disk_floor"] / median["storescp"], 2),
                      "floor_vs_one_writer": round(
                          median["disk_floor"] / statistics.median(rates[(size, 1, "disk_floor")]), 2),
                      "all_rounds": {t: [round(r, 1) for r in rates[(size, parallel, t)]] for t in median},
                      "load_at_round_start": loads[(size, parallel)]}
            print(json.dumps(figure))
            rows.append(figure)
    print(f"\n{machine()}; images/s, median of {args.rounds} rounds; node CPU ms per image; receiver processes: "
          + ", ".join(f"{name} {receivers[name]}" for name in nodes) + "\n")
    columns = [*(f"{t}_per_s" for t in targets), *(f"{name}_cpu_ms_per_image" for name in nodes),
               "storescu_cpu_ms_per_image", "disk_fsync_cpu_ms_per_image", "node_vs_storescp",
               "node_vs_disk", "node_vs_disk_layout", "node_vs_one_association", "floor_vs_storescp",
               "floor_vs_one_writer"]
    print("| size | assocs | " + " | ".join(columns) + " | load at start |")
    print("| --- " * (len(columns) + 3) + "|")
    for r in rows:
        print(f"| {r['size']} | {r['associations']} | " + " | ".join(str(r[c]) for c in columns) +
              f" | {'; '.join(r['load_at_round_start'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
