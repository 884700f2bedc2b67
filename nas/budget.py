"""The latency budget: a latency table's predictions for a space's architectures, and the feasible region.

`detforge search` predicts each candidate's latency with `table_predictor` + `space_predictor`, and keeps
only those within its budget, so the supernet need only be good on those: `FeasibleRegion` is that set of
architectures (drawn by rejection from the space's uniform draw), which `detforge supernet train --table T
--budget-ms X` trains. See docs/nas.md, "A supernet for one budget".
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latency_tables.table import table_predictor
from search_spaces.architecture import Architecture
from search_spaces.errors import ConfigError
from search_spaces.space import Decision, SearchSpace

PredictMs = Callable[[Architecture], float]
LARGEST_DRAWS = 512  # random draws among which the feasible region's largest architecture is chosen
MAX_TRIES = 2000  # random draws before a sample of the region gives up
CACHED_LATENCIES = 4096  # predictions a region keeps: a supernet training draws a new architecture nearly every time


def pinned_space(space: SearchSpace, imgsz: int) -> SearchSpace:
    """`space` with the input size fixed: one latency table predicts one input size."""
    dec = space.decisions["imgsz"]
    if dec.choices == (imgsz,):
        return space
    return dataclasses.replace(space, decisions={**space.decisions, "imgsz": Decision("imgsz", (imgsz,), dec.field)})


def nc_fallback(predictor: PredictMs, space: SearchSpace, table_nc: int, path: str | Path) -> PredictMs:
    """Predict heads at the space's own nc when the table was built for it, not for the dataset's classes.

    `detforge latency build` measures a space at its YAML's nc; only the last 1x1 convs of the head depend
    on nc, so the prediction stays close. Exact heads need a table built for `space.with_nc(dataset nc)`.
    """
    try:
        predictor(space.smallest())
        return predictor
    except ConfigError as e:
        first = e

    def at_table_nc(arch: Architecture) -> float:
        return predictor(arch.with_nc(table_nc))

    try:
        at_table_nc(space.smallest())
    except ConfigError:
        raise first from None
    warnings.warn(f"latency table {path} has heads for nc={table_nc}, not the dataset's nc={space.nc}: "
                  f"predicting heads at nc={table_nc}", UserWarning, stacklevel=4)
    return at_table_nc


def space_predictor(predictor: PredictMs, space: SearchSpace, nc: int, imgsz: int,
                    table: str | Path | None = None) -> tuple[PredictMs, SearchSpace]:
    """`predictor` for `space`'s architectures at `nc` classes, and the space pinned to `imgsz`.

    With the `table` path given, a table built at the space's own nc predicts the heads at that nc.
    """
    pinned = pinned_space(space.with_nc(nc), imgsz)
    if table is not None and space.nc != nc:
        predictor = nc_fallback(predictor, pinned, space.nc, table)
    return predictor, pinned


@dataclass
class FeasibleRegion:
    """The architectures of a space whose predicted latency is within a budget."""

    space: SearchSpace
    predict_ms: PredictMs
    budget_ms: float
    _ms: OrderedDict[str, float] = field(default_factory=OrderedDict, init=False, repr=False)  # LRU by decisions

    def __post_init__(self) -> None:
        if not self.budget_ms > 0:
            raise ConfigError(f"must be > 0, got {self.budget_ms}", field="budget_ms")

    @classmethod
    def from_table(cls, path: str | Path, space: SearchSpace, budget_ms: float, *, nc: int | None = None,
                   imgsz: int | None = None) -> FeasibleRegion:
        """The region of `space` (at `nc` classes) under `budget_ms` as the table at `path` predicts it."""
        predictor, imgsz = table_predictor(path, imgsz)
        predictor, pinned = space_predictor(predictor, space, nc or space.nc, imgsz, path)
        return cls(pinned, predictor, float(budget_ms))

    def latency_ms(self, decisions: Mapping[str, Any]) -> float:
        """The predicted latency of the architecture of `decisions` (cached)."""
        # keyed by the decisions, not the built architecture: building one costs as much as a table lookup
        key = json.dumps(decisions, sort_keys=True, default=str)
        if key in self._ms:
            self._ms.move_to_end(key)
            return self._ms[key]
        ms = self._ms[key] = float(self.predict_ms(self.space.build_arch(decisions)))
        if len(self._ms) > CACHED_LATENCIES:  # bounded: a long training would otherwise keep every draw
            self._ms.popitem(last=False)
        return ms

    def contains(self, decisions: Mapping[str, Any]) -> bool:
        """Whether the architecture of `decisions` is predicted within the budget."""
        return self.latency_ms(decisions) <= self.budget_ms

    def sample(self, rng: np.random.Generator, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A uniformly random architecture of the region (the space's uniform draw, kept when it fits),
        with the decisions in `fixed` held at their values."""
        fixed = fixed or {}
        for _ in range(MAX_TRIES):
            d = {**self.space.random_decisions(rng), **fixed}
            if self.contains(d):
                return d
        raise ConfigError(f"no architecture of space '{self.space.name}'{_with(fixed)} within {self.budget_ms:g} ms "
                          f"in {MAX_TRIES} random draws: raise the budget", field="budget_ms")

    def sample_top(self, rng: np.random.Generator, k: int, fixed: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        """Of `k` uniform draws of the region (`sample`), the one predicted to spend the most of the budget:
        AttentiveNAS's best-up sampling with predicted latency as the proxy; k=1 is `sample`."""
        draws = [self.sample(rng, fixed) for _ in range(k)]
        return max(draws, key=self.latency_ms)

    def largest(self, seed: int = 0, draws: int = LARGEST_DRAWS, fixed: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """The space's largest architecture if it fits; else the feasible one of `draws` random draws that
        spends the most of the budget (the sandwich's upper end and teacher), else the smallest if it fits;
        `fixed` as in `sample`."""
        fixed = fixed or {}
        top = {**self.space.largest_decisions(), **fixed}
        if self.contains(top):
            return top
        rng = np.random.default_rng(seed)
        best, best_ms = None, -1.0
        for _ in range(draws):
            d = {**self.space.random_decisions(rng), **fixed}
            ms = self.latency_ms(d)
            if best_ms < ms <= self.budget_ms:
                best, best_ms = d, ms
        if best is None:  # a tight budget: the smallest is the largest there is, if it fits
            best = {**self.space.smallest_decisions(), **fixed}
            if not self.contains(best):
                raise ConfigError(f"none of {draws} random architectures of space '{self.space.name}'{_with(fixed)} "
                                  f"is within {self.budget_ms:g} ms: raise the budget", field="budget_ms")
        return best

    def check_fits(self, decisions: Mapping[str, Any], what: str) -> None:
        """A ConfigError naming `what` when its architecture is over the budget."""
        ms = self.latency_ms(decisions)
        if ms > self.budget_ms:
            raise ConfigError(f"{what} is predicted at {ms:.3g} ms, over the budget of {self.budget_ms:g} ms: raise "
                              "the budget", field="budget_ms")


def _with(fixed: Mapping[str, Any]) -> str:
    """' with a=1, b=2' for an error message (empty when nothing is fixed)."""
    return " with " + ", ".join(f"{k}={v}" for k, v in fixed.items()) if fixed else ""


__all__ = ["FeasibleRegion", "PredictMs", "nc_fallback", "pinned_space", "space_predictor", "table_predictor"]
