"""Helpers for test_draft.py, test_refl.py and test_alignprop.py: run a method script's real `main()` in this
process with hooks on the UNet and on the reward, so a test sees which sampling steps the training loop
actually routes gradient through, and what the reward was given."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import common
import rewards
import runner

ROOT = Path(__file__).resolve().parents[1]
# A tiny budget for every run: 2 updates of 2 images, 2 eval prompts; one thread (a shared CPU makes
# several threads wait on each other at every op). On the toy Stable Diffusion: the traces read its UNet's calls.
TINY = ["--model", "toy", "--reward", "brightness", "--batch-size", "2", "--eval-size", "2", "--eval-num-steps", "3",
        "--iters", "2", "--threads", "1"]


@dataclass
class UNetCall:
    t: int  # the scheduler timestep it was called at (-1: a batch of different timesteps)
    batch: int
    requires_grad: bool  # the call was made with gradient (its output is in the autograd graph)
    input_requires_grad: bool  # its latent input carries gradient (to earlier steps)
    x: torch.Tensor  # its latent input
    out: torch.Tensor  # its raw output
    cond: torch.Tensor  # its text conditioning (the whole batch's: uncond then cond under CFG)
    grad: float | None = None  # sum |d loss / d output|, once backward has reached this call


@dataclass
class RewardCall:
    images: torch.Tensor
    requires_grad: bool
    grad: torch.Tensor | None = None  # d loss / d reward, per image


class Trace:
    """Everything the UNet and the reward saw, in order."""

    def __init__(self):
        self.events, self.pipe = [], None

    def on_unet(self, module, args, output):
        if torch._C._current_graph_task_id() != -1:
            return  # a checkpointed call recomputed during backward, not a new call
        sample = output.sample
        t = torch.as_tensor(args[1])
        call = UNetCall(int(t) if t.numel() == 1 else -1, args[0].shape[0], sample.requires_grad, args[0].requires_grad,
                        args[0].detach().clone(), sample.detach().clone(), args[2].detach().clone())
        if sample.requires_grad:
            sample.register_hook(lambda g: setattr(call, "grad", g.abs().sum().item()))
        self.events.append(call)

    def wrap_reward(self, fn):
        def score(images, prompts):
            reward = fn(images, prompts)
            call = RewardCall(images.detach().clone(), reward.requires_grad)
            if reward.requires_grad:
                reward.register_hook(lambda g: setattr(call, "grad", g.detach().clone()))
            self.events.append(call)
            return reward

        return score

    def training_segments(self):
        """[(UNet calls since the previous reward call, the reward call)] for each reward call with gradient;
        segments ending in a no-gradient reward call (evaluation) are dropped."""
        segments, calls = [], []
        for event in self.events:
            if isinstance(event, UNetCall):
                calls.append(event)
                continue
            if event.requires_grad:
                segments.append((calls, event))
            calls = []
        return segments


def run_main(module, argv, monkeypatch, run_dir):
    """module.main() on `argv` with hooks installed -> (Trace, the metrics rows of the iterations; the final
    evaluation's row is checked and left out)."""
    trace = Trace()
    load = common.load_pipeline

    def load_with_hooks(*args, **kwargs):
        trace.pipe = load(*args, **kwargs)
        trace.pipe.unet.register_forward_hook(trace.on_unet)
        return trace.pipe

    monkeypatch.setattr(common, "load_pipeline", load_with_hooks)
    reward = argv[argv.index("--reward") + 1]
    entry = rewards.REWARDS[reward]
    monkeypatch.setitem(rewards.REWARDS, reward, (trace.wrap_reward(entry[0]), *entry[1:]))
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv, "--run-dir", str(run_dir)])
    module.main()
    if "--num-steps" in argv:  # the final evaluation left the scheduler at the eval protocol's T: back to training's
        trace.pipe.scheduler.set_timesteps(int(argv[argv.index("--num-steps") + 1]))
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["final"] and "eval_reward_mean" in rows[-1]
    return trace, rows[:-1]


def expect_bad_input(module, argv, monkeypatch, capsys, tmp_path, needle: str):
    """main() must stop with exit status != 0, one line on stderr containing `needle`, and no run dir."""
    run_dir = tmp_path / "should_not_exist"
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv, "--run-dir", str(run_dir)])
    try:
        module.main()
    except SystemExit as stop:
        assert stop.code not in (0, None)
    else:
        raise AssertionError(f"{argv} did not stop")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not run_dir.exists()


def run_scripts(script: str, *argvs):
    """The script as a user runs it, once per argv list, in fresh processes side by side (imports are slow)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    processes = [subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def check_run_dir(run_dir, iters: int):
    """metrics.jsonl has one row per update, eval at the start, and a final row with the eval after the last
    update; the LoRA and the checkpoint a resume needs."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == list(range(iters + 1)) and rows[-1]["final"]
    assert "eval_reward_mean" in rows[0] and "eval_reward_mean" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[:-1])
    assert (Path(run_dir) / "pytorch_lora_weights.safetensors").is_file()
    checkpoint = runner.load_checkpoint(run_dir)
    assert checkpoint["iter"] == iters and checkpoint["rows"] == rows
    return rows[:-1]
