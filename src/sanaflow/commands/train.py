"""`sanaflow train --config F [--set k=v ...] [--resume]`: run a training config.

Multi-GPU: launch the same command through accelerate or torchrun, e.g.
``accelerate launch --num_processes 2 -m sanaflow.cli train --config F``.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `train` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train a model (text-to-image flow matching, or the DC-AE) from a YAML config",
        description="Train from a YAML config (a path, or the name of a shipped config such as "
                    "train/shapes-tiny-dit). Resumable: --resume continues the latest checkpoint of output_dir.",
    )
    p.add_argument("--config", required=True, help="YAML config file or shipped config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, build the task and train."""
    from ..config import load_config
    from ..training.config import TrainConfig, validate
    from ..training.tasks import build_task
    from ..training.trainer import Trainer, check_output_dir
    from ..utils import dumps_json

    cfg = validate(load_config(args.config, TrainConfig, args.overrides))
    # Checks of output_dir (and of the checkpoint --resume continues) come before any model is built.
    check_output_dir(cfg, args.resume)
    task = build_task(cfg)
    summary = Trainer(cfg, task).fit(resume=args.resume)
    print(dumps_json(summary))
    return 0
