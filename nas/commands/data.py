"""`detforge data`: make the built-in synthetic dataset, or check a dataset for bad images and labels."""
from __future__ import annotations

import argparse
import time

from nas.commands import command_group
from nas.output import emit, format_mapping


def register(subparsers) -> None:
    """Add `data synth` and `data check` to the `detforge` parser."""
    _, sub = command_group(subparsers, "data", "datasets: make the synthetic one, check a YOLO one")

    s = sub.add_parser("synth", help="write the built-in synthetic shapes dataset (YOLO format)")
    s.add_argument("--out", required=True, help="output directory (created; resumed if it holds a partial run)")
    s.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    s.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    s.add_argument("--imgsz", type=int, default=320, help="image side in pixels (default 320)")
    s.add_argument("--classes", type=int, default=6, help="number of shape classes, 1..10 (default 6)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_synth)

    c = sub.add_parser("check", help="scan a dataset (data.yaml or its directory) and report bad data")
    c.add_argument("data", help="data.yaml, or a directory holding one")
    c.add_argument("--strict", action="store_true", help="fail on the first problem instead of skipping it")
    c.add_argument("--no-cache", action="store_true", help="rescan instead of using the label cache")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic dataset and report where it is."""
    from trainer.synthetic import SHAPES, generate

    t0 = time.perf_counter()
    data_yaml = generate(args.out, train=args.train, val=args.val, imgsz=args.imgsz, classes=args.classes,
                         seed=args.seed, workers=args.workers, progress=True)
    result = {
        "data": str(data_yaml),
        "root": str(data_yaml.parent),
        "train": args.train,
        "val": args.val,
        "imgsz": args.imgsz,
        "nc": args.classes,
        "names": list(SHAPES[: args.classes]),
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    emit(result, args.json, f"wrote {data_yaml}\n" + format_mapping(result))
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Scan every split of a data.yaml; exit 1 when any problem was found (2 with --strict)."""
    import logging

    from trainer.datasets import YoloDataset, load_data_config

    logging.basicConfig(format="%(message)s", level=logging.INFO)
    cfg = load_data_config(args.data)
    splits = {}
    for split in ("train", "val", "test"):
        if getattr(cfg, split) is None:
            continue
        ds = YoloDataset.from_config(cfg, split, imgsz=64, augment=False, strict=args.strict,
                                     cache=not args.no_cache)
        splits[split] = ds.stats
    bad = sum(s["skipped_images"] + s["dropped_labels"] + s["duplicates"] for s in splits.values())
    result = {"data": str(cfg.yaml_path), "nc": cfg.nc, "names": cfg.names, "splits": splits, "problems": bad}
    text = "\n".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in s.items()) for k, s in splits.items())
    emit(result, args.json, text)
    return 1 if bad else 0
