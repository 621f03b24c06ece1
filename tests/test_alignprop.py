import random
import statistics

import pytest

import alignprop
from gradient_family import TINY, check_run_dir, expect_bad_input, run_main, run_scripts


def test_gaussian_truncation_is_int_normal_42_5_at_50_steps():
    random.seed(0)
    draws = [alignprop.draw_truncation(50, "gaussian") for _ in range(4000)]
    assert all(1 <= k <= 49 for k in draws)
    # int(N(42, 5)) with the ~5 % of draws at 50 or beyond redrawn: mean ~41.0 (42, floored, upper tail cut)
    assert 40.6 < statistics.mean(draws) < 41.4
    assert 4.2 < statistics.stdev(draws) < 4.8


def test_truncation_scales_with_t_and_stays_inside_the_chain():
    random.seed(1)
    gaussian = [alignprop.draw_truncation(10, "gaussian") for _ in range(4000)]
    assert all(1 <= k <= 9 for k in gaussian)
    assert 7.5 < statistics.mean(gaussian) < 8.0  # N(0.84 T, 0.1 T) floored and cut as at T = 50: ~7.8
    uniform = [alignprop.draw_truncation(10, "uniform") for _ in range(2000)]
    assert set(uniform) == set(range(1, 10))
    assert alignprop.draw_truncation(10, "fixed") == 9
    assert alignprop.alignprop_steps(10, "fixed") == [9]


@pytest.mark.parametrize("truncation", ["uniform", "fixed"])
def test_gradient_flows_exactly_through_the_steps_after_the_drawn_truncation(truncation, monkeypatch, tmp_path):
    T = 5
    trace, rows = run_main(alignprop, [*TINY, "--num-steps", str(T), "--truncation", truncation, "--iters", "3"],
                           monkeypatch, tmp_path / "run")
    segments = trace.training_segments()
    assert len(segments) == len(rows) == 3
    timesteps = [int(t) for t in trace.pipe.scheduler.timesteps]
    for (calls, _), row in zip(segments, rows):
        [k] = row["truncation"]
        assert 1 <= k < T and (k == T - 1 or truncation == "uniform")
        assert [c.t for c in calls] == timesteps
        assert [i for i, c in enumerate(calls) if c.requires_grad and c.grad] == list(range(k, T))
        assert not any(c.requires_grad for c in calls[:k])


@pytest.mark.parametrize("stop_grad_input", [False, True])
def test_stop_grad_input_detaches_exactly_the_unet_input(stop_grad_input, monkeypatch, tmp_path):
    """DRTune eq. 3 on AlignProp (DRTune sec. 4.2): the steps after the truncation keep their gradient; with the
    flag no UNet input carries gradient, without it the inputs after the first trained step do."""
    T = 5
    flags = [*TINY, "--num-steps", str(T), "--truncation", "uniform", "--iters", "3"]
    trace, rows = run_main(alignprop, flags + (["--stop-grad-input"] if stop_grad_input else []), monkeypatch,
                           tmp_path / "run")
    for (calls, _), row in zip(trace.training_segments(), rows):
        [k] = row["truncation"]
        assert [i for i, c in enumerate(calls) if c.requires_grad and c.grad] == list(range(k, T))
        assert [c.input_requires_grad for c in calls] == [not stop_grad_input and i > k for i in range(T)]


@pytest.mark.parametrize("argv, needle", [
    (["--truncation", "exponential"], "--truncation"),
    (["--reward", "jpeg_compressibility"], "not differentiable"),
    (["--num-steps", "1"], "--num-steps"),
])
def test_bad_input_stops_before_any_work(argv, needle, monkeypatch, capsys, tmp_path):
    expect_bad_input(alignprop, argv, monkeypatch, capsys, tmp_path, needle)


def test_script_runs_as_a_user_runs_it(tmp_path):
    result, bad = run_scripts(
        "alignprop.py",
        [*TINY, "--num-steps", "3", "--run-dir", str(tmp_path / "run")],
        ["--truncation", "nope", "--run-dir", str(tmp_path / "bad")])
    assert result.returncode == 0, result.stderr
    rows = check_run_dir(tmp_path / "run", iters=2)
    assert all(1 <= k < 3 for r in rows for k in r["truncation"])
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
