"""The fitted correction from a sum of block latencies to an end-to-end latency: a + b * sum + c * blocks."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search_spaces.errors import ConfigError

# Relative residuals above this scale count linearly instead of quadratically in the fit (soft-L1 loss), so
# one model measured during a burst of other load cannot drag the line.
ROBUST_SCALE = 0.03
MIN_SPAN = 1.3  # a coefficient is fitted only where its feature varies at least this much (max / min)
MIN_POINTS_PER_PARAM = 2  # ... and with at least this many fit models per fitted coefficient, plus one


@dataclass
class OverheadModel:
    """`predicted = a_ms + b * sum(max(entry - call_overhead_ms, 0)) + c_ms * blocks`, fitted on models."""

    a_ms: float = 0.0  # fixed cost of a whole model that no block carries (graph input/output, final concat)
    b: float = 1.0  # ratio of whole-model to block time (fusions across blocks, warm caches)
    c_ms: float = 0.0  # cost per block that a block timed alone does not show (hand-offs between nodes)
    call_overhead_ms: float = 0.0  # one empty model's latency: the per-call cost inside every block entry
    method: str = "identity"  # 'soft_l1' (robust least squares), 'ratio' (too few models), 'identity' (none)
    points: list[dict[str, Any]] = field(default_factory=list)  # per model: arch, sum_ms, blocks, measured_ms
    residual_mape: float | None = None  # mean |relative error| of the fit on its own models, in percent

    def apply(self, sum_ms: float, blocks: int = 0) -> float:
        """End-to-end latency predicted from a block sum (net of call overheads) and the block count."""
        # The fit is linear over the fit models' range; below it a negative intercept can take a small
        # (pruned) model under zero, which would meet any budget. No model runs faster than an empty call.
        return max(self.a_ms + self.b * sum_ms + self.c_ms * blocks, self.call_overhead_ms)

    def net(self, entry_ms: float) -> float:
        """A block entry without the per-call cost that a block inside a whole model does not pay."""
        return max(entry_ms - self.call_overhead_ms, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | None = None) -> OverheadModel:
        """Inverse of to_dict (unknown keys ignored); a malformed mapping is a ConfigError on `overhead`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a mapping, got {type(d).__name__}", path=path, field="overhead")
        try:
            om = cls(a_ms=float(d.get("a_ms", 0.0)), b=float(d.get("b", 1.0)), c_ms=float(d.get("c_ms", 0.0)),
                     call_overhead_ms=float(d.get("call_overhead_ms", 0.0)),
                     method=str(d.get("method", "identity")), points=list(d.get("points", [])),
                     residual_mape=d.get("residual_mape"))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"malformed overhead model ({e})", path=path, field="overhead") from None
        for i, pt in enumerate(om.points):
            ms = pt.get("measured_ms") if isinstance(pt, Mapping) else None
            if not (isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0):
                raise ConfigError(f"a fit point is an object with a positive measured_ms, got {pt!r}"[:200],
                                  path=path, field=f"overhead.points.{i}")
        if not (all(math.isfinite(v) for v in (om.a_ms, om.b, om.c_ms)) and om.b > 0):
            raise ConfigError(f"a_ms={om.a_ms}, b={om.b}, c_ms={om.c_ms}: b must be positive and all finite",
                              path=path, field="overhead")
        return om


def _spans(x: np.ndarray) -> bool:
    """Whether a positive feature varies enough across the fit models to identify its coefficient."""
    return len(x) > 0 and float(x.min()) > 0 and float(x.max()) >= MIN_SPAN * float(x.min())


def fit_overhead(sums_ms: Sequence[float], measured_ms: Sequence[float], *,
                 blocks: Sequence[int] | None = None, call_overhead_ms: float = 0.0,
                 archs: Sequence[Any] | None = None) -> OverheadModel:
    """Fit `measured = a + b * sum + c * blocks` by robust least squares on relative errors."""
    # Relative residuals, because the acceptance is a relative one (within +-10 %) and the models span a wide
    # range of latencies: an absolute fit would let the largest model decide alone. The intercept and the
    # per-block term are only fitted when the fit models' sums (block counts) vary enough and there are enough
    # models; otherwise they trade off against the slope and extrapolate badly, and stay 0.
    s = np.asarray(sums_ms, dtype=np.float64)
    m = np.asarray(measured_ms, dtype=np.float64)
    n = np.zeros_like(s) if blocks is None else np.asarray(blocks, dtype=np.float64)
    if not (s.shape == m.shape == n.shape):
        raise ValueError(f"{len(s)} sums, {len(n)} block counts, {len(m)} measurements")
    names = list(archs) if archs is not None else [None] * len(s)
    points = [{"arch": a, "sum_ms": float(x), "blocks": int(k), "measured_ms": float(y)}
              for a, x, k, y in zip(names, s, n, m)]
    ok = (s > 0) & (m > 0) & np.isfinite(s) & np.isfinite(m)
    s, m, n = s[ok], m[ok], n[ok]
    if len(s) == 0:
        return OverheadModel(call_overhead_ms=call_overhead_ms, points=points)
    ratio = float(np.median(m / s))
    coef, method = {"a": 0.0, "b": ratio, "c": 0.0}, "ratio"
    free = ["b"]
    if _spans(s):
        free.append("a")
    if _spans(n):
        free.append("c")
    while len(free) > 1 and len(s) < MIN_POINTS_PER_PARAM * len(free) + 1:
        free.pop()  # too few models for every coefficient: drop the last identifiable one first
    if len(free) > 1:
        from scipy.optimize import least_squares

        cols = {"a": np.ones_like(s), "b": s, "c": n}
        design = np.stack([cols[k] for k in free], axis=1)
        x0 = [ratio if k == "b" else 0.0 for k in free]
        res = least_squares(lambda p: (design @ p - m) / m, x0=x0, loss="soft_l1", f_scale=ROBUST_SCALE)
        fitted = {**coef, **dict(zip(free, (float(v) for v in res.x)))}
        # A non-positive slope or a non-positive prediction for a fit model means the points are
        # noise-dominated.
        if fitted["b"] > 0 and float(np.min(fitted["a"] + fitted["b"] * s + fitted["c"] * n)) > 0:
            coef, method = fitted, "soft_l1"
    pred = coef["a"] + coef["b"] * s + coef["c"] * n
    mape = float(np.mean(np.abs(pred - m) / m) * 100.0)
    return OverheadModel(a_ms=coef["a"], b=coef["b"], c_ms=coef["c"], call_overhead_ms=call_overhead_ms,
                         method=method, points=points, residual_mape=mape)
