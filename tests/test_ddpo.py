import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import runner
import ddpo
from gradient_family import expect_bad_input

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iters", "2", "--num-steps", "3", "--batch-size", "2", "--samples-per-prompt", "1", "--eval-size", "2",
        "--eval-every", "0",
        "--eval-num-steps", "3", "--threads", "1"]


def run_script(*flags, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "ddpo.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- the estimators --------------------------------------------------------------------------------

# (ratio, advantage, loss, d loss / d log p) with clip range 0.1, worked out by hand from
# L = max(-A r, -A clip(r, 0.9, 1.1)) and dr/dlogp = r.
PPO_CASES = [
    (1.05, 2.0, -2.1, -2.1),   # inside the clip: the plain IS surrogate, gradient -A r
    (1.5, 2.0, -2.2, 0.0),     # A > 0, ratio above the clip: clipped, no gradient
    (0.5, 2.0, -1.0, -1.0),    # A > 0, ratio below the clip: the unclipped term is larger, gradient -A r
    (1.05, -2.0, 2.1, 2.1),    # inside, A < 0
    (1.5, -2.0, 3.0, 3.0),     # A < 0, ratio above the clip: unclipped (pessimistic), gradient -A r
    (0.5, -2.0, 1.8, 0.0),     # A < 0, ratio below the clip: clipped, no gradient
]


@pytest.mark.parametrize("ratio,adv,loss,grad", PPO_CASES)
def test_ppo_loss_and_its_gradient_match_the_closed_form(ratio, adv, loss, grad):
    old = torch.tensor([-0.7])
    log_prob = (old + math.log(ratio)).requires_grad_()
    value, r = ddpo.ppo_loss(log_prob, old, torch.tensor([adv]), clip_range=0.1)
    value.sum().backward()
    assert r.item() == pytest.approx(ratio, rel=1e-6)
    assert value.item() == pytest.approx(loss, rel=1e-6)
    assert log_prob.grad.item() == pytest.approx(grad, rel=1e-6, abs=1e-9)


def test_score_function_gradient_is_minus_advantage_times_grad_log_prob():
    # log p(x | theta) = -(x - theta)^2 / 2 per sample, so grad log p = (x - theta).
    theta = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    x, adv = torch.tensor([1.0, 0.5, 1.5]), torch.tensor([1.5, -0.5, 2.0])
    ddpo.sf_loss(-((x - theta) ** 2) / 2, adv).sum().backward()
    assert torch.allclose(theta.grad, -adv * (x - theta.detach()))


def test_on_policy_the_clipped_estimator_has_the_score_function_gradient():
    # At ratio 1 (first minibatch) eq. 4 reduces to eq. 3: both surrogates give -A grad log p.
    adv = torch.tensor([1.0, -2.0, 0.5])
    grads = []
    for loss_fn in (lambda lp: ddpo.ppo_loss(lp, lp.detach(), adv, 1e-4)[0], lambda lp: ddpo.sf_loss(lp, adv)):
        theta = torch.tensor([0.1, 0.2, -0.3], requires_grad=True)
        loss_fn(-(theta - 1.0) ** 2).sum().backward()
        grads.append(theta.grad)
    assert torch.allclose(grads[0], grads[1])


# --- reward normalisation (F.3) --------------------------------------------------------------------


def test_per_prompt_tracker_uses_batch_stats_until_min_count_then_its_own_buffer():
    tracker = ddpo.PerPromptStatTracker(buffer_size=3, min_count=2, buffers={})
    # Round 1: "a" has 2 rewards (enough) -> its own mean 2, std 1; "b" has 1 -> the batch's
    # statistics over [1, 3, 10]: mean 14/3, population std sqrt(134/9).
    adv = tracker.update(["a", "a", "b"], [1.0, 3.0, 10.0])
    batch_std = math.sqrt(134 / 9)
    assert adv == pytest.approx([-1.0, 1.0, (10 - 14 / 3) / batch_std], rel=1e-5)
    # Round 2: buffers carry over: a = [1, 3, 5] (mean 3, std sqrt(8/3)), b = [10, 0, 2] (mean 4, std sqrt(56/3)).
    adv = tracker.update(["a", "b", "b"], [5.0, 0.0, 2.0])
    assert adv == pytest.approx([2 / math.sqrt(8 / 3), -4 / math.sqrt(56 / 3), -2 / math.sqrt(56 / 3)], rel=1e-5)
    # Round 3: the buffer holds the last 3 only: a = [3, 5, 7] (1 dropped), mean 5.
    adv = tracker.update(["a"], [7.0])
    assert adv == pytest.approx([2 / math.sqrt(8 / 3)], rel=1e-5)


def test_global_advantages_are_reward_minus_mean_over_std():
    r = np.array([1.0, 2.0, 3.0, 4.0])
    assert ddpo.batch_advantages(r) == pytest.approx((r - 2.5) / math.sqrt(1.25), rel=1e-6)


# --- re-scoring the real rollout -------------------------------------------------------------------


def test_first_minibatch_ratio_is_exactly_one_on_the_real_rollout_and_moves_after_an_update(pipe):
    params = common.add_lora(pipe.unet, 4)
    for p in params:  # gaussian init leaves lora_B at 0; make the adapter matter
        torch.nn.init.normal_(p, std=0.05)
    B, T, w = 3, 4, 5.0
    uncond = common.encode_prompts(pipe, [""]).expand(B, -1, -1)
    latents, log_probs, timesteps, conds = [], [], [], []
    for batch in (["cat", "dog", "fox"], ["owl", "bee", "cow"]):
        cond = common.encode_prompts(pipe, batch)
        with torch.no_grad():
            out = common.rollout(pipe, cond, uncond, common.initial_latents(pipe, B, 32), num_steps=T,
                                 guidance_scale=w, eta=1.0, record=True)
        latents.append(torch.stack(out.latents, 1))
        log_probs.append(torch.stack(out.log_probs, 1))
        timesteps.append(torch.stack(out.timesteps).expand(B, T))
        conds.append(cond)
    latents, log_probs, timesteps, conds = map(torch.cat, (latents, log_probs, timesteps, conds))
    # As in training: samples permuted across sampling batches, each row at its own shuffled timestep.
    torch.manual_seed(1)
    idx = torch.randperm(2 * B)[:B]
    k = torch.stack([torch.randperm(T) for _ in range(B)])[:, 0]
    assert len(set(k.tolist())) > 1  # the minibatch really mixes timesteps

    def ratio():
        lp, _ = ddpo.rescore(pipe, latents[idx, k], latents[idx, k + 1], timesteps[idx, k], conds[idx], uncond, w, 1.0)
        return torch.exp(lp - log_probs[idx, k]), lp

    r, lp = ratio()
    assert (r - 1).abs().max().item() < 1e-5  # bit-exact here; far inside the 1e-4 clip anywhere
    lp.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():  # a small gradient-ascent step on log p (first order: +0.01 per sample on average)
        step = 0.01 * B / sum((p.grad**2).sum() for p in params)
        for p in params:
            p += step * p.grad
    r, _ = ratio()
    assert r.mean().item() > 1 + 1e-3


# --- the script ------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,extra,updates", [("is", ["--grad-accum", "1"], 2),
                                                      pytest.param("sf", [], 1, marks=pytest.mark.slow)])
def test_tiny_run_writes_metrics_and_lora(estimator, extra, updates, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("--estimator", estimator, *TINY, "--sample-batches", "2", *extra, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    rows, final = rows[:-1], rows[-1]
    for row in rows:
        assert {"reward_mean", "reward_std", "loss", "wall_time_s", "approx_kl", "clipfrac", "ratio_mean"} <= set(row)
        assert row["updates"] == updates
    assert [r["samples_seen"] for r in rows] == [4, 8]
    assert ["eval_reward_mean" in r for r in rows] == [True, False] and "eval_reward_mean" in final
    if estimator == "sf":  # on-policy: every sample is re-scored before the round's single update
        assert all(r["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and r["clipfrac"] == 0.0 for r in rows)
    assert (run_dir / "pytorch_lora_weights.safetensors").exists()
    assert runner.load_checkpoint(run_dir)["iter"] == 2
    # --lr 0 (the default) is each estimator's own learning rate, recorded as such for --config and --resume
    assert json.loads((run_dir / "args.json").read_text())["lr"] == {"is": 1e-3, "sf": 1e-2}[estimator]


# --- Flow-GRPO's KL term ---------------------------------------------------------------------------


def test_kl_to_pretrained_is_the_gaussian_kl_of_the_two_policies_steps(pipe):
    """--kl-coeff: per step KL(N(mu_theta, s^2) || N(mu_ref, s^2)), averaged over the latent dims; zero (and with
    zero gradient) while the LoRA is zero, the closed form of two DDIM steps (diffusers' own, noise-free) after."""
    params = common.add_lora(pipe.unet, 2)
    pipe.scheduler.set_timesteps(4)
    x, t = torch.randn(2, 4, 16, 16), pipe.scheduler.timesteps[1]
    cond, uncond = common.encode_prompts(pipe, ["a cat", "a dog"]), common.encode_prompts(pipe, ["", ""])
    out = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    kl = ddpo.kl_to_pretrained(pipe, out, x, t, cond, uncond, 5.0, 1.0)
    kl.sum().backward()
    assert torch.equal(kl, torch.zeros(2)) and all(p.grad is None or not p.grad.any() for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    out = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    kl = ddpo.kl_to_pretrained(pipe, out, x, t, cond, uncond, 5.0, 1.0)
    with torch.no_grad():
        pipe.unet.disable_adapters()
        out_ref = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
        pipe.unet.enable_adapters()
    zero = torch.zeros_like(x)
    mean = pipe.scheduler.step(out.detach(), t, x, eta=1.0, variance_noise=zero).prev_sample
    mean_ref = pipe.scheduler.step(out_ref, t, x, eta=1.0, variance_noise=zero).prev_sample
    prev_t = t - pipe.scheduler.config.num_train_timesteps // 4
    std = pipe.scheduler._get_variance(t, prev_t).sqrt()
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(mean_ref, std)).mean(dim=(1, 2, 3))
    assert (kl > 0).all()
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-7)


def test_kl_coeff_run_logs_the_kl_to_the_pretrained_policy(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("--estimator", "is", *TINY, "--sample-batches", "2", "--grad-accum", "1", "--kl-coeff", "0.1",
                        "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:-1]
    assert rows[0]["kl_to_pretrained"] >= 0 and rows[1]["kl_to_pretrained"] > 0  # the LoRA has moved by iteration 1
    assert json.loads((run_dir / "args.json").read_text())["kl_coeff"] == 0.1


@pytest.mark.parametrize("argv,needle", [
    (["--eta", "0.0"], "--eta"),
    (["--clip-range", "0.0"], "--clip-range"),
    (["--kl-coeff", "-0.1"], "--kl-coeff"),
    (["--timestep-fraction", "0.0"], "--timestep-fraction"),
    (["--timestep-fraction", "1.5"], "--timestep-fraction"),
    (["--sample-batches", "3", "--grad-accum", "2"], "divide"),
    (["--estimator", "sf", "--grad-accum", "1"], "--estimator sf"),
    (["--estimator", "sf", "--inner-epochs", "2"], "--estimator sf"),
    (["--estimator", "ppo"], "--estimator"),
    (["--no-cfg-training"], "--no-cfg-training"),  # guided sampling, unguided re-scoring: ratio != 1
    (["--grad-clip", "-1.0"], "--grad-clip"),
    (["--dtype", "fp8"], "--dtype"),
    (["--device", "gpu"], "--device"),
])
def test_bad_input_is_one_line_before_any_work(argv, needle, monkeypatch, capsys, tmp_path):
    expect_bad_input(ddpo, argv, monkeypatch, capsys, tmp_path, needle)  # main(): nothing created


def test_bad_input_from_the_command_line_exits_with_one_line_and_creates_no_run_dir(tmp_path):
    result = run_script("--eta", "0", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--eta" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
