"""The fitted correction from a sum of block latencies to an end-to-end latency: `a + b * sum`."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search_spaces.errors import ConfigError

# Relative residuals above this scale count linearly instead of quadratically in the fit (soft-L1 loss), so
# one model measured under a burst of other load cannot drag the line.
ROBUST_SCALE = 0.03


@dataclass
class OverheadModel:
    """`predicted = a_ms + b * sum(max(entry - call_overhead_ms, 0))`, fitted on measured whole models."""

    a_ms: float = 0.0  # fixed cost of a whole model that no block carries (graph input/output, final concat)
    b: float = 1.0  # ratio of whole-model to block time (fusions across blocks, warm caches, thread hand-offs)
    call_overhead_ms: float = 0.0  # one empty model's latency: the per-call cost inside every block entry
    method: str = "identity"  # 'soft_l1' (robust least squares), 'ratio' (too few models), 'identity' (none)
    points: list[dict[str, Any]] = field(default_factory=list)  # {arch, sum_ms, measured_ms} per fit model
    residual_mape: float | None = None  # mean |relative error| of the fit on its own models, in percent

    def apply(self, sum_ms: float) -> float:
        """End-to-end latency predicted from a block sum (already net of call overheads)."""
        return self.a_ms + self.b * sum_ms

    def net(self, entry_ms: float) -> float:
        """A block entry without the per-call cost that a block inside a whole model does not pay."""
        return max(entry_ms - self.call_overhead_ms, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | None = None) -> OverheadModel:
        """Inverse of to_dict (unknown keys ignored); a malformed mapping is a ConfigError naming `overhead`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a mapping, got {type(d).__name__}", path=path, field="overhead")
        try:
            om = cls(a_ms=float(d.get("a_ms", 0.0)), b=float(d.get("b", 1.0)),
                     call_overhead_ms=float(d.get("call_overhead_ms", 0.0)), method=str(d.get("method", "identity")),
                     points=list(d.get("points", [])), residual_mape=d.get("residual_mape"))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"malformed overhead model ({e})", path=path, field="overhead") from None
        if not (math.isfinite(om.a_ms) and math.isfinite(om.b) and om.b > 0):
            raise ConfigError(f"a_ms={om.a_ms}, b={om.b}: b must be positive and both finite", path=path,
                              field="overhead")
        return om


def fit_overhead(sums_ms: Sequence[float], measured_ms: Sequence[float], *, call_overhead_ms: float = 0.0,
                 archs: Sequence[Any] | None = None) -> OverheadModel:
    """Fit `measured = a + b * sum` by robust least squares on relative errors."""
    # Relative residuals, because the acceptance is a relative one (within +-10 %) and the models span a
    # wide range of latencies: an absolute fit would let the largest model decide the line alone.
    s = np.asarray(sums_ms, dtype=np.float64)
    m = np.asarray(measured_ms, dtype=np.float64)
    if s.shape != m.shape:
        raise ValueError(f"{len(s)} sums for {len(m)} measurements")
    names = list(archs) if archs is not None else [None] * len(s)
    points = [{"arch": n, "sum_ms": float(a), "measured_ms": float(b)} for n, a, b in zip(names, s, m)]
    ok = (s > 0) & (m > 0) & np.isfinite(s) & np.isfinite(m)
    s, m = s[ok], m[ok]
    if len(s) == 0:
        return OverheadModel(call_overhead_ms=call_overhead_ms, points=points)
    ratio = float(np.median(m / s))
    a, b, method = 0.0, ratio, "ratio"
    # The intercept is only identifiable when the models' sums differ enough; otherwise a and b trade off
    # against each other and a two-parameter fit extrapolates badly, so keep the plain ratio.
    if len(s) >= 3 and s.max() >= 1.3 * s.min():
        from scipy.optimize import least_squares

        def residuals(p: np.ndarray) -> np.ndarray:
            return (p[0] + p[1] * s - m) / m

        res = least_squares(residuals, x0=[0.0, ratio], loss="soft_l1", f_scale=ROBUST_SCALE)
        a_fit, b_fit = (float(v) for v in res.x)
        # A negative total at the smallest model or a non-positive slope means the points are noise-dominated.
        if b_fit > 0 and a_fit + b_fit * s.min() > 0:
            a, b, method = a_fit, b_fit, "soft_l1"
    pred = a + b * s
    mape = float(np.mean(np.abs(pred - m) / m) * 100.0)
    return OverheadModel(a_ms=a, b=b, call_overhead_ms=call_overhead_ms, method=method, points=points,
                         residual_mape=mape)
