"""DRTune Fig. 7 from a compare.py result: the LoRA gradient norm (before clipping) against K, with and without the
stop-gradient of the UNet input, mean ± std over seeds of each run's mean over its updates.

    python benchmarks/compare.py --preset drtune-fig7 --seeds 0 1 2
    python benchmarks/gradnorm.py benchmarks/results/drtune-fig7      # -> gradnorm.png and gradnorm.md there

Method names must be `<anything>-<K>` and `<anything>-<K>-sg` (the preset's DRaFT-5, DRaFT-5-sg, ...).
"""

import json
import re
import statistics
import sys
from pathlib import Path


def main():
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "curves.json").is_file():
        print("error: usage: gradnorm.py RESULTS_DIR (a compare.py results folder with curves.json)", file=sys.stderr)
        raise SystemExit(2)
    folder = Path(sys.argv[1])
    methods = json.loads((folder / "curves.json").read_text())["methods"]
    series = {False: {}, True: {}}  # stop-gradient? -> K -> per-seed mean grad norm
    for name, method in methods.items():
        match = re.fullmatch(r".*-(\d+)(-sg)?", name)
        if match:
            per_seed = [statistics.mean(run["train"]["grad_norm"]) for run in method["runs"].values()]
            series[bool(match.group(2))][int(match.group(1))] = per_seed
    lines = ["| K | grad norm, no stop-gradient | grad norm, stop-gradient |", "|---|---|---|"]
    for k in sorted(series[False]):
        cells = [f"{statistics.mean(v):.3g} ± {statistics.stdev(v) if len(v) > 1 else 0:.2g}"
                 for v in (series[False][k], series[True].get(k, [float("nan")]))]
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    (folder / "gradnorm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib
    except ImportError:
        print("error: the plot needs matplotlib: pip install -e \".[plot]\" (gradnorm.md is written)", file=sys.stderr)
        raise SystemExit(2)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for sg, label in ((False, "without stop-gradient"), (True, "with stop-gradient (DRTune eq. 3)")):
        ks = sorted(series[sg])
        means = [statistics.mean(series[sg][k]) for k in ks]
        stds = [statistics.stdev(series[sg][k]) if len(series[sg][k]) > 1 else 0 for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("K (trained steps of T = 20)")
    ax.set_ylabel("LoRA gradient norm")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("DRaFT-K gradient norm (run mean over its updates)")
    fig.tight_layout()
    fig.savefig(folder / "gradnorm.png", dpi=120)


if __name__ == "__main__":
    main()
