"""Shared helpers of the NAS search tests: a tiny dataset, a stand-in latency table and a 1-epoch supernet.

The latency table is NOT a measurement: it is built with the latency-table tests' SizeBackend, whose
'latency' of a block is 0.01 ms + 1 ms per 100k parameters. It is deterministic and has an entry for
every block of the tiny space at 64 px, which is all the search plumbing needs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
IMGSZ = 64
NC = 3
_CACHE: dict[str, Artifacts] = {}


@dataclass(frozen=True)
class Artifacts:
    """Files the search tests share: data.yaml, the stand-in table, supernet.pt."""

    data: Path
    table: Path
    supernet: Path


def artifacts(base: Path) -> Artifacts:
    """Build (once per pytest session and base directory) the dataset, the table and the supernet."""
    key = str(base)
    if key in _CACHE:
        return _CACHE[key]
    from latency_tables import LatencyTable
    from nas.supernet_train import SupernetTrainer
    from search_spaces.space import load_space
    from tests.latency_table import SizeBackend
    from trainer.config import TrainConfig
    from trainer.synthetic import generate

    data = generate(base / "data", train=16, val=8, imgsz=IMGSZ, classes=NC, seed=0)
    table = base / "table.json"
    LatencyTable.build(load_space("tiny").with_nc(NC), SizeBackend(), IMGSZ, table, progress=False, fit_models=0,
                       group=64)
    cfg = TrainConfig(data=str(data), out=str(base / "supernet"), epochs=1, imgsz=IMGSZ, batch=8, workers=0,
                      progress=False)
    SupernetTrainer(cfg, space="tiny").train()
    _CACHE[key] = Artifacts(data, table, base / "supernet" / "supernet.pt")
    return _CACHE[key]


def env() -> dict[str, str]:
    """A subprocess environment with one thread per process (a shared CPU) and the repo importable."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def search_args(a: Artifacts, storage: str, study: str, trials: int, *extra: str) -> list[str]:
    """`detforge search` arguments for the shared artifacts (small batches, quiet)."""
    return ["search", "--supernet", str(a.supernet), "--table", str(a.table), "--data", str(a.data),
            "--budget-ms", "4", "--trials", str(trials), "--storage", storage, "--study", study,
            "--bn-batches", "1", "--batch", "8", "--quiet", "--json", "--heartbeat", "1", "--grace", "30", *extra]


def spawn(args: list[str], out: Path | None = None) -> subprocess.Popen:
    """Start `python -m nas.cli ARGS` as a separate worker process."""
    log = open(out, "w") if out is not None else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "nas.cli", *args], cwd=ROOT, env=env(), stdout=log,
                            stderr=subprocess.STDOUT)


def one_thread() -> int:
    """Set torch to one thread; return the previous count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    return n
