"""benchmarks/compare.py: a two-method, one-seed, tiny-budget comparison through the scripts' command lines (its
output files and their fields, the budget stop, a rerun that skips finished runs), and its pure parts by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import compare

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 200  # DRTune below: ~36 units per iteration (6 iterations); DDPO: 128 (2 iterations)
METHODS = {"DRTune": "drtune.py --K 2 --early-stop 2", "DDPO": "ddpo.py --estimator is --sample-batches 2 --samples-per-prompt 1"}


def compare_cli(*flags, timeout=300):
    return subprocess.run([sys.executable, "benchmarks/compare.py", *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def tiny(results, *extra, timeout=300):
    """The comparison of the test: the embedded tiny model (not the toy world: no fidelity), T = 4, batch 2."""
    flags = ["--name", "tiny", "--results", str(results), "--model", "embedded-tiny-sd", "--reward", "brightness",
             "--budget", str(BUDGET), "--seeds", "0", "--eval-every", "2", "--eval-size", "4", "--jobs", "2",
             "--common-flags", "--num-steps 4 --batch-size 2"]
    for name, spec in METHODS.items():
        flags += ["--method", f"{name}={spec}"]
    return compare_cli(*flags, *extra, timeout=timeout)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    results = tmp_path_factory.mktemp("compare")
    result = tiny(results)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return results / "tiny", result


@pytest.mark.slow  # one comparison run for the module: ~30 s
def test_curves_json_has_every_curve_and_the_common_point(done):
    out, _ = done
    curves = json.loads((out / "curves.json").read_text())
    assert {"name", "settings", "methods", "common_point", "pretrained"} <= set(curves)
    assert curves["settings"]["budget"] == BUDGET and curves["settings"]["fidelity"] is False
    assert list(curves["methods"]) == list(METHODS)
    finals = []
    for name, method in curves["methods"].items():
        assert method["command"] == METHODS[name] and method["eval_every"] == 2
        run = method["runs"]["0"]
        assert {"run_dir", "eval", "train", "final", "fidelity", "at_common_point"} <= set(run)
        ev, train, final = run["eval"], run["train"], run["final"]
        assert {"iter", "compute", "reward_evals", "seconds", "eval_reward_mean", "eval_reward_std"} <= set(ev)
        assert len({len(v) for v in ev.values()}) == 1 and ev["iter"][0] == 0 and ev["compute"][0] == 0
        assert ev["iter"][-1] == final["iter"] and ev["compute"][-1] == final["compute"]
        assert ev["compute"] == sorted(ev["compute"])
        assert len(train["reward_mean"]) == final["iter"] and "grad_norm" in train
        assert final["budget_stop"] and final["compute"] >= BUDGET
        finals.append(final["compute"])
    assert "policy_reward_mean" in curves["methods"]["DDPO"]["runs"]["0"]["eval"]  # RL scripts' own sampler
    common = curves["common_point"]
    assert common == {"x": "compute", "value": min(finals)}
    for method in curves["methods"].values():
        run = method["runs"]["0"]
        assert run["at_common_point"] == pytest.approx(
            compare.interpolate(run["eval"]["compute"], run["eval"]["eval_reward_mean"], common["value"]))
        assert method["summary"]["n"] == 1 and method["summary"]["final_eval_reward"][0] == \
            run["final"]["eval_reward_mean"]
    assert curves["pretrained"]["n"] == 2 and curves["pretrained"]["eval_reward"][1] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_runs_stop_in_the_iteration_that_reaches_the_budget(done):
    out, _ = done
    for name in METHODS:
        text = (out / "runs" / f"{name}__seed0" / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        assert rows[-1]["final"] and rows[-1]["compute"] >= BUDGET > rows[-3]["compute"]  # [-2]: the last iteration
        assert rows[-2]["compute"] == rows[-1]["compute"]


@pytest.mark.slow
def test_table_has_a_row_per_method_and_the_columns(done):
    out, _ = done
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:3] == ["method", "n", "final eval reward"] and head[3].startswith("eval reward @ compute")
    # no fidelity columns off the toy world; grad norm, as both scripts log it
    assert head[4:] == ["grad norm", "compute", "seconds", "samples", "reward evals"]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:5])}
    assert list(rows) == ["pretrained (iteration 0)", *METHODS]
    assert all(len(r) == len(head) for r in rows.values()) and rows["DRTune"][1] == "1"
    assert float(rows["DRTune"][4]) > 0 and float(rows["DDPO"][4]) > 0
    assert int(rows["DDPO"][5].replace(",", "")) >= BUDGET


@pytest.mark.slow
def test_strips_are_the_first_eval_rows_and_the_plot_is_written(done):
    out, _ = done
    # 4 eval images of 32 px in the first grid row, shown at 2x: 64 px high, after a label column
    strips = {name: Image.open(out / "strips" / f"{name}.png") for name in METHODS}
    widths = {im.width for im in strips.values()}
    assert len(widths) == 1 and widths.pop() > 4 * 64 and all(im.height == 64 for im in strips.values())
    stacked = Image.open(out / "strips.png")
    assert stacked.size == (strips["DDPO"].width, 3 * 64 + 2 * 2)  # pretrained + 2 methods, 2 px between
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "plot.png").exists()
    else:
        assert Image.open(out / "plot.png").size == (900, 540)


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_refuses_another_command(done):
    out, _ = done
    metrics = {name: (out / "runs" / f"{name}__seed0" / "metrics.jsonl").stat().st_mtime_ns for name in METHODS}
    result = tiny(out.parent, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 of 2 runs already done (skipped)" in result.stdout
    assert {name: (out / "runs" / f"{name}__seed0" / "metrics.jsonl").stat().st_mtime_ns for name in METHODS} == metrics
    changed = tiny(out.parent, "--budget", str(2 * BUDGET), timeout=60)  # the last --budget wins
    assert changed.returncode == 2 and "holds a run of another command" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,needle", [
    (["--name", "x", "--reward", "brightness", "--method", "A=drtune.py"], "--budget"),
    (["--name", "x", "--reward", "brightness", "--budget", "9", "--method", "A=drtune.py --seed 3"], "--seed"),
    (["--name", "x", "--reward", "brightness", "--budget", "9", "--method", "A=drtune.py --prompts toy"],
     "--common-flags"),
    (["--name", "x", "--reward", "brightness", "--budget", "9", "--method", "A=nope.py"], "method script"),
    (["--name", "x", "--reward", "brightness", "--budget", "9", "--method", "drtune.py"], "NAME=SCRIPT"),
    (["--preset", "nope"], "--preset"),
    (["--preset", "flagship", "--only", "ReFL"], "--only"),
    (["--preset", "flagship", "--model", "embedded-tiny-sd", "--fidelity", "on"], "--fidelity"),
    (["--preset", "flagship", "--seeds", "1", "1"], "--seeds"),
])
def test_bad_input_is_one_line_exit_2(flags, needle, tmp_path):
    result = compare_cli(*flags, "--results", str(tmp_path), timeout=60)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # before any work


@pytest.mark.parametrize("preset", list(compare.PRESETS))
def test_presets_settle(preset):
    s = compare.settle(compare.parse_args(["--preset", preset]))
    assert s.methods and (s.budget > 0 or s.default_length or s.iters < compare.DEFAULT_CAP) and s.name == preset
    assert s.reward and s.runs == [(seed, threads) for seed in s.seeds for threads in s.threads]


def test_eval_points_count_the_work_done_before_them_and_interpolate_by_hand():
    # Iterations cost 100, 150, 200 units; evals before iterations 0 and 2 (eval_every 2), and the final one.
    rows = [{"iter": 0, "eval_reward_mean": 0.1, "compute": 100, "reward_evals": 4, "wall_time_s": 1.0},
            {"iter": 1, "compute": 250, "reward_evals": 8, "wall_time_s": 2.0},
            {"iter": 2, "eval_reward_mean": 0.4, "compute": 450, "reward_evals": 12, "wall_time_s": 3.5},
            {"iter": 3, "final": True, "eval_reward_mean": 0.7, "compute": 450, "reward_evals": 12, "wall_time_s": 4.0}]
    curve = compare.eval_curve(rows)
    assert curve["compute"] == [0, 250, 450] and curve["reward_evals"] == [0, 8, 12]
    assert curve["seconds"] == [0.0, 2.0, 3.5] and curve["eval_reward_mean"] == [0.1, 0.4, 0.7]
    # at 400: 0.4 + (400 - 250) / (450 - 250) * (0.7 - 0.4) = 0.4 + 0.75 * 0.3 = 0.625
    assert compare.interpolate(curve["compute"], curve["eval_reward_mean"], 400) == pytest.approx(0.625)
    assert compare.interpolate(curve["compute"], curve["eval_reward_mean"], 125) == pytest.approx(0.25)
    assert compare.interpolate(curve["compute"], curve["eval_reward_mean"], 451) is None
    final = compare.final_info(rows, budget=300)
    assert final["budget_stop"] and final["seconds"] == 3.5 and final["compute"] == 450  # 250 < 300 <= 450


def test_eval_cadence_from_a_probe():
    probe = [{"iter": 0, "compute": 500, "wall_time_s": 9.0}, {"iter": 1, "compute": 1000, "wall_time_s": 10.0},
             {"iter": 2, "final": True, "compute": 1000, "wall_time_s": 11.0}]
    assert compare.eval_every_from_probe(probe, 40_000, 0, 100_000, 8) == 10  # 80 iterations / 8
    assert compare.eval_every_from_probe(probe, 40_000, 20, 100_000, 8) == 2  # 20 s at 1 s per iteration first
    assert compare.eval_every_from_probe(probe, 1_000, 0, 100_000, 8) == 1


def test_a_killed_run_is_resumed_and_a_run_without_checkpoint_restarted(tmp_path):
    cmd = ["/x/drtune.py", "--K", "2", "--run-dir", str(tmp_path / "a"), "--threads", "1", "--eval-every", "3"]
    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 0, "compute": 5}) + "\n")
    fresh = compare.prepare(run, cmd, 100, 1, 30.0, 3, 200, 0)
    assert fresh == cmd and not (run / "metrics.jsonl").exists()  # cleared: nothing in it could be continued
    assert json.loads((run / "compare.json").read_text())["identity"] == ["drtune.py", "--K", "2"]
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 0, "compute": 5}) + "\n")
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "args.json").write_text("{}")
    resume = compare.prepare(run, cmd, 100, 1, 30.0, 3, 200, 0)
    assert resume[:3] == ["/x/drtune.py", "--resume", str(run)] and "--K" not in resume and "200" in resume
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 1, "final": True}) + "\n")
    assert compare.prepare(run, cmd, 100, 1, 30.0, 3, 200, 0) is None


def test_a_run_holds_only_with_its_gain_or_halved_asymmetry_and_the_prompt_kept():
    s = compare.settle(compare.parse_args(["--preset", "defaults"]))
    assert s.reward == "default" and s.default_length and s.threads == [1, 2] and len(s.runs) == 6
    cmd = compare.run_command(s, s.methods[0], 2, 1, Path("/r"))
    assert "--reward" not in cmd and "--iters" not in cmd and "--eval-every" not in cmd  # the script's default run
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--seed") + 1] == "2"
    assert compare.run_dir_of(s, s.methods[0], 2, 1).name == "DRTune__seed2__t1"
    kept = {"asymmetry": 0.2, "colour": 0.95, "shape": 0.8, "background": 0.95}

    def run(before, after, **fidelity):
        return {"eval": {"eval_reward_mean": [before, after]}, "final": {"eval_reward_mean": after},
                "fidelity": kept | fidelity}
    assert compare.holds(s, run(0.5, 0.6), None) is True
    assert compare.holds(s, run(0.5, 0.5), None) is False  # no gain
    assert compare.holds(s, run(0.5, 0.6, shape=0.74), None) is False  # gained by losing the shape
    assert compare.holds(s, run(0.5, 0.6, colour=0.89), None) is False
    assert compare.holds(s, run(0.5, 0.6) | {"fidelity": None}, None) is None  # not judged without a check
    flagship = compare.settle(compare.parse_args(["--preset", "flagship"]))
    pretrained = {"asymmetry": 0.42}
    assert compare.holds(flagship, run(0.5, 0.4), pretrained) is True  # judged by the asymmetry, not the gain
    assert compare.holds(flagship, run(0.5, 0.9, asymmetry=0.211), pretrained) is False  # not halved
    assert compare.holds(flagship, run(0.5, 0.9, shape=0.79), pretrained) is False  # 0.80 for the flagship
    assert compare.holds(flagship, run(0.5, 0.9, shape=0.8, colour=0.95), pretrained) is True
