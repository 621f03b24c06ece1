import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import runner

import rwr
from gradient_family import expect_bad_input

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iters", "2", "--num-steps", "3", "--batch-size", "2", "--sample-batches", "2", "--samples-per-prompt",
        "2", "--updates-per-round", "2", "--eval-size", "2", "--eval-every", "0", "--eval-num-steps", "3",
        "--threads", "1"]


def run_script(*flags, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "rwr.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


PROMPTS = ["a", "b", "a", "c", "b", "a"]
REWARDS = np.array([0.0, 5.0, 2.0, -3.0, 4.0, 1.0])


def test_softmax_weights_are_per_prompt_softmax_with_mean_one():
    w = rwr.softmax_weights(REWARDS, PROMPTS, beta=1.0, normalize=False)
    a = np.exp([0.0, 2.0, 1.0])
    b = np.exp([5.0, 4.0])
    # closed form: n_p * exp(beta r) / sum over the prompt's samples
    assert w[[0, 2, 5]] == pytest.approx(3 * a / a.sum(), rel=1e-6)
    assert w[[1, 4]] == pytest.approx(2 * b / b.sum(), rel=1e-6)
    assert w[3] == pytest.approx(1.0)  # a prompt with one sample carries no preference
    for prompt in "abc":
        assert np.mean([wi for wi, p in zip(w, PROMPTS) if p == prompt]) == pytest.approx(1.0)
    assert w[2] > w[5] > w[0] and w[1] > w[4]  # ordering follows the reward within a prompt


def test_softmax_weights_sharpen_with_beta_and_normalised_ones_ignore_the_reward_scale():
    flat = rwr.softmax_weights(REWARDS, PROMPTS, beta=0.01, normalize=False)
    sharp = rwr.softmax_weights(REWARDS, PROMPTS, beta=10.0, normalize=False)
    assert flat == pytest.approx(np.ones(6), abs=0.05)
    assert sharp[2] == pytest.approx(3.0, rel=1e-3)  # nearly all of prompt a's weight on its best sample
    normalised = rwr.softmax_weights(REWARDS, PROMPTS, beta=1.0)
    assert rwr.softmax_weights(1000 * REWARDS - 7, PROMPTS, beta=1.0) == pytest.approx(normalised, rel=1e-6)
    assert not np.allclose(normalised, rwr.softmax_weights(REWARDS, PROMPTS, beta=1.0, normalize=False))


@pytest.mark.parametrize("n,percentile,kept", [(10, 90, 1), (20, 90, 2), (4, 90, 1), (1, 90, 1), (10, 50, 5),
                                               (8, 75, 2), (3, 10, 3)])
def test_sparse_weights_keep_exactly_the_top_of_each_prompt(n, percentile, kept):
    rng = np.random.default_rng(n)
    rewards = np.concatenate([rng.normal(size=n), rng.normal(size=n) + 100])  # prompt y is far better
    prompts = ["x"] * n + ["y"] * n
    w = rwr.sparse_weights(rewards, prompts, percentile)
    assert set(np.unique(w)) <= {0.0, 1.0}
    for sl in (slice(0, n), slice(n, 2 * n)):  # per prompt, not globally: both prompts keep the same count
        assert w[sl].sum() == kept
        assert set(np.flatnonzero(w[sl])) == set(np.argsort(-rewards[sl])[:kept])


def test_sparse_weights_count_ties_exactly():
    w = rwr.sparse_weights(np.ones(10), ["p"] * 10, 80)
    assert w.sum() == 2 and list(np.flatnonzero(w)) == [0, 1]


def test_weighted_denoising_loss_drops_zero_weights_and_scales_the_others():
    pred, target = torch.zeros(3, 4, 2, 2), torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0)])
    loss = rwr.weighted_denoising_loss(pred, target, torch.tensor([2.0, 0.0, 1.0]))
    assert loss.item() == pytest.approx((2 * 1 + 0 * 4 + 1 * 9) / 3)


def test_anchor_to_pretrained_is_the_squared_gap_to_the_lora_free_prediction(pipe):
    """--kl-coeff: zero, with zero gradient, while the LoRA is zero; after a change of the LoRA, the mean squared gap
    between the guided prediction and the same UNet's with the adapter switched off, and its gradient pulls back."""
    params = common.add_lora(pipe.unet, 2)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 100])
    cond, uncond = common.encode_prompts(pipe, ["a cat", "a dog"]), common.encode_prompts(pipe, ["", ""])
    pred = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    gap = rwr.anchor_to_pretrained(pipe, pred, x, t, cond, uncond, 5.0)
    gap.backward()
    assert gap.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    pred = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    gap = rwr.anchor_to_pretrained(pipe, pred, x, t, cond, uncond, 5.0)
    scaled = [m for m in pipe.unet.modules() if isinstance(getattr(m, "scaling", None), dict)]
    scalings = [dict(m.scaling) for m in scaled]
    with torch.no_grad():
        for module in scaled:  # the LoRA-free UNet computed another way: every LoRA scale at 0
            module.scaling = {k: 0.0 for k in module.scaling}
        ref = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    torch.testing.assert_close(gap, ((pred.detach() - ref) ** 2).mean(), rtol=1e-5, atol=1e-8)
    assert gap.item() > 0
    # one small step down the anchor's gradient shrinks the gap
    gap.backward()
    with torch.no_grad():
        for module, scaling in zip(scaled, scalings):
            module.scaling = scaling
        for p in params:
            p.sub_(1e-3 * p.grad / (p.grad.norm() + 1e-12))
        after = rwr.anchor_to_pretrained(pipe, common.unet_output(pipe.unet, x, t, cond, uncond, 5.0), x, t, cond,
                                         uncond, 5.0)
    assert after < gap


@pytest.mark.parametrize("weighting,kept", [pytest.param("softmax", 4, marks=pytest.mark.slow), ("sparse", 2)])
def test_tiny_run_writes_metrics_and_lora(weighting, kept, tmp_path, embedded_dir):
    model = embedded_dir
    if weighting == "sparse":  # and on a v-prediction model (SD 2.x style): the target is v, not epsilon
        model = tmp_path / "v-model"
        shutil.copytree(embedded_dir, model)
        config_path = model / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"prediction_type": "v_prediction"}))
    run_dir = tmp_path / "run"
    result = run_script("--weighting", weighting, "--model", str(model), *TINY, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    rows, final = rows[:-1], rows[-1]
    for row in rows:
        assert {"reward_mean", "reward_std", "loss", "wall_time_s", "samples_seen"} <= set(row)
        assert math.isfinite(row["loss"]) and row["kept"] == kept  # sparse: 2 prompts x top 1 of 2
    assert [r["samples_seen"] for r in rows] == [4, 8]
    assert ["eval_reward_mean" in r for r in rows] == [True, False] and "eval_reward_mean" in final
    assert (run_dir / "pytorch_lora_weights.safetensors").exists()
    assert runner.load_checkpoint(run_dir)["iter"] == 2


@pytest.mark.parametrize("argv,needle", [
    (["--percentile", "0.0"], "--percentile"),
    (["--percentile", "100.0"], "--percentile"),
    (["--batch-size", "3", "--sample-batches", "1", "--samples-per-prompt", "2"], "divide"),
    (["--weighting", "dense"], "--weighting"),
    (["--kl-coeff", "-1"], "--kl-coeff"),
])
def test_bad_input_is_one_line_before_any_work(argv, needle, monkeypatch, capsys, tmp_path):
    expect_bad_input(rwr, argv, monkeypatch, capsys, tmp_path, needle)  # main(): nothing created


def test_bad_input_from_the_command_line_exits_with_one_line_and_creates_no_run_dir(tmp_path):
    result = run_script("--percentile", "100", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--percentile" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
