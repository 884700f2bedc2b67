"""The run report: report.md with the Pareto front against zoo baselines, latency accuracy and compression steps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.errors import DetforgeError
from search_spaces.io import atomic_path, atomic_write_text, read_json

# The backend every latency the pipeline measures runs on (export_front's default and
# compress.report.measure_latency_ms): a table of another backend is compared by prediction only.
MEASURED_ON = "ort-cpu"

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _plot_front(path: Path, front: list[dict], models: dict[str, Any], base: dict[str, Any],
                budget: float | None, scored: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [e["predicted_ms"] for e in front]
    ys = [e["map"] for e in front]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="C0", label=f"Pareto front ({scored})")
    for mid, m in models.items():
        v = m["verify"]
        ax.scatter([v["fp32"]["latency_ms"]], [v["fp32"]["map"]], marker="s", color="C2", zorder=3,
                   label=f"{mid} finetuned, FP32 (measured)")
        if "int8" in v:
            ax.scatter([v["int8"]["latency_ms"]], [v["int8"]["map"]], marker="D", color="C3", zorder=3,
                       label=f"{mid} INT8 (measured)")
    for name, b in base.items():
        ax.scatter([b["latency_ms"]], [b["map"]], marker="*", s=160, color="k", zorder=4,
                   label=f"{name} (from scratch, measured)")
    if budget:
        ax.axvline(budget, ls="--", color="grey", label=f"budget {budget:g} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("mAP@[.5:.95] (val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _plot_latency(path: Path, pairs: list[tuple[str, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    if pairs:
        pred = [p for _, p, _ in pairs]
        meas = [m for _, _, m in pairs]
        ax.scatter(pred, meas)
        lim = [0, max(pred + meas) * 1.1]
        ax.plot(lim, lim, "--", color="grey")
        for name, p_, m in pairs:
            ax.annotate(name, (p_, m), fontsize=7)
    ax.set_xlabel("predicted (table) ms")
    ax.set_ylabel("measured ms")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _measured_like(fp: dict[str, Any], backend: str, threads: int) -> bool:
    """Whether this machine's measurements (MEASURED_ON, `threads`) time what the table describes."""
    from latency_tables.fingerprint import DeviceFingerprint

    if backend != MEASURED_ON or fp.get("threads") != threads:
        return False
    try:  # a probe table of another CPU is ort-cpu too
        theirs = DeviceFingerprint.from_dict(fp)
    except (DetforgeError, TypeError):  # no readable fingerprint: it cannot vouch for this machine
        return False
    return theirs.same_device(DeviceFingerprint.collect(backend=backend, threads=threads, precision="fp32"))


def write_report(p: Pipeline, d: dict, t: dict, front: dict, models: dict, base: dict, budget: float | None) -> Path:
    """Write report.md, front.png and latency.png into the run directory."""
    out = p.out
    entries = front["front"]
    s = p.cfg.search
    scored = f"{s.scratch_epochs} epochs from scratch" if s.scratch else "inherited weights"
    _plot_front(out / "front.png", entries, models, base, budget, scored)
    pairs = [(e["arch_id"], e["predicted_ms"], e["measured_ms"]) for e in entries if e.get("measured_ms")]
    _plot_latency(out / "latency.png", pairs)
    table_json = read_json(t["path"])
    fp = table_json.get("device", {})
    measured_here = _measured_like(fp, t["backend"], p.cfg.latency.threads)
    lines = [f"# detforge run `{p.cfg.name}`", "",
             (f"Dataset: `{d['yaml']}` ({d['nc']} classes). Space: `{p.cfg.space}` at {p.cfg.imgsz} px. "
              f"Latency budget: {budget if budget is not None else 'none'} ms on `{t['backend']}`. Measured "
              f"latencies: {MEASURED_ON}, {p.cfg.latency.threads} threads, batch 1."), "",
             "## Pareto front against the zoo", "", "![front](front.png)", "",
             "| arch id | mAP | mAP50 | predicted ms | measured ms | params | GFLOPs |", "|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: e["predicted_ms"]):
        lines.append(f"| {e['arch_id']} | {_fmt(e['map'])} | {_fmt(e.get('map50'))} | {_fmt(e['predicted_ms'], 2)} | "
                     f"{_fmt(e.get('measured_ms'), 2)} | {_fmt(e.get('params'))} | {_fmt(e.get('gflops'), 3)} |")
    c = p.cfg
    front_epochs = [f"{n} {where}" for where, n in c.front_training().items()]
    if c.prune.enabled:
        front_epochs.append(f"{c.prune.finetune_epochs} after pruning")
    if c.distill.enabled:
        front_epochs.append(f"{c.distill.epochs} distillation")
    lines += ["", f"Baselines trained from scratch (the chosen models had {' + '.join(front_epochs)} epochs):", "",
              "| model | epochs | mAP | mAP50 | measured ms |", "|---|---|---|---|---|"]
    for name, b in base.items():
        lines.append(f"| {name} | {b['epochs']} | {_fmt(b['map'])} | {_fmt(b['map50'])} | {_fmt(b['latency_ms'], 2)} |")
    refit = {n: b["autoanchor"] for n, b in base.items() if (b.get("autoanchor") or {}).get("replaced")}
    # not an earlier config's supernet (a run switched to scratch mode keeps its record)
    sup = p.records["supernet"].outputs if "supernet" in p.records and not c.search.scratch else {}
    refit.update({f"the supernet's {layout} heads": f for layout, f in (sup.get("autoanchor") or {}).items()
                  if f.get("replaced")})
    if refit:  # as YOLOv7 would; the searched models inherit the supernet's anchors
        lines += ["", "AutoAnchor refit the anchors of " + ", ".join(
            f"{n} (best possible recall {f['bpr']:.3f} -> {f['new_bpr']:.3f})" for n, f in refit.items())
            + "; the searched models keep the anchors their supernet trained with."]
    lines += ["", "## Predicted vs measured latency", "", "![latency](latency.png)", ""]
    for mid, m in models.items():
        lines += [f"## Model `{mid}`", "", "| step | params | GFLOPs | mAP |", "|---|---|---|---|"]
        for s in m["steps"]:
            lines.append(f"| {s['step']} | {_fmt(s['params'])} | {_fmt(s['gflops'], 3)} | {_fmt(s['map'])} |")
        lines += ["", "| exported file | mAP (ONNX Runtime) | measured latency ms |", "|---|---|---|"]
        for k, v in m["verify"].items():
            name = "model.onnx" if k == "fp32" else "model.int8.onnx"
            lines.append(f"| {name} ({k.upper()}) | {_fmt(v['map'])} | {_fmt(v['latency_ms'], 2)} |")
        if measured_here:
            meets, how = budget is None or any(v["latency_ms"] <= budget for v in m["verify"].values()), ""
        else:  # the measurements are on another backend than the budget: only the table speaks for it
            pred = m.get("predicted_ms")
            meets = budget is None or (pred is not None and pred <= budget)
            how = (f" (by the table's prediction: the measured latencies are {MEASURED_ON} on this machine, the "
                   f"table is `{t['backend']}` on {fp.get('gpu_name') or fp.get('cpu_model')}, "
                   f"{fp.get('threads')} threads)")
        lines += ["", (f"Predicted (table): {_fmt(m.get('predicted_ms'), 2)} ms. Meets the budget: "
                       f"{'yes' if meets else 'no'}{how}."), ""]
    lines += ["## Device", "", "```", json.dumps(fp, indent=1), "```", "",
              "## Stage times", "", "| stage | seconds |", "|---|---|"]
    for name in p.stage_names(models):
        if name in p.records:  # this config's stages, not an earlier one's records in the same run directory
            lines.append(f"| {name} | {p.records[name].seconds} |")
    lines += ["", "## Reproduce", "", "```bash", f"detforge run {p.out / 'config.yaml'} --out {p.out} --resume",
              "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
