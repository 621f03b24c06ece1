import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import common


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
        common.seed_everything(3)
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
        pipe.unet.disable_adapters()
        reference = common.unet_output(pipe.unet, x, 500, cond)
        pipe.unet.enable_adapters()
    assert not torch.equal(base, tuned)
    assert torch.equal(base, reference)


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
    for p in common.add_lora(pipe.unet, 4):
        torch.nn.init.normal_(p, std=0.1)
    common.save_lora(pipe.unet, tmp_path)
    fresh = StableDiffusionPipeline.from_pretrained(str(embedded_dir))
    fresh.load_lora_weights(str(tmp_path))
    x, cond = torch.randn(1, 4, 16, 16), common.encode_prompts(pipe, ["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, 500, cond).sample, pipe.unet(x, 500, cond).sample)


# --- prompts, evaluation, run directory ------------------------------------------------------------------


def test_prompt_sets_and_user_files(tmp_path, capsys):
    assert len(common.load_prompts("simple_animals")) == 45
    assert len(common.load_prompts("imagenet_animals")) == 398
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue whale \n")
    assert common.load_prompts(str(tmp_path / "p.txt")) == ["a red fox", "a blue whale"]
    with pytest.raises(SystemExit):
        common.load_prompts(str(tmp_path / "missing.txt"))
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


def test_run_log_writes_jsonl_and_refuses_to_overwrite(tmp_path, capsys):
    from dataclasses import dataclass

    @dataclass
    class A:
        x: int = 1

    log = common.RunLog(str(tmp_path / "run"), A(), total=2)
    log.log({"iter": 0, "loss": torch.tensor(0.5), "eval_reward_mean": 1.0})
    log.log({"iter": 1, "loss": 0.25, "eval_reward_mean": 2.0})
    log.close("test")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1] and rows[0]["loss"] == 0.5 and "wall_time_s" in rows[0]
    assert "1.0000 -> 2.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        common.RunLog(str(tmp_path / "run"), A(), total=1)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # untouched


def test_eval_prompts_are_spread_and_fixed():
    prompts = [f"p{i}" for i in range(10)]
    assert common.eval_prompts("my.txt", prompts, 5) == ["p0", "p2", "p4", "p6", "p8"]
    assert common.eval_prompts("my.txt", prompts[:2], 3) == ["p0", "p1", "p0"]
    assert common.eval_prompts("my.txt", prompts, 10) == prompts


def test_toy_prompts_evaluate_on_their_held_out_companion_set():
    train, held_out = common.load_prompts("toy"), common.load_prompts("toy_eval")
    chosen = common.eval_prompts("toy", train, 8)
    assert chosen == held_out * 2 and not set(chosen) & set(train)
