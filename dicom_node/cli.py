"""`mmdl-node`: serve the node, check a configuration, and the models' commands (label, manifest, train, calibrate, evaluate)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

from config import ConfigError, load_settings

# Sub-commands that live in other packages: each module has add_arguments(parser) and run(args) -> int.
DELEGATED = {
    "label": ("models.commands.label", "label report texts (JSONL) with the 14 CheXpert observations"),
    "manifest": ("models.commands.manifest", "build a training manifest (CSV) from public dataset layouts"),
    "train": ("models.commands.train", "train an MMDL model from a manifest"),
    "calibrate": ("models.commands.calibrate", "fit calibrated findings and the match probability into a model"),
    "evaluate": ("models.commands.evaluate", "evaluate retrieval (mAP@k, per-class AP, Acc-k) on a manifest"),
    "bench": ("bench.populate", "benchmark tools: populate a data dir with synthetic studies"),
}


def _serve(args: argparse.Namespace) -> int:
    # torch (imported later, with the model) otherwise lets its idle OpenMP threads spin; beside the
    # node's other threads that halved the embedding rate and doubled freshness p99 (docs/BENCHMARKS.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dicom_node.logsetup import configure_logging
    from dicom_node.server import Node

    settings = load_settings(args.config)
    configure_logging(settings.logging)
    node = Node(settings)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    node.start()
    print(f"mmdl-node serving {settings.node.ae_title} and {settings.node.similar_ae_title} "
          f"on {settings.node.host}:{node.port}, data in {settings.node.data_dir}", flush=True)
    stopping.wait()
    node.stop()
    return 0


def _config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(f"{args.file}: valid ({settings.node.ae_title}/{settings.node.similar_ae_title} on port "
          f"{settings.node.port}, {len(settings.peers)} peers, data in {settings.node.data_dir})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dicom_node.glance import status_lines

    lines = status_lines(load_settings(args.config))
    print("\n".join(lines))
    return 0 if "health: ok" in lines[1] else 1


def _backfill(args: argparse.Namespace) -> int:
    import time

    from dicom_node.logsetup import configure_logging
    from indexer.backfill import Filters, Progress, make_source, run_backfill
    from indexer.catalog import Catalog

    settings = load_settings(args.config)
    configure_logging(settings.logging)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per REST call otherwise
    filters = Filters(args.date_from or "", args.date_to or "", tuple(args.modality or settings.backfill.modalities))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    last = [0.0]

    def report(progress: Progress) -> None:
        if time.monotonic() - last[0] >= 1.0 or progress.done == progress.listed:
            last[0] = time.monotonic()
            print(progress.line(), file=sys.stderr, flush=True)

    catalog = Catalog(settings.catalog_url)
    try:
        progress = run_backfill(make_source(settings.backfill, settings.node.ae_title), catalog, filters,
                                settings.backfill, report, stop)
    finally:
        catalog.close()
    print(progress.line() + (" (stopped: run again to resume)" if stop.is_set() else ""), flush=True)
    return 1 if progress.failed or stop.is_set() else 0


def _date(value: str) -> str:
    if len(value) != 8 or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected YYYYMMDD, got {value!r}")
    return value


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser; a delegated module (they import torch) is imported only when ``command`` is it, or is None."""
    parser = argparse.ArgumentParser(prog="mmdl-node", description="MMDL similar-case DICOM node")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node")
    serve.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    serve.set_defaults(func=_serve)

    status = commands.add_parser("status", help="health and metrics at a glance (from the running node, or its catalog)")
    status.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    status.set_defaults(func=_status)

    backfill = commands.add_parser("backfill", help="have the PACS send the studies it already holds ([backfill])")
    backfill.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    backfill.add_argument("--from", dest="date_from", type=_date, help="first study date, YYYYMMDD")
    backfill.add_argument("--to", dest="date_to", type=_date, help="last study date, YYYYMMDD")
    backfill.add_argument("--modality", action="append",
                          help="only studies with this modality (repeatable; default: backfill.modalities)")
    backfill.set_defaults(func=_backfill)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file without starting")
    check.add_argument("file")
    check.set_defaults(func=_config_check)

    modules: dict[str, ModuleType] = {}
    for name, (module_name, help_text) in DELEGATED.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if command not in (None, name):
            continue  # listed in the help, not imported: `status` and `backfill` start in a second, not twenty
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser, _ = build_parser(command if command in {"serve", "status", "backfill", "config"} else None)
    args = parser.parse_args(words)
    try:
        return int(args.func(args))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
