"""How well a LatencyTable predicts: random architectures measured end to end against their predictions."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search_spaces.errors import ConfigError
from search_spaces.io import atomic_path, atomic_write_json

from .backends import Backend
from .fingerprint import check_fingerprint
from .table import MODEL_GROUP, MODEL_PASSES, LatencyTable, measure_architectures, sample_architectures

if TYPE_CHECKING:
    from search_spaces import Architecture


@dataclass
class ValidationReport:
    """Prediction error of a table over measured architectures (errors in percent, shares as fractions)."""

    n: int
    seed: int
    backend: str
    imgsz: int
    device: str
    mape: float  # mean |predicted - measured| / measured, percent
    kendall_tau: float
    spearman: float
    within_5: float  # share of architectures predicted within +-5 % of the measured latency
    within_10: float  # ... within +-10 %
    bias: float  # median signed error, percent (positive: the table over-predicts)
    max_error: float  # worst |error|, percent
    measure_s: float  # seconds spent measuring the architectures end to end
    table: str | None = None
    plot: str | None = None
    report: str | None = None
    points: list[dict[str, Any]] = field(default_factory=list)  # name, predicted_ms, measured_ms, ...

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    def figures(self) -> dict[str, Any]:
        """The headline numbers, without the per-architecture points."""
        d = self.to_dict()
        d.pop("points")
        return d

    def passed(self, within_10: float = 0.9, tau: float = 0.85) -> bool:
        """The acceptance: a share of at least `within_10` within +-10 %, and Kendall tau >= `tau`."""
        return self.within_10 >= within_10 and self.kendall_tau >= tau

    def text(self) -> str:
        """One line for people."""
        return (f"n={self.n}: MAPE {self.mape:.2f}%, Kendall tau {self.kendall_tau:.3f}, Spearman "
                f"{self.spearman:.3f}, within 5% {self.within_5:.0%}, within 10% {self.within_10:.0%}, "
                f"bias {self.bias:+.2f}%, worst {self.max_error:.1f}% [{self.backend} imgsz {self.imgsz}, "
                f"{self.device}]")


def error_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """MAPE, Kendall tau, Spearman, shares within 5/10 %, bias and worst error of predictions."""
    from scipy import stats

    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    err = (p - m) / m * 100.0
    ranked = len(p) >= 2 and np.ptp(p) > 0 and np.ptp(m) > 0  # rank correlation is undefined for constants
    return {
        "mape": float(np.mean(np.abs(err))),
        "kendall_tau": float(stats.kendalltau(p, m)[0]) if ranked else math.nan,
        "spearman": float(stats.spearmanr(p, m)[0]) if ranked else math.nan,
        "within_5": float(np.mean(np.abs(err) <= 5.0)),
        "within_10": float(np.mean(np.abs(err) <= 10.0)),
        "bias": float(np.median(err)),
        "max_error": float(np.max(np.abs(err))),
    }


def validate(table: LatencyTable, space: Any, n: int = 50, seed: int = 0, backend: Backend | None = None, *,
             archs: Sequence[Architecture] | None = None, group: int = MODEL_GROUP,
             plot: str | Path | None = None,
             report: str | Path | None = None, progress: bool = False, realtime: bool = False,
             passes: int = MODEL_PASSES) -> ValidationReport:
    """Predict and measure `n` random architectures of `space` (seeded) end to end on the table's backend."""
    # Every model is measured in `passes` passes minutes apart and its fastest pass counts
    # (measure_architectures); `realtime` as in build().
    models = list(archs) if archs is not None else sample_architectures(space, n, seed)
    if not models:  # the error statistics of nothing are not a validation
        raise ConfigError(f"nothing to validate: n must be >= 1, got {n}" if archs is None
                          else "nothing to validate: no architectures given", field="n")
    be = backend or table.backend_instance()
    check_fingerprint(table.fingerprint, be.fingerprint(table.batch),
                      what="the latency table being validated")
    predicted = [table.predict(a) for a in models]
    t0 = time.perf_counter()
    measured = measure_architectures(models, be, table.imgsz, batch=table.batch, group=group,
                                     fuse=table.fused, progress=progress, desc="validation",
                                     realtime=realtime, passes=passes)
    measure_s = time.perf_counter() - t0
    meds = [m.median_ms for m in measured]
    points = [{"name": a.name, "predicted_ms": p, "measured_ms": m.median_ms,
               "error_pct": (p - m.median_ms) / m.median_ms * 100.0, "noise": m.noise,
               "other_load": m.other_load, "stop_reason": m.stop_reason, "passes_ms": m.repeat_medians_ms,
               "arch": a.to_dict()}
              for a, p, m in zip(models, predicted, measured)]
    rep = ValidationReport(n=len(models), seed=seed, backend=be.name, imgsz=table.imgsz,
                           device=table.fingerprint.slug(), measure_s=round(measure_s, 2),
                           table=str(table.path) if table.path else None, points=points,
                           **error_stats(predicted, meds))
    if plot is not None:
        rep.plot = str(plot_report(rep, plot))
    if report is not None:
        rep.report = str(report)
        atomic_write_json(report, rep.to_dict())
    return rep


def plot_report(rep: ValidationReport, path: str | Path) -> Path:
    """Scatter of predicted vs measured latency with the +-10 % band, written as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array([p["measured_ms"] for p in rep.points])
    p = np.array([p["predicted_ms"] for p in rep.points])
    lo, hi = float(min(m.min(), p.min())) * 0.9, float(max(m.max(), p.max())) * 1.1
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    xs = np.array([lo, hi])
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.12, label="±10 %")
    ax.plot(xs, xs, color="black", lw=0.8, label="predicted = measured")
    inside = np.abs(p - m) <= 0.1 * m
    ax.scatter(m[inside], p[inside], s=16, color="tab:blue", label="within ±10 %")
    ax.scatter(m[~inside], p[~inside], s=20, color="tab:red", marker="x", label="outside")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{rep.backend}, imgsz {rep.imgsz}, n={rep.n}", fontsize=10)
    ax.text(0.03, 0.97, f"MAPE {rep.mape:.1f}%\nKendall τ {rep.kendall_tau:.3f}\n"
            f"Spearman {rep.spearman:.3f}\n"
            f"within 5% {rep.within_5:.0%}, 10% {rep.within_10:.0%}", transform=ax.transAxes, va="top",
            fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
