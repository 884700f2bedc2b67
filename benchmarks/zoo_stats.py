"""Zoo figures beside the official code's and the paper's: params, fused params, GFLOPs (issue: foundation)."""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

from search_spaces import list_models, load_model
from search_spaces.stats import model_stats

warnings.filterwarnings("ignore")
REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/yolov7/model_stats.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reference", default=str(REFERENCE))
    ap.add_argument("--out", default="runs/bench/zoo_stats.json")
    args = ap.parse_args()
    ref = json.loads(Path(args.reference).read_text())["models"] if Path(args.reference).is_file() else {}
    rows = []
    print("| model | paper params / GFLOPs | ours: deploy params | fused params | GFLOPs (fused, fvcore x2) "
          "| official fused GFLOPs | training params | official training params |")
    print("|---|---|---|---|---|---|---|---|")
    for name in list_models():
        t = time.time()
        dep = model_stats(load_model(name, form="deploy"))
        tr = sum(p.numel() for p in load_model(name, form="training").parameters())
        r_dep, r_tr = ref.get(f"deploy/{name}", {}), ref.get(f"training/{name}", {})
        paper = r_dep.get("paper", {})
        rows.append({"name": name, "deploy": dep.to_dict(), "training_params": tr, "seconds": time.time() - t})
        print(f"| {name} | {paper.get('params_M', '?')}M / {paper.get('gflops', '?')} | {dep.params:,} | "
              f"{dep.params_fused:,} | {dep.gflops:.2f} @{dep.imgsz} | "
              f"{r_dep.get('fused_flops_native', {}).get('gflops_2x_fvcore_total', '?')} | {tr:,} | "
              f"{r_tr.get('params', '?'):,} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows},
                                         indent=2))


if __name__ == "__main__":
    main()
