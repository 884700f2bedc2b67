"""Sub-commands of `detforge`; every module here has `register(subparsers)`."""
from __future__ import annotations

import argparse


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str,
                  metavar: str = "ACTION") -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A `detforge NAME ACTION` group; `detforge NAME` alone prints the group's help and exits 2."""
    parser = subparsers.add_parser(name, help=help)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar=metavar)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
    return parser, actions


def add_optimizer_args(p: argparse.ArgumentParser, trains: str = "the training") -> None:
    """The optimizer flags every training command shares (`optimizer_settings` reads them back); `trains` names
    what they drive in the help (e.g. "the trials' trainings")."""
    from trainer.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig

    p.add_argument("--nbs", type=int, default=TrainConfig.nbs,
                   help=f"nominal batch of {trains}: gradients accumulate to it (YOLOv7: 64; = --batch for one "
                        "optimizer step per batch)")
    p.add_argument("--optimizer", default=TrainConfig.optimizer, choices=OPTIMIZERS,
                   help="sgd (YOLOv7's, Nesterov) or adamw, which learns much faster in short CPU runs (docs/training.md)")
    p.add_argument("--lr-schedule", default=TrainConfig.lr_schedule, choices=LR_SCHEDULES)
    p.add_argument("--lr0", type=float, default=None,
                   help="initial learning rate, overriding the hyp's lr0 (0.01 is SGD's; use about 0.002 with adamw)")


def optimizer_settings(args: argparse.Namespace) -> dict[str, object]:
    """TrainConfig's optimizer fields (nominal batch included) from the flags of `add_optimizer_args`."""
    return {"nbs": args.nbs, "optimizer": args.optimizer, "lr_schedule": args.lr_schedule, "lr0": args.lr0}
