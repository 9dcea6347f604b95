"""`mmdl-node`: serve the node, check a configuration, and the models' commands (label, manifest, train, evaluate)."""
from __future__ import annotations

import argparse
import importlib
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
    "evaluate": ("models.commands.evaluate", "evaluate retrieval (mAP@k, per-class AP, Acc-k) on a manifest"),
    "bench": ("indexer.populate", "benchmark tools: populate a data dir with synthetic studies"),
}


def _serve(args: argparse.Namespace) -> int:
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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(prog="mmdl-node", description="MMDL similar-case DICOM node")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node")
    serve.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    serve.set_defaults(func=_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file without starting")
    check.add_argument("file")
    check.set_defaults(func=_config_check)

    modules: dict[str, ModuleType] = {}
    for name, (module_name, help_text) in DELEGATED.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
