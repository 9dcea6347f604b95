"""Start-up alone: the node on a data dir `bench.query` populated, nothing else running; seconds from process start
to the DICOM port open and to the first similar-case answer over HTTP, and the longest HTTP wait meanwhile (the
stall while hnswlib parses the snapshot). With --cold the page cache is dropped first (root). `bench.query` times
the same, but right after reading every vector from the catalog itself, which slows the load (docs/BENCHMARKS.md).
Run from the repository root:

    .venv/bin/python -m bench.startup --folder /tmp/mmdl-bench/query-1000000-m32-efc200-sample-embeddings --cold
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.populate import synthetic_uid
from bench.query import load, machine, serve, wait_for_index, wait_for_port
from tests.helpers import free_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="a bench.query folder (its data/ is used)")
    parser.add_argument("--cold", action="store_true", help="sync and drop the page cache first (needs root)")
    parser.add_argument("--node-tree", type=Path, help="serve from this checkout of the node (before/after runs)")
    args = parser.parse_args()
    folder = args.folder.resolve()
    port, web_port = free_port(), free_port()
    config = folder / "node-startup.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{folder / "data"}"\n'
                      f'[web]\nenabled = true\nport = {web_port}\n[logging]\nlevel = "WARNING"\n')
    if args.cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    at_start = load()
    started = time.monotonic()
    node = serve(config, folder / "node-startup.log", args.node_tree)
    try:
        port_open_s = wait_for_port(port, node, folder / "node-startup.log", started)
        longest_ms = wait_for_index(web_port, synthetic_uid(1), node)
        ready_s = time.monotonic() - started
    finally:
        node.terminate()
        node.wait(timeout=120)
    print(json.dumps({"bench": "startup", "machine": machine(), "folder": folder.name, "cold": args.cold,
                      "port_open_s": round(port_open_s, 2), "index_ready_s": round(ready_s, 2),
                      "longest_http_wait_ms": round(longest_ms, 1), "load": at_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
