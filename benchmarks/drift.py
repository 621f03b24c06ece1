"""How fast two floating-point paths of one run drift apart: the same seed with --threads 1 and --threads 2.

    python benchmarks/drift.py benchmarks/results/flagship          # a compare.py results folder run with --threads 1 2

Both runs draw the same prompts, noise and timesteps (one seed), so their training batches are the same pictures
drawn by two LoRAs that differ only by the order in which threads summed. The difference of the two batch rewards,
|r_1(i) - r_2(i)| at iteration i, starts at float rounding (~1e-7) and grows; this prints, per method and seed, the
first iteration at which it passes 1e-5, 1e-3 and 1e-1 and its growth per iteration in between (a geometric fit of
log |r_1 - r_2| from the first iteration above 1e-6 to the first above 1e-2), and writes drift.md beside
curves.json. Reads curves.json only (compare.py's), no torch.
"""

import json
import math
import sys
from pathlib import Path

THRESHOLDS = (1e-5, 1e-3, 1e-1)


def first_above(diffs: list, level: float) -> int | None:
    return next((i for i, d in enumerate(diffs) if d > level), None)


def growth_per_iteration(diffs: list) -> float | None:
    """exp of the least-squares slope of log|diff| against the iteration, between 1e-6 and 1e-2 (the exponential
    phase: below it the difference is rounding noise, above it the runs are simply different runs)."""
    start, end = first_above(diffs, 1e-6), first_above(diffs, 1e-2)
    if start is None or end is None or end - start < 2:
        return None
    xs = list(range(start, end + 1))
    ys = [math.log(max(diffs[i], 1e-12)) for i in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(slope)


def drift(curves: dict) -> list:
    """Per method and seed: the per-iteration |reward difference| of its two float paths and its summary."""
    rows = []
    for name, method in curves["methods"].items():
        by_seed = {}
        for run in method["runs"].values():
            if "seed" in run:
                by_seed.setdefault(run["seed"], {})[run["threads"]] = run["train"]["reward_mean"]
        for seed, paths in sorted(by_seed.items()):
            if len(paths) < 2:
                continue
            a, b = (paths[t] for t in sorted(paths)[:2])
            diffs = [abs(x - y) for x, y in zip(a, b)]
            rows.append({"method": name, "seed": seed, "diffs": diffs, "growth": growth_per_iteration(diffs),
                         **{f"first_above_{t:g}": first_above(diffs, t) for t in THRESHOLDS}})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "curves.json").is_file():
        print("error: give a compare.py results folder holding curves.json (run with --threads 1 2)", file=sys.stderr)
        raise SystemExit(2)
    folder = Path(argv[0])
    rows = drift(json.loads((folder / "curves.json").read_text()))
    if not rows:
        print(f"error: {folder}/curves.json has no seed run on two thread counts (compare.py --threads 1 2)",
              file=sys.stderr)
        raise SystemExit(2)
    lines = ["| method | seed | first iteration with \\|r₁ − r₂\\| > " + " / ".join(f"{t:g}" for t in THRESHOLDS)
             + " | growth per iteration | \\|r₁ − r₂\\| at the last iteration |", "|---|---|---|---|---|"]
    for r in rows:
        firsts = " / ".join("–" if r[f"first_above_{t:g}"] is None else str(r[f"first_above_{t:g}"])
                            for t in THRESHOLDS)
        growth = "–" if r["growth"] is None else f"×{r['growth']:.2f}"
        lines.append(f"| {r['method']} | {r['seed']} | {firsts} | {growth} | {r['diffs'][-1]:.2g} |")
    text = "\n".join(lines) + "\n"
    (folder / "drift.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
