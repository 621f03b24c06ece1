import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import common
import refl
import runner
from gradient_family import TINY, check_run_dir, expect_bad_input, run_main, run_scripts


def test_stop_step_is_drawn_inside_the_range_and_is_the_only_gradient_step():
    random.seed(0)
    T, t1, t2 = 20, 2, 6
    seen = set()
    for _ in range(300):
        grad_steps, stop = refl.refl_steps(T, t1, t2)
        assert grad_steps == [stop] and T - t2 <= stop <= T - t1
        seen.add(stop)
    assert seen == set(range(T - t2, T - t1 + 1))  # every step of the range is drawn


def make_pretrain_folder(path, n=3):
    path.mkdir()
    rng = np.random.default_rng(0)
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(n):
            array = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # not square, not 32 px
            Image.fromarray(array).save(path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a photo of animal {i}"}) + "\n")
    return path


@pytest.mark.parametrize("cfg", [False, True])
def test_gradient_only_at_the_stop_step_and_the_reward_sees_its_x0_prediction(cfg, monkeypatch, tmp_path):
    T = 6
    argv = [*TINY, "--num-steps", str(T), "--t1", "2", "--t2", "4", "--iters", "3"]
    argv += ["--guidance-scale", "3.0" if cfg else "1.0"]
    trace, rows = run_main(refl, argv, monkeypatch, tmp_path / "run")
    segments = trace.training_segments()
    assert len(segments) == len(rows) == 3
    timesteps = [int(t) for t in trace.pipe.scheduler.timesteps]
    for (calls, score), row in zip(segments, rows):
        stop = T - row["t_stop"]
        assert 2 <= row["t_stop"] <= 4 and row["trained_steps"] == [stop]
        assert [c.t for c in calls] == timesteps[:stop + 1]  # sampling ends at the stop step
        assert [c.requires_grad for c in calls] == [False] * stop + [True]
        assert calls[-1].grad > 0
        assert calls[-1].batch == (4 if cfg else 2)  # CFG off (the original's 1.0): one conditional call
        x, out = calls[-1].x[:2], calls[-1].out
        if cfg:
            out = out[:2] + 3.0 * (out[2:] - out[:2])
        with torch.no_grad():
            x0 = common.predict_x0(trace.pipe.scheduler, out, timesteps[stop], x)[0]
            expected = common.decode(trace.pipe.vae, x0)
        torch.testing.assert_close(score.images, expected, atol=1e-5, rtol=1e-4)
        # lambda * ReLU(phi - r) with the brightness defaults (phi = 1, lambda = 1): d loss / d r = -1/B
        torch.testing.assert_close(score.grad, torch.full_like(score.grad, -1 / 2))
    # no update before the first rollout: it runs the pretrained model (the LoRA starts as the identity)
    torch.testing.assert_close(segments[0][0][0].out, pretrained_output(trace.pipe, segments[0][0][0]))


def pretrained_output(pipe, call):
    """The UNet output of `call`'s input with the LoRA adapter off (the pretrained model)."""
    with torch.no_grad():
        pipe.unet.disable_adapters()
        out = pipe.unet(call.x, call.t, call.cond).sample
        pipe.unet.enable_adapters()
    return out


def test_pretrain_data_is_a_first_optimizer_step_then_the_refl_step(monkeypatch, tmp_path):
    """ImageReward's Alg. 1: each iteration updates on the pre-training loss, then on the ReFL loss, whose rollout
    already runs the model the first update left."""
    folder = make_pretrain_folder(tmp_path / "data")
    trace, rows = run_main(refl, [*TINY, "--num-steps", "5", "--pretrain-data", str(folder)], monkeypatch,
                           tmp_path / "run")
    assert all(r["pretrain_loss"] > 0 and r["pretrain_grad_norm"] > 0 and r["grad_norm"] > 0 for r in rows)
    segments = trace.training_segments()
    assert len(segments) == len(rows) == 2
    for calls, score in segments:
        pretrain, rollout = calls[0], calls[1:]
        # one call on the 2 real images at a random t each, with gradient, before the rollout
        assert pretrain.t == -1 and pretrain.batch == 2 and pretrain.requires_grad and pretrain.grad > 0
        assert all(c.t >= 0 for c in rollout) and rollout[-1].grad > 0 and score.grad is not None
    # the first rollout already differs from the pretrained model (in the run without --pretrain-data it does not)
    first = segments[0][0][1]
    assert (first.out - pretrained_output(trace.pipe, first)).abs().max() > 1e-4
    checkpoint = runner.load_checkpoint(tmp_path / "run")
    assert {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()} == {2 * len(rows)}


def test_pretrain_folder_format(tmp_path, capsys):
    folder = make_pretrain_folder(tmp_path / "data")
    pairs = refl.read_pretrain_data(str(folder))
    assert [(p.name, c) for p, c in pairs] == [(f"{i}.png", f"a photo of animal {i}") for i in range(3)]
    images = refl.load_images([p for p, _ in pairs], 16)
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def bad_folder(tmp_path, kind):
    if kind == "missing":
        return str(tmp_path / "nope")
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "no_metadata":
        return str(folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    return str(folder)


@pytest.mark.parametrize("argv, needle", [
    (["--t1", "4", "--t2", "2"], "--t1/--t2"),  # empty range
    (["--t1", "0", "--t2", "3"], "--t1/--t2"),
    (["--t1", "1", "--t2", "21"], "--t1/--t2"),  # beyond T = 20
    (["--reward", "jpeg_incompressibility"], "not differentiable"),
    (["--lam", "0"], "--lam"),
])
def test_bad_input_stops_before_any_work(argv, needle, monkeypatch, capsys, tmp_path):
    expect_bad_input(refl, argv, monkeypatch, capsys, tmp_path, needle)


@pytest.mark.parametrize("kind, needle", [("missing", "no such folder"), ("no_metadata", "no metadata.jsonl"),
                                          ("bad_entry", "gone.png")])
def test_bad_pretrain_data_stops_before_any_work(kind, needle, monkeypatch, capsys, tmp_path):
    argv = ["--pretrain-data", bad_folder(tmp_path, kind)]
    expect_bad_input(refl, argv, monkeypatch, capsys, tmp_path, needle)


def test_script_runs_as_a_user_runs_it(tmp_path):
    folder = make_pretrain_folder(tmp_path / "data")
    result, bad = run_scripts(
        "refl.py",
        [*TINY, "--num-steps", "5", "--pretrain-data", str(folder), "--run-dir", str(tmp_path / "run")],
        ["--pretrain-data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "bad")])
    assert result.returncode == 0, result.stderr
    check_run_dir(tmp_path / "run", iters=2)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_the_default_threshold_never_cuts_the_symmetry_rewards_gradient(monkeypatch, tmp_path):
    """symmetry with its CLIP regulariser is positive (about 0.5 on the toy world): phi must sit above it, or
    ReLU(phi - r) is 0 and nothing is learned."""
    flags = [*TINY, "--reward", "symmetry", "--num-steps", "4", "--t1", "1", "--t2", "2"]
    _, rows = run_main(refl, flags, monkeypatch, tmp_path / "run")
    assert all(r["reward_mean"] > 0 and r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
