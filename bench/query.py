"""Similar-case query: round trips (a new association per query, as a viewer does; and over HTTP/JSON),
recall@10 against exact search, and the node's start-up and memory on a data dir of N synthetic studies: start-up
to the DICOM port open (`startup_s`; the index then loads in the background) and to the first similar-case answer
over HTTP (`index_ready_s`, with the longest HTTP answer meanwhile: the node's stall while hnswlib parses the snapshot).

Populates --work/query-N-mM-efcE with `bench populate` unless it is already there, starts
`mmdl-node serve` on it (web server on), and times --queries similar-case C-FINDs for random studies from
three clients taking turns: a blocking one (bench/dicom_client.py, as compiled viewers are: the node's own
latency), pynetdicom's with TCP_NODELAY and with Nagle's algorithm on (pynetdicom's requestor polls, which
adds its own waits); then the blocking client alone, query after query, with the node's CPU time per query (one viewer, nothing
else on the node meanwhile: taking turns, each query also shares the machine with the end of the previous client's association);
then GET /api/studies/{uid}/similar on one kept-alive HTTP connection, and the C-FINDs on one open association. Recall@10 compares the node's answers with numpy brute force over the catalog's
vectors (the query study excluded, as the node excludes it). Prints one JSON line per figure and a Markdown
table. Run from the repository root:

    .venv/bin/python -m bench.query --count 100000

With --baseline-tree, a second node serves the same data dir from that checkout (an earlier commit whose catalog
schema and study vector rule are the same), and the `paired_*` figures, taken first, time both, query after query,
alternating which goes first: the blocking client's C-FIND and the HTTP answer, with each node's CPU per query.
The baseline stops before the other figures. This machine's speed drifts by tens of percent from minute to minute;
a before/after taken from two runs minutes apart measures that drift as much as the change.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from bench import dicom_client
from dicom_node.handlers import NO_DELAY
from bench.populate import synthetic_uid
from indexer.vector_index import VectorIndex
from tests.helpers import free_port, port_open


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, user and system, all threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(config: Path, log: Path, tree: Path | None = None) -> subprocess.Popen[bytes]:
    """`mmdl-node serve --config config` in a new process; from ``tree``, another checkout of the node (a
    worktree of an earlier commit), when given, so that a before/after comparison runs the same bench."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                            cwd=tree, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def similar_query(study_uid: str) -> Dataset:
    """A similar-case request for one study, asking for the description (rank, score, findings)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.StudyDescription = ""
    return query


def associate(port: int, no_delay: bool) -> Association:
    """A new association to the similar-case title; ``no_delay``: the client sets TCP_NODELAY, as
    dcm4che-based viewers do by default and dcmtk-based ones unless built or configured otherwise."""
    ae = AE("BENCH")
    ae.add_requested_context(FIND)
    return ae.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR", evt_handlers=NO_DELAY if no_delay else None)


def answered(assoc: Association, study_uid: str) -> list[str]:
    """The Study Instance UIDs a similar-case C-FIND for ``study_uid`` answers, best first."""
    return [str(i.StudyInstanceUID) for s, i in assoc.send_c_find(similar_query(study_uid), FIND)
            if s and s.Status == 0xFF00]


def similar_round_trip(port: int, study_uid: str, no_delay: bool) -> tuple[float, list[str]]:
    """Seconds from associate to release for one similar-case C-FIND, and the UIDs it answered; without
    ``no_delay`` the client's own Nagle delays show in the figure."""
    start = time.perf_counter()
    assoc = associate(port, no_delay)
    uids = answered(assoc, study_uid)
    assoc.release()
    return time.perf_counter() - start, uids


def blocking_round_trip(port: int, study_uid: str) -> tuple[float, list[str]]:
    """Seconds from connect to release for one similar-case C-FIND from a blocking client (as compiled
    viewers are; TCP_NODELAY), and the UIDs it answered: the node's latency without a polling client's."""
    start = time.perf_counter()
    sock = dicom_client.associate("127.0.0.1", port, "MMDL_SIMILAR", FIND)
    uids = [str(answer.StudyInstanceUID) for answer in dicom_client.find(sock, FIND, similar_query(study_uid))]
    dicom_client.release(sock)
    return time.perf_counter() - start, uids


def wait_for_port(port: int, node: subprocess.Popen[bytes], log: Path, started: float) -> float:
    """Seconds from ``started`` until the node's DICOM ``port`` accepts connections; exits if the node does not start."""
    while not port_open(port):
        if node.poll() is not None or time.monotonic() - started > 600:
            raise SystemExit(f"the node did not start; see {log}")
        time.sleep(0.01)
    return time.monotonic() - started


def wait_for_index(port: int, study_uid: str, node: subprocess.Popen[bytes]) -> float:
    """Poll GET /api/studies/{uid}/similar (a new connection each time) until it answers 200: the node answers
    503 while its index loads. Returns the longest poll in ms: the node stalls while hnswlib parses the
    snapshot it has read (``load_index`` holds the GIL)."""
    longest = 0.0
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start = time.perf_counter()
        try:
            connection.request("GET", f"/api/studies/{study_uid}/similar", headers={"Accept": "application/json"})
            response = connection.getresponse()
            response.read()
            status = response.status
        except ConnectionError:  # the web server's port is not open yet
            status = 0
        finally:
            connection.close()
        longest = max(longest, time.perf_counter() - start)
        if status == 200:
            return longest * 1000
        if status not in (0, 503) or node.poll() is not None:
            raise SystemExit(f"the node did not load its index (HTTP {status})")
        time.sleep(0.02)


@contextlib.contextmanager
def http_similar(port: int) -> Iterator[Callable[[str], float]]:
    """Milliseconds of one GET /api/studies/{uid}/similar (JSON, top 10), per call, on one kept-alive HTTP
    connection, closed at the end of the ``with`` block."""
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(uid: str) -> float:
        start = time.perf_counter()
        connection.request("GET", f"/api/studies/{uid}/similar", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
        ms = (time.perf_counter() - start) * 1000
        if response.status != 200 or len(json.loads(body)["similar"]) != 10:
            raise SystemExit(f"expected 10 similar studies over HTTP, got {response.status}: {body[:200]!r}")
        return ms

    try:
        yield round_trip
    finally:
        connection.close()


def blocking_ms(port: int) -> Callable[[str], float]:
    """Milliseconds of one similar-case C-FIND from the blocking client, per call (`blocking_round_trip`)."""
    def round_trip(uid: str) -> float:
        seconds, uids = blocking_round_trip(port, uid)
        if len(uids) != 10:
            raise SystemExit(f"expected 10 answers over DICOM, got {len(uids)}")
        return seconds * 1000

    return round_trip


def open_association_round_trips(port: int, study_uids: list[str]) -> np.ndarray:
    """Milliseconds per similar-case C-FIND on one association kept open (TCP_NODELAY), as a viewer that
    keeps its association does."""
    assoc = associate(port, no_delay=True)
    times = []
    for uid in study_uids:
        start = time.perf_counter()
        uids = answered(assoc, uid)
        times.append(time.perf_counter() - start)
        if len(uids) != 10:
            raise SystemExit(f"expected 10 answers on the open association, got {len(uids)}")
    assoc.release()
    return np.array(times) * 1000


def percentiles(ms: np.ndarray | list[float], digits: int = 2) -> dict[str, float]:
    """p50 and p99 of ``ms``, rounded for the report."""
    return {"p50": round(float(np.percentile(ms, 50)), digits), "p99": round(float(np.percentile(ms, 99)), digits)}


def exact_top(vectors: np.ndarray, row: int, k: int) -> set[int]:
    """Rows of the ``k`` most cosine-similar vectors to ``vectors[row]``, itself excluded (unit vectors)."""
    sims = vectors @ vectors[row]
    sims[row] = -np.inf
    return set(np.argpartition(-sims, k)[:k].tolist())


def snapshot_stall(index: VectorIndex) -> dict[str, float]:
    """Seconds one index snapshot takes, and the longest this process stalls meanwhile (ms), seen by a
    thread that wakes every millisecond: what every association of the node would wait."""
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.2)
    start = time.perf_counter()
    index.snapshot()
    seconds = time.perf_counter() - start
    time.sleep(0.2)
    done.set()
    ticker.join()
    return {"snapshot_s": round(seconds, 2), "max_stall_ms": round(max(gaps) * 1000, 1)}


def stage_times(config: Path, vectors: np.ndarray, picks: list[int]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """In this process, on the same data dir: ms per stage of answering one similar-case query, and
    the stall an index snapshot causes."""
    from config import load_settings
    from dicom_node.server import model_directory
    from dicom_node.similar import find_similar, hit_identifier, parse_request, query_study
    from indexer.catalog import Catalog
    from indexer.vector_index import HnswParams
    from models.calibration import load_calibration
    from models.bundle_manifest import embedding_dim

    settings = load_settings(config)
    calibration = load_calibration(model_directory(settings))
    catalog = Catalog(settings.catalog_url)
    index = VectorIndex.open(HnswParams.from_settings(embedding_dim(model_directory(settings)), settings.index),
                             settings.node.data_dir / "index", catalog)
    stages: dict[str, list[float]] = {"hnsw_search": [], "find_similar": [], "study_values": [], "identifiers": []}
    for row in picks:
        request = similar_query(synthetic_uid(row + 1))
        t0 = time.perf_counter()
        index.search(vectors[row], 11)
        t1 = time.perf_counter()
        parsed = parse_request(request, settings.query)
        hits = find_similar(catalog, index, query_study(catalog, parsed), parsed, calibration)
        t2 = time.perf_counter()
        values = catalog.study_values([hit.study.id for hit in hits])
        t3 = time.perf_counter()
        [hit_identifier(request, hit, values[hit.study.id], "MMDL_SIMILAR", calibration) for hit in hits]
        t4 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[name].append(seconds * 1000)
    stall = snapshot_stall(index)
    catalog.close()
    return {name: percentiles(ms, 3) for name, ms in stages.items()}, stall


def write_config(path: Path, port: int, web_port: int, args: argparse.Namespace) -> Path:
    """A node configuration on the data dir next to ``path``, the web server on."""
    path.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "data"\n'
                    f'[web]\nenabled = true\nport = {web_port}\n'
                    f'[index]\nm = {args.m}\nef_construction = {args.ef_construction}\nef_search = {args.ef_search}\n'
                    f'[logging]\nlevel = "WARNING"\n')
    return path


def paired(nodes: dict[str, tuple[subprocess.Popen[bytes], Callable[[str], float]]],
           study_uids: list[str]) -> dict[str, dict[str, float]]:
    """Per node: p50/p99 ms of ``nodes[name][1]`` (one round trip) and the node's CPU per query, the nodes taking
    turns on each study, each going first every other time."""
    names = list(nodes)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_before = {name: cpu_seconds(process.pid) for name, (process, _) in nodes.items()}
    for n, uid in enumerate(study_uids):
        for name in names[n % 2:] + names[:n % 2]:
            times[name].append(nodes[name][1](uid))
    return {name: {**percentiles(np.array(times[name])),
                   "cpu_ms_per_query": round((cpu_seconds(nodes[name][0].pid) - cpu_before[name]) * 1000
                                             / len(study_uids), 2)}
            for name in names}


# What a node's catalog and index on disk depend on: a baseline that differs here must not share the data dir
# (it would add columns, or rebuild every study vector and snapshot its index over the other node's).
SHARED_DATA_FILES = ("indexer/schema.py", "models/study.py")


def paired_figures(node: subprocess.Popen[bytes], port: int, web_port: int, folder: Path, args: argparse.Namespace,
                   study_uids: list[str]) -> list[dict[str, object]]:
    """The ``paired_*`` figures: a node from ``args.baseline_tree`` serves the same data dir, both nodes answer each
    study in turn (a blocking C-FIND, then HTTP), and the baseline stops before the other figures are taken.
    Both nodes have answered nothing but their index-ready polls before (the other figures come after)."""
    tree = args.node_tree or Path(__file__).parents[1]
    different = [name for name in SHARED_DATA_FILES
                 if (args.baseline_tree / name).read_bytes() != (tree / name).read_bytes()]
    if different:
        raise SystemExit(f"the baseline's {', '.join(different)} differ: it cannot share this data dir")
    baseline_port, baseline_web = free_port(), free_port()
    log = folder / "node-baseline.log"
    baseline = serve(write_config(folder / "node-baseline.toml", baseline_port, baseline_web, args), log,
                     args.baseline_tree)
    figures: list[dict[str, object]] = []
    try:
        wait_for_port(baseline_port, baseline, log, time.monotonic())
        wait_for_index(baseline_web, study_uids[0], baseline)
        with http_similar(web_port) as ours_http, http_similar(baseline_web) as theirs_http:
            for figure, ours, theirs in (
                    ("paired_similar_find_ms_client_blocking", blocking_ms(port), blocking_ms(baseline_port)),
                    ("paired_similar_http_json_ms_keep_alive", ours_http, theirs_http)):
                load_before = load()
                by_node = paired({"node": (node, ours), "baseline": (baseline, theirs)}, study_uids)
                figures.append({"figure": figure, "queries": len(study_uids),
                                **{f"{name}_{key}": value for name, values in by_node.items()
                                   for key, value in values.items()},
                                "load": f"{load_before} -> {load()}"})
    finally:
        baseline.terminate()
        baseline.wait(timeout=300)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmdl-bench")
    parser.add_argument("--node-tree", type=Path, help="serve from this checkout of the node (before/after runs)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also serve the same data dir from this checkout, and time both nodes in turn (paired_*)")
    parser.add_argument("--centres", type=Path,
                        help="real embeddings (.npy, python -m bench.sample_embeddings) the studies are drawn around")
    args = parser.parse_args()
    args.work = args.work.resolve()

    vectors_from = "random" if args.centres is None else args.centres.stem
    folder = args.work / f"query-{args.count}-m{args.m}-efc{args.ef_construction}-{vectors_from}"
    folder.mkdir(parents=True, exist_ok=True)
    port, web_port = free_port(), free_port()
    config = write_config(folder / f"node-ef{args.ef_search}.toml", port, web_port, args)
    figures: list[dict[str, object]] = []
    base = {"machine": machine(), "count": args.count, "vectors": vectors_from, "m": args.m,
            "ef_construction": args.ef_construction,
            "ef_search": args.ef_search}
    if not (folder / "data" / "index" / "current.json").exists():
        start = time.monotonic()
        centres = [] if args.centres is None else ["--centres", str(args.centres.resolve())]
        subprocess.run([sys.executable, "-m", "dicom_node.cli", "bench", "populate", "--config", str(config),
                        "--count", str(args.count), *centres], check=True)
        figures.append({**base, "figure": "populate_s", "value": round(time.monotonic() - start, 1), "load": load()})

    database = sqlite3.connect(folder / "data" / "catalog.sqlite3")
    rows = database.execute("SELECT vector FROM studies WHERE synthetic = 1 ORDER BY id").fetchall()
    database.close()
    vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    del rows

    started = time.monotonic()
    node = serve(config, folder / "node.log", args.node_tree)
    try:
        startup = wait_for_port(port, node, folder / "node.log", started)
        figures.append({**base, "figure": "startup_s", "value": round(startup, 2), "load": load()})
        rng = np.random.default_rng(1)
        picks = rng.choice(len(vectors), size=min(args.queries, len(vectors)), replace=False)
        longest_ms = wait_for_index(web_port, synthetic_uid(int(picks[0]) + 1), node)
        figures.append({**base, "figure": "index_ready_s", "value": round(time.monotonic() - started, 2),
                        "longest_http_wait_ms": round(longest_ms, 1), "load": load()})
        figures.append({**base, "figure": "rss_after_start_mib", **rss_mib(node.pid), "load": load()})
        if args.baseline_tree is not None:
            figures += [{**base, **figure} for figure in paired_figures(
                node, port, web_port, folder, args, [synthetic_uid(row + 1) for row in picks.tolist()])]
        similar_round_trip(port, synthetic_uid(int(picks[0]) + 1), True)  # warm-up: first association, page cache
        # Three clients on every study, taking turns at going first: a blocking one (as compiled viewers),
        # and pynetdicom's (which polls) with TCP_NODELAY and with Nagle's algorithm on.
        clients: dict[str, Callable[[str], tuple[float, list[str]]]] = {
            "client_blocking": lambda uid: blocking_round_trip(port, uid),
            "client_pynetdicom_nodelay": lambda uid: similar_round_trip(port, uid, True),
            "client_pynetdicom_nagle": lambda uid: similar_round_trip(port, uid, False),
        }
        times: dict[str, list[float]] = {client: [] for client in clients}
        hits = 0
        load_before = load()
        for n, row in enumerate(picks.tolist()):
            names = list(clients)
            for client in names[n % 3:] + names[:n % 3]:
                seconds, uids = clients[client](synthetic_uid(row + 1))
                times[client].append(seconds)
                if client == "client_blocking":
                    answered = {int(u.rsplit(".", 1)[1]) - 1 for u in uids}
                    hits += len(answered & exact_top(vectors, row, 10))
        for client in clients:
            ms = np.array(times[client]) * 1000
            figures.append({**base, "figure": f"similar_find_round_trip_ms_{client}", "queries": len(ms),
                            **percentiles(ms),
                            "max": round(float(ms.max()), 2), "load": f"{load_before} -> {load()}"})
        load_before, cpu_before = load(), cpu_seconds(node.pid)
        alone = blocking_ms(port)
        ms = np.array([alone(synthetic_uid(row + 1)) for row in picks.tolist()])
        node_cpu_ms = (cpu_seconds(node.pid) - cpu_before) * 1000 / len(ms)
        figures.append({**base, "figure": "similar_find_round_trip_ms_client_blocking_alone", "queries": len(ms),
                        **percentiles(ms), "max": round(float(ms.max()), 2),
                        "node_cpu_ms_per_query": round(node_cpu_ms, 2), "load": f"{load_before} -> {load()}"})
        load_before = load()
        with http_similar(web_port) as http:
            ms = np.array([http(synthetic_uid(row + 1)) for row in picks.tolist()])
        figures.append({**base, "figure": "similar_http_json_ms_keep_alive", "queries": len(ms), **percentiles(ms),
                        "max": round(float(ms.max()), 2), "load": f"{load_before} -> {load()}"})
        load_before = load()
        ms = open_association_round_trips(port, [synthetic_uid(row + 1) for row in picks.tolist()])
        figures.append({**base, "figure": "similar_find_ms_open_association", "queries": len(ms),
                        **percentiles(ms),
                        "max": round(float(ms.max()), 2), "load": f"{load_before} -> {load()}"})
        figures.append({**base, "figure": "recall_at_10", "value": round(hits / (10 * len(picks)), 4),
                        "queries": len(picks), "load": load()})
        figures.append({**base, "figure": "rss_after_queries_mib", **rss_mib(node.pid), "load": load()})
    finally:
        node.terminate()
        node.wait(timeout=300)
    load_before = load()
    stages, stall = stage_times(config, vectors, picks.tolist())
    for stage, ms in stages.items():
        figures.append({**base, "figure": f"stage_{stage}_ms", "queries": len(picks), **ms,
                        "load": f"{load_before} -> {load()}"})
    figures.append({**base, "figure": "index_snapshot", **stall, "load": load()})
    index_file = next((folder / "data" / "index").glob("hnsw-*.bin"))
    figures.append({**base, "figure": "vectors_plus_graph_mib",
                    "value": round(index_file.stat().st_size / 2**20, 1), "load": load()})

    for figure in figures:
        print(json.dumps(figure))
    print(f"\n{machine()}; {args.count} studies ({vectors_from} centres), M={args.m}, ef_construction={args.ef_construction}, "
          f"ef_search={args.ef_search}\n")
    print("| figure | value | load (1/5/15 min) |\n| --- | --- | --- |")
    for f in figures:
        value = {k: v for k, v in f.items() if k not in base and k not in ("figure", "load")}
        print(f"| {f['figure']} | {', '.join(f'{k} {v}' for k, v in value.items())} | {f['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
