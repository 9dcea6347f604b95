"""Sub-commands of `mmdl-node` that belong to the models package.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``; dicom_node.cli wires them.
"""
