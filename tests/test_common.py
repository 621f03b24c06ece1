import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import common
import distributed
import hub
import runner


def make_scheduler(prediction_type="epsilon", set_alpha_to_one=False, steps=10):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                              prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


# --- ddim_step_with_logprob ----------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_step_reproduces_diffusers_ddim_with_same_noise(prediction_type, set_alpha_to_one):
    scheduler = make_scheduler(prediction_type, set_alpha_to_one)
    torch.manual_seed(0)
    sample = torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps:  # every step, the last one (previous timestep < 0) included
        model_output = torch.randn_like(sample)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t)))
        expected = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
        ours, _ = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 0.7,
                                                generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        sample = expected


def test_step_accepts_a_batch_of_different_timesteps():
    scheduler = make_scheduler()
    sample, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev = torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[[1, 9]]  # the second sample is at the last step
    _, batched = common.ddim_step_with_logprob(scheduler, out, t, sample, 1.0, prev_sample=prev)
    for i in range(2):
        _, single = common.ddim_step_with_logprob(scheduler, out[i:i + 1], t[i], sample[i:i + 1], 1.0,
                                                  prev_sample=prev[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)


@pytest.mark.parametrize("step", [0, 5, 9])
def test_logprob_is_the_closed_form_gaussian_density_mean_over_dims(step):
    scheduler = make_scheduler()
    t = scheduler.timesteps[step]
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    torch.manual_seed(1)
    sample, model_output, prev_sample = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    eta = 1.0
    # mean: diffusers' DDIM step with zero noise; std: eta * sqrt of its variance (DDIM eq. 16)
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    std = eta * scheduler._get_variance(t, prev_t).sqrt()
    expected = torch.distributions.Normal(mean, std).log_prob(prev_sample).mean(dim=(1, 2, 3))
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output, t, sample, eta, prev_sample=prev_sample)
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    assert log_prob.shape == (2,)


def test_logprob_gradient_flows_through_the_mean_only():
    scheduler = make_scheduler()
    out = torch.randn(1, 4, 8, 8, requires_grad=True)
    prev = torch.randn(1, 4, 8, 8, requires_grad=True)
    _, log_prob = common.ddim_step_with_logprob(scheduler, out, scheduler.timesteps[3], torch.randn(1, 4, 8, 8),
                                                1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert out.grad.abs().sum() > 0
    assert prev.grad is None


def test_rescoring_own_sample_gives_ratio_exactly_one(pipe):
    common.add_lora(pipe.unet, 4)
    for p in pipe.unet.parameters():
        if p.requires_grad:  # make the adapter do something
            torch.nn.init.normal_(p, std=0.05)
    prompts = ["a cat", "a dog"]
    cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, ["", ""])
    with torch.no_grad():
        traj = common.rollout(pipe, cond, uncond, common.initial_latents(pipe, 2, 32), num_steps=6,
                              guidance_scale=5.0, eta=1.0, record=True)
        assert len(traj.latents) == 7 and len(traj.log_probs) == 6
        for j, t in enumerate(traj.timesteps):
            out = common.unet_output(pipe.unet, traj.latents[j], t, cond, uncond, 5.0)
            _, log_prob = common.ddim_step_with_logprob(pipe.scheduler, out, t, traj.latents[j], 1.0,
                                                        prev_sample=traj.latents[j + 1])
            assert torch.equal(torch.exp(log_prob - traj.log_probs[j]), torch.ones(2))


# --- rollout --------------------------------------------------------------------------------------


def unet_call_log(pipe):
    """Record, for every UNet call, whether its input needs grad and the gradient norm on its output."""
    calls = []

    def hook(module, args, kwargs, output):
        record = {"input_requires_grad": args[0].requires_grad, "grad": 0.0}
        calls.append(record)
        if output.sample.requires_grad:
            output.sample.register_hook(lambda g: record.__setitem__("grad", g.abs().sum().item()))

    return calls, pipe.unet.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("stop_grad_input", [True, False])
def test_rollout_routes_gradient_to_exactly_the_chosen_steps(pipe, stop_grad_input):
    params = common.add_lora(pipe.unet, 4)
    torch.nn.init.normal_(params[1], std=0.1)
    cond = common.encode_prompts(pipe, ["a cat"])
    calls, handle = unet_call_log(pipe)
    x_T = common.initial_latents(pipe, 1, 32)
    out = common.rollout(pipe, cond, None, x_T, num_steps=8, guidance_scale=1.0, eta=1.0, grad_steps=[1, 4, 6],
                         stop_grad_input=stop_grad_input, checkpoint=False)
    common.decode(pipe.vae, out.output).mean().backward()
    handle.remove()
    assert len(calls) == 8
    assert [i for i, c in enumerate(calls) if c["grad"] > 0] == [1, 4, 6]
    # DRTune eq. 3: with sg(x_t) no UNet input is part of the graph; without it, inputs after step 1 are.
    assert any(c["input_requires_grad"] for c in calls) == (not stop_grad_input)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_rollout_early_stop_returns_x0_prediction_at_that_step(pipe):
    cond = common.encode_prompts(pipe, ["a cat"])
    calls, handle = unet_call_log(pipe)
    with torch.no_grad():
        traj = common.rollout(pipe, cond, None, common.initial_latents(pipe, 1, 32), num_steps=10,
                              guidance_scale=1.0, eta=1.0, stop_step=6, record=True)
        handle.remove()
        assert len(calls) == 7 and len(traj.latents) == 7  # x_T and the six steps before the stop
        t = pipe.scheduler.timesteps[6]
        eps = common.unet_output(pipe.unet, traj.latents[6], t, cond)
        a_t = pipe.scheduler.alphas_cumprod[t]
        expected = (traj.latents[6] - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    torch.testing.assert_close(traj.output, expected)


def test_checkpointing_gives_the_same_gradients(pipe):
    params = common.add_lora(pipe.unet, 4)
    torch.nn.init.normal_(params[1], std=0.1)
    cond, uncond = common.encode_prompts(pipe, ["a cat"]), common.encode_prompts(pipe, [""])
    x_T = common.initial_latents(pipe, 1, 32)
    grads = []
    for checkpoint in (False, True):
        noise = torch.Generator().manual_seed(0)
        out = common.rollout(pipe, cond, uncond, x_T, num_steps=5, guidance_scale=3.0, eta=1.0,
                             grad_steps=range(5), checkpoint=checkpoint, generator=noise)
        common.decode(pipe.vae, out.output, checkpoint=checkpoint).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_same_seed_gives_identical_rollouts(pipe):
    cond = common.encode_prompts(pipe, ["a cat"])
    outs = []
    for _ in range(2):
        runner.seed_everything(3)
        with torch.no_grad():
            outs.append(common.rollout(pipe, cond, None, common.initial_latents(pipe, 1, 32), num_steps=4,
                                       guidance_scale=1.0, eta=1.0).output)
    assert torch.equal(outs[0], outs[1])


def test_decode_gives_images_in_unit_range_with_gradient(pipe):
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    images = common.decode(pipe.vae, latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad.abs().sum() > 0


def test_decode_clamps_but_saturated_pixels_still_pass_gradient(pipe):
    latents = (50 * torch.randn(1, 4, 16, 16)).requires_grad_(True)
    raw = pipe.vae.decode(latents.detach() / pipe.vae.config.scaling_factor).sample / 2 + 0.5
    saturated = (raw < 0) | (raw > 1)
    assert saturated.any()
    images = common.decode(pipe.vae, latents)
    assert torch.equal(images.detach(), raw.clamp(0, 1))
    # a plain clamp would give exactly zero here: nothing could pull a saturated pixel back
    (images * saturated).sum().backward()
    assert latents.grad.abs().sum() > 0


# --- loading, LoRA, saving --------------------------------------------------------------------------


def test_load_pipeline_from_a_local_folder_with_v_prediction(embedded_dir, tmp_path):
    folder = tmp_path / "sd2-like"
    shutil.copytree(embedded_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text()) | {"prediction_type": "v_prediction"}
    config_path.write_text(json.dumps(config))
    pipe = common.load_pipeline(str(folder))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())


def test_missing_folder_and_unreachable_hub_id_are_one_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        common.load_pipeline(str(tmp_path / "nope"))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "nope" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        common.load_pipeline("some-org/not-a-cached-model")
    err = capsys.readouterr().err.strip()
    assert "some-org/not-a-cached-model" in err and len(err.splitlines()) == 1


def test_lora_trainable_fp32_frozen_in_run_dtype_and_reference_is_adapters_disabled(embedded_dir):
    pipe = common.load_pipeline(str(embedded_dir), dtype=torch.bfloat16)
    params = common.add_lora(pipe.unet, rank=4, alpha=8)
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for n, p in pipe.unet.named_parameters() if not p.requires_grad)
    targets = {n.split(".lora")[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "0", "conv1", "conv2"}  # "0" is to_out.0
    x, cond = torch.randn(1, 4, 16, 16), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        base = common.unet_output(pipe.unet, x, 500, cond)
        for p in params:
            torch.nn.init.normal_(p, std=0.1)
        tuned = common.unet_output(pipe.unet, x, 500, cond)
    reference = common.pretrained_output(pipe.unet, x, 500, cond)
    assert not torch.equal(base, tuned)
    assert torch.equal(base, reference) and not reference.requires_grad
    with torch.no_grad():
        assert torch.equal(common.unet_output(pipe.unet, x, 500, cond), tuned)  # the LoRA is back on
    with pytest.raises(RuntimeError):  # a failing call (a wrong-sized condition) still switches it back on
        common.pretrained_output(pipe.unet, x, 500, cond[:, :, :7])
    with torch.no_grad():
        assert torch.equal(common.unet_output(pipe.unet, x, 500, cond), tuned)


def test_lora_targets_choose_the_layers_and_an_unknown_one_is_a_one_line_error(embedded_dir, capsys):
    pipe = common.load_pipeline(str(embedded_dir))
    common.add_lora(pipe.unet, 4, targets="to_q,to_k,to_v,to_out.0")
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert names and all(".attn" in n for n in names)
    fresh = common.load_pipeline(str(embedded_dir))
    with pytest.raises(SystemExit):
        common.add_lora(fresh.unet, 4, targets="to_q,convv1")
    err = capsys.readouterr().err.strip()
    assert "convv1" in err and len(err.splitlines()) == 1
    assert not any(p.requires_grad for p in fresh.unet.parameters())  # refused before any change


def test_saved_lora_loads_with_diffusers_load_lora_weights(embedded_dir, tmp_path):
    pipe = common.load_pipeline(str(embedded_dir))
    for p in common.add_lora(pipe.unet, 4, alpha=16):  # alpha != rank: the file must carry the scale
        torch.nn.init.normal_(p, std=0.1)
    runner.save_lora(pipe.unet, tmp_path)
    fresh = StableDiffusionPipeline.from_pretrained(str(embedded_dir))
    fresh.load_lora_weights(str(tmp_path))
    x, cond = torch.randn(1, 4, 16, 16), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, 500, cond).sample, pipe.unet(x, 500, cond).sample)


# --- prompts, evaluation, run directory ------------------------------------------------------------------


def test_prompt_sets_and_user_files(tmp_path, capsys):
    assert len(runner.load_prompts("simple_animals")) == 45
    assert len(runner.load_prompts("imagenet_animals")) == 398
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue whale \n")
    assert runner.load_prompts(str(tmp_path / "p.txt")) == ["a red fox", "a blue whale"]
    with pytest.raises(SystemExit):
        runner.load_prompts(str(tmp_path / "missing.txt"))
    assert "missing.txt" in capsys.readouterr().err


def test_evaluate_is_deterministic_and_independent_of_the_global_seed(pipe):
    from rewards import brightness

    scores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        scores.append(common.evaluate(pipe, ["a cat", "a dog", "a cow"], brightness, num_steps=3,
                                      guidance_scale=2.0, resolution=32, batch_size=2)[0])
    assert scores[0].shape == (3,)
    assert torch.equal(scores[0], scores[1])


def test_eval_prompts_are_spread_and_fixed():
    prompts = [f"p{i}" for i in range(10)]
    assert runner.eval_prompts("my.txt", prompts, 5) == ["p0", "p2", "p4", "p6", "p8"]
    assert runner.eval_prompts("my.txt", prompts[:2], 3) == ["p0", "p1", "p0"]
    assert runner.eval_prompts("my.txt", prompts, 10) == prompts


def test_toy_prompts_evaluate_on_their_held_out_companion_set():
    train, held_out = runner.load_prompts("toy"), runner.load_prompts("toy_eval")
    chosen = runner.eval_prompts("toy", train, 8)
    assert chosen == held_out * 2 and not set(chosen) & set(train)


# --- runs that survive: checkpoints, exact resume, --init-lora, the NaN guard, bad input -------------------

ROOT = Path(__file__).resolve().parents[1]
USER_REWARD = "tests/user_rewards.py:brightness"  # brightness, with faults on demand (see the module)
TINY_RUN = ["--model", "embedded-tiny-sd", "--reward", USER_REWARD, "--eval-size", "2", "--eval-every", "2",
            "--eval-num-steps", "3", "--threads", "1", "--save-every", "1", "--iters", "5"]
METHODS = {  # each script (and variant) with a tiny setting of its own flags
    "drtune": ["drtune.py", "--num-steps", "4", "--K", "2", "--early-stop", "1", "--batch-size", "2"],
    "draft": ["draft.py", "--num-steps", "3", "--K", "1", "--lv", "1", "--batch-size", "2"],
    "refl": ["refl.py", "--num-steps", "4", "--t1", "1", "--t2", "2", "--batch-size", "2", "--phi", "1", "--lam", "1"],
    "alignprop": ["alignprop.py", "--num-steps", "4", "--batch-size", "2"],
    "ddpo": ["ddpo.py", "--estimator", "is", "--num-steps", "3", "--batch-size", "2", "--sample-batches", "2",
             "--samples-per-prompt", "1"],
    "rwr": ["rwr.py", "--num-steps", "3", "--batch-size", "2", "--sample-batches", "2", "--samples-per-prompt", "2",
            "--updates-per-round", "2"],
    "d3po": ["d3po.py", "--num-steps", "3", "--batch-size", "2", "--samples-per-prompt", "2"],
}


def one_fast(methods, fast="drtune"):
    """`methods` as test parameters, all but `fast` in the slow tier (`-m slow`): the README's test command keeps
    one run of each kind, CI runs them all."""
    return [pytest.param(m, marks=() if m == fast else pytest.mark.slow) for m in methods]


def launch(script, *flags, env=None, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / script), *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})), **popen)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def metrics(run_dir):
    """metrics.jsonl without the times (the only fields two identical runs may differ in)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "eval_time_s")} for r in rows]


def lora(run_dir):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("method", one_fast(METHODS))
def test_a_run_killed_mid_way_resumes_to_exactly_the_uninterrupted_run(method, tmp_path):
    script, *flags = METHODS[method]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    runs = [launch(script, *TINY_RUN, *flags, "--run-dir", str(whole)),
            launch(script, *TINY_RUN, *flags, "--run-dir", str(killed), env={"KILL_AT_CALL": "5"})]
    uninterrupted, crashed = (finish(p) for p in runs)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert crashed.returncode == -signal.SIGKILL  # SIGKILLed by its reward, mid-iteration
    done = runner.load_checkpoint(killed)["iter"]
    assert 0 < done < 5 and len(metrics(killed)) >= done  # the rows of an unfinished iteration may be there
    resumed = finish(launch(script, "--resume", str(killed)))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(killed) == metrics(whole)
    a, b = lora(whole), lora(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "args.json").read_text())["_meta"]["resumed_at"] == done


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_iteration_0(tmp_path):
    script, *flags = METHODS["drtune"]
    flags = [*TINY_RUN, *flags, "--save-every", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # reward calls: the eval before iteration 0, iterations 0 and 1, then the eval before iteration 2: killed there,
    # with rows 0 and 1 logged and the first checkpoint (after 3 iterations) not yet written
    runs = [launch(script, *flags, "--run-dir", str(whole)),
            launch(script, *flags, "--run-dir", str(killed), env={"KILL_AT_CALL": "4"})]
    uninterrupted, crashed = (finish(p) for p in runs)
    assert uninterrupted.returncode == 0 and crashed.returncode == -signal.SIGKILL
    assert (killed / "args.json").is_file() and not (killed / "checkpoint.pt").exists() and len(metrics(killed)) == 2
    rerun = finish(launch(script, *flags, "--run-dir", str(killed)))
    assert rerun.returncode == 2 and f"--resume {killed}" in rerun.stderr
    resumed = finish(launch(script, "--resume", str(killed)))
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(killed) == metrics(whole)  # the stale rows replaced, not kept beside the new ones
    a, b = lora(whole), lora(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("returns,described", [("0.5", "a float (0.5)"),
                                                ("images.mean(dim=(2, 3))", "a Tensor of shape (2, 3)")])
def test_a_user_reward_without_one_score_per_image_is_one_line_and_the_run_resumes_once_fixed(returns, described,
                                                                                               tmp_path):
    module = tmp_path / "my_reward.py"
    module.write_text(f"def score(images, prompts):\n    return {returns}\n\n\nscore.differentiable = True\n")
    script, *flags = METHODS["drtune"]
    run = tmp_path / "run"
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "2", "--reward", f"{module}:score",
                           "--run-dir", str(run)))
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--reward {module}:score returned {described} for 2 images" in err and "shape (2,)" in err
    # the first evaluation failed after the run directory was made: fixed, the run starts from iteration 0
    module.write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n\n\n"
                      "score.differentiable = True\n")
    resumed = finish(launch(script, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["iter"] for r in metrics(run)] == [0, 1, 2]


def test_a_second_ctrl_c_stops_at_once_in_one_line_with_the_resume_hint(tmp_path):
    script, *flags = METHODS["drtune"]
    run = tmp_path / "run"
    # reward call 3 is iteration 1's, and it sleeps: both signals arrive within that iteration (waiting for the
    # sleep itself, not for iteration 0's checkpoint: a signal between that save and iteration 1 ends the run there)
    sleeping = tmp_path / "sleeping"
    process = launch(script, *TINY_RUN, *flags, "--iters", "40", "--run-dir", str(run),
                     env={"SLEEP_AT_CALL": "3", "SLEEP_MARK": str(sleeping)})
    deadline = time.time() + 120
    while not sleeping.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    first = process.stderr.readline() + process.stderr.readline()  # a blank line, then the message
    assert "stopping after this iteration" in first
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=60)
    lines = rest.strip().splitlines()
    assert process.returncode == 130 and "Traceback" not in rest and len(lines) == 1, rest
    assert "stopped at once" in lines[0] and "(after 1 iteration)" in lines[0]
    assert lines[0].endswith(f"continue with: python drtune.py --resume {run}")
    assert runner.load_checkpoint(run)["iter"] == 1


def test_a_second_ctrl_c_while_the_graceful_stop_writes_its_checkpoint_is_one_line(pipe, tmp_path, monkeypatch,
                                                                                    capsys):
    import drtune

    params = common.add_lora(pipe.unet, 2)
    run = runner.Run("drtune.py", drtune.Args(run_dir=str(tmp_path / "run"), iters=5, save_every=0), pipe.unet,
                     torch.optim.AdamW(params, lr=0.1), "cpu")
    before = signal.getsignal(signal.SIGINT)
    for it in run.iterations():
        run.log({"iter": it})
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this iteration
    save = run.save

    def interrupted_save():
        os.kill(os.getpid(), signal.SIGINT)  # the second, while the stop's checkpoint is being written
        save()

    monkeypatch.setattr(run, "save", interrupted_save)
    with pytest.raises(BaseException) as stop:  # a KeyboardInterrupt too: it would end the test session
        run.finish(lambda it: {})
    err = capsys.readouterr().err.strip().splitlines()
    assert isinstance(stop.value, SystemExit) and stop.value.code == 130 and "stopped at once; no checkpoint had been written yet" in err[-1]
    assert err[-1].endswith(f"--resume {tmp_path / 'run'}")
    assert signal.getsignal(signal.SIGINT) == before  # the handlers are handed back


@pytest.mark.slow
def test_ctrl_c_stops_after_the_iteration_with_a_checkpoint_and_the_resume_is_exact(tmp_path):
    script, *flags = METHODS["drtune"]
    flags = [*TINY_RUN, *flags, "--iters", "40"]
    whole = launch(script, *flags, "--run-dir", str(tmp_path / "whole"))
    stopped = launch(script, *flags, "--run-dir", str(tmp_path / "stopped"))
    deadline = time.time() + 120
    while not (tmp_path / "stopped" / "eval_00002.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    result = finish(stopped)
    assert result.returncode == 130 and f"--resume {tmp_path / 'stopped'}" in result.stderr
    done = runner.load_checkpoint(tmp_path / "stopped")["iter"]
    assert f"stopped after {done} of 40 iterations" in result.stderr  # counted as done, as the progress line counts
    assert 2 <= done < 40 and len(metrics(tmp_path / "stopped")) == done  # the iteration finished, then it stopped
    assert finish(launch(script, "--resume", str(tmp_path / "stopped"))).returncode == 0
    assert finish(whole).returncode == 0
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "whole")


def test_a_checkpoint_write_interrupted_at_any_stage_leaves_the_previous_one_loadable(pipe, tmp_path, monkeypatch):
    import drtune

    params = common.add_lora(pipe.unet, 2)
    optimizer = torch.optim.AdamW(params, lr=0.1)
    args = drtune.Args(run_dir=str(tmp_path / "run"))
    run = runner.Run("drtune.py", args, pipe.unet, optimizer, "cpu")
    run.next_iter = 1
    run.save()
    before = runner.load_checkpoint(tmp_path / "run")

    def explode(*a, **k):
        raise OSError("disk gone")

    def half_then_explode(obj, f, *a, **k):
        f.write(b"\x80\x02half a checkpoint")
        raise OSError("killed")

    for stage in (("torch.save", half_then_explode), ("os.fsync", explode), ("os.replace", explode)):
        with monkeypatch.context() as m:
            m.setattr(*stage)
            torch.nn.init.normal_(params[0])  # something new to save
            run.next_iter += 1
            with pytest.raises(OSError):
                run.save()
        after = runner.load_checkpoint(tmp_path / "run")
        assert after["iter"] == before["iter"] and all(torch.equal(after["lora"][k], before["lora"][k])
                                                        for k in before["lora"])
        assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("events.out.")) == [
            "README.md", "args.json", "checkpoint.pt", "metrics.jsonl", "pytorch_lora_weights.safetensors"]  # no leftovers
    run.save()  # and the next write goes through
    assert runner.load_checkpoint(tmp_path / "run")["iter"] == run.next_iter


@pytest.mark.slow
def test_the_nan_guard_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    script, *flags = METHODS["drtune"]
    # calls: the eval before iteration 0, then one per iteration (no eval in between): call 5 is iteration 3
    result = finish(launch(script, *TINY_RUN, *flags, "--eval-every", "0", "--run-dir", str(tmp_path / "run"),
                           env={"NAN_AT_CALL": "5"}))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "iteration 3: non-finite reward (nan)" in lines[0] and "(after 3 iterations)" in lines[0]
    checkpoint = runner.load_checkpoint(tmp_path / "run")
    assert checkpoint["iter"] == 3 and [r["iter"] for r in metrics(tmp_path / "run")] == [0, 1, 2]
    weights = lora(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_weights_are_never_saved(pipe, tmp_path, capsys):
    import drtune

    params = common.add_lora(pipe.unet, 2)
    run = runner.Run("drtune.py", drtune.Args(run_dir=str(tmp_path / "run")), pipe.unet,
                     torch.optim.AdamW(params, lr=0.1), "cpu")
    run.next_iter = 1
    run.save()
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes(), lora(tmp_path / "run")
    with torch.no_grad():
        params[3][0] = float("inf")
    run.next_iter = 2
    with pytest.raises(SystemExit) as stop:
        run.save()
    assert stop.value.code == 3 and "iteration 1: non-finite LoRA weights" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved[0]
    assert all(torch.equal(v, saved[1][k]) for k, v in lora(tmp_path / "run").items())


@pytest.mark.slow
def test_resume_refuses_a_changed_run_and_allows_a_longer_one(tmp_path, capsys, monkeypatch):
    import drtune

    script, *flags = METHODS["drtune"]
    run = tmp_path / "run"
    assert finish(launch(script, *TINY_RUN, *flags, "--iters", "2", "--run-dir", str(run))).returncode == 0
    for changed in (["--lr", "0.5"], ["--K", "3"], ["--lora-rank", "2"], ["--reward", "brightness"]):
        monkeypatch.setattr(sys, "argv", ["drtune.py", "--resume", str(run), *changed])
        with pytest.raises(SystemExit) as stop:
            runner.parse_args(drtune.Args, "drtune.py")
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and changed[0] in err and "would change" in err
    monkeypatch.setattr(sys, "argv", ["drtune.py", "--resume", str(run), "--iters", "3", "--eval-every", "1"])
    args = runner.parse_args(drtune.Args, "drtune.py")
    assert args.iters == 3 and args.run_dir == str(run) and args.K == 2
    longer = finish(launch(script, "--resume", str(run), "--iters", "3"))
    assert longer.returncode == 0, longer.stderr
    assert [r["iter"] for r in metrics(run)] == [0, 1, 2, 3] and metrics(run)[-1]["final"]
    done = finish(launch(script, "--resume", str(run), "--iters", "3"))  # nothing left to run
    assert done.returncode == 0 and "has run its 3 iterations" in done.stderr


@pytest.mark.slow
def test_config_reruns_a_run_and_args_json_records_where_it_ran(tmp_path):
    script, *flags = METHODS["alignprop"]
    first, again = tmp_path / "first", tmp_path / "again"
    assert finish(launch(script, *TINY_RUN, *flags, "--iters", "2", "--run-dir", str(first))).returncode == 0
    meta = json.loads((first / "args.json").read_text())["_meta"]
    assert meta["script"] == "alignprop.py" and meta["device"] == "cpu"
    assert {"torch", "diffusers", "transformers", "peft", "python"} <= set(meta["versions"])
    assert "git_commit" in meta and meta["command"][0] == "alignprop.py"
    result = finish(launch(script, "--config", str(first / "args.json"), "--run-dir", str(again)))
    assert result.returncode == 0, result.stderr
    assert metrics(again) == metrics(first)
    other = finish(launch("drtune.py", "--config", str(first / "args.json")))
    assert other.returncode == 2 and "written by alignprop.py" in other.stderr


@pytest.mark.slow
def test_init_lora_starts_from_a_saved_lora_with_a_fresh_optimizer(tmp_path):
    script, *flags = METHODS["draft"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert finish(launch(script, *TINY_RUN, *flags, "--iters", "2", "--run-dir", str(first))).returncode == 0
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "1", "--init-lora", str(first),
                           "--run-dir", str(second)))
    assert result.returncode == 0, result.stderr
    # the second run's first evaluation is the first run's last: the same model, the same eval noise
    assert metrics(second)[0]["eval_reward_mean"] == metrics(first)[-1]["eval_reward_mean"]
    assert runner.load_checkpoint(second)["optimizer"]["state"][0]["step"] == 1  # fresh: one step, not three
    file = finish(launch(script, *TINY_RUN, *flags, "--iters", "1", "--init-lora",
                         str(first / "pytorch_lora_weights.safetensors"), "--run-dir", str(tmp_path / "file")))
    assert file.returncode == 0 and metrics(tmp_path / "file")[0] == metrics(second)[0]


@pytest.mark.slow
def test_a_lora_trained_with_alpha_other_than_its_rank_draws_the_runs_images_in_plain_diffusers(embedded_dir, tmp_path):
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    script, *flags = METHODS["drtune"]
    run = tmp_path / "run"
    # lr 0.05: a LoRA strong enough that drawing it at another scale changes the pictures by far more than rounding
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "3", "--eval-every", "0", "--lora-alpha", "32",
                           "--lr", "0.05", "--run-dir", str(run)))
    assert result.returncode == 0, result.stderr
    # the README's route: a plain pipeline of the same model, load_lora_weights(run dir), the eval prompts and noise
    pipe = StableDiffusionPipeline.from_pretrained(str(embedded_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = runner.eval_prompts("toy", runner.load_prompts("toy"), 2)
    x_T = randn_tensor((2, 4, 16, 16), generator=torch.Generator().manual_seed(common.EVAL_SEED))

    def draw():
        images = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, eta=0.0, latents=x_T, output_type="np").images
        return torch.from_numpy((images * 255).round()).permute(1, 0, 2, 3).flatten(1, 2)  # side by side, as the grid

    in_run = torch.from_numpy(np.array(Image.open(run / "eval_00003.png"))).float()
    pretrained = draw()
    pipe.load_lora_weights(str(run))
    tuned = draw()
    assert (pretrained - in_run).abs().mean() > 10  # the LoRA changed the pictures
    assert (tuned - in_run).abs().max() <= 2  # and diffusers draws them as the run did: same scale
    # --init-lora takes the saved alpha into account: another one is refused in one line, the same one continues
    other = finish(launch(script, *TINY_RUN, *flags, "--iters", "1", "--init-lora", str(run),
                          "--run-dir", str(tmp_path / "other")))
    assert other.returncode == 2 and "pass --lora-alpha 32 to match" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()
    same = finish(launch(script, *TINY_RUN, *flags, "--iters", "1", "--lora-alpha", "32", "--init-lora", str(run),
                         "--run-dir", str(tmp_path / "same")))
    assert same.returncode == 0, same.stderr
    assert metrics(tmp_path / "same")[0]["eval_reward_mean"] == metrics(run)[-1]["eval_reward_mean"]


@pytest.mark.slow
def test_every_file_a_run_writes_has_the_mode_the_umask_gives(tmp_path):
    script, *flags = METHODS["drtune"]
    run = tmp_path / "run"

    def umask_027():
        os.umask(0o027)

    assert finish(launch(script, *TINY_RUN, *flags, "--iters", "2", "--run-dir", str(run),
                         preexec_fn=umask_027)).returncode == 0
    resumed = finish(launch(script, "--resume", str(run), "--iters", "3", preexec_fn=umask_027))  # rewrites metrics
    assert resumed.returncode == 0, resumed.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    assert {"args.json", "checkpoint.pt", "metrics.jsonl", "pytorch_lora_weights.safetensors", "README.md"} <= set(modes)
    assert set(modes.values()) == {"0o640"}, modes


@pytest.mark.slow
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    script, *flags = METHODS["drtune"]
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "3", "--progress-every", "0.001",
                           "--run-dir", str(tmp_path / "run")))
    lines = [line for line in result.stderr.splitlines() if line.startswith("drtune: iter")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("s/it" in line and "ETA" in line and "reward_mean" in line for line in lines)


def test_default_run_dirs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *a: "20261202-120000")
    dirs = {runner.new_run_dir("drtune", "hpsv2+0.5*clipscore", 0) for _ in range(3)}
    assert len(dirs) == 3 and all(d.is_dir() and "*" not in str(d) and "+" not in str(d) for d in dirs)


def test_iters_1_keeps_the_eval_before_training(tmp_path):
    script, *flags = METHODS["refl"]
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "1", "--eval-every", "1",
                           "--run-dir", str(tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    rows = metrics(tmp_path / "run")
    assert "eval_reward_mean" in rows[0] and rows[1]["final"] and rows[1]["eval_reward_mean"] != rows[0]["eval_reward_mean"]
    assert f"{rows[0]['eval_reward_mean']:.4f} -> {rows[1]['eval_reward_mean']:.4f}" in result.stdout


BAD_INPUT = [  # (script, flags, what the one line must name)
    ("drtune.py", ["--lr", "inf"], "--lr must be a finite number"),
    ("drtune.py", ["--lr", "nan"], "--lr"),
    ("drtune.py", ["--lr", "-1"], "--lr must be positive"),
    ("drtune.py", ["--lr", "1e38"], "--lr must be at most 1"),
    ("alignprop.py", ["--grad-clip", "nan"], "--grad-clip"),
    ("draft.py", ["--eta", "-1"], "--eta must be in [0, 1]"),
    ("draft.py", ["--eta", "2"], "--eta must be in [0, 1]"),
    ("refl.py", ["--threads", "-3"], "--threads must be non-negative"),
    ("drtune.py", ["--seed", "-1"], "--seed must be non-negative"),
    ("drtune.py", ["--seed", "4294967296"], "--seed must be at most 4294967295"),  # numpy's seed range
    ("ddpo.py", ["--seed", "4294967296"], "--seed must be at most 4294967295"),
    ("drtune.py", ["--K", "abc"], "--K"),
    ("drtune.py", ["--no-such-flag", "1"], "--no-such-flag"),
    ("rwr.py", ["--iters"], "--iters"),
    ("ddpo.py", ["--budget", "-5"], "--budget must be non-negative"),
    ("ddpo.py", ["--budget-seconds", "inf"], "--budget-seconds"),
    ("d3po.py", ["--save-every", "-1"], "--save-every"),
    ("draft.py", ["--progress-every", "0"], "--progress-every must be positive"),
    ("drtune.py", ["--eval-size", "1"], "--eval-size"),
    ("drtune.py", ["--dtype", "fp64"], "--dtype"),
    ("drtune.py", ["--device", "tpu"], "--device"),
    ("drtune.py", ["--lora-targets", "to_qq"], "to_qq"),
    ("drtune.py", ["--lora-alpha", "-2"], "--lora-alpha"),
    ("ddpo.py", ["--eta", "0"], "--eta"),
    ("ddpo.py", ["--clip-range", "0"], "--clip-range"),
    ("ddpo.py", ["--sample-batches", "3", "--grad-accum", "2"], "divide"),
    ("rwr.py", ["--percentile", "100"], "--percentile"),
    ("rwr.py", ["--inverse-temperature", "0"], "--inverse-temperature"),
    ("d3po.py", ["--samples-per-prompt", "1"], "--samples-per-prompt"),
    ("d3po.py", ["--clip-range", "1"], "--clip-range"),
    ("d3po.py", ["--ref-lora", "/nonexistent/lora"], "/nonexistent/lora"),
    ("draft.py", ["--lv", "-1"], "--lv"),
    ("refl.py", ["--t1", "0"], "--t1"),
    ("alignprop.py", ["--truncation", "sideways"], "--truncation"),
    ("drtune.py", ["--resume", "/nonexistent/run"], "/nonexistent/run"),
    ("drtune.py", ["--config", "/nonexistent/args.json"], "/nonexistent/args.json"),
    ("drtune.py", ["--resume", "/nonexistent/run", "--run-dir", "/nonexistent/elsewhere"], "it takes no --run-dir"),
    ("drtune.py", ["--init-lora", "/nonexistent/lora"], "/nonexistent/lora"),
    ("drtune.py", ["--prompts", "BINARY"], "not a UTF-8 text file"),
    ("drtune.py", ["--prompts", "EMPTY"], "no prompts"),
    ("drtune.py", ["--run-dir", "A_FILE"], "is a file"),
    ("drtune.py", ["--run-dir", "/proc/no/run"], "not writable"),
    ("drtune.py", ["--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--prompts", "toy"], "toy world"),
    ("drtune.py", ["--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--clip-model", "toy"], "toy world"),
]


@pytest.mark.parametrize("script,flags,needle", BAD_INPUT, ids=[f"{s}:{' '.join(f)}" for s, f, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_before_any_work(script, flags, needle, tmp_path, monkeypatch, capsys):
    import importlib

    files = {"BINARY": tmp_path / "prompts.bin", "EMPTY": tmp_path / "empty.txt", "A_FILE": tmp_path / "a_file"}
    files["BINARY"].write_bytes(bytes(range(256)))
    files["EMPTY"].write_text("\n \n")
    files["A_FILE"].write_text("not a directory")
    flags = [str(files.get(f, f)) for f in flags]
    run_dir = [] if "--run-dir" in flags else ["--run-dir", str(tmp_path / "never")]
    module = importlib.import_module(Path(script).stem)
    monkeypatch.setattr(sys, "argv", [script, *flags, *run_dir])
    with pytest.raises(SystemExit) as stop:
        module.main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "never").exists() and not Path("/proc/no").exists()
    assert files["A_FILE"].read_text() == "not a directory"


def test_a_parse_error_from_the_command_line_is_one_line_and_help_is_kept():
    bad = subprocess.run([sys.executable, str(ROOT / "drtune.py"), "--K", "abc"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "--K" in bad.stderr and "abc" in bad.stderr
    help = subprocess.run([sys.executable, str(ROOT / "drtune.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help.returncode == 0 and "--resume" in help.stdout and "--init-lora" in help.stdout


# --- data parallel: torchrun with 2 gloo ranks on the CPU ---------------------------------------------------

DDP_METHODS = {  # a gradient method, DDPO (one update per round, so it is one step on the global batch) and D3PO
    "drtune": ["drtune.py", "--num-steps", "4", "--K", "2", "--early-stop", "1", "--eta", "1"],
    "ddpo": ["ddpo.py", "--estimator", "sf", "--num-steps", "3", "--sample-batches", "2", "--samples-per-prompt", "1"],
    "d3po": ["d3po.py", "--num-steps", "3"],
}
DDP_RUN = [*TINY_RUN[:-2], "--iters", "3"]


def torchrun(script, *flags, ranks=2, env=None):
    """`torchrun --nproc-per-node 2 script flags` on a free port, gloo on the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", "localhost:0", str(ROOT / script), *flags]
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


@pytest.mark.parametrize("method", one_fast(DDP_METHODS))
def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(method, tmp_path):
    script, *flags = DDP_METHODS[method]
    two = torchrun(script, *DDP_RUN, *flags, "--batch-size", "1", "--run-dir", str(tmp_path / "two"))
    one = launch(script, *DDP_RUN, *flags, "--batch-size", "2", "--run-dir", str(tmp_path / "one"))
    ran = finish(two)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert finish(one).returncode == 0
    # every save compared the ranks' LoRA digests (bitwise) and would have stopped the run on a difference
    assert "2 ranks, global batch 2" in ran.stderr
    rows_two, rows_one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["iter"] for r in rows_two] == [r["iter"] for r in rows_one]
    for a, b in zip(rows_two, rows_one):
        # the same samples (per-sample noise drawn for the global batch), scored alike; the UNet's kernels at
        # batch 1 and 2 differ in the last bits only
        for key in ("reward_mean", "eval_reward_mean", "advantage_abs_mean", "loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        assert a.get("samples_seen") == b.get("samples_seen") and a["compute"] == b["compute"]
    lora_two, lora_one = lora(tmp_path / "two"), lora(tmp_path / "one")
    for k in lora_one:  # Adam normalises each step, so the gradients' last bits show up at about lr * 1e-2
        torch.testing.assert_close(lora_two[k], lora_one[k], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_a_rank_killed_brings_the_other_down_within_seconds_and_the_run_resumes_on_two_ranks(tmp_path):
    script, *flags = DDP_METHODS["drtune"]
    flags = [*TINY_RUN, *flags, "--batch-size", "1"]
    whole = torchrun(script, *flags, "--run-dir", str(tmp_path / "whole"))
    start = time.monotonic()
    killed = finish(torchrun(script, *flags, "--run-dir", str(tmp_path / "killed"),
                             env={"KILL_AT_CALL": "5", "KILL_RANK": "1"}))
    assert killed.returncode != 0 and time.monotonic() - start < 90  # startup ~10 s; no rank waits on a dead one
    assert "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr
    done = runner.load_checkpoint(tmp_path / "killed")["iter"]
    assert 0 < done < 5
    one_rank = finish(launch(script, "--resume", str(tmp_path / "killed")))
    assert one_rank.returncode == 2 and "ran on 2 ranks, now 1" in one_rank.stderr
    resumed = finish(torchrun(script, "--resume", str(tmp_path / "killed")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finish(whole).returncode == 0
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    a, b = lora(tmp_path / "whole"), lora(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_holding_different_weights_stop_the_run(pipe, tmp_path, monkeypatch, capsys):
    import drtune

    params = common.add_lora(pipe.unet, 2)
    run = runner.Run("drtune.py", drtune.Args(run_dir=str(tmp_path / "run")), pipe.unet,
                     torch.optim.AdamW(params, lr=0.1), "cpu")
    run.next_iter = 1
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj, "another rank's digest"])
    with pytest.raises(SystemExit) as stop:
        run.save()
    assert stop.value.code == 3 and "the ranks hold different LoRA weights" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- compute counts and budgets ------------------------------------------------------------------------------


def hand_count(method, row):
    """UNet image-steps forward/backward, VAE decodes and reward evaluations of one iteration, by hand (embedded
    model, batch 2, guidance on: a guided call is 2 image-steps per image; checkpointed calls run twice)."""
    if method == "drtune":  # T 4, stop at t_min 1: 4 guided calls; both trained steps reached, recomputed
        return {"unet_forwards": 4 * 4 + 2 * 4, "unet_backwards": 2 * 4, "vae_decodes": 2, "reward_evals": 2}
    if method == "draft":  # T 3, K 1, LV 1: 3 guided calls without gradient; one LV call on the 2 copies, recomputed
        return {"unet_forwards": 3 * 4 + 2 * 4, "unet_backwards": 4, "vae_decodes": 4, "reward_evals": 4}
    if method == "refl":  # guided (the toy default); calls down to the stop step, which is trained and recomputed
        calls = 4 - row["t_stop"] + 1
        return {"unet_forwards": 4 * calls + 4, "unet_backwards": 4, "vae_decodes": 2, "reward_evals": 2}
    if method == "alignprop":  # T 4: 4 guided calls; steps k..3 trained and recomputed
        trained = 4 - row["truncation"][0]
        return {"unet_forwards": 4 * 4 + trained * 4, "unet_backwards": trained * 4, "vae_decodes": 2,
                "reward_evals": 2}
    if method == "ddpo":  # 2 batches x T 3 sampled; every (sample, step) re-scored with gradient, guided
        return {"unet_forwards": 2 * 3 * 4 + 2 * 3 * 4, "unet_backwards": 2 * 3 * 4, "vae_decodes": 4,
                "reward_evals": 4}
    if method == "rwr":  # 2 batches x T 3 sampled; 2 updates of one guided denoising call on 2 samples, each with
        # the pretrained model's call for --kl-coeff (no backward)
        return {"unet_forwards": 2 * 3 * 4 + 2 * 4 + 2 * 4, "unet_backwards": 2 * 4, "vae_decodes": 4,
                "reward_evals": 4}
    if method == "d3po":  # 2 prompts x 2 samples (4 images) x T 3; each step re-scored by pi_theta and pi_ref
        return {"unet_forwards": 3 * 8 + 3 * (8 + 8), "unet_backwards": 3 * 8, "vae_decodes": 4, "reward_evals": 4}


@pytest.mark.parametrize("method", METHODS)
def test_the_compute_count_of_one_iteration_is_the_hand_count(method, tmp_path, monkeypatch):
    import importlib

    script, *flags = METHODS[method]
    monkeypatch.setattr(sys, "argv", [script, *TINY_RUN, *flags, "--iters", "1", "--run-dir", str(tmp_path / "run")])
    importlib.import_module(Path(script).stem).main()
    row, final = metrics(tmp_path / "run")
    expected = hand_count(method, row)
    assert {k: row[k] for k in expected} == expected
    assert row["compute"] == expected["unet_forwards"] + 2 * expected["unet_backwards"]
    assert {k: final[k] for k in expected} == expected  # the final evaluation is not counted


@pytest.mark.slow
def test_the_budget_stops_a_run_after_the_iteration_that_reaches_it(tmp_path):
    script, *flags = METHODS["drtune"]  # 40 compute units an iteration
    result = finish(launch(script, *TINY_RUN, *flags, "--iters", "50", "--budget", "100",
                           "--run-dir", str(tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    rows = metrics(tmp_path / "run")
    assert [r["compute"] for r in rows] == [40, 80, 120, 120] and rows[-1]["final"]
    assert runner.load_checkpoint(tmp_path / "run")["iter"] == 3
    assert "after 3 of 50 iterations (--budget 100 reached;" in result.stdout  # not mistaken for a finished run
    timed = finish(launch(script, *TINY_RUN, *flags, "--iters", "50", "--budget-seconds", "0.001",
                          "--run-dir", str(tmp_path / "timed")))
    assert timed.returncode == 0 and [r["iter"] for r in metrics(tmp_path / "timed")] == [0, 1]


# --- defaults that follow the model --------------------------------------------------------------------------


def test_auto_prompts_and_clip_follow_the_model(embedded_dir, tmp_path, monkeypatch):
    import drtune

    for model, prompts, clip, steps in (("toy", "toy", "toy", 20), (str(embedded_dir), "general", hub.REAL_CLIP, 50)):
        monkeypatch.setattr(sys, "argv", ["drtune.py", "--model", model, "--reward", "symmetry", "--clip-weight", "0",
                                          "--run-dir", str(tmp_path / "run")])
        args = runner.parse_args(drtune.Args, "drtune.py")
        drtune.check_args(args)
        assert (args.prompts, args.clip_model, args.eval_num_steps) == (prompts, clip, steps)
    monkeypatch.setattr(sys, "argv", ["drtune.py", "--model", str(embedded_dir), "--reward", "jpeg_compressibility"])
    args = runner.parse_args(drtune.Args, "drtune.py")
    assert runner.default_prompts(args.reward) == "simple_animals"
    assert runner.default_prompts("objectness+0.1*brightness") == "books"


# --- Stable Diffusion XL -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL pipeline built from config and saved: `--model DIR` loads it as it would a hub snapshot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_arch

    return sd_arch.build("tiny-sdxl", str(tmp_path_factory.mktemp("sdxl") / "model"))


def test_sdxl_loads_by_its_model_index_and_its_conditioning_is_the_pipelines(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = common.load_pipeline(tiny_sdxl)
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert not any(p.requires_grad for p in pipe.text_encoder_2.parameters())
    prompts = ["a photo of a cat", "a red fox"]
    cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, ["", ""])
    assert cond.shape == (2, 77 + 1, 64) and not uncond.any()  # force_zeros_for_empty_prompt
    x, t = torch.randn(2, 4, 16, 16), pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else 500
    ours = common.unet_output(pipe.unet, x, t, cond, uncond, 5.0)
    # the pipeline's own way: encode_prompt with CFG, time ids from _get_add_time_ids, one doubled UNet call
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        out = pipe.unet(torch.cat([x, x]), t, torch.cat([negative, embeds]), added_cond_kwargs={
            "text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids.repeat(4, 1)}).sample
    theirs = out[:2] + 5.0 * (out[2:] - out[:2])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sdxl_logprob_step_reproduces_the_ddim_scheduler_built_from_its_config(tiny_sdxl):
    pipe = common.load_pipeline(tiny_sdxl)
    scheduler = pipe.scheduler  # DDIM from SDXL's Euler config: timestep_spacing "leading", steps_offset 1
    scheduler.set_timesteps(10)
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        model_output = torch.randn_like(sample)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t)))
        expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        ours, log_prob = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0,
                                                       generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()
        sample = expected


def test_sdxl_lora_loads_with_the_xl_pipelines_load_lora_weights(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = common.load_pipeline(tiny_sdxl)
    for p in common.add_lora(pipe.unet, 4):
        torch.nn.init.normal_(p, std=0.1)
    runner.save_lora(pipe.unet, tmp_path)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    fresh.load_lora_weights(str(tmp_path))
    fresh.unet.pixels_per_latent = 2
    x, cond = torch.randn(1, 4, 16, 16), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(common.unet_output(fresh.unet, x, 500, cond), common.unet_output(pipe.unet, x, 500, cond))


@pytest.mark.parametrize("method", METHODS)
def test_every_script_runs_an_iteration_on_sdxl(method, tiny_sdxl, tmp_path, monkeypatch):
    import importlib

    script, *flags = METHODS[method]
    argv = [*TINY_RUN, *flags, "--model", tiny_sdxl, "--prompts", "simple_animals", "--iters", "2"]
    monkeypatch.setattr(sys, "argv", [script, *argv, "--run-dir", str(tmp_path / "run")])
    importlib.import_module(Path(script).stem).main()
    rows = metrics(tmp_path / "run")
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in rows[:-1])
    assert json.loads((tmp_path / "run" / "args.json").read_text())["eval_num_steps"] == 3


# --- Flow-matching models: SD3 and FLUX -------------------------------------------------------------------


@pytest.fixture(scope="session", params=["tiny-sd3", "tiny-flux"])
def tiny_flow(request, tmp_path_factory):
    """A tiny SD3 (CLIP-L, CLIP-G, T5) or FLUX (CLIP, T5, packed latents, guidance embedding) pipeline built from
    config and saved: `--model DIR` loads it as it would a hub snapshot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_arch

    return sd_arch.build(request.param, str(tmp_path_factory.mktemp(request.param) / "model"))


def test_flow_models_sample_as_their_own_pipelines_do(tiny_flow):
    """The ODE rollout (eta 0) with CFG (SD3) or the guidance embedding (FLUX) gives the pipeline's own latents."""
    import families

    pipe = common.load_pipeline(tiny_flow)
    assert common.is_flow(pipe.scheduler) and pipe.unet is pipe.transformer
    prompts = ["a red circle", "a photo of a cat"]
    cond, uncond = common.encode_prompts(pipe, prompts), common.encode_prompts(pipe, [""])
    x_T = common.initial_latents(pipe, 2, 32, generator=torch.Generator().manual_seed(0))
    ours = common.rollout(pipe, cond, uncond.expand(2, -1, -1), x_T, num_steps=4, guidance_scale=3.0, eta=0.0).output
    flux = "flux" in tiny_flow
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="latent",
                      latents=families.pack(x_T) if flux else x_T).images
    if flux:
        theirs = families.unpack(theirs, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sd3_saved_without_t5_loads_with_zeros_in_t5s_place(tmp_path):
    """text_encoder_3 = None (the toy flow model; SD3 loaded without its 4.7 B T5): model_index.json records it as
    [null, null] and load_pipeline names it absent; the conditioning has as many zero tokens as CLIP has tokens."""
    from diffusers import StableDiffusion3Pipeline

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_arch

    full = StableDiffusion3Pipeline.from_pretrained(sd_arch.build("tiny-sd3", str(tmp_path / "full")))
    full.register_modules(text_encoder_3=None, tokenizer_3=None)
    full.save_pretrained(tmp_path / "no-t5")
    pipe = common.load_pipeline(str(tmp_path / "no-t5"))
    assert pipe.text_encoder_3 is None
    cond = common.encode_prompts(pipe, ["a cat"])
    assert cond.shape == (1, 77 + 77 + 1, 64) and not cond[:, 77:-1].any()


def test_flux_latents_pack_into_its_patches_and_back():
    from diffusers import FluxPipeline

    import families

    x = torch.randn(2, 16, 8, 12)
    packed = families.pack(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12), rtol=0, atol=0)
    assert torch.equal(families.unpack(packed, 8, 12), x)


def flow_scheduler(num_steps: int, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_training_timesteps_are_drawn_as_each_family_was_pre_trained():
    """Denoising losses (RWR, ReFL's L_pre) draw t as the model was trained: DDPM's uniform integers, and for a flow
    model 1000 sigma with SD3's logit-normal sigma (whose logit has std 1; a uniform sigma's has std pi/sqrt 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    t = common.training_timesteps(DDIMScheduler(num_train_timesteps=1000), 20_000, "cpu")
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999 and abs(t.float().mean() - 499.5) < 10
    sigma = common.training_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 20_000, "cpu") / 1000
    assert 0 < sigma.min() and sigma.max() < 1
    logit = torch.log(sigma / (1 - sigma))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03


def test_flow_euler_step_equals_the_flow_match_scheduler_step():
    scheduler = flow_scheduler(10)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        velocity = torch.randn_like(sample)
        expected = scheduler.step(velocity, t, sample).prev_sample
        ours, log_prob = common.step_with_logprob(scheduler, velocity, t, sample, eta=0.0)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(log_prob, torch.zeros(2))  # the ODE step has no density
        x0, eps = common.predict_x0(scheduler, velocity, t, sample)
        sigma = t / 1000
        torch.testing.assert_close(x0, sample - sigma * velocity)  # rectified flow: x0 = x_t - sigma v
        torch.testing.assert_close((1 - sigma) * x0 + sigma * eps, sample)  # and eps completes the interpolation
        sample = expected


def test_flow_sde_step_log_prob_is_the_gaussian_density_of_flow_grpos_step():
    scheduler, a = flow_scheduler(6), 0.7
    sigmas = scheduler.sigmas
    sample = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(scheduler.timesteps):
        velocity = torch.randn_like(sample)
        prev, log_prob = common.flow_step_with_logprob(scheduler, velocity, t, sample, a,
                                                       generator=torch.Generator().manual_seed(i))
        # flow.md's first form of Flow-GRPO's step: the coefficients of x and v written out
        s, dt = sigmas[i].item(), (sigmas[i + 1] - sigmas[i]).item()
        ratio = s / (1 - (sigmas[1].item() if s == 1 else s))
        mean = sample * (1 + a**2 * ratio / (2 * s) * dt) + velocity * (1 + a**2 * ratio * (1 - s) / (2 * s)) * dt
        std = a * math.sqrt(ratio) * math.sqrt(-dt)
        expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(prev, mean + std * noise, rtol=1e-5, atol=1e-5)
        # scored again with the sample given, as the RL scripts rescore stored transitions, with gradient to v
        v = velocity.clone().requires_grad_()
        _, again = common.step_with_logprob(scheduler, v, t, sample, a, prev_sample=prev)
        torch.testing.assert_close(again, log_prob)
        again.sum().backward()
        assert v.grad.abs().sum() > 0
        sample = prev


def test_flow_sde_has_the_marginals_of_the_ode_on_gaussian_data():
    """Data x0 ~ N(m, s^2): x_sigma = (1 - sigma) x0 + sigma eps is Gaussian and the exact velocity E[eps - x0 | x_sigma]
    is linear in x_sigma. The ODE and Flow-GRPO's SDE, both driven by it from x_1 ~ N(0, 1), end in N(m, s^2)."""
    m, s, n = 1.5, 0.5, 40000
    scheduler = flow_scheduler(400, shift=1.0)

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        centred = x - (1 - sigma) * m
        return sigma / var * centred - (m + (1 - sigma) * s**2 / var * centred)

    for a in (0.0, 0.7):
        x = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        generator = torch.Generator().manual_seed(1)
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i].double()
            x, _ = common.flow_step_with_logprob(scheduler, velocity(x, sigma), t, x, a, generator=generator)
            x = x.double()
            if i == len(scheduler.timesteps) // 2:  # midway: the marginal of x_sigma' too
                after = scheduler.sigmas[i + 1].item()
                assert abs(x.mean().item() - (1 - after) * m) < 0.03, (a, x.mean())
                assert abs(x.std().item() - math.sqrt((1 - after) ** 2 * s**2 + after**2)) < 0.03, (a, x.std())
        assert abs(x.mean().item() - m) < 0.03 and abs(x.std().item() - s) < 0.03, (a, x.mean(), x.std())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_flow_stop_grad_input_makes_the_x0_jacobian_a_multiple_of_the_identity(eta, tiny_flow):
    """DRTune eq. 3 on a flow model: with sg(x_t) fed to the transformer, x0_hat at the stop step is linear in x_T
    through the chain only: d x0_hat / d x_T = c I (c = 1 for the ODE; the SDE's mean scales x by a scalar)."""
    pipe = common.load_pipeline(tiny_flow)
    cond, uncond = common.encode_prompts(pipe, ["a cat"]), common.encode_prompts(pipe, [""])
    x_T = common.initial_latents(pipe, 1, 8, generator=torch.Generator().manual_seed(0))

    def x0_hat(x, stop_grad_input=True):
        out = common.rollout(pipe, cond, uncond, x, num_steps=4, guidance_scale=3.0, eta=eta, grad_steps=range(4),
                             stop_grad_input=stop_grad_input, stop_step=3, checkpoint=False,
                             generator=torch.Generator().manual_seed(1))
        return out.output.flatten()

    jacobian = torch.autograd.functional.jacobian(x0_hat, x_T).reshape(x_T.numel(), x_T.numel())
    c = jacobian[0, 0]
    torch.testing.assert_close(jacobian, c * torch.eye(x_T.numel()), rtol=1e-5, atol=1e-6)
    assert (c - 1).abs() < 1e-6 if eta == 0 else c > 0
    full = torch.autograd.functional.jacobian(lambda x: x0_hat(x, False), x_T).reshape(x_T.numel(), x_T.numel())
    assert (full - full.diagonal().diag()).abs().max() > 1e-4  # without the stop-gradient it is not diagonal


def test_flow_training_targets_are_the_velocity_and_x0_comes_back_from_it():
    scheduler = flow_scheduler(8)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[[0, 3, 7]]
    x_t = common.noised(scheduler, x0, noise, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)
    target = common.denoising_target(scheduler, x0, noise, t)
    torch.testing.assert_close(target, noise - x0)
    x0_back, eps_back = common.predict_x0(scheduler, target, t, x_t)  # the exact velocity gives x0 and eps back
    torch.testing.assert_close(x0_back, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_back, noise, rtol=1e-5, atol=1e-5)


def test_flow_lora_defaults_to_the_attention_projections_and_loads_in_the_pipeline(tiny_flow, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = common.load_pipeline(tiny_flow)
    for p in common.add_lora(pipe.unet, 4):  # the default --lora-targets, mapped for a transformer
        torch.nn.init.normal_(p, std=0.1)
    assert set(pipe.unet.peft_config["default"].target_modules) == set(common.FLOW_LORA_TARGETS.split(","))
    runner.save_lora(pipe.unet, tmp_path)
    state = common.check_lora_file(str(tmp_path), 4, common.LORA_TARGETS, alpha=4)  # --init-lora with the defaults
    assert state and all(".lora_" in k for k in state)
    fresh = DiffusionPipeline.from_pretrained(tiny_flow)
    fresh.load_lora_weights(str(tmp_path))
    x, cond = torch.randn(1, fresh.vae.config.latent_channels, 16, 16), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(common.unet_output(fresh.transformer, x, 500.0, cond, None, 3.0),
                                   common.unet_output(pipe.unet, x, 500.0, cond, None, 3.0))
        pipe.unet.disable_adapters()
        assert not torch.allclose(common.unet_output(fresh.transformer, x, 500.0, cond, None, 3.0),
                                  common.unet_output(pipe.unet, x, 500.0, cond, None, 3.0))


@pytest.mark.parametrize("method", METHODS)
def test_every_script_runs_an_iteration_on_sd3_and_flux(method, tiny_flow, tmp_path, monkeypatch):
    import importlib

    script, *flags = METHODS[method]
    argv = [*TINY_RUN, *flags, "--model", tiny_flow, "--prompts", "simple_animals", "--iters", "2", "--resolution", "32"]
    monkeypatch.setattr(sys, "argv", [script, *argv, "--run-dir", str(tmp_path / "run")])
    importlib.import_module(Path(script).stem).main()
    rows = metrics(tmp_path / "run")
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in rows[:-1])
    assert runner.load_checkpoint(tmp_path / "run")["iter"] == 2


def test_cpu_threads_are_capped_at_the_cores_per_local_rank(monkeypatch):
    """2 ranks x 2 threads on 2 cores ran 10x slower than 2 x 1: under torchrun each rank takes its share."""
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        runner.setup_device("cpu", "fp32", 2)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        runner.setup_device("cpu", "fp32", 3)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        runner.setup_device("cpu", "fp32", 3)
        assert torch.get_num_threads() == 3  # a plain process gets what it asks for
    finally:
        torch.set_num_threads(before)


# --- the house: which module imports which, and the flags every script shares ------------------------------

PROJECT_MODULES = ["hub", "distributed", "families", "rewards", "common", "runner", "d3po_label", "ddpo", "rwr",
                   "draft", "refl", "alignprop", "drtune", "d3po"]
SCRIPTS = ["ddpo", "rwr", "draft", "refl", "alignprop", "drtune", "d3po"]


def project_imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its source (a function's own imports count too)."""
    import ast

    path = ROOT / f"{module}.py" if (ROOT / f"{module}.py").is_file() else ROOT / module / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT_MODULES)


def test_the_modules_import_each_other_without_a_circle():
    graph = {module: project_imports(module) for module in PROJECT_MODULES}
    # the floors: hub, distributed and families on nothing, rewards on hub alone, common on those three
    assert graph["hub"] == graph["distributed"] == graph["families"] == set(), graph
    assert graph["rewards"] == {"hub"}, graph
    assert graph["common"] == {"distributed", "families", "hub"}, graph
    done, path = set(), []

    def visit(module):  # depth-first: meeting a module still on the path is a circle
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in PROJECT_MODULES:
        visit(module)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_scripts_args_hold_its_own_flags_and_help_lists_every_flag(script, capsys):
    """The shared flags are declared once (runner.RunArgs); a script redeclares one only to give it another default.
    --help still lists every flag, the shared ones included."""
    import dataclasses
    import importlib

    Args = importlib.import_module(script).Args
    assert issubclass(Args, runner.RunArgs)
    shared = {f.name: f.default for f in dataclasses.fields(runner.RunArgs)}
    own = Args.__dict__["__annotations__"]
    redeclared = [name for name in own if name in shared and getattr(Args, name) == shared[name]]
    assert not redeclared, f"{script}.Args repeats runner.RunArgs' {redeclared} with the same default"
    with pytest.raises(SystemExit) as stop:
        runner.cli(Args, ["--help"], prog=f"{script}.py")
    assert stop.value.code == 0
    shown = capsys.readouterr()
    missing = [f.name for f in dataclasses.fields(Args) if hub.flag(f.name) not in shown.out + shown.err]
    assert not missing, f"{script}.py --help does not list {missing}"
