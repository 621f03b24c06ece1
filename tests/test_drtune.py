import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import tyro
from diffusers import StableDiffusion3Pipeline

import common
import hub
import runner
import drtune
import rewards

ROOT = Path(__file__).resolve().parents[1]


def run_script(*flags, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "drtune.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("T,K,m", [(20, 5, 8), (50, 5, 20), (20, 3, 8), (7, 7, 6), (10, 1, 1)])
def test_drtune_steps_are_k_equally_spaced_inside_the_chain(T, K, m):
    random.seed(0)
    offsets = Counter()
    for _ in range(400):
        grad_steps, stop_step = drtune.drtune_steps(T, K, m)
        assert len(grad_steps) == K and all(0 <= i < T for i in grad_steps)
        assert {b - a for a, b in zip(grad_steps, grad_steps[1:])} <= {T // K}
        assert T - m <= stop_step <= T - 1  # t_min in [1, m]
        offsets[T - grad_steps[-1]] += 1  # s, the smallest paper timestep trained
    if T % K == 0:  # the offset covers a whole stride, so every timestep is trained equally often
        assert set(offsets) == set(range(1, T // K + 1))


def test_drtune_gradient_routing_on_the_real_rollout(pipe):
    """No gradient reaches a UNet input; exactly the selected steps before the stop give LoRA gradient."""
    params = common.add_lora(pipe.unet, 4)
    torch.nn.init.normal_(params[1], std=0.1)
    random.seed(3)
    T = 12
    grad_steps, stop_step = drtune.drtune_steps(T, K=4, m=5)
    calls = []

    def hook(module, args, output):
        record = {"input_grad": args[0].requires_grad, "grad": 0.0}
        calls.append(record)
        if output.sample.requires_grad:
            output.sample.register_hook(lambda g: record.__setitem__("grad", g.abs().sum().item()))

    handle = pipe.unet.register_forward_hook(hook)
    cond, uncond = common.encode_prompts(pipe, ["a cat", "a dog"]), common.encode_prompts(pipe, ["", ""])
    out = common.rollout(pipe, cond, uncond, common.initial_latents(pipe, 2, 32), num_steps=T, guidance_scale=5.0,
                         eta=1.0, grad_steps=grad_steps, stop_grad_input=True, stop_step=stop_step, checkpoint=False)
    (-rewards.symmetry(common.decode(pipe.vae, out.output), None).mean()).backward()
    handle.remove()
    assert len(calls) == stop_step + 1  # early stop: no UNet call after t_min
    assert not any(c["input_grad"] for c in calls)
    assert [i for i, c in enumerate(calls) if c["grad"] > 0] == [i for i in grad_steps if i <= stop_step]
    assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0


@pytest.mark.parametrize("flags,needle", [
    (["--reward", "nope"], "symmetry"),  # lists the valid names
    (["--reward", "jpeg_compressibility"], "not differentiable"),
    (["--K", "0"], "--K"),
    (["--K", "21"], "--K"),
    (["--early-stop", "20"], "--early-stop"),
    (["--resolution", "30"], "--resolution"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-clip", "-0.1"], "--grad-clip"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompts.txt"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--model", "some-org/uncached-model"], "some-org/uncached-model"),
    (["--clip-weight", "-1"], "--clip-weight"),
    (["--clip-model", "/nonexistent/clip"], "/nonexistent/clip"),
    (["--eval-size", "1"], "--eval-size"),
])
def test_bad_input_is_one_line_before_any_work(flags, needle, monkeypatch, capsys, tmp_path):
    from gradient_family import expect_bad_input

    expect_bad_input(drtune, flags, monkeypatch, capsys, tmp_path, needle)  # main(): nothing created


def test_bad_input_from_the_command_line_creates_no_run_dir(tmp_path):
    result = run_script("--K", "0", "--run-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "--K" in result.stderr
    assert not (tmp_path / "run").exists()


def test_clip_model_is_not_needed_when_nothing_uses_it(monkeypatch, tmp_path):
    """--clip-model only matters for clipscore and a symmetry regulariser: with weight 0 a bad one is fine."""
    monkeypatch.setattr(sys, "argv", ["drtune.py", "--clip-weight", "0", "--clip-model", "/nonexistent/clip"])
    args = tyro.cli(drtune.Args)
    drtune.check_args(args)
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(runner.reward_function(args)(images, ["a", "b"]), -rewards.asymmetry(images))


def test_tiny_run_writes_metrics_grids_and_a_lora_diffusers_can_load(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("--iters", "3", "--eval-every", "2", "--num-steps", "6", "--K", "3", "--early-stop", "2",
                        "--batch-size", "2", "--eval-size", "2", "--eval-num-steps", "4", "--lr", "0.05", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1, 2, 3] and rows[-1]["final"]
    for row in rows[:-1]:
        assert {"iter", "reward_mean", "reward_std", "loss", "wall_time_s", "samples_seen"} <= set(row)
    assert [r["samples_seen"] for r in rows[:-1]] == [2, 4, 6]
    assert ["eval_reward_mean" in r for r in rows] == [True, False, True, True]  # start, every 2, after the end
    assert (run_dir / "eval_00000.png").exists() and (run_dir / "eval_00003.png").exists()
    assert "eval reward" in result.stdout and "->" in result.stdout
    assert json.loads((run_dir / "args.json").read_text())["K"] == 3
    assert runner.load_checkpoint(run_dir)["iter"] == 3

    # same seed -> identical run on the CPU
    again = run_script("--iters", "3", "--eval-every", "2", "--num-steps", "6", "--K", "3", "--early-stop", "2",
                       "--batch-size", "2", "--eval-size", "2", "--eval-num-steps", "4", "--lr", "0.05", "--run-dir", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    rows_again = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_time_s", "eval_time_s")} for r in rs]  # noqa: E731
    assert strip(rows_again) == strip(rows)

    # the default model (the toy flow model, saved without T5) loaded by plain diffusers, then the run's LoRA on it
    assert json.loads((run_dir / "args.json").read_text())["model"] == hub.DEFAULT_MODEL == hub.TOY_FLOW_MODEL
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    base = StableDiffusion3Pipeline.from_pretrained(str(hub.TOY_FLOW_MODEL_DIR), dtype=torch.float32, **no_t5)
    tuned = StableDiffusion3Pipeline.from_pretrained(str(hub.TOY_FLOW_MODEL_DIR), dtype=torch.float32, **no_t5)
    tuned.load_lora_weights(str(run_dir))
    config = base.transformer.config
    inputs = {"hidden_states": torch.randn(1, config.in_channels, 16, 16), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim)}
    with torch.no_grad():
        assert not torch.allclose(base.transformer(**inputs).sample, tuned.transformer(**inputs).sample)

    # the toy world's checker loads the same LoRA and scores the samples
    check = subprocess.run([sys.executable, str(ROOT / "toyworld" / "check.py"), "--lora", str(run_dir), "--n", "4",
                            "--num-steps", "4"], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert {"asymmetry", "clipscore", "colour", "shape", "background"} <= set(report) and report["n"] == 4


def test_iterations_whose_trained_steps_all_lie_below_t_min_are_skipped_not_fatal(tmp_path, monkeypatch):
    """With K = 1 and m > 1 the one trained step is often never reached (Alg. 1 stops first)."""
    from gradient_family import TINY, run_main

    trace, rows = run_main(drtune, [*TINY, "--num-steps", "6", "--K", "1", "--early-stop", "5",
                                    "--iters", "6", "--eval-size", "2", "--eval-every", "0", "--seed", "1"], monkeypatch, tmp_path / "run")
    assert [r["iter"] for r in rows] == list(range(6))
    reached = [min(r["trained_steps"]) <= 6 - r["t_min"] for r in rows]
    assert any(reached) and not all(reached)  # both kinds of iteration happened in this seeded run
    segments = [calls for calls, _ in trace.training_segments()]
    assert len(segments) == sum(reached)  # a reward with gradient exactly when a trained step was reached
