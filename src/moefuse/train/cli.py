"""``moefuse train [CONFIG.yaml] [--key value ...]``."""

from __future__ import annotations

import argparse
import sys


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfigError, help_text
    from .run import run_train

    argv = list(args.args)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    config_file = argv.pop(0) if argv and not argv[0].startswith("-") else None
    try:
        run_train(config_file, argv)
    except TrainConfigError as e:
        print(f"moefuse train: {e}", file=sys.stderr)
        return 2
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    # The keys are TRL's and moefuse's (parsed by HfArgumentParser in moefuse.train.config); '+' as the
    # prefix keeps argparse from reading --key options itself, so they all reach the remainder.
    train = sub.add_parser(
        "train",
        help="supervised fine-tuning (LoRA or full) on TRL's SFTTrainer; no CONFIG: the built-in tiny default",
        add_help=False,
        prefix_chars="+",
    )
    train.add_argument("args", nargs=argparse.REMAINDER, help="[CONFIG.yaml] [--key value ...]")
    train.set_defaults(func=cmd_train)
