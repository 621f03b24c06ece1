"""Methods compared at equal compute on one reward: several seeds, through the scripts' command lines only.

    python benchmarks/compare.py --preset drtune-table1                    # a named comparison (PRESETS below)
    python benchmarks/compare.py --preset drtune-table1 --budget 2000 --seeds 0 --name smoke    # a quick look
    python benchmarks/compare.py --name sym --reward symmetry --budget 40000 --seeds 0 1 2 --jobs 2 \\
        --method "DRTune=drtune.py" --method "ReFL=refl.py" --method "DRaFT-LV=draft.py --K 1 --lv 2"
    python benchmarks/compare.py --list                                    # the presets

Every run is `python <script> <its flags> --budget U --seed k --run-dir ...` in a subprocess; what is compared comes
from its metrics.jsonl and eval grids alone, so this file imports neither torch nor the scripts. Equal compute:
each run stops after the iteration in which its compute (UNet image-step forwards + 2 x backwards, common.py's
count) reaches --budget (or its wall time --budget-seconds). Iterations are indivisible, so a run overshoots by
less than one of its iterations and runs end at different compute: the table reports each method's actual
compute, and reads every run's eval curve at one common point, the smallest final x of all runs (linear
interpolation between a run's evaluations), besides each run's own final evaluation.

An eval row of metrics.jsonl is measured *before* its iteration's update, so it is plotted at the work done by then
(the previous row's cumulative count; 0 at iteration 0). Evaluations are spread over the budget: --evals per run,
the cadence in iterations set per method from a 2-iteration probe run of it (its compute per iteration), unless
--eval-every fixes one for all.

Results in benchmarks/results/<name>/ (--results): curves.json (every curve of every run), table.md, plot.png
(matplotlib: pip install -e ".[plot]"), strips/<method>.png and strips.png (the first row of the final eval grid of
each method's first seed, same eval noise for all, under the pretrained model's row), runs/ (the run directories,
not committed). Rerunning the same command skips finished runs, resumes killed ones from their checkpoint, and
rewrites the outputs. Toy world only: each run's prompt fidelity by toyworld/check.py (--fidelity).
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hub  # noqa: E402  (the toy models' names and folders; hub imports nothing heavy)

SCRIPTS = ("alignprop.py", "d3po.py", "ddpo.py", "draft.py", "drtune.py", "refl.py", "rwr.py")

# Named comparisons. Keys: about, reward ("default": each script's own), methods (name -> "script flags"), budget
# (compute units) and/or budget_seconds, iters ("default": each script's own iterations and eval cadence, i.e.
# its default run), seeds, threads, x (plot axis and common point), evals, eval_size, common_flags (given to every
# method), fidelity, holds (HOLDS below), placeholder. Flags on the command line override a preset's values.
# DRTune compared every method with one set of hyperparameters (sec. 4.1: T 50, CFG 7.5, batch 32, lr 2e-5, clip
# 0.1, LoRA 128); the toy world's equivalent is DRTune's toy defaults, given to every gradient method. Scale:
# DRTune's toy defaults (T 20, K 5, batch 8) cost ~540 units per iteration, its 70 iterations ~38k.
UNIFIED = ("--num-steps 20 --guidance-scale 5.0 --eta 0 --batch-size 8 --lr 3e-3 --weight-decay 1e-2 "
           "--grad-clip 0.1 --lora-rank 8 --clip-weight 0.01")
PRESETS = {
    "drtune-table1": {
        "model": hub.TOY_MODEL,  # measured on the toy Stable Diffusion (the README's figures)
        "about": "DRTune Table 1, symmetry column, on the toy world: the gradient family at equal compute, one set "
                 "of hyperparameters for all (ReFL-k and DRaFT-k scaled from T 50 to T 20: k 10 -> 4, 20 -> 8)",
        "reward": "symmetry",
        "budget": 38_000,
        "seeds": [0, 1, 2],
        "common_flags": UNIFIED,
        "methods": {
            "DRTune": "drtune.py --K 5 --early-stop 3",
            "ReFL-4": "refl.py --t1 1 --t2 4",
            "ReFL-8": "refl.py --t1 1 --t2 8",
            "DRaFT-LV": "draft.py --K 1 --lv 2",
            "DRaFT-4": "draft.py --K 4",
            "AlignProp": "alignprop.py --loss-coeff 1",
        },
        "fidelity": "on",
    },
    "drtune-fig6": {
        "model": hub.TOY_MODEL,  # measured on the toy Stable Diffusion (the README's figures)
        "about": "DRTune Fig. 6 on the toy world: DRaFT-T (all 20 steps) and AlignProp (T/2 steps on average: uniform "
                 "truncation), each with and without the stop-gradient of the UNet input, at equal compute",
        "reward": "symmetry",
        "budget": 38_000,
        "seeds": [0, 1, 2],
        "common_flags": UNIFIED,
        "methods": {
            "DRaFT-T": "draft.py --K -1",
            "DRaFT-T-sg": "draft.py --K -1 --stop-grad-input",
            "AlignProp": "alignprop.py --loss-coeff 1 --truncation uniform",
            "AlignProp-sg": "alignprop.py --loss-coeff 1 --truncation uniform --stop-grad-input",
        },
        "fidelity": "on",
    },
    "drtune-fig7": {
        "model": hub.TOY_MODEL,  # measured on the toy Stable Diffusion (the README's figures)
        "about": "DRTune Fig. 7 on the toy world: the LoRA gradient norm of DRaFT-K against K (T 20), with and without "
                 "the stop-gradient of the UNet input, over the first 5 updates",
        "reward": "symmetry",
        "iters": 5,
        "seeds": [0],
        "evals": 1,
        "common_flags": UNIFIED,
        "methods": {f"DRaFT-{k}{sg}": f"draft.py --K {k}" + (" --stop-grad-input" if sg else "")
                    for k in (1, 2, 5, 10, 15, 20) for sg in ("", "-sg")},
        "fidelity": "off",
    },
    "ddpo-fig3": {
        "model": hub.TOY_MODEL,  # measured on the toy Stable Diffusion (the README's figures)
        "about": "DDPO Fig. 3 (JPEG compressibility) on the toy world: the RL family at equal reward queries (20 rounds "
                 "of 32 samples), each method at its best learning rate and clip range of a one-seed sweep "
                 "(benchmarks/results/ddpo-sweep)",
        "reward": "jpeg_compressibility",
        "iters": 20,
        "x": "reward_evals",
        "seeds": [0, 1, 2],
        "methods": {
            # the best of benchmarks/results/ddpo-sweep (one seed) per method; DDPO also with RWR's 8 samples per
            # prompt, so that its per-prompt statistics hold from the first round (F.3)
            "DDPO-IS": "ddpo.py --estimator is --lr 1e-3 --clip-range 1e-2 --grad-accum 1 --samples-per-prompt 1 "
                       "--stat-min-count 16",
            "DDPO-IS-spp8": "ddpo.py --estimator is --lr 1e-3 --clip-range 1e-2 --grad-accum 1 "
                            "--samples-per-prompt 8 --stat-min-count 8",
            "DDPO-SF": "ddpo.py --estimator sf --lr 1e-2 --samples-per-prompt 1 --stat-min-count 16",
            "DDPO-SF-spp8": "ddpo.py --estimator sf --lr 1e-2 --samples-per-prompt 8 --stat-min-count 8",
            # the paper's RWR (the script's toy defaults since added deterministic samples and a pull to the
            # pretrained model): ancestral samples, no pull
            "RWR": "rwr.py --weighting softmax --sample-batches 4 --updates-per-round 8 --lr 3e-3 --eta 1 --kl-coeff 0",
            "RWR-sparse": "rwr.py --weighting sparse --sample-batches 4 --updates-per-round 8 --lr 3e-3 --eta 1 "
                          "--kl-coeff 0",
        },
    },
    "d3po-vs-ddpo": {
        "model": hub.TOY_MODEL,  # measured on the toy Stable Diffusion (the README's figures)
        "about": "D3PO (preferences from the reward) against DDPO on the same reward, JPEG compressibility, at equal "
                 "reward queries (20 iterations of 32 samples)",
        "reward": "jpeg_compressibility",
        "iters": 20,
        "x": "reward_evals",
        "seeds": [0, 1, 2],
        # D3PO as measured: the paper's pairs at T 20 (the script's toy defaults have since changed)
        "methods": {"D3PO": "d3po.py --batch-size 16 --samples-per-prompt 2 --num-steps 20 --lr 1e-2",
                    "DDPO-SF": "ddpo.py --estimator sf"},
    },
    "flagship": {
        "about": "The flagship: python drtune.py --reward symmetry --K 5, its defaults, 5 seeds x 2 float paths "
                 "(--threads 1 and 2), with toyworld/check.py's fidelity; it holds when it halves the held-out "
                 "asymmetry with colour and background >= 95 % and shape >= 80 %",
        "reward": "symmetry",
        "iters": "default",
        "seeds": [0, 1, 2, 3, 4],
        "threads": [1, 2],
        "methods": {"DRTune": "drtune.py --K 5"},
        "fidelity": "on",
        "holds": "halve-asymmetry",
    },
    "defaults": {
        "about": "Every script's default run (no flags: each its own reward, iterations and evaluation cadence), 3 "
                 "seeds x 2 float paths (--threads 1 and 2); a run holds when its eval reward gains with the prompt "
                 "kept (toyworld/check.py: colour and background >= 90 %, shape >= 75 %)",
        "reward": "default",
        "iters": "default",
        "seeds": [0, 1, 2],
        "threads": [1, 2],
        "methods": {name: f"{name.lower()}.py" for name in
                    ("DRTune", "DRaFT", "ReFL", "AlignProp", "DDPO", "RWR", "D3PO")},
        "fidelity": "on",
        "holds": "gain",
    },
}
# The flagship as it was measured on the toy Stable Diffusion, before the default model became the flow one.
PRESETS["sd-flagship"] = PRESETS["flagship"] | {
    "about": "The flagship on the toy Stable Diffusion: python drtune.py --model toy --reward symmetry --K 5, its "
             "defaults, 5 seeds x 2 float paths, with toyworld/check.py's fidelity (same bar as the flagship)",
    "model": hub.TOY_MODEL}
# What makes a run hold (--holds): "gain": its eval reward rises with the prompt kept; "halve-asymmetry": the
# flagship's bar, half the pretrained model's held-out asymmetry with the prompt kept more strictly.
HOLDS = {"gain": {"colour": 0.90, "background": 0.90, "shape": 0.75},
         "halve-asymmetry": {"colour": 0.95, "background": 0.95, "shape": 0.80}}
PRESET_KEYS = {"about", "reward", "model", "methods", "budget", "budget_seconds", "iters", "seeds", "threads", "x",
               "evals", "eval_size", "common_flags", "fidelity", "holds", "placeholder"}

# Flags compare.py sets for every run (refused in method and common flags), and flags that must be the same for
# every method, so that all runs optimise and are evaluated on one reward, prompts and eval protocol (allowed in
# --common-flags only).
HARNESS_FLAGS = {"seed", "run-dir", "resume", "config", "budget", "budget-seconds", "iters", "threads", "model",
                 "reward", "eval-size", "eval-every", "progress-every"}
SHARED_FLAGS = {"prompts", "clip-model", "clip-weight", "reward-model", "reward-query", "aesthetic-clip", "hps-version",
                "eval-num-steps", "eval-guidance-scale", "resolution"}
X_AXES = {"compute": "compute (UNet image-step forwards + 2 x backwards)",
          "reward_evals": "reward queries (images scored in training)",
          "seconds": "training time (s; evaluations left out)"}
FIDELITY = ("asymmetry", "clipscore", "colour", "shape", "background")  # toyworld/check.py's report
DEFAULT_CAP = 100_000  # --iters when a budget decides the length: only the budget should stop a run
PROBE_ITERS = 2
POLL_S = 0.5
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # method and comparison names become file names


def fail(message: str):
    """Bad input: one line on stderr, exit status 2 (as hub.fail)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# The command line, merged with a preset
# ---------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + message -> one line, exit 2
        fail(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)  # --budget is not --budget-seconds
    # Defaults of preset-able flags are None here: None = the preset's value, else the default in settle().
    p.add_argument("--preset", help=f"a named comparison: {', '.join(PRESETS)}; flags given override its values")
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    p.add_argument("--name", help="results folder name, benchmarks/results/<name>/ (default: the preset's name)")
    p.add_argument("--method", action="append", metavar='"NAME=SCRIPT FLAGS"',
                   help='a method, e.g. "DRaFT-LV=draft.py --K 1 --lv 2" (repeat it); replaces a preset\'s methods')
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these of the methods (e.g. of a preset)")
    p.add_argument("--reward", help="the reward every method optimises and is evaluated on; default = each "
                   "script's own default reward (the table then compares gains)")
    p.add_argument("--model", help="every run's --model (default toy, the toy world)")
    p.add_argument("--budget", type=float, help="compute units per run: it stops after the iteration in which its "
                   "compute reaches this (UNet image-step forwards + 2 x backwards)")
    p.add_argument("--budget-seconds", type=float, help="wall seconds per run (the same stop rule); with --budget, "
                   "whichever is reached first")
    p.add_argument("--iters", type=int, help=f"iterations per run: the cap with a budget (default {DEFAULT_CAP}), "
                   "else the length (equal iterations)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0)")
    p.add_argument("--common-flags", help='flags given to every method, e.g. "--clip-weight 0.02 --num-steps 10"')
    p.add_argument("--x", choices=list(X_AXES), help="plot axis and the common point of the table (default compute)")
    p.add_argument("--evals", type=int, help="evaluations per run, spread over the budget (default 8)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N iterations in every run (default 0 = from --evals and a probe run of each "
                   "method)")
    p.add_argument("--eval-size", type=int, help="evaluation prompts per eval (default 16; the scripts' default)")
    p.add_argument("--fidelity", choices=["auto", "on", "off"],
                   help="toyworld/check.py on each final LoRA; auto = on for the toy model (default auto)")
    p.add_argument("--fidelity-n", type=int, default=96, help="check.py's --n samples (default 96)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    p.add_argument("--threads", type=int, nargs="+",
                   help="--threads of every run (default 1: one per job on a shared CPU); several (1 2) run every "
                   "seed once per thread count: each sums in another order, another floating-point path")
    p.add_argument("--holds", choices=list(HOLDS),
                   help="judge every run: gain (eval reward rises, prompt kept) or halve-asymmetry (the flagship's bar)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where <name>/ is written (default benchmarks/results)")
    p.add_argument("--progress-every", type=float, default=30.0,
                   help="seconds between plain progress lines when stderr is not a terminal (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands and exit")
    return p.parse_args(argv)


@dataclass
class Method:
    name: str
    script: str
    flags: list  # the method's own flags followed by the common flags
    spec: str  # "script flags" as given
    eval_every: int | None = 0  # set from --eval-every, --iters or the probe; None: the script's default


def check_flags(tokens: list, where: str, refused: set):
    for token in tokens:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("_", "-")
            if name in refused:
                owner = "compare.py sets it" if name in HARNESS_FLAGS else "it must be the same for every method; " \
                                                                          "put it in --common-flags"
                fail(f"{where}: --{name} is not allowed here ({owner})")


def parse_method(name: str, spec: str, common: list) -> Method:
    where = f"--method {name}"
    if not NAME_OK.match(name) or name in ("pretrained",):
        fail(f"{where}: a method name must be letters, digits, . _ + - (and not 'pretrained')")
    try:
        tokens = shlex.split(spec)
    except ValueError as e:
        fail(f"{where}: {e}")
    if not tokens or tokens[0] not in SCRIPTS:
        fail(f"{where}: {spec!r} must start with a method script: {', '.join(SCRIPTS)}")
    check_flags(tokens[1:], where, HARNESS_FLAGS | SHARED_FLAGS)
    return Method(name, tokens[0], tokens[1:] + common, spec)


def is_toy(model: str) -> bool:
    return model != hub.EMBEDDED_MODEL and hub.is_toy(model)  # the trained toy models: check.py can score them


def settle(ns: argparse.Namespace) -> argparse.Namespace:
    """Merge the preset and the command line, check everything (one line, exit 2, before any work)."""
    preset = {}
    if ns.preset is not None:
        if ns.preset not in PRESETS:
            fail(f"--preset {ns.preset}: unknown; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[ns.preset]
        unknown = set(preset) - PRESET_KEYS
        if unknown:
            fail(f"preset {ns.preset} has unknown keys {', '.join(sorted(unknown))}")
    s = argparse.Namespace(**vars(ns))
    for key, default in (("reward", None), ("model", hub.DEFAULT_MODEL), ("budget", 0.0), ("budget_seconds", 0.0),
                         ("iters", None), ("seeds", [0]), ("common_flags", ""), ("x", "compute"), ("evals", 8),
                         ("eval_size", 16), ("fidelity", "auto"),
                         ("threads", [1]), ("holds", None)):
        if getattr(ns, key) is None:
            setattr(s, key, preset.get(key, default))
    s.about, s.placeholder = preset.get("about", ""), bool(preset.get("placeholder"))
    s.name = ns.name or ns.preset
    if not s.name:
        fail("--name is required without --preset")
    if not NAME_OK.match(s.name):
        fail(f"--name {s.name}: letters, digits, . _ + - only (it names a folder)")
    if not s.reward:
        fail("--reward is required (or a --preset that sets it)")
    for key in ("budget", "budget_seconds"):
        value = getattr(s, key)
        if not math.isfinite(value) or value < 0:
            fail(f"--{key.replace('_', '-')} must be a non-negative number (got {value})")
    # iters "default" (a preset's): every run is the script's default run, its own length and eval cadence
    s.default_length = s.iters == "default" and not (s.budget or s.budget_seconds)
    if s.iters == "default":
        s.iters = None
    if not s.default_length:
        if s.iters is not None and s.iters < 1:
            fail(f"--iters must be at least 1 (got {s.iters})")
        if not (s.budget or s.budget_seconds or s.iters):
            fail("give --budget (compute units), --budget-seconds or --iters: what makes the runs equal")
        s.iters = s.iters or DEFAULT_CAP
    if len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        fail(f"--seeds must be distinct non-negative integers (got {' '.join(map(str, s.seeds))})")
    if len(set(s.threads)) != len(s.threads) or min(s.threads) < 0:
        fail(f"--threads must be distinct non-negative integers (got {' '.join(map(str, s.threads))})")
    # Every run: a seed on a floating-point path (its thread count), seed by seed.
    s.runs = [(seed, threads) for seed in s.seeds for threads in s.threads]
    for key, low in (("evals", 1), ("eval_every", 0), ("eval_size", 2), ("jobs", 1), ("fidelity_n", 1)):
        if getattr(s, key) < low:
            fail(f"--{key.replace('_', '-')} must be at least {low} (got {getattr(s, key)})")
    if not s.progress_every > 0:
        fail(f"--progress-every must be positive (got {s.progress_every})")
    if s.x not in X_AXES:
        fail(f"--x {s.x}: choose one of {', '.join(X_AXES)}")
    if s.fidelity not in ("auto", "on", "off"):
        fail(f"fidelity {s.fidelity}: choose auto, on or off")
    if s.holds is not None and s.holds not in HOLDS:
        fail(f"holds {s.holds}: choose one of {', '.join(HOLDS)}")
    if s.fidelity == "on" and not is_toy(s.model):
        fail(f"--fidelity on: toyworld/check.py measures the toy world's pictures only (--model {s.model})")
    s.fidelity = s.fidelity == "on" or (s.fidelity == "auto" and is_toy(s.model))
    if s.holds and not s.fidelity:
        fail(f"--holds {s.holds}: a run is judged by toyworld/check.py's fidelity, which needs the toy model")
    try:
        common = shlex.split(s.common_flags)
    except ValueError as e:
        fail(f"--common-flags: {e}")
    check_flags(common, "--common-flags", HARNESS_FLAGS)
    if ns.method:
        specs = []
        for text in ns.method:
            if "=" not in text:
                fail(f'--method {text!r}: expected NAME=SCRIPT FLAGS, e.g. "DRaFT-LV=draft.py --K 1 --lv 2"')
            specs.append(tuple(part.strip() for part in text.split("=", 1)))
    else:
        specs = list(preset.get("methods", {}).items())
    if not specs:
        fail("no methods: give --method NAME=SCRIPT (repeat it) or a --preset")
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        fail(f"method names must be distinct (got {', '.join(names)})")
    if ns.only:
        missing = [n for n in ns.only if n not in names]
        if missing:
            fail(f"--only {' '.join(missing)}: not among the methods ({', '.join(names)})")
        specs = [(n, spec) for n, spec in specs if n in ns.only]
    s.methods = [parse_method(n, spec, common) for n, spec in specs]
    for m in s.methods:
        m.eval_every = None if s.default_length else \
            s.eval_every or (0 if s.budget or s.budget_seconds else max(1, round(s.iters / s.evals)))
    s.out = Path(s.results).expanduser().resolve() / s.name
    return s


# ---------------------------------------------------------------------------------------------
# Reading a run: metrics.jsonl -> curves (pure functions, unit-tested)
# ---------------------------------------------------------------------------------------------


def read_rows(run_dir: Path) -> list:
    """metrics.jsonl's rows; a last line cut short by a kill is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def last_row(run_dir: Path) -> dict | None:
    """metrics.jsonl's last whole row, read from its end (polled twice a second for the progress bar)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def finished(rows: list) -> bool:
    return bool(rows) and bool(rows[-1].get("final"))


def seconds(row: dict) -> float:
    """Training seconds: the row's wall time less the run's evaluations (as the scripts' --budget-seconds)."""
    return row["wall_time_s"] - row.get("eval_time_s", 0.0)


def eval_curve(rows: list) -> dict:
    """The run's evaluations as columns. An eval row is measured before its iteration's update (the final row
    after the last one), so its x is the work done by then: the previous row's cumulative compute, reward
    queries and wall time (0 before the first iteration)."""
    curve = {k: [] for k in ("iter", "compute", "reward_evals", "seconds", "eval_reward_mean", "eval_reward_std")}
    if any("policy_reward_mean" in r for r in rows):  # RL scripts: the reward of their own training sampler
        curve["policy_reward_mean"] = []
    before = {"compute": 0, "reward_evals": 0, "wall_time_s": 0.0, "eval_time_s": 0.0}
    for row in rows:
        if "eval_reward_mean" in row:
            curve["iter"].append(row["iter"])
            curve["compute"].append(before["compute"])
            curve["reward_evals"].append(before["reward_evals"])
            curve["seconds"].append(seconds(before))
            curve["eval_reward_mean"].append(row["eval_reward_mean"])
            curve["eval_reward_std"].append(row.get("eval_reward_std"))
            if "policy_reward_mean" in curve:
                curve["policy_reward_mean"].append(row.get("policy_reward_mean"))
        before = row
    return curve


def train_curve(rows: list) -> dict:
    """The training batch's reward per iteration (and grad_norm, for the gradient scripts), at the row's own
    cumulative counts (measured during the iteration)."""
    its = [r for r in rows if not r.get("final")]
    curve = {"iter": [r["iter"] for r in its], "compute": [r["compute"] for r in its],
             "reward_evals": [r["reward_evals"] for r in its], "seconds": [seconds(r) for r in its],
             "reward_mean": [r.get("reward_mean") for r in its]}
    if any("grad_norm" in r for r in its):
        curve["grad_norm"] = [r.get("grad_norm") for r in its]
    return curve


def final_info(rows: list, budget: float) -> dict:
    """The final row's eval and counts; seconds and samples are those of the last iteration (the final eval
    follows it). budget_stop: the budget ended the run (its last iteration crossed it, the one before did not)."""
    final, its = rows[-1], [r for r in rows if not r.get("final")]
    info = {"iter": final["iter"], "eval_reward_mean": final["eval_reward_mean"],
            "eval_reward_std": final.get("eval_reward_std"), "compute": final["compute"],
            "reward_evals": final["reward_evals"], "unet_forwards": final.get("unet_forwards"),
            "unet_backwards": final.get("unet_backwards"), "vae_decodes": final.get("vae_decodes"),
            "seconds": seconds(its[-1]), "wall_time_s": final["wall_time_s"],
            "samples_seen": its[-1].get("samples_seen")}
    previous = its[-2]["compute"] if len(its) > 1 else 0
    info["budget_stop"] = bool(budget) and final["compute"] >= budget > previous
    return info


def interpolate(xs: list, ys: list, x: float | None) -> float | None:
    """y at x on the polyline (xs increasing), None outside [xs[0], xs[-1]]."""
    if not xs or x is None or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def eval_every_from_probe(rows: list, budget: float, budget_seconds: float, iters: int, evals: int) -> int:
    """The eval cadence that spreads about `evals` evaluations over a run, from a short probe run of the method:
    its compute and seconds per iteration (the first iteration's seconds hold its iteration-0 eval: left out)."""
    its = [r for r in rows if not r.get("final")]
    per_compute = its[-1]["compute"] / len(its)
    per_second = (seconds(its[-1]) - seconds(its[0])) / (len(its) - 1) if len(its) > 1 else seconds(its[0])
    length = [iters]
    if budget:
        length.append(budget / max(per_compute, 1e-9))
    if budget_seconds:
        length.append(budget_seconds / max(per_second, 1e-9))
    return max(1, round(min(length) / evals))


def mean_std(values: list) -> tuple:
    """(mean, std over seeds with ddof 1 or None for one value, n); (None, None, 0) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None), len(values)


# ---------------------------------------------------------------------------------------------
# The plan: one task per subprocess (probe, run, fidelity check)
# ---------------------------------------------------------------------------------------------


@dataclass
class Task:
    kind: str  # probe, run, fidelity
    label: str
    cmd: list
    log: Path
    run_dir: Path | None = None
    stdout: Path | None = None  # a separate stdout file (check.py's JSON line); else stdout goes to the log
    then: Callable | None = None  # called with the exit status; returns tasks to run next
    proc: subprocess.Popen | None = None
    files: list = field(default_factory=list)


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def run_command(s, m: Method, seed: int, threads: int, run_dir: Path, probe: bool = False) -> list:
    """A run's command line: the method's flags, then what compare.py sets (so a method cannot override it)."""
    reward = [] if s.reward == "default" else ["--reward", s.reward]  # default: the script's own
    cmd = [str(ROOT / m.script), *m.flags, "--model", s.model, *reward, "--seed", str(seed),
           "--run-dir", str(run_dir), "--threads", str(threads), "--progress-every", str(s.progress_every)]
    if probe:  # a short look at the method's cost per iteration: no budget, tiny evaluations
        return cmd + ["--iters", str(PROBE_ITERS), "--eval-every", "0", "--eval-size", "2"]
    if not s.default_length:
        cmd += ["--iters", str(s.iters), "--eval-every", str(m.eval_every)]
    cmd += ["--eval-size", str(s.eval_size)]
    for key in ("budget", "budget_seconds"):
        if getattr(s, key):
            cmd += [f"--{key.replace('_', '-')}", number(getattr(s, key))]
    return cmd


def identity(cmd: list) -> list:
    """What makes a run the run it is: its command without where it is written and how it is watched (a finished
    run directory is reused only for the same identity; --eval-every too may change, as in a --resume)."""
    out, skip = [Path(cmd[0]).name], {"--run-dir", "--threads", "--progress-every", "--eval-every"}
    it = iter(cmd[1:])
    for token in it:
        if token in skip:
            next(it, None)
        else:
            out.append(token)
    return out


def check_identity(run_dir: Path, cmd: list):
    """An existing run directory must hold the run this command asks for (compare.json beside metrics.jsonl)."""
    path = run_dir / "compare.json"
    if not (run_dir / "metrics.jsonl").is_file():  # nothing ran there yet (e.g. refused): it is started afresh
        return
    if path.is_file() and json.loads(path.read_text())["identity"] != identity(cmd):
        fail(f"{run_dir} holds a run of another command ({' '.join(json.loads(path.read_text())['identity'])}); "
             "remove it or choose another --name")


def prepare(run_dir: Path, cmd: list, iters: int, threads: int, progress_every: float, eval_every: int,
            budget: float, budget_seconds: float) -> list | None:
    """The command for this run directory: None if finished; a --resume if a killed run left a checkpoint;
    else a fresh start (a directory without a checkpoint is cleared: nothing in it can be continued)."""
    rows = read_rows(run_dir)
    if finished(rows):
        return None
    if (run_dir / "checkpoint.pt").is_file() and (run_dir / "args.json").is_file():
        # Only the flags a resume may change (runner.RESUME_MAY_CHANGE); the rest comes from its args.json.
        resume = [cmd[0], "--resume", str(run_dir), "--threads", str(threads), "--progress-every", str(progress_every)]
        if iters is not None:  # else the run's own (args.json)
            resume += ["--iters", str(iters), "--eval-every", str(eval_every)]
        if budget:
            resume += ["--budget", number(budget)]
        if budget_seconds:
            resume += ["--budget-seconds", number(budget_seconds)]
        return resume
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "compare.json").write_text(json.dumps({"identity": identity(cmd)}))
    return cmd


class Abort(Exception):
    """Stop everything with one line: a script refused its input (exit 2), or a probe run failed (exit 1)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].removeprefix("error: ")


def start(task: Task):
    log = open(task.log, "a")
    out = open(task.stdout, "w") if task.stdout else log
    task.files = [log, out]
    # Its own session: a Ctrl-C in the terminal reaches compare.py alone, which then stops every run once
    # (a run stops after its current iteration, with a checkpoint; a second signal would stop it at once).
    task.proc = subprocess.Popen([sys.executable, *task.cmd], cwd=os.getcwd(), stdout=out, stderr=log,
                                 start_new_session=True)


def execute(tasks: list, jobs: int, progress: Callable):
    """Run the tasks, `jobs` at a time; a task's `then` may queue more (run first). Ctrl-C or SIGTERM: every
    running subprocess is stopped after its current iteration with a checkpoint; the same command continues."""
    queue, running = list(tasks), []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.pop(0)
                start(task)
                running.append(task)
            time.sleep(POLL_S)
            for task in list(running):
                rc = task.proc.poll()
                if rc is None:
                    continue
                running.remove(task)
                for f in task.files:
                    f.close()
                queue[:0] = (task.then(rc) if task.then else None) or []
            progress(running)
    except Abort as e:
        stop(running)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.code)
    except KeyboardInterrupt:
        print("\ncompare.py: stopping the running jobs after their current iteration (checkpointed); "
              "rerun the same command to continue", file=sys.stderr, flush=True)
        stop(running)
        raise SystemExit(130)
    except BaseException:  # a bug of ours: the runs (in sessions of their own) must not run on unwatched
        stop(running)
        raise


def stop(running: list):
    for task in running:
        task.proc.send_signal(signal.SIGTERM)
    for task in running:
        try:
            task.proc.wait()
        except KeyboardInterrupt:  # asked again: the runs stop at once, their last checkpoint kept
            for t in running:
                t.proc.send_signal(signal.SIGTERM)
            task.proc.wait()


# ---------------------------------------------------------------------------------------------
# Outputs: curves.json, table.md, plot.png, strips
# ---------------------------------------------------------------------------------------------


def run_key(s, seed: int, threads: int) -> str:
    """A run's name in curves.json: its seed, and its thread count when the comparison has several."""
    return str(seed) if len(s.threads) == 1 else f"{seed}-t{threads}"


def run_dir_of(s, m: Method, seed: int, threads: int) -> Path:
    return s.out / "runs" / (f"{m.name}__seed{seed}" + (f"__t{threads}" if len(s.threads) > 1 else ""))


def holds(s, run: dict, pretrained_fidelity: dict | None) -> bool | None:
    """Whether a run meets the comparison's bar (--holds): None when it has none or the fidelity is missing."""
    fid = run["fidelity"]
    if not s.holds or fid is None or (s.holds == "halve-asymmetry" and pretrained_fidelity is None):
        return None
    kept = all(fid[k] >= low for k, low in HOLDS[s.holds].items())
    if s.holds == "gain":
        return kept and run["final"]["eval_reward_mean"] > run["eval"]["eval_reward_mean"][0]
    return kept and fid["asymmetry"] <= 0.5 * pretrained_fidelity["asymmetry"]


def read_fidelity(path: Path, n: int):
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    saved.pop("lora", None)  # check.py's absolute path of the run: curves.json names the run (run_dir) relatively
    return saved if saved.get("n") == n else None  # another --fidelity-n: measured again


def collect(s) -> dict:
    """curves.json: the settings, the common point, and per method and seed every curve and the final counts."""
    curves = {"name": s.name, "about": s.about, "placeholder": s.placeholder,
              "settings": {"reward": s.reward, "model": s.model, "budget": s.budget, "budget_seconds": s.budget_seconds,
                           "iters": s.iters, "seeds": s.seeds, "x": s.x, "evals": s.evals, "eval_size": s.eval_size,
                           "common_flags": s.common_flags, "fidelity": s.fidelity, "fidelity_n": s.fidelity_n,
                           "jobs": s.jobs, "threads": s.threads, "holds": s.holds},
              "methods": {}}
    for m in s.methods:
        runs = {}
        for seed, threads in s.runs:
            run_dir = run_dir_of(s, m, seed, threads)
            rows = read_rows(run_dir)
            if not finished(rows):
                continue
            fidelity = read_fidelity(run_dir / "fidelity.json", s.fidelity_n) if s.fidelity else None
            runs[run_key(s, seed, threads)] = {"seed": seed, "threads": threads, "run_dir": os.path.relpath(run_dir, s.out), "eval": eval_curve(rows),
                               "train": train_curve(rows), "final": final_info(rows, s.budget), "fidelity": fidelity}
        curves["methods"][m.name] = {"command": m.spec, "script": m.script, "flags": m.flags,
                                     "eval_every": m.eval_every, "runs": runs}
    finals = [r["eval"][s.x][-1] for method in curves["methods"].values() for r in method["runs"].values()]
    # The common point: the smallest final x of all runs, where every run has an eval curve to read (it ends at its
    # own final x, at or past the budget); no run is extrapolated.
    common = min(finals) if finals else None
    curves["common_point"] = {"x": s.x, "value": common}
    pretrained_fidelity = read_fidelity(s.out / "runs" / "pretrained__fidelity.json", s.fidelity_n) \
        if s.fidelity else None
    zero = []
    for method in curves["methods"].values():
        for run in method["runs"].values():
            run["at_common_point"] = interpolate(run["eval"][s.x], run["eval"]["eval_reward_mean"], common)
            zero.append(run["eval"]["eval_reward_mean"][0])
            run["gain"] = run["final"]["eval_reward_mean"] - run["eval"]["eval_reward_mean"][0]
            run["holds"] = holds(s, run, pretrained_fidelity)
        values = list(method["runs"].values())
        method["summary"] = {
            "n": len(values),
            "final_eval_reward": mean_std([r["final"]["eval_reward_mean"] for r in values])[:2],
            "at_common_point": mean_std([r["at_common_point"] for r in values])[:2],
            **{k: mean_std([r["final"][k] for r in values])[:2] for k in ("compute", "reward_evals", "seconds",
                                                                          "samples_seen")},
            "fidelity": ({k: mean_std([(r["fidelity"] or {}).get(k) for r in values])[:2] for k in FIDELITY}
                         if s.fidelity else None),
            # gradient scripts: the LoRA gradient norm before clipping, averaged over the run (DRTune Fig. 7)
            "grad_norm": mean_std([float(np.mean(r["train"]["grad_norm"])) if "grad_norm" in r["train"] else None
                                   for r in values])[:2],
            "pretrained_eval_reward": values[0]["eval"]["eval_reward_mean"][0] if values else None,
            "gain": mean_std([r["gain"] for r in values])[:2],
            "worst_gain": min((r["gain"] for r in values), default=None),
            "fidelity_worst": ({k: min(((r["fidelity"] or {}).get(k) for r in values if r["fidelity"]), default=None)
                                for k in ("colour", "shape", "background")} |
                               {"asymmetry": max((r["fidelity"]["asymmetry"] for r in values if r["fidelity"]),
                                                 default=None)} if s.fidelity else None),
            "wall_time_s": mean_std([r["final"]["wall_time_s"] for r in values])[:2],
            "wall_time_s_max": max((r["final"]["wall_time_s"] for r in values), default=None),
            "holds": [sum(r["holds"] is True for r in values), sum(r["holds"] is not None for r in values)]
            if s.holds else None}
    # Iteration 0 evaluates the pretrained model: the same prompts and noise in every run, hence one value.
    curves["pretrained"] = {"eval_reward": mean_std(zero)[:2], "n": len(zero),
                            "fidelity": pretrained_fidelity}
    return curves


def fmt(mean, std=None, digits=4) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.{digits}g}" if abs(mean) < 10 ** digits else f"{mean:,.0f}"
    return text if std is None else f"{text} ± {std:.2g}"


def fmt_count(mean, std=None) -> str:
    return "–" if mean is None else f"{mean:,.0f}" + ("" if std is None else f" ± {std:,.0f}")


def write_table(s, curves: dict, path: Path):
    common = curves["common_point"]["value"]
    at = f"eval reward @ {s.x} {fmt_count(common) if s.x != 'seconds' else fmt(common)}"
    grad = any(m["summary"]["grad_norm"][0] is not None for m in curves["methods"].values())
    head = ["method", "n", "final eval reward", at] + (list(FIDELITY) if s.fidelity else []) + \
        (["grad norm"] if grad else []) + ["compute", "seconds", "samples", "reward evals"]
    pre = curves["pretrained"]
    pre_fid = pre["fidelity"] or {}
    lines = [f"# {s.name}", ""]
    if s.about:
        lines += [s.about, ""]
    if s.placeholder:
        lines += [f"**Placeholder settings**: preset `{s.preset}`'s budget and flags are not tuned yet.", ""]
    limit = ", ".join(x for x in (s.budget and f"{s.budget:,.0f} compute units", s.budget_seconds and
                                  f"{s.budget_seconds:g} s", s.iters not in (DEFAULT_CAP, None) and
                                  f"{s.iters} iterations") if x)
    reward = "each script's own default reward" if s.reward == "default" else f"Reward `{s.reward}`"
    limit = limit or "each script's default iterations"
    lines += [f"{reward}, model `{s.model}`, {limit} per run, seeds {' '.join(map(str, s.seeds))}"
              + (f", threads {' and '.join(map(str, s.threads))} (each seed on each float path)"
                 if len(s.threads) > 1 else "")
              + (f", common flags `{s.common_flags}`" if s.common_flags else "") + ".", ""]
    if s.holds:
        lines += holds_table(s, curves)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pre_reward = ["per script"] * 2 if s.reward == "default" else [fmt(*pre["eval_reward"])] * 2
    lines.append("| " + " | ".join(["pretrained (iteration 0)", str(pre["n"]), *pre_reward] + [fmt(pre_fid.get(k)) for k in FIDELITY if s.fidelity]
                                   + ["–"] * grad + ["0", "0", "0", "0"]) + " |")
    for name, method in curves["methods"].items():
        m = method["summary"]
        if not m["n"]:
            continue
        cells = [name, str(m["n"]), fmt(*m["final_eval_reward"]), fmt(*m["at_common_point"])]
        cells += [fmt(*m["fidelity"][k]) for k in FIDELITY] if s.fidelity else []
        cells += [fmt(*m["grad_norm"], digits=3)] if grad else []
        cells += [fmt_count(*m["compute"]), fmt(*m["seconds"], digits=3), fmt_count(*m["samples_seen"]),
                  fmt_count(*m["reward_evals"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± std over seeds (n runs). **final eval reward**: each run's evaluation after its last "
              "update, "
              "at its own compute (a budget stop overshoots by less than one iteration: see compute). "
              f"**{at}**: each run's eval curve read at one point for all, the smallest final {s.x} of all runs, "
              "linearly interpolated between the run's evaluations (an evaluation counts at the work done before it). "
              f"Evaluation: the scripts' shared protocol (deterministic DDIM, {s.eval_size} fixed prompts and noise)."]
    if s.fidelity:
        lines += ["", f"Fidelity: `toyworld/check.py --lora RUN_DIR --n {s.fidelity_n}` on the final LoRA (asymmetry "
                  "is DRTune eq. 6, lower is better; colour, shape, background: fraction of samples showing the "
                  "prompted one)."]
    lines += ["", "compute: UNet image-step forwards + 2 × backwards (CFG counts both halves, checkpoint "
              "recomputation counts; evaluation is not counted). seconds: training time up to the last update, the "
              f"evaluations left out (--jobs {s.jobs}, --threads {' '.join(map(str, s.threads))}). grad norm: the LoRA gradient's norm before "
              "clipping, averaged over the run's updates. samples: training images generated. reward evals: images "
              "scored in training.", "",
              "| method | command | eval every (iterations) |", "|---|---|---|"]
    lines += [f"| {name} | `{method['command']}` | {method['eval_every'] or 'the script default'} |"
              for name, method in curves["methods"].items()]
    path.write_text("\n".join(lines) + "\n")


def holds_table(s, curves: dict) -> list:
    """The verdict first: per method how many runs hold (--holds), the gain and the worst run, the prompt fidelity
    (mean, and the worst run's), the wall time; then every run on its own line."""
    bar = HOLDS[s.holds]
    pre = curves["pretrained"]["fidelity"] or {}
    what = ("eval reward rises, " if s.holds == "gain" else
            f"held-out asymmetry <= {0.5 * pre.get('asymmetry', float('nan')):.3f} (half the pretrained "
            f"{pre.get('asymmetry', float('nan')):.3f}), ")
    lines = [f"**Holds** when: {what}" + ", ".join(f"{k} >= {v:.0%}" for k, v in bar.items()) +
             " (toyworld/check.py on the final LoRA).", "",
             "| script | holds | pretrained eval reward | gain (mean ± std) | worst gain | asymmetry (worst) | colour "
             "(worst) | shape (worst) | background (worst) | wall time s (max) |", "|" + "---|" * 10]
    for name, method in curves["methods"].items():
        m = method["summary"]
        if not m["n"]:
            continue
        fid, worst = m["fidelity"], m["fidelity_worst"]
        lines.append("| " + " | ".join([
            name, f"**{m['holds'][0]}/{m['holds'][1]}**", fmt(m["pretrained_eval_reward"]), fmt(*m["gain"], digits=3),
            fmt(m["worst_gain"], digits=3), f"{fmt(fid['asymmetry'][0], digits=3)} ({fmt(worst['asymmetry'], digits=3)})",
            *[f"{fmt(fid[k][0], digits=2)} ({fmt(worst[k], digits=2)})" for k in ("colour", "shape", "background")],
            f"{m['wall_time_s'][0]:.0f} ({m['wall_time_s_max']:.0f})"]) + " |")
    lines += ["", "<details><summary>every run</summary>", "",
              "| script | seed | threads | eval reward | gain | asymmetry | colour | shape | background | wall time s "
              "| holds |", "|" + "---|" * 11]
    for name, method in curves["methods"].items():
        for run in method["runs"].values():
            fid = run["fidelity"] or {}
            lines.append("| " + " | ".join([
                name, str(run["seed"]), str(run["threads"]),
                f"{run['eval']['eval_reward_mean'][0]:.4g} → {run['final']['eval_reward_mean']:.4g}",
                f"{run['gain']:+.3g}", *[fmt(fid.get(k), digits=3) for k in ("asymmetry", "colour", "shape", "background")],
                f"{run['final']['wall_time_s']:.0f}", {True: "yes", False: "**no**", None: "–"}[run["holds"]]]) + " |")
    return lines + ["", "</details>", ""]


def write_plot(s, curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e \".[plot]\"): no plot.png", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, method in curves["methods"].items():
        runs = list(method["runs"].values())
        if not runs:
            continue
        # Seeds are evaluated at different x: each on one grid up to the shortest run's end, then mean ± std.
        end = min(r["eval"][s.x][-1] for r in runs)
        grid = np.linspace(0, end, 200)
        # each script's own reward (--reward default): its gain over its pretrained value, comparable in sign only
        ys = np.array([np.interp(grid, r["eval"][s.x], np.subtract(r["eval"]["eval_reward_mean"],
                                                                    r["eval"]["eval_reward_mean"][0] if
                                                                    s.reward == "default" else 0)) for r in runs])
        line, = ax.plot(grid, ys.mean(0), label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            std = ys.std(0, ddof=1)
            ax.fill_between(grid, ys.mean(0) - std, ys.mean(0) + std, color=line.get_color(), alpha=0.2, lw=0)
        for r in runs:  # the evaluations themselves
            ax.plot(r["eval"][s.x], r["eval"]["eval_reward_mean"], "o", ms=2.5, color=line.get_color(), alpha=0.6)
    if curves["common_point"]["value"] is not None:
        ax.axvline(curves["common_point"]["value"], color="grey", ls="--", lw=1, label="common point")
    ax.set_xlabel(X_AXES[s.x])
    ax.set_ylabel("eval reward gain (each script's reward)" if s.reward == "default" else f"eval reward ({s.reward})")
    ax.set_title(f"{s.name}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def first_row(grid_path: Path, eval_size: int) -> Image.Image:
    """The first row of an eval grid (runner.save_grid: 8 square images per row, in eval-prompt order)."""
    grid = Image.open(grid_path).convert("RGB")
    size = grid.width // min(8, eval_size)
    return grid.crop((0, 0, grid.width, size))


def labelled(row: Image.Image, label: str, label_width: int, scale: int) -> Image.Image:
    row = row.resize((row.width * scale, row.height * scale), Image.NEAREST)  # tiny images, shown pixel for pixel
    canvas = Image.new("RGB", (label_width + row.width, row.height), "white")
    canvas.paste(row, (label_width, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    box = draw.textbbox((0, 0), label, font=font)
    draw.text((4, (row.height - (box[3] - box[1])) // 2 - box[1]), label, fill="black", font=font)
    return canvas


def write_strips(s, curves: dict) -> list:
    """strips/<method>.png: the first row of the final eval grid of the method's first seed; strips.png: all of
    them under the pretrained model's row (iteration 0), every row on the same eval prompts and noise."""
    seed = run_key(s, *s.runs[0])
    rows = []
    for name, method in curves["methods"].items():
        run = method["runs"].get(seed)
        if run is None:
            continue
        run_dir = s.out / run["run_dir"]
        if not rows:
            rows.append(("pretrained", first_row(run_dir / "eval_00000.png", s.eval_size)))
        rows.append((name, first_row(run_dir / f"eval_{run['final']['iter']:05d}.png", s.eval_size)))
    if not rows:
        return []
    scale = max(1, 64 // rows[0][1].height)
    font = ImageFont.load_default()
    label_width = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n, _ in rows)
    images = [(name, labelled(row, name, label_width, scale)) for name, row in rows]
    (s.out / "strips").mkdir(exist_ok=True)
    written = []
    for name, image in images[1:]:
        image.save(s.out / "strips" / f"{name}.png")
        written.append(s.out / "strips" / f"{name}.png")
    gap = 2  # white between the rows
    stacked = Image.new("RGB", (images[0][1].width, len(images) * (images[0][1].height + gap) - gap), "white")
    for k, (_, image) in enumerate(images):
        stacked.paste(image, (0, k * (image.height + gap)))
    stacked.save(s.out / "strips.png")
    return written + [s.out / "strips.png"]


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def print_presets():
    for name, p in PRESETS.items():
        print(f"{name}{'  (placeholder settings)' if p.get('placeholder') else ''}: {p['about']}")
        print(f"    reward {p['reward']}, budget {p.get('budget', 0):,.0f}, seeds {p.get('seeds', [0])}, "
              f"threads {p.get('threads', [1])}, "
              f"x {p.get('x', 'compute')}; " + "; ".join(f"{k}={v}" for k, v in p["methods"].items()))


def fidelity_task(s, lora: Path | None, result: Path, label: str) -> Task:
    # One float path for every check (1 thread), so that runs differ only by their own training.
    cmd = [str(ROOT / "toyworld" / "check.py"), "--model", s.model, "--n", str(s.fidelity_n), "--threads", "1"] + \
        (["--lora", str(lora)] if lora else [])
    out = result.with_suffix(".out")

    def then(rc):
        lines = out.read_text().splitlines() if out.is_file() else []
        try:
            report = json.loads(lines[-1]) if rc == 0 and lines else None
        except json.JSONDecodeError:
            report = None
        if report is None:
            s.failed.append(f"{label} (toyworld/check.py exit {rc}; see {result.with_suffix('.log')})")
        else:
            result.write_text(json.dumps(report | {"n": s.fidelity_n}))
            s.fidelity_done += 1
    return Task("fidelity", label, cmd, result.with_suffix(".log"), stdout=out, then=then)


def on_sigterm(signum, frame):
    raise KeyboardInterrupt  # stopped like a Ctrl-C: the runs are checkpointed, the same command continues


def main(argv=None):
    ns = parse_args(argv)
    if ns.list:
        print_presets()
        return
    s = settle(ns)
    runs_dir = s.out / "runs"

    # Every existing run directory must hold the run asked for, checked before any work.
    for m in s.methods:
        for seed, threads in s.runs:
            run_dir = run_dir_of(s, m, seed, threads)
            check_identity(run_dir, run_command(s, m, seed, threads, run_dir))
    if ns.dry_run:
        for m in s.methods:
            for seed, threads in s.runs:
                cmd = run_command(s, m, seed, threads, run_dir_of(s, m, seed, threads))
                if m.eval_every == 0:
                    cmd[cmd.index("--eval-every") + 1] = "<from a probe run>"
                print("python " + shlex.join(cmd))
        return
    if s.placeholder:
        print(f"note: preset {s.preset}'s budget and flags are placeholders (not tuned yet)", file=sys.stderr)
    runs_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, on_sigterm)
    s.failed, s.fidelity_done = [], 0
    n_runs = len(s.methods) * len(s.runs)
    tty = sys.stderr.isatty()
    bar = tqdm(total=n_runs, desc=f"compare {s.name}", unit="run", disable=not tty, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total} runs [{elapsed}<{remaining}]{postfix}")
    done = {}  # finished run directory -> its compute
    started = time.time()
    last_line = [started]

    def fraction(task: Task) -> float:
        """How far a running run is towards what ends it (its budget, or its iterations)."""
        row = last_row(task.run_dir)
        if row is None:
            return 0.0
        parts = [(row["iter"] + 1) / (s.iters or 100)]  # a script's default length: about 20-140 iterations
        if s.budget:
            parts.append(row["compute"] / s.budget)
        if s.budget_seconds:
            parts.append(seconds(row) / s.budget_seconds)
        return min(1.0, max(parts))

    def progress(running):
        live = [t for t in running if t.kind == "run"]
        probing = sum(t.kind == "probe" for t in running)
        bar.n = len(done) + sum(fraction(t) for t in live)
        compute = sum(done.values()) + sum((last_row(t.run_dir) or {}).get("compute", 0) for t in live)
        bar.set_postfix_str(f"{len(done)} done, {len(live)} running" + (f", {probing} probing" if probing else "") + (
            f", compute {compute:,.0f}" + (f"/{n_runs * s.budget:,.0f}" if s.budget else "")) + (
            f", fidelity {s.fidelity_done}/{n_runs + 1}" if s.fidelity else "") + (
            f", {len(s.failed)} failed" if s.failed else ""), refresh=False)
        bar.refresh()
        if not tty and time.time() - last_line[0] >= s.progress_every:
            last_line[0] = time.time()
            print(f"compare {s.name}: {bar.n:.2f}/{n_runs} runs, {len(live)} running, {probing} probing, "
                  f"{len(s.failed)} failed, "
                  f"{time.time() - started:.0f} s", file=sys.stderr, flush=True)

    def say(text):
        tqdm.write(text, file=sys.stdout)

    # 1. The eval cadence: a 2-iteration probe of each method (its compute per iteration), kept for reruns.
    probes = []
    for m in s.methods:
        if m.eval_every or s.default_length:
            continue
        probe_dir = runs_dir / f"{m.name}__probe"

        def probe_done(rc, m=m, probe_dir=probe_dir):
            rows = read_rows(probe_dir)
            if rc == 2:
                raise Abort(f"{m.name} ({m.spec}): {last_error(probe_dir / 'compare.log')}")
            if not finished(rows):
                raise Abort(f"{m.name}: its probe run failed (exit {rc}); see {probe_dir / 'compare.log'}", code=1)
            m.eval_every = eval_every_from_probe(rows, s.budget, s.budget_seconds, s.iters, s.evals)
            its = [r for r in rows if not r.get("final")]
            per_it = seconds(its[-1]) - seconds(its[-2])
            say(f"{m.name}: {its[-1]['compute'] / len(its):,.0f} compute units and {per_it:.2g} s per iteration "
                f"(probe) -> eval every {m.eval_every} iterations")
        cmd = run_command(s, m, 0, s.threads[0], probe_dir, True)  # seed 0 whatever --seeds: it measures cost only
        if (probe_dir / "compare.json").is_file() and \
                json.loads((probe_dir / "compare.json").read_text())["identity"] != identity(cmd):
            shutil.rmtree(probe_dir)  # a probe of other flags: a cache, measured again
        cmd = prepare(probe_dir, cmd, PROBE_ITERS, s.threads[0], s.progress_every, 0, 0, 0)
        if cmd is None:
            probe_done(0)
        else:
            probes.append(Task("probe", f"{m.name} probe", cmd, probe_dir / "compare.log", probe_dir, then=probe_done))
    if probes:
        execute(probes, s.jobs, progress)

    # 2. The runs, seed by seed (early results cover every method); each finished run's fidelity check first.
    tasks, skipped = [], 0
    if s.fidelity and read_fidelity(runs_dir / "pretrained__fidelity.json", s.fidelity_n) is None:
        tasks.append(fidelity_task(s, None, runs_dir / "pretrained__fidelity.json", "pretrained fidelity"))
    elif s.fidelity:
        s.fidelity_done += 1
    for seed, threads in s.runs:
        for m in s.methods:
            run_dir = run_dir_of(s, m, seed, threads)
            label = f"{m.name} seed {seed}" + (f" threads {threads}" if len(s.threads) > 1 else "")
            fid = run_dir / "fidelity.json"

            def run_done(rc, m=m, run_dir=run_dir, label=label, fid=fid):
                rows = read_rows(run_dir)
                if rc == 2:
                    raise Abort(f"{label} ({m.spec}): {last_error(run_dir / 'compare.log')}")
                if not finished(rows):
                    s.failed.append(f"{label} (exit {rc}; see {run_dir / 'compare.log'})")
                    return []
                done[run_dir] = rows[-1]["compute"]
                info = final_info(rows, s.budget)
                say(f"{label}: eval reward {rows[0]['eval_reward_mean']:.4g} -> {info['eval_reward_mean']:.4g}, "
                    f"compute {info['compute']:,} in {info['seconds']:.0f} s ({info['iter']} iterations)")
                return [fidelity_task(s, run_dir, fid, f"{label} fidelity")] if s.fidelity else []
            cmd = prepare(run_dir, run_command(s, m, seed, threads, run_dir), s.iters, threads, s.progress_every,
                          m.eval_every, s.budget, s.budget_seconds)
            if cmd is None:
                skipped += 1
                done[run_dir] = read_rows(run_dir)[-1]["compute"]
                if s.fidelity and read_fidelity(fid, s.fidelity_n) is None:
                    tasks.append(fidelity_task(s, run_dir, fid, f"{label} fidelity"))
                elif s.fidelity:
                    s.fidelity_done += 1
            else:
                tasks.append(Task("run", label, cmd, run_dir / "compare.log", run_dir, then=run_done))
    if skipped:
        say(f"compare {s.name}: {skipped} of {n_runs} runs already done (skipped)")
    execute(tasks, s.jobs, progress)
    progress([])
    bar.close()

    # 3. The outputs.
    curves = collect(s)
    (s.out / "curves.json").write_text(json.dumps(curves, indent=1))
    write_table(s, curves, s.out / "table.md")
    written = [s.out / "curves.json", s.out / "table.md"]
    if write_plot(s, curves, s.out / "plot.png"):
        written.append(s.out / "plot.png")
    written += write_strips(s, curves)
    print(f"compare {s.name}: wrote " + ", ".join(os.path.relpath(p, s.out) for p in written) + f" in {s.out}")
    if s.failed:
        print(f"error: {len(s.failed)} failed: " + "; ".join(s.failed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
