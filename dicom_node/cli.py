"""`mmdl-node`: serve the node, check a configuration, and the models' commands (label, manifest, train, calibrate, evaluate)."""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from config import ConfigError, load_settings

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]  # the exit code


@dataclass(frozen=True)
class Command:
    """One `mmdl-node` command: its help line, and ``load``, which gives the function that adds its arguments
    and the one that runs it. Only the command being run is loaded: the models' commands import torch, which
    `status` and `backfill` need not wait for."""

    help: str
    load: Callable[[], tuple[AddArguments, Run]]


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file (default: embedded defaults)")


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.server import Node  # torch-free: the node sets OMP_WAIT_POLICY before torch loads (process.py)

    settings = load_settings(args.config)
    node = Node(settings)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    node.start()
    # What start-up loaded lives as long as the process: out of the collector's sight, a full collection
    # walks only what serving creates (milliseconds, not a pause of every association).
    gc.freeze()
    print(f"mmdl-node serving {settings.node.ae_title} and {settings.node.similar_ae_title} "
          f"on {settings.node.host}:{node.port}, data in {settings.node.data_dir}", flush=True)
    stopping.wait()
    node.stop()
    return 0


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="config_command", required=True)
    check = commands.add_parser("check", help="validate a configuration file without starting")
    check.add_argument("file")


def _config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(f"{args.file}: valid ({settings.node.ae_title}/{settings.node.similar_ae_title} on port "
          f"{settings.node.port}, {len(settings.peers)} peers, data in {settings.node.data_dir})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dicom_node.status_command import node_status

    status = node_status(load_settings(args.config))
    print("\n".join(status.lines))
    return 0 if status.healthy else 1


def _backfill(args: argparse.Namespace) -> int:
    import time

    from dicom_node.process import configure_logging
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


def _backfill_arguments(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument("--from", dest="date_from", type=_date, help="first study date, YYYYMMDD")
    parser.add_argument("--to", dest="date_to", type=_date, help="last study date, YYYYMMDD")
    parser.add_argument("--modality", action="append",
                        help="only studies with this modality (repeatable; default: backfill.modalities)")


def _label() -> tuple[AddArguments, Run]:
    from models.commands import label
    return label.add_arguments, label.run


def _manifest() -> tuple[AddArguments, Run]:
    from models.commands import manifest
    return manifest.add_arguments, manifest.run


def _train() -> tuple[AddArguments, Run]:
    from models.commands import train
    return train.add_arguments, train.run


def _calibrate() -> tuple[AddArguments, Run]:
    from models.commands import calibrate
    return calibrate.add_arguments, calibrate.run


def _evaluate() -> tuple[AddArguments, Run]:
    from models.commands import evaluate
    return evaluate.add_arguments, evaluate.run


def _bench() -> tuple[AddArguments, Run]:
    from bench import populate
    return populate.add_arguments, populate.run


COMMANDS = {
    "serve": Command("run the node", lambda: (_config_option, _serve)),
    "status": Command("health and metrics at a glance (from the running node, or its catalog)",
                      lambda: (_config_option, _status)),
    "backfill": Command("have the PACS send the studies it already holds ([backfill])",
                        lambda: (_backfill_arguments, _backfill)),
    "config": Command("configuration tools", lambda: (_config_arguments, _config_check)),
    "label": Command("label report texts (JSONL) with the 14 CheXpert observations", _label),
    "manifest": Command("build a training manifest (CSV) from public dataset layouts", _manifest),
    "train": Command("train an MMDL model from a manifest", _train),
    "calibrate": Command("fit calibrated findings and the match probability into a model", _calibrate),
    "evaluate": Command("evaluate retrieval (mAP@k, per-class AP, Acc-k) on a manifest", _evaluate),
    "bench": Command("benchmark tools: populate a data dir with synthetic studies", _bench),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser: every command listed, the arguments of ``command`` (the one being run) only."""
    parser = argparse.ArgumentParser(prog="mmdl-node", description="MMDL similar-case DICOM node")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        sub = commands.add_parser(name, help=entry.help, description=entry.help)
        if name == command:
            add_arguments, run = entry.load()
            add_arguments(sub)
            sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(next((word for word in words if not word.startswith("-")), None)).parse_args(words)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
