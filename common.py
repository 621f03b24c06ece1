"""The diffusion core the seven method scripts share, in the order a method uses it: load Stable Diffusion (or the
toy world's model), add LoRA, encode prompts, call the UNet with classifier-free guidance, predict x0, take the DDIM
step with its log-probability (or, on a flow-matching model, the Euler step of its ODE or Flow-GRPO's SDE step),
roll the chain out, decode; then the shared evaluation and saved LoRA files.

Two kinds of model, one interface: diffusion models (SD 1.x/2.x/XL: DDIM, epsilon or v prediction) and
flow-matching models (SD3/3.5, FLUX: x_sigma = (1 - sigma) x0 + sigma eps, velocity prediction). The scheduler
tells them apart; each function that differs says both. What one family alone needs (SDXL/SD3/FLUX text encoders,
FLUX's packed latents) is families.py.

No method's loss or estimator lives here. `rollout` carries out a gradient routing but does not choose
one: each script decides which steps carry gradient, whether the UNet input is detached and where
sampling stops, what is rewarded and how the loss is built, and passes those choices in as knobs.
The run around it (flags, run directory, checkpoints) is runner.py; ranks and the compute count are distributed.py;
where weights come from (and the tests' embedded tiny model) is hub.py.
"""

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices at import
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers
import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, set_peft_model_state_dict

import distributed
import families
import hub
from hub import fail

EVAL_SEED = 1234  # eval noise is fixed across methods and training seeds, so runs compare like for like
# One evaluation for every script, so that methods compare on one footing: deterministic DDIM (eta 0) with this
# T and guidance scale (--eval-num-steps / --eval-guidance-scale 0 take them), --eval-size fixed prompts
# (eval_prompts) and fixed noise (EVAL_SEED). The toy world's values, then Stable Diffusion's (the papers' T 50, w 7.5).
EVAL_PROTOCOL = {"toy": {"num_steps": 20, "guidance_scale": 5.0}, "sd": {"num_steps": 50, "guidance_scale": 7.5}}
# Attention projections (what the public implementations train) and the ResNet 3x3 convolutions: the toy
# UNet has no attention at full latent resolution, and without the convs LoRA can hardly move a shape.
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"
# A flow model's transformer has no convolutions; the default there is every attention projection, the image
# stream's and the text stream's (Flow-GRPO's LoRA targets).
FLOW_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
diffusers_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Loading Stable Diffusion (1.x, 2.x, XL, 3/3.5, the toy world's) or FLUX, and LoRA
# ---------------------------------------------------------------------------------------------


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu", vae: str = ""):
    """Stable Diffusion 1.x/2.x/XL/3, or FLUX, from a hub id, a local folder or the embedded tiny model; the pipeline
    class is the one its model_index.json names. Every component frozen (LoRA adds the trainable part to the
    denoiser); a diffusion model gets the DDIM scheduler built from its own betas and prediction type (epsilon
    or v), a flow model keeps its FlowMatchEulerDiscreteScheduler (its sigma shift); `vae` replaces its VAE.
    A flow model's denoiser is a transformer: `pipe.unet` names it too, so every script reads the same.
    """
    source = hub.resolve_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        if source == hub.EMBEDDED_MODEL:  # built to disk, then loaded through the same path as any model
            hub.build_embedded_pipeline(tmp)
            source = tmp
        index = DiffusionPipeline.load_config(source)
        kind = index["_class_name"]
        # Components saved as absent (e.g. SD3 without T5: text_encoder_3 [null, null]) must be named absent to load
        absent = {name: None for name, value in index.items() if value == [None, None]}
        cls, options = getattr(diffusers, kind), absent | hub.PIPELINES[kind]
        if vae:
            options = options | {"vae": AutoencoderKL.from_pretrained(hub.resolve_vae(vae), dtype=dtype)}
        pipe = cls.from_pretrained(source, dtype=dtype, **options)
    if is_flow(pipe.scheduler):
        pipe.unet = pipe.transformer
    else:  # No clipping of x0 (DDIM's default where a config does not say, e.g. SDXL's Euler one): latents are
        # not in [-1, 1], and ddim_step_with_logprob never clips.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast"):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (decode upcasts to the VAE's dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.unet.pixels_per_latent = pipe.vae_scale_factor  # SDXL's time ids are in pixels (families.denoise)
    # what diffusers must be told is absent to load this model again (the model card's snippet)
    pipe.unet.absent_text_components = sorted(n for n in absent if n.startswith(("text_encoder", "tokenizer")))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_flow(scheduler) -> bool:
    """A flow-matching model (SD3, FLUX, the toy flow world) rather than a diffusion model."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def native_resolution(pipe) -> int:
    return (pipe.unet.config.get("sample_size") or pipe.default_sample_size) * pipe.vae_scale_factor


def add_lora(unet, rank: int, alpha: float | None = None, targets: str = LORA_TARGETS, init: str = ""):
    """LoRA on the UNet layers whose names end in one of `targets` (comma-separated), its weights from the
    saved LoRA `init` if given; returns the trainable parameters (kept in fp32). The pretrained model is the
    same UNet under `unet.disable_adapters()`: no copy. On a flow model's transformer the default targets are
    FLOW_LORA_TARGETS.
    """
    targets = lora_targets(lora_component(unet), targets)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    layers = [n for n, _ in unet.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in layers)]
    if not names or missing:
        fail(f"--lora-targets {targets!r}: no {type(unet).__name__} layer named {', '.join(missing) or '(empty)'} "
             f"(e.g. {lora_targets(lora_component(unet), LORA_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=names)
    unet.add_adapter(config)
    if init:
        load_lora(unet, init)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_component(unet) -> str:
    """The pipeline component a saved LoRA's keys are prefixed with: unet, or a flow model's transformer."""
    return "unet" if isinstance(unet, UNet2DConditionModel) else "transformer"


def lora_targets(component: str, targets: str) -> str:
    """--lora-targets for a LoRA on this component: as given, except that the default on a transformer is
    FLOW_LORA_TARGETS."""
    return FLOW_LORA_TARGETS if targets == LORA_TARGETS and component == "transformer" else targets


# ---------------------------------------------------------------------------------------------
# Prompts, the UNet call with guidance, x0, the DDIM step with log-probability, the rollout
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]):
    """The text conditioning, one tensor (B, tokens, width) that every script can batch, index and repeat: SD 1.x/2.x's
    CLIP hidden states; SDXL, SD3 and FLUX add their pooled embedding as one more token (families.encode_prompts)."""
    if type(pipe) is not StableDiffusionPipeline:
        return families.encode_prompts(pipe, prompts)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def unet_output(unet, latents, t, cond, uncond=None, guidance_scale: float = 1.0):
    """The (guided) UNet output in fp32; cond and uncond go through one batched call (FLUX: one call, the guidance
    scale an input of the model). Counted in distributed.COMPUTE: image-steps forward when called (a checkpointed
    call again when recomputed), backward when a gradient reaches the output."""
    if families.guidance_in_model(unet):
        distributed.count("unet_forwards", len(latents))
        return _count_backward(families.denoise(unet, latents.to(unet.dtype), t, cond.to(unet.dtype),
                                                guidance_scale)).float()
    guided = uncond is not None and guidance_scale != 1.0
    distributed.count("unet_forwards", len(latents) * (2 if guided else 1))
    if not guided:
        return _count_backward(_unet(unet, latents.to(unet.dtype), t, cond.to(unet.dtype))).float()
    if torch.is_tensor(t) and t.ndim == 1:  # one timestep per row: the doubled batch needs them twice
        t = torch.cat([t, t])
    out = _unet(unet, torch.cat([latents, latents]).to(unet.dtype), t, torch.cat([uncond, cond]).to(unet.dtype))
    out_uncond, out_cond = _count_backward(out).float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


@torch.no_grad()
def pretrained_output(unet, latents, t, cond, uncond=None, guidance_scale: float = 1.0):
    """unet_output of the pretrained model: the same UNet with its LoRA switched off for the one call (no copy),
    switched back on whatever happens; no gradient (a reference, a KL anchor)."""
    unet.disable_adapters()
    try:
        return unet_output(unet, latents, t, cond, uncond, guidance_scale)
    finally:
        unet.enable_adapters()


def _unet(unet, latents, t, cond):
    """One call of the denoiser: SD 1.x/2.x's UNet here; SDXL's UNet and the SD3 and FLUX transformers in
    families.denoise (their added conditions: pooled embedding, time ids, packed latents)."""
    if isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type != "text_time":
        return unet(latents, t, cond).sample
    return families.denoise(unet, latents, t, cond)


def _count_backward(sample):
    if sample.requires_grad and distributed.counting():
        sample.register_hook(lambda grad: distributed.count("unet_backwards", len(grad)))
    return sample


def _alpha_bars(scheduler, t, device):
    """alpha-bar at t and at the previous DDIM timestep, shaped (B or 1, 1, 1, 1).

    The previous timestep is not clamped: below 0 it is `final_alpha_cumprod`, as in DDIMScheduler.
    """
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    alphas = scheduler.alphas_cumprod.to(device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = alphas[t]
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod.to(device))
    return a_t.view(-1, 1, 1, 1), a_prev.view(-1, 1, 1, 1)


def set_timesteps(pipe, num_steps: int, latents):
    """The sampler's T steps: DDIM's evenly spaced timesteps; a flow model's sigmas from 1 down, shifted as its own
    pipeline shifts them (SD3: the scheduler's fixed shift; FLUX: mu grows with the image's token count)."""
    scheduler = pipe.scheduler
    if is_flow(scheduler) and scheduler.config.use_dynamic_shifting:
        mu = families.flux_shift(scheduler, *latents.shape[-2:])
        scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / num_steps, num_steps)), mu=mu, device=latents.device)
    else:
        scheduler.set_timesteps(num_steps, device=latents.device)


def _sigmas(scheduler, t, device):
    """A flow model's sigma at scheduler timestep(s) t and at the next (less noisy) step, shaped (B or 1, 1, 1, 1);
    the last step's next sigma is the terminal 0."""
    t = torch.as_tensor(t, device=device).float().reshape(-1)
    i = (scheduler.timesteps.to(device)[None] - t[:, None]).abs().argmin(dim=1)
    sigmas = scheduler.sigmas.to(device).float()
    return sigmas[i].view(-1, 1, 1, 1), sigmas[i + 1].view(-1, 1, 1, 1)


def predict_x0(scheduler, model_output, t, sample):
    """(x0 prediction, epsilon prediction) from the model output: epsilon, v or sample prediction, or a flow
    model's velocity (rectified flow: x0 = x_sigma - sigma v, eps = x_sigma + (1 - sigma) v)."""
    if is_flow(scheduler):
        sigma, _ = _sigmas(scheduler, t, sample.device)
        return sample - sigma * model_output, sample + (1 - sigma) * model_output
    a_t, _ = _alpha_bars(scheduler, t, sample.device)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
    elif kind == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {kind}")
    return x0, eps


def ddim_step_with_logprob(scheduler, model_output, t, sample, eta: float, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} with noise scale eta; returns (x_{t-1}, log p(x_{t-1} | x_t)).

    The log-prob is the Gaussian density of `prev_sample` (drawn here if not given), averaged over the latent
    dimensions, shape (B,) (_draw_with_logprob). A step with zero noise (eta = 0, or the last step of a
    scheduler with set_alpha_to_one) has no density; its log-prob is reported as 0.
    """
    mean, std = ddim_mean_std(scheduler, model_output, t, sample, eta)
    return _draw_with_logprob(mean, std, sample, prev_sample, generator)


def ddim_mean_std(scheduler, model_output, t, sample, eta: float):
    """The Gaussian a DDIM step draws x_{t-1} from (DDIM eq. 12 with sigma_t = eta * its eq. 16 value)."""
    a_t, a_prev = _alpha_bars(scheduler, t, sample.device)
    x0, eps = predict_x0(scheduler, model_output, t, sample)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def flow_step_with_logprob(scheduler, velocity, t, sample, noise_level: float, prev_sample=None, generator=None):
    """One step of a flow model x_sigma -> x_sigma' (sigma' < sigma); returns (x_sigma', log p(x_sigma' | x_sigma)),
    the log-prob reduced as ddim_step_with_logprob's: the ODE's Euler step at noise level 0 (log-prob 0),
    Flow-GRPO's SDE step above it (flow_mean_std)."""
    mean, std = flow_mean_std(scheduler, velocity, t, sample, noise_level)
    return _draw_with_logprob(mean, std, sample, prev_sample, generator)


def flow_mean_std(scheduler, velocity, t, sample, noise_level: float):
    """The Gaussian a flow model's step draws x_sigma' from, dt = sigma' - sigma < 0.

    noise_level 0: the Euler step of the flow ODE dx = v dsigma (rectified flow): mean x + dt v, std 0.
    noise_level a > 0: Flow-GRPO's SDE (arXiv 2505.05470, the ODE-to-SDE conversion), whose marginals equal the
    ODE's: with g^2 = a^2 sigma / (1 - sigma), mean = x + [v + g^2 / (2 sigma) (x + (1 - sigma) v)] dt (the score
    term, from x0 = x - sigma v), std = g sqrt(-dt). At sigma = 1 the denominator takes the schedule's second sigma
    instead, as Flow-GRPO's code does (g would be infinite).
    """
    sigma, sigma_next = _sigmas(scheduler, t, sample.device)
    dt = sigma_next - sigma
    if noise_level == 0:
        return sample + dt * velocity, torch.zeros_like(sigma)
    sigma_max = scheduler.sigmas[1].to(sample.device).float()
    g2 = noise_level**2 * sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))
    mean = sample + (velocity + g2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
    return mean, (g2 * -dt).sqrt()


def step_with_logprob(scheduler, model_output, t, sample, eta: float, prev_sample=None, generator=None):
    """The sampler's step with its log-probability: DDIM with noise scale eta on a diffusion model; on a flow model
    the ODE's Euler step at eta 0, else Flow-GRPO's SDE with noise level a = eta (Flow-GRPO: 0.7)."""
    step = flow_step_with_logprob if is_flow(scheduler) else ddim_step_with_logprob
    return step(scheduler, model_output, t, sample, eta, prev_sample, generator)


def step_mean_std(scheduler, model_output, t, sample, eta: float):
    """The Gaussian of step_with_logprob's step, (mean, std): for a KL between two policies' steps."""
    return (flow_mean_std if is_flow(scheduler) else ddim_mean_std)(scheduler, model_output, t, sample, eta)


def _draw_with_logprob(mean, std, sample, prev_sample, generator):
    """Draw the next latent from N(mean, std^2) (unless given) -> (it, its log-density averaged over the latent
    dimensions, shape (B,)). Mean, not sum, as in the DDPO and Flow-GRPO code: a sum over 16k dims turns a per-dim
    ratio of 1.01 into 1e70. Gradient flows through the mean only (prev_sample is a constant). A step with zero
    noise has no density; its log-prob is reported as 0."""
    if prev_sample is None:
        prev_sample = mean + std * distributed.randn(sample.shape, sample.device, sample.dtype, generator)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2) - safe_std.log()
                - math.log(math.sqrt(2 * math.pi)))
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def training_timesteps(scheduler, n: int, device):
    """n timesteps drawn as the model was pre-trained, for a denoising loss (RWR, ReFL's L_pre): uniform integers
    below num_train_timesteps for a diffusion model (DDPM); for a flow model 1000 sigma with sigma ~ sigmoid(N(0, 1)),
    the logit-normal SD3 was trained with (and the toy flow model: toyworld/train_flow.py)."""
    if not is_flow(scheduler):
        return distributed.randint(scheduler.config.num_train_timesteps, n, device)
    return torch.sigmoid(distributed.randn((n,), device)) * scheduler.config.num_train_timesteps


def noised(scheduler, x0, noise, t):
    """x0 noised to training timestep(s) t (integers below num_train_timesteps): q(x_t | x0) = N(sqrt(a_t) x0,
    (1 - a_t) I) for a diffusion model; x_sigma = (1 - sigma) x0 + sigma noise, sigma = t / 1000, for a flow model."""
    if not is_flow(scheduler):
        return scheduler.add_noise(x0, noise, torch.as_tensor(t, device=x0.device).long().reshape(-1))
    sigma = (torch.as_tensor(t, device=x0.device).float() / scheduler.config.num_train_timesteps)
    sigma = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise


def denoising_target(scheduler, x0, noise, t):
    """What the model regresses at noised(x0, noise, t): the noise (epsilon prediction), the velocity
    sqrt(a_t) noise - sqrt(1 - a_t) x0 (v prediction), or the flow velocity noise - x0 (flow matching)."""
    if is_flow(scheduler):
        return noise - x0
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, torch.as_tensor(t, device=x0.device).long())
    return noise


@dataclass
class Rollout:
    """What a rollout returns. `output` is the final latent x_0, or the x0 prediction at the stop step."""

    output: torch.Tensor
    latents: list = field(default_factory=list)  # x_T, x_{T-1}, ... (detached), when recorded
    log_probs: list = field(default_factory=list)  # log p(x_{t-1} | x_t) per step, (B,) each
    timesteps: list = field(default_factory=list)  # the scheduler timestep of each executed step


def rollout(pipe, cond, uncond, latents, *, num_steps: int, guidance_scale: float, eta: float,
            grad_steps=(), stop_grad_input: bool = False, stop_step: int | None = None,
            checkpoint: bool = True, record: bool = False, generator=None) -> Rollout:
    """Sample from x_T = `latents` (DDIM, or a flow model's ODE/SDE: step_with_logprob); the knobs say where gradient
    flows.

    grad_steps: step indices (0 = first, noisiest step) whose UNet call carries gradient; the others run
        under no_grad, but the latent chain after the first gradient step stays differentiable, so
        gradient still reaches earlier trained steps through the linear part of the DDIM update.
    stop_grad_input: feed sg(x_t) to the UNet (DRTune eq. 3); the chain stays linear in the model output, for the
        DDIM step and the flow Euler step alike.
    stop_step: stop at this step index and return the x0 prediction made there (ReFL, DRTune).
    checkpoint: recompute each differentiable UNet call in backward, so activation memory is O(1) in T.
    record: keep latents, timesteps and log-probs (for the RL methods).
    """
    scheduler = pipe.scheduler
    set_timesteps(pipe, num_steps, latents)
    grad_steps = set(grad_steps)
    first_grad = min(grad_steps, default=num_steps)
    x, result = latents, Rollout(output=latents)
    if record:
        result.latents.append(x.detach())
    for i, t in enumerate(scheduler.timesteps):
        unet_input = x.detach() if stop_grad_input else x
        if i in grad_steps and checkpoint:
            out = torch.utils.checkpoint.checkpoint(unet_output, pipe.unet, unet_input, t, cond, uncond,
                                                    guidance_scale, use_reentrant=False)
        else:
            with torch.set_grad_enabled(i in grad_steps):
                out = unet_output(pipe.unet, unet_input, t, cond, uncond, guidance_scale)
        if i == stop_step:
            result.output = predict_x0(scheduler, out, t, x)[0]
            return result
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            x, log_prob = step_with_logprob(scheduler, out, t, x, eta, generator=generator)
        if record:
            result.latents.append(x.detach())
            result.log_probs.append(log_prob.detach())
            result.timesteps.append(t)
    result.output = x
    return result


def initial_latents(pipe, batch_size: int, resolution: int, generator=None):
    """x_T for `batch_size` images (this rank's share of the global batch, unless a generator is given)."""
    shape = (batch_size, pipe.vae.config.latent_channels, resolution // pipe.vae_scale_factor,
             resolution // pipe.vae_scale_factor)
    return distributed.randn(shape, pipe.unet.device, torch.float32, generator)


def decode(vae, latents, checkpoint: bool = False):
    """Latents -> images (N,3,H,W) in [0,1], float32, differentiable (optionally checkpointed).

    The clamp to [0,1] passes its gradient straight through: a plain clamp has zero gradient on saturated
    pixels (the toy world's white and black backgrounds), so a reward could push a picture into saturation
    and nothing, not even the CLIP regulariser, could pull it back.
    """
    distributed.count("vae_decodes", len(latents))
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0)
    if checkpoint and torch.is_grad_enabled():
        images = torch.utils.checkpoint.checkpoint(lambda z: vae.decode(z).sample, z, use_reentrant=False)
    else:
        images = vae.decode(z).sample
    images = images.float() / 2 + 0.5
    return images + (images.clamp(0, 1) - images).detach()  # forward: clamp; backward: identity


@torch.no_grad()
def encode_images(vae, images):
    """Images (N,3,H,W) in [0,1] -> scaled (and, for SD3/FLUX's VAE, shifted) latents, for denoising losses."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    return (dist.sample().float() - (vae.config.get("shift_factor") or 0)) * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# The evaluation every script shares (EVAL_PROTOCOL)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(pipe, prompts, reward_fn, *, num_steps, guidance_scale, resolution, eta=0.0, batch_size=16):
    """Full T-step sampling (deterministic: DDIM at eta 0, a flow model's ODE) on fixed prompts and fixed noise (the
    step noise too, with eta > 0): (rewards, images). Not part of the run's compute count."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    uncond_one = encode_prompts(pipe, [""])
    rewards, images = [], []
    with distributed.uncounted():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            cond = encode_prompts(pipe, chunk)
            x_T = initial_latents(pipe, len(chunk), resolution, generator=generator)
            out = rollout(pipe, cond, uncond_one.expand(len(chunk), -1, -1), x_T, num_steps=num_steps,
                          guidance_scale=guidance_scale, eta=eta, generator=generator).output
            image = decode(pipe.vae, out)
            rewards.append(reward_fn(image, chunk).float().cpu())
            images.append(image.cpu())
    return torch.cat(rewards), torch.cat(images)


# ---------------------------------------------------------------------------------------------
# Saved LoRAs: a run directory's pytorch_lora_weights.safetensors or any diffusers LoRA file
# ---------------------------------------------------------------------------------------------

# Where diffusers (>= 0.35) keeps a LoRA's adapter config in the safetensors header: JSON, its keys prefixed by the
# component (unet.r, unet.lora_alpha, ...); load_lora_weights builds the LoraConfig from it.
LORA_METADATA_KEY = "lora_adapter_metadata"


def _read_lora(path: str, what: str) -> tuple[dict, float | None, str]:
    """A run directory (its pytorch_lora_weights.safetensors) or a diffusers LoRA file -> (UNet or transformer LoRA
    weights under PEFT names without the adapter name, e.g. `...attn1.to_q.lora_A.weight`; the alpha it records,
    or None; which of the two it adapts)."""
    source = Path(path).expanduser()
    if source.is_dir():
        source = source / "pytorch_lora_weights.safetensors"
    if not source.is_file():
        fail(f"{what} {path}: no such LoRA file (a run directory or a .safetensors file)")
    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(str(source))
        metadata = {}
        if source.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(source), "pt") as f:
                metadata = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY) or "{}")
    except Exception as e:
        fail(f"{what} {path}: not a LoRA file diffusers can read ({type(e).__name__})")
    component = "transformer" if any(k.startswith("transformer.") for k in state) else "unet"  # a flow model's
    unet = {k.removeprefix(component + "."): v for k, v in state.items() if k.startswith(component + ".")}
    if not unet:
        fail(f"{what} {path}: holds no UNet or transformer LoRA weights")
    alpha = metadata.get(f"{component}.lora_alpha")
    alpha = None if alpha is None else float(alpha)
    return convert_unet_state_dict_to_peft(unet), alpha, component


def read_lora(path: str, what: str = "--init-lora") -> dict:
    """The UNet LoRA weights of a run directory or a diffusers LoRA file, under PEFT names (see _read_lora)."""
    return _read_lora(path, what)[0]


def _check_alpha(path: str, saved: float | None, rank: int, alpha: float, what: str):
    # A file without an alpha loads in diffusers at alpha = rank; the same weights at another alpha draw other pictures.
    saved = float(rank) if saved is None else saved
    if not math.isclose(saved, alpha):
        fail(f"{what} {path} has LoRA alpha {saved:g}; pass --lora-alpha {saved:g} to match (got {alpha:g})")


def check_lora_file(path: str, rank: int, targets: str, what: str = "--init-lora", alpha: float | None = None) -> dict:
    """The LoRA in `path` must have the shape this run's adapter has (--lora-rank, --lora-targets) and, when `alpha`
    is given, its scale (--lora-alpha, resolved: 0 = the rank)."""
    state, saved_alpha, component = _read_lora(path, what)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    layers = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    kinds = {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in layers}
    targets = lora_targets(component, targets)
    wanted = {t.strip() for t in targets.split(",") if t.strip()}
    if ranks != {rank}:
        fail(f"{what} {path} has LoRA rank {', '.join(map(str, sorted(ranks)))}; pass --lora-rank to match (got {rank})")
    if kinds != wanted:
        fail(f"{what} {path} adapts the layers {','.join(sorted(kinds))}; pass them as --lora-targets (got {targets})")
    if alpha is not None:
        _check_alpha(path, saved_alpha, rank, alpha, what)
    return state


def load_lora(unet, path: str, what: str = "--init-lora"):
    """Set the adapter's weights (added by add_lora, same rank, alpha and targets) from a saved LoRA."""
    state, saved_alpha, _ = _read_lora(path, what)
    expected = {n.replace(".default.", ".") for n, p in unet.named_parameters() if p.requires_grad}
    if set(state) != expected:
        fail(f"{what} {path}: its LoRA layers differ from this run's ({len(state)} tensors, expected {len(expected)})")
    config = unet.peft_config["default"]
    _check_alpha(path, saved_alpha, config.r, config.lora_alpha, what)
    set_peft_model_state_dict(unet, {k: v.float() for k, v in state.items()}, adapter_name="default")
