"""``moefuse convert`` and ``moefuse inspect``, added to the ``moefuse`` command by :func:`add_parsers`."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .engines import ALIASES, FORMATS, resolve
from .layouts import FUSED_LAYOUTS, LAYOUTS, LORA_LAYOUTS, lora_layout_for

_USAGE = "moefuse convert {to-fused [--layout L] | to-unfused | --to LAYOUT} IN OUT [--overwrite]"


def cmd_convert(args: argparse.Namespace) -> int:
    from . import lora
    from .model import convert_model

    direction = args.args[0] if args.args[0] in ("to-fused", "to-unfused") else None
    paths = args.args[1:] if direction else args.args
    layout = {"to-fused": args.layout or "transformers", "to-unfused": "per_expert"}.get(direction, args.to)
    if (
        len(paths) != 2
        or layout is None
        or (direction and args.to)
        or (args.layout and direction != "to-fused")
    ):
        print(f"moefuse convert: usage: {_USAGE}", file=sys.stderr)
        return 2
    source, target = paths
    options = dict(overwrite=args.overwrite, progress=not args.quiet)
    adapter = lora.is_adapter(source)
    try:
        if adapter:
            layout = lora_layout_for(resolve(layout))
            lora.convert_lora(source, target, layout, **options)
        else:
            if layout not in LAYOUTS:
                print(
                    f"moefuse convert: {layout} is a LoRA layout; a model takes {', '.join(LAYOUTS)}",
                    file=sys.stderr,
                )
                return 2
            convert_model(source, target, layout, max_shard_size=args.max_shard_size, **options)
    except CheckpointError as e:
        print(f"moefuse convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({layout} layout)")
    if adapter and layout in FORMATS:  # the table is of adapter formats
        engines = sorted({reader.engine for reader in FORMATS[layout].readers})
        print(f"read as is by {', '.join(engines)}: moefuse inspect {target} says which versions and models")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import compare, describe

    try:
        if args.verify:
            if len(args.paths) != 2:
                print(
                    "moefuse inspect: --verify compares two folders: moefuse inspect --verify A B",
                    file=sys.stderr,
                )
                return 2
            first, second = args.paths
            differences = compare(first, second)
            if not differences:
                print(f"identical tensors up to layout: {first} == {second}")
                return 0
            for d in differences:
                print(f"{d.name}: {d.first or 'absent'} != {d.second or 'absent'}")
            print(f"{len(differences)} tensors differ between {first} and {second}")
            return 1
        for path in args.paths:
            rows = describe(path)
            width = max(map(len, rows))
            for key, value in rows.items():
                lines = value if isinstance(value, list) else [value]
                print(f"{key:<{width}}  {lines[0]}")
                print("".join(f"{'':<{width}}  {line}\n" for line in lines[1:]), end="")
        return 0
    except CheckpointError as e:
        print(f"moefuse inspect: {e}", file=sys.stderr)
        return 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``inspect`` to the ``moefuse`` command's subparsers."""
    convert = sub.add_parser(
        "convert",
        help="convert a model or LoRA adapter between expert layouts (streaming, lossless)",
        description="Convert a model checkpoint or PEFT LoRA adapter folder between expert layouts "
        f"({', '.join(LAYOUTS)}; adapters: {', '.join(LORA_LAYOUTS)}). The input is never written to.",
        usage=_USAGE,
    )
    convert.add_argument("args", nargs="+", metavar="[to-fused|to-unfused] IN OUT")
    convert.add_argument(
        "--to",
        choices=LAYOUTS + tuple(layout for layout in LORA_LAYOUTS if layout not in LAYOUTS) + tuple(ALIASES),
        help="target layout (from any layout); adapters also take fused and peft_target_parameters, and "
        + ", ".join(f"{alias} (= {resolve(alias)})" for alias in ALIASES),
    )
    convert.add_argument(
        "--layout", choices=FUSED_LAYOUTS, help="fused layout of to-fused (default: transformers)"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    convert.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=cmd_convert)
    inspect = sub.add_parser(
        "inspect", help="layout, family, experts, dtypes, size and shards of a checkpoint"
    )
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="model or adapter folder(s)")
    inspect.add_argument(
        "--verify", action="store_true", help="with two PATHs: check they hold identical tensors up to layout"
    )
    inspect.set_defaults(func=cmd_inspect)
