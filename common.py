"""Machinery shared by the seven method scripts: loading Stable Diffusion, LoRA, the DDIM step with
log-probability, one configurable sampling rollout, decoding, prompts, evaluation and the run directory.

No method's loss or estimator lives here. `rollout` carries out a gradient routing but does not choose
one: each script decides which steps carry gradient, whether the UNet input is detached and where
sampling stops, what is rewarded and how the loss is built, and passes those choices in as knobs.
"""

import contextlib
import io
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices at import
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
import tyro
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The default `--model` of every script, kept in this one place: the toy world's trained Stable Diffusion
# (toyworld/: 32x32 coloured shapes, text encoder = the toy CLIP's text tower; committed, 4.8 MB).
TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "sd"
# A random-weight tiny Stable Diffusion built offline in a second: the mechanics without meaning (tests).
EMBEDDED_MODEL = "embedded-tiny-sd"
EMBEDDED_RESOLUTION = 32  # the embedded model's native image size (VAE factor 2 -> 16x16 latents)
PROMPT_SETS = {p.stem: p for p in sorted((Path(__file__).parent / "prompts").glob("*.txt"))}
EVAL_SEED = 1234  # eval noise is fixed across methods and training seeds, so runs compare like for like
# One evaluation for every script, so that methods compare on one footing: deterministic DDIM (eta 0) with this
# T and guidance scale (--eval-num-steps / --eval-guidance-scale 0 take them), --eval-size fixed prompts
# (eval_prompts) and fixed noise (EVAL_SEED). The toy world's values, then Stable Diffusion's (the papers' T 50, w 7.5).
EVAL_PROTOCOL = {"toy": {"num_steps": 20, "guidance_scale": 5.0}, "sd": {"num_steps": 50, "guidance_scale": 7.5}}
# Attention projections (what the public implementations train) and the ResNet 3x3 convolutions: the toy
# UNet has no attention at full latent resolution, and without the convs LoRA can hardly move a shape.
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"
REAL_CLIP = "openai/clip-vit-large-patch14"  # `--clip-model auto` for any model but the toy one
diffusers_logging.disable_progress_bar()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fail(message: str):
    """Stop on bad user input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Loading Stable Diffusion
# ---------------------------------------------------------------------------------------------


def build_embedded_pipeline(path: str):
    """Write the embedded tiny Stable Diffusion (random weights, fixed seed) in diffusers format."""
    # A byte-level BPE vocabulary with no merges: every character is a token, so no file is downloaded.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    codepoints, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codepoints.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codepoints]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(
        sample_size=EMBEDDED_RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=EMBEDDED_RESOLUTION)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name: str, flag: str, marker: str, what: str, example: str) -> str:
    """Check a pretrained-model flag without loading: a local folder holding `marker`, or a hub id that is
    cached or reachable. Returns what `from_pretrained` should be given."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            fail(f"{flag} {name}: no {marker} there; expected {what}")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        fail(f"{flag} {name}: no such directory; pass {what} or a hub id such as {example}")
    from huggingface_hub import snapshot_download

    try:  # already in the local Hugging Face cache?
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        fail(f"{flag} {name}: not in the local Hugging Face cache and the Hub cannot be reached; download it "
             f"where there is network (`hf download {name}`) or pass its local directory")
    return name


# The pipelines --model may name (model_index.json's _class_name), and what each is loaded with.
PIPELINES = {"StableDiffusionPipeline": (StableDiffusionPipeline, {"safety_checker": None,
                                                                  "requires_safety_checker": False}),
             "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, {"add_watermarker": False})}


def resolve_model(model: str) -> str:
    """Check `--model` without loading it: the toy model, the embedded one, a local folder or a hub id of a
    Stable Diffusion 1.x/2.x or XL pipeline."""
    if model == EMBEDDED_MODEL:
        return model
    if model == TOY_MODEL:
        return str(TOY_MODEL_DIR)
    source = resolve_pretrained(model, "--model", "model_index.json",
                                "a diffusers Stable Diffusion (1.x, 2.x or XL) folder (save_pretrained or a hub "
                                f"snapshot; default: {TOY_MODEL})", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    index = Path(source) / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if index.is_file() and kind not in PIPELINES:
        fail(f"--model {model} is a {kind}; the scripts take {' or '.join(PIPELINES)}")
    return source


def resolve_vae(name: str) -> str:
    """Check `--vae`: an AutoencoderKL folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    return resolve_pretrained(name, "--vae", "config.json", "a diffusers AutoencoderKL folder",
                              "madebyollin/sdxl-vae-fp16-fix")


def resolve_clip(name: str) -> str:
    """Check `--clip-model`: `toy` (the toy world's CLIP), a local CLIPModel folder or a hub id."""
    import rewards

    if name == TOY_MODEL:
        return rewards.TOY_CLIP
    return resolve_pretrained(name, "--clip-model", "config.json", "a transformers CLIPModel folder",
                              "openai/clip-vit-large-patch14")


def reward_options(args) -> dict:
    return {"clip_model": args.clip_model, "clip_weight": args.clip_weight, "reward_model": args.reward_model,
            "reward_query": args.reward_query}


def reward_function(args, device="cpu", dtype=torch.float32):
    """The `--reward` function (rewards.make: a reward, a weighted sum, a user's module:function), its models
    loaded once, on the run's device; each image scored counts in COMPUTE."""
    import rewards

    fn, _ = rewards.make(args.reward, **reward_options(args), device=device, dtype=dtype)

    def reward(images, prompts):
        count("reward_evals", len(images))
        return fn(images, prompts)

    return reward


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu", vae: str = ""):
    """Stable Diffusion 1.x/2.x or XL from a hub id, a local folder or the embedded tiny model; the pipeline class
    is the one its model_index.json names. Every component frozen (LoRA adds the trainable part to the UNet); the
    DDIM scheduler built from the model's own betas and prediction type (epsilon or v); `vae` replaces its VAE.
    """
    source = resolve_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        if source == EMBEDDED_MODEL:  # built to disk, then loaded through the same path as any model
            build_embedded_pipeline(tmp)
            source = tmp
        cls, options = PIPELINES[DiffusionPipeline.load_config(source)["_class_name"]]
        if vae:
            options = options | {"vae": AutoencoderKL.from_pretrained(resolve_vae(vae), dtype=dtype)}
        pipe = cls.from_pretrained(source, dtype=dtype, **options)
    # No clipping of x0 (DDIM's default where a config does not say, e.g. SDXL's Euler one): latents are not in [-1, 1],
    # and ddim_step_with_logprob never clips.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast"):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (decode upcasts to the VAE's dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.unet.pixels_per_latent = pipe.vae_scale_factor  # SDXL's time ids are in pixels (unet_output)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_lora(unet, rank: int, alpha: float | None = None, targets: str = LORA_TARGETS, init: str = ""):
    """LoRA on the UNet layers whose names end in one of `targets` (comma-separated), its weights from the
    saved LoRA `init` if given; returns the trainable parameters (kept in fp32). The pretrained model is the
    same UNet under `unet.disable_adapters()`: no copy.
    """
    names = [t.strip() for t in targets.split(",") if t.strip()]
    layers = [n for n, _ in unet.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in layers)]
    if not names or missing:
        fail(f"--lora-targets {targets!r}: no UNet layer named {', '.join(missing) or '(empty)'} "
             f"(e.g. {LORA_TARGETS})")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=names)
    unet.add_adapter(config)
    if init:
        load_lora(unet, init)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


# Where diffusers (>= 0.35) keeps a LoRA's adapter config in the safetensors header: JSON, its keys prefixed by the
# component (unet.r, unet.lora_alpha, ...); load_lora_weights builds the LoraConfig from it.
LORA_METADATA_KEY = "lora_adapter_metadata"


def save_lora(unet, run_dir):
    """Write `pytorch_lora_weights.safetensors` (atomically) so `pipe.load_lora_weights(run_dir)` loads it, at the
    scale it was trained with."""
    from safetensors.torch import save

    # PEFT key names under unet.: what save_lora_weights writes, and what the SD and SDXL pipelines both load
    lora = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    config = unet.peft_config["default"]
    # Without its alpha in the file, load_lora_weights takes alpha = rank: a run with any other --lora-alpha would
    # draw other pictures than it trained on. Only the fields that shape the adapter, so any peft can build the
    # config; written here rather than by save_lora_weights, whose metadata argument diffusers < 0.35 lacks.
    adapter = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    header = {"format": "pt", LORA_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in adapter.items()})}
    data = save(lora, metadata=header)
    write_atomic(Path(run_dir) / "pytorch_lora_weights.safetensors", lambda f: f.write(data))


def _read_lora(path: str, what: str) -> tuple[dict, float | None]:
    """A run directory (its pytorch_lora_weights.safetensors) or a diffusers LoRA file -> (UNet LoRA weights under
    PEFT names without the adapter name, e.g. `...attn1.to_q.lora_A.weight`; the alpha it records, or None)."""
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
        alpha = metadata.get("unet.lora_alpha")
        alpha = None if alpha is None else float(alpha)
    except Exception as e:
        fail(f"{what} {path}: not a LoRA file diffusers can read ({type(e).__name__})")
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet:
        fail(f"{what} {path}: holds no UNet LoRA weights")
    return convert_unet_state_dict_to_peft(unet), alpha


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
    state, saved_alpha = _read_lora(path, what)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    layers = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    kinds = {".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in layers}
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
    state, saved_alpha = _read_lora(path, what)
    expected = {n.replace(".default.", ".") for n, p in unet.named_parameters() if p.requires_grad}
    if set(state) != expected:
        fail(f"{what} {path}: its LoRA layers differ from this run's ({len(state)} tensors, expected {len(expected)})")
    config = unet.peft_config["default"]
    _check_alpha(path, saved_alpha, config.r, config.lora_alpha, what)
    set_peft_model_state_dict(unet, {k: v.float() for k, v in state.items()}, adapter_name="default")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]):
    """The text conditioning, one tensor (B, tokens, width) that every script can batch, index and repeat. SDXL's
    pooled embedding (its second text encoder's) rides along as one more token, zero-padded; unet_output splits it
    off again. An all-empty batch under SDXL's force_zeros_for_empty_prompt is zeros, as its pipeline makes it."""
    if not isinstance(pipe, StableDiffusionXLPipeline):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=pipe.unet.device, do_classifier_free_guidance=False)
    if pipe.config.force_zeros_for_empty_prompt and not any(prompts):
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return torch.cat([embeds, F.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))[:, None]], dim=1)


def decode(vae, latents, checkpoint: bool = False):
    """Latents -> images (N,3,H,W) in [0,1], float32, differentiable (optionally checkpointed).

    The clamp to [0,1] passes its gradient straight through: a plain clamp has zero gradient on saturated
    pixels (the toy world's white and black backgrounds), so a reward could push a picture into saturation
    and nothing, not even the CLIP regulariser, could pull it back.
    """
    count("vae_decodes", len(latents))
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if checkpoint and torch.is_grad_enabled():
        images = torch.utils.checkpoint.checkpoint(lambda z: vae.decode(z).sample, z, use_reentrant=False)
    else:
        images = vae.decode(z).sample
    images = images.float() / 2 + 0.5
    return images + (images.clamp(0, 1) - images).detach()  # forward: clamp; backward: identity


@torch.no_grad()
def encode_images(vae, images):
    """Images (N,3,H,W) in [0,1] -> scaled VAE latents (for denoising losses on real or sampled images)."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    return dist.sample().float() * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# The DDIM step with log-probability, and the rollout
# ---------------------------------------------------------------------------------------------


def unet_output(unet, latents, t, cond, uncond=None, guidance_scale: float = 1.0):
    """The (guided) UNet output in fp32; cond and uncond go through one batched call. Counted in COMPUTE:
    image-steps forward when called (a checkpointed call again when recomputed), backward when a gradient
    reaches the output."""
    guided = uncond is not None and guidance_scale != 1.0
    count("unet_forwards", len(latents) * (2 if guided else 1))
    if not guided:
        return _count_backward(_unet(unet, latents.to(unet.dtype), t, cond.to(unet.dtype))).float()
    if torch.is_tensor(t) and t.ndim == 1:  # one timestep per row: the doubled batch needs them twice
        t = torch.cat([t, t])
    out = _unet(unet, torch.cat([latents, latents]).to(unet.dtype), t, torch.cat([uncond, cond]).to(unet.dtype))
    out_uncond, out_cond = _count_backward(out).float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def _unet(unet, latents, t, cond):
    """One UNet call. SDXL's takes two added conditions: the pooled text embedding (cond's last token, see
    encode_prompts) and the time ids (original size, crop corner, target size: the image's size, no crop)."""
    if unet.config.addition_embed_type != "text_time":
        return unet(latents, t, cond).sample
    pooled = cond[:, -1, :unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim]
    h, w = (side * unet.pixels_per_latent for side in latents.shape[-2:])
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond.dtype, device=cond.device).expand(len(latents), 6)
    return unet(latents, t, cond[:, :-1], added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def _count_backward(sample):
    if sample.requires_grad and _counting[0]:
        sample.register_hook(lambda grad: count("unet_backwards", len(grad)))
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


def predict_x0(scheduler, model_output, t, sample):
    """(x0 prediction, epsilon prediction) from the UNet output, for epsilon, v or sample prediction."""
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

    The log-prob is the Gaussian density of `prev_sample` (drawn here if not given), averaged over the
    latent dimensions, shape (B,). Mean, not sum, as in the DDPO code: a sum over 16k dims turns a
    per-dim ratio of 1.01 into 1e70. Gradient flows through the mean only (prev_sample is a constant).
    A step with zero noise (eta = 0, or the last step of a scheduler with set_alpha_to_one) has no
    density; its log-prob is reported as 0.
    """
    a_t, a_prev = _alpha_bars(scheduler, t, sample.device)
    x0, eps = predict_x0(scheduler, model_output, t, sample)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean + std * randn(sample.shape, sample.device, sample.dtype, generator)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2) - safe_std.log()
                - math.log(math.sqrt(2 * math.pi)))
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


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
    """Sample with DDIM from x_T = `latents`; the knobs say where gradient flows.

    grad_steps: step indices (0 = first, noisiest step) whose UNet call carries gradient; the others run
        under no_grad, but the latent chain after the first gradient step stays differentiable, so
        gradient still reaches earlier trained steps through the linear part of the DDIM update.
    stop_grad_input: feed sg(x_t) to the UNet (DRTune eq. 3).
    stop_step: stop at this step index and return the x0 prediction made there (ReFL, DRTune).
    checkpoint: recompute each differentiable UNet call in backward, so activation memory is O(1) in T.
    record: keep latents, timesteps and log-probs (for the RL methods).
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=latents.device)
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
            x, log_prob = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=generator)
        if record:
            result.latents.append(x.detach())
            result.log_probs.append(log_prob.detach())
            result.timesteps.append(t)
    result.output = x
    return result


def initial_latents(pipe, batch_size: int, resolution: int, generator=None):
    """x_T for `batch_size` images (this rank's share of the global batch, unless a generator is given)."""
    shape = (batch_size, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor,
             resolution // pipe.vae_scale_factor)
    return randn(shape, pipe.unet.device, torch.float32, generator)


# ---------------------------------------------------------------------------------------------
# Data parallel: the same script under torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK)
# ---------------------------------------------------------------------------------------------
# Every rank draws the same random numbers, and every draw for a batch is made for the global batch, of which
# a rank keeps its share (shard): N ranks with --batch-size B compute what one process with N * B would, every
# scalar choice (DRTune's steps, a truncation point) is the same on all ranks, and rank 0's random state is
# every rank's (one checkpoint resumes them all). Gradients are averaged before clipping; rank 0 evaluates,
# logs and saves, with no collective inside what only it runs.

RANK, WORLD = 0, 1


def init_distributed(device: str) -> str:
    """Read torchrun's rank and world size; returns this rank's device (under torchrun on GPUs, its own)."""
    global RANK, WORLD
    RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if WORLD > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def join_process_group(device):
    """NCCL on GPUs, gloo on CPUs. After the models are loaded: transformers' save_pretrained writes only on rank 0
    of an initialised group, and the embedded model is built by saving it."""
    if WORLD > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))


def shard(batch):
    """This rank's share of a global batch (a tensor or a list, its length a multiple of WORLD)."""
    n = len(batch) // WORLD
    return batch[RANK * n:(RANK + 1) * n]


def choices(population, k: int) -> list:
    """k draws with replacement for this rank: its share of the global batch's k * WORLD."""
    return shard(random.choices(population, k=k * WORLD))


def randn(shape, device, dtype=torch.float32, generator=None):
    """Gaussian noise for this rank's share of a global batch (shape[0] per rank); with a generator (the
    evaluation's, on rank 0 alone) exactly what it asks for."""
    if generator is not None:
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
    return shard(torch.randn((shape[0] * WORLD, *shape[1:]), dtype=dtype)).to(device)


def randint(high: int, n: int, device):
    """n random integers in [0, high) for this rank's share of a global batch of n per rank."""
    return shard(torch.randint(0, high, (n * WORLD,))).to(device)


def gather(tensor):
    """All ranks' tensors concatenated along dim 0, in rank order, on every rank (the global batch)."""
    if WORLD == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_gradients(params):
    """Average the LoRA gradients over the ranks (one flat all-reduce), before clipping: every rank then
    takes the same step and holds the same weights (ddpo-pytorch #10: LoRA gradients never synchronised)."""
    if WORLD == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= WORLD
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def mean_over_ranks(value: float) -> float:
    """The mean of a logged number over the ranks (each has its own share of the batch)."""
    if WORLD == 1:
        return float(value)
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / WORLD


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one (a decision all ranks must take together)."""
    if WORLD == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if WORLD == 1:
        return [obj]
    import torch.distributed as dist

    objects = [None] * WORLD
    dist.all_gather_object(objects, obj)
    return objects


def lora_digest(lora: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(lora):
        digest.update(name.encode() + lora[name].float().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Compute: a machine-independent count of the work a run has done (its budget unit)
# ---------------------------------------------------------------------------------------------

# Cumulative over a run (and restored on resume): UNet image-steps forward and backward (a CFG call counts
# both halves; a checkpointed call's recomputation counts as another forward), VAE decodes and images scored.
# Evaluation is not counted: it measures a run and is the same for every method.
COMPUTE = {"unet_forwards": 0, "unet_backwards": 0, "vae_decodes": 0, "reward_evals": 0}
_counting = [True]


def count(kind: str, n: int):
    if _counting[0]:
        COMPUTE[kind] += n


def compute_units() -> float:
    """The budget unit: UNet passes, a backward counted as two forwards (about its FLOPs), of all ranks (each
    does the same work on its share of the batch)."""
    return (COMPUTE["unet_forwards"] + 2 * COMPUTE["unet_backwards"]) * WORLD


class uncounted:
    """Leave evaluation out of the compute count."""

    def __enter__(self):
        self.previous, _counting[0] = _counting[0], False

    def __exit__(self, *exc):
        _counting[0] = self.previous


# ---------------------------------------------------------------------------------------------
# Prompts and the checks every script shares (all before any work)
# ---------------------------------------------------------------------------------------------


def load_prompts(spec: str) -> list[str]:
    """A prompt set name (a file in prompts/) or a UTF-8 text file with one prompt per line."""
    path = PROMPT_SETS.get(spec, Path(spec).expanduser())
    if not path.is_file():
        fail(f"--prompts {spec}: neither a prompt set ({', '.join(PROMPT_SETS)}) nor a text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        fail(f"--prompts {spec}: cannot be read ({e.strerror})")
    except UnicodeDecodeError:
        fail(f"--prompts {spec}: not a UTF-8 text file (one prompt per line)")
    if "\x00" in text:
        fail(f"--prompts {spec}: a binary file, not text (one prompt per line)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"--prompts {spec}: the file has no prompts")
    return prompts


def eval_prompts(spec: str, prompts: list[str], n: int) -> list[str]:
    """n fixed evaluation prompts: the set's held-out companion `<set>_eval` if there is one (toy ->
    toy_eval), else an evenly spread subset of the training prompts; cycled when there are fewer than n."""
    if f"{spec}_eval" in PROMPT_SETS:
        prompts = load_prompts(f"{spec}_eval")
    return [prompts[(i * len(prompts)) // n % len(prompts)] if n <= len(prompts) else prompts[i % len(prompts)]
            for i in range(n)]


def default_prompts(spec: str) -> str:
    """The prompt set `--prompts auto` takes for a real model: the reward's own (REWARDS' third column; in a sum,
    its first term's), general for a user's reward."""
    import rewards

    names = [name for _, name in rewards.parse(spec) if name in rewards.REWARDS]
    return rewards.REWARDS[names[0]][2] if names else "general"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_writable_dir(path: str, what: str):
    """A directory that is, or can be created as, a writable folder; probed by writing a file (root ignores modes)."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        fail(f"{what} {path} is a file, not a directory")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{what} {path}: {parent} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        fail(f"{what} {path}: {parent} is not writable ({e.strerror})")


def check_common_args(args, differentiable: bool):
    """Validate the flags every script shares, before any work; returns the prompt list."""
    import rewards

    for f in fields(args):  # tyro parses nan and inf; no flag of ours means either
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(f.name)} must be a finite number (got {value})")
    for name in ("batch_size", "iters", "num_steps", "lora_rank"):
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be at least 1 (got {getattr(args, name)})")
    for name in ("seed", "threads", "save_every", "eval_every", "lora_alpha", "weight_decay", "budget",
                 "budget_seconds", "clip_weight", "eval_num_steps", "eval_guidance_scale"):
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative (got {getattr(args, name)})")
    if args.seed > 2**32 - 1:  # numpy's generator takes no larger seed
        fail(f"--seed must be at most {2**32 - 1} (got {args.seed})")
    if args.resolution < 0 or args.resolution % 8:
        fail(f"--resolution must be a positive multiple of 8, or 0 for the model's own size (got {args.resolution})")
    for name in ("lr", "grad_clip", "progress_every"):
        if getattr(args, name) <= 0:
            fail(f"{flag(name)} must be positive (got {getattr(args, name)})")
    if args.lr > 1:  # AdamW moves each weight by about lr per step: above 1 it only destroys the model
        fail(f"--lr must be at most 1 (got {args.lr})")
    if not 0 <= args.eta <= 1:
        fail(f"--eta must be in [0, 1]: 0 is deterministic DDIM, 1 DDPM-like (got {args.eta})")
    if args.dtype not in ("auto", "fp32", "bf16", "fp16"):
        fail(f"--dtype must be auto, fp32, bf16 or fp16 (got {args.dtype})")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        fail(f"--device must be auto, cpu, cuda or cuda:N (got {args.device})")
    if args.eval_size < 2:
        fail(f"--eval-size must be at least 2 (the eval reward's std needs two images; got {args.eval_size})")
    # `auto` follows the model: the toy world's CLIP and captions for the toy model (and the embedded one),
    # a real CLIP and the reward's prompt set for Stable Diffusion; resolved here, so args.json records them.
    toy = args.model in (TOY_MODEL, EMBEDDED_MODEL) or Path(args.model).expanduser().resolve() == TOY_MODEL_DIR
    if args.clip_model == "auto":
        args.clip_model = TOY_MODEL if toy else REAL_CLIP
    protocol = EVAL_PROTOCOL["toy" if toy else "sd"]
    args.eval_num_steps = args.eval_num_steps or protocol["num_steps"]
    args.eval_guidance_scale = args.eval_guidance_scale or protocol["guidance_scale"]
    if args.prompts == "auto":
        args.prompts = "toy" if toy else default_prompts(args.reward)
    if not toy and (args.clip_model == TOY_MODEL or Path(args.clip_model).resolve() == Path(rewards.TOY_CLIP)):
        fail(f"--clip-model {args.clip_model} is the toy world's CLIP; with --model {args.model} use a real one "
             f"(auto = {REAL_CLIP})")
    if not toy and args.prompts in ("toy", "toy_eval"):
        fail(f"--prompts {args.prompts} are the toy world's captions; with --model {args.model} use a set that suits "
             f"it (auto = the reward's: {default_prompts(args.reward)})")
    resolve_model(args.model)
    if args.vae:
        resolve_vae(args.vae)
    # Every model the reward needs is found (local, cached, or a reachable Hub) now, none loaded yet.
    if not rewards.check(args.reward, **reward_options(args)) and differentiable:
        fail(f"--reward {args.reward} is not differentiable; this method needs one of "
             f"{', '.join(n for n, entry in rewards.REWARDS.items() if entry[1])} (or a user reward whose function "
             "has the attribute differentiable = True)")
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 alone reads and writes the run directory
        pass
    elif args.resume:
        check_checkpoint(args.resume, args.iters)
    else:
        check_writable_dir(args.run_dir or "runs", "--run-dir")
        if args.run_dir and (Path(args.run_dir) / "metrics.jsonl").exists():
            fail(f"--run-dir {args.run_dir} already holds a run (metrics.jsonl); choose another directory, "
                 f"or continue it with --resume {args.run_dir}")
    if args.init_lora:
        check_lora_file(args.init_lora, args.lora_rank, args.lora_targets, "--init-lora",
                        alpha=args.lora_alpha or args.lora_rank)
    return load_prompts(args.prompts)


# ---------------------------------------------------------------------------------------------
# The command line: tyro with one-line errors; --config reruns a run, --resume continues one
# ---------------------------------------------------------------------------------------------

# What a resumed run may change: how long it runs, how often it evaluates, saves and reports, and where it
# runs. Everything else would make the continuation a different run from the one that was started.
RESUME_MAY_CHANGE = {"iters", "eval_every", "save_every", "progress_every", "budget", "budget_seconds", "device",
                     "threads", "resume", "config", "run_dir"}


def _flag_value(argv, name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def _one_line(box: str) -> str:
    """tyro's error box -> its message on one line (the box's lines up to its first rule, joined)."""
    lines = [line.strip().strip("│").strip() for line in box.splitlines()]
    content = [line for line in lines if line and not set(line) <= set("╭╮╰╯─ ")][:]
    message = []
    for line in lines[1:]:
        if not line or set(line) <= set("─╭╮╰╯ "):
            if message:
                break
            continue
        message.append(line)
    return " ".join(message or content[-1:] or ["could not parse the command line"])


def cli(Args, argv=None, default=None, prog=None):
    """tyro.cli, its parse errors as one line (exit status 2); --help as tyro prints it."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv, default=default, prog=prog)
    except SystemExit as stop:
        if stop.code not in (0, None):
            fail(_one_line(captured.getvalue()))
        sys.stderr.write(captured.getvalue())
        raise


def read_args_json(path: Path, Args, script: str, what: str):
    """A run's args.json -> an Args instance (the defaults of a --config or --resume parse)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{what}: cannot read {path} as a run's args.json ({type(e).__name__})")
    made_by = saved.get("_meta", {}).get("script") if isinstance(saved, dict) else None
    if made_by != script:
        fail(f"{what}: {path} was written by {made_by or 'something else'}, not {script}")
    known = {f.name: f for f in fields(Args)}
    unknown = sorted(set(saved) - set(known) - {"_meta"})
    if unknown:
        fail(f"{what}: {path} has settings {script} does not know ({', '.join(unknown)})")
    values = {k: tuple(v) if isinstance(getattr(Args(), k), tuple) else v for k, v in saved.items() if k in known}
    return Args(**values)


def parse_args(Args, script_file: str):
    """The script's Args from the command line. `--config RUN_DIR/args.json` takes a finished run's settings
    as the defaults (a rerun; flags given override them); `--resume RUN_DIR` does so for the run to continue
    and refuses any flag that would change what it computes (RESUME_MAY_CHANGE lists the ones allowed)."""
    script, argv = Path(script_file).name, sys.argv[1:]
    resume, config = _flag_value(argv, "--resume"), _flag_value(argv, "--config")
    if resume and config:
        fail("--resume continues a run with its own settings; it takes no --config")
    run_dir = _flag_value(argv, "--run-dir")
    if resume and run_dir and Path(run_dir).expanduser().resolve() != Path(resume).expanduser().resolve():
        fail(f"--resume {resume} continues the run in its own directory; it takes no --run-dir (got {run_dir}): "
             f"to rerun its settings elsewhere, pass --config {Path(resume) / 'args.json'} --run-dir {run_dir}")
    default = Args()
    if resume:
        default = read_args_json(Path(resume) / "args.json", Args, script, f"--resume {resume}")
    elif config:
        default = read_args_json(Path(config), Args, script, f"--config {config}")
        default.run_dir = ""  # a rerun gets a run directory of its own
    default.resume, default.config = "", ""
    args = cli(Args, argv, default, script)
    if resume:
        changed = [f.name for f in fields(Args)
                   if f.name not in RESUME_MAY_CHANGE and getattr(args, f.name) != getattr(default, f.name)]
        if changed:
            fail(f"--resume {resume}: {', '.join(f'{flag(n)} {getattr(args, n)}' for n in changed)} would change "
                 f"the run (it was {', '.join(str(getattr(default, n)) for n in changed)}); a resume may change only "
                 f"{', '.join(flag(n) for n in sorted(RESUME_MAY_CHANGE - {'resume', 'config', 'run_dir'}))}")
        args.run_dir = resume
    return args


# ---------------------------------------------------------------------------------------------
# Seeding, devices, evaluation, grids
# ---------------------------------------------------------------------------------------------


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_device(device: str, dtype: str, threads: int):
    """Resolve `auto` device/dtype (bf16 frozen weights on a GPU, fp32 on the CPU); join the process group when
    launched by torchrun (each rank on its own GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    device = init_distributed(device)
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if device == "cpu" and threads > 0:
        # Measured on 2 cores: with anything else running, torch's default threading made an iteration
        # of the tiny model 4-80x slower than one thread; alone, two threads gain only ~1.4x. Ranks on one
        # machine share its cores: 2 ranks x 2 threads on 2 cores ran 10x slower than 2 x 1.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) // local_ranks)))
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


@torch.no_grad()
def evaluate(pipe, prompts, reward_fn, *, num_steps, guidance_scale, resolution, eta=0.0, batch_size=16):
    """Full T-step DDIM sampling (deterministic: eta 0) on fixed prompts and fixed noise (the DDIM noise too,
    with eta > 0): (rewards, images). Not part of the run's compute count."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    uncond_one = encode_prompts(pipe, [""])
    rewards, images = [], []
    with uncounted():
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


def save_grid(images, path, ncols: int = 8):
    images = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = images.shape
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[(i // ncols) * h:(i // ncols + 1) * h, (i % ncols) * w:(i % ncols + 1) * w] = image
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------
# The run directory: metrics, checkpoints, resume, the NaN guard, Ctrl-C, progress
# ---------------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"


def umask() -> int:
    """The process's umask, read without changing it where the system allows (os.umask can only set it, and
    setting it even for an instant races any thread creating a file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write):
    """write(file) into a temporary file beside `path`, flushed to disk, then renamed over it: a kill at any
    instant leaves either the old file or the new one, whole. The file gets the mode a plain open() would give
    (mkstemp's is 0600: nobody else could read a run's args.json or checkpoint)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir, mmap: bool = False) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file() or not (Path(run_dir) / "args.json").is_file():
        fail(f"--resume {run_dir}: no {CHECKPOINT} and args.json there (a run directory written by a script)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged file: say so in one line
        fail(f"--resume {run_dir}: {CHECKPOINT} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def check_checkpoint(run_dir: str, iters: int):
    """--resume: a loadable checkpoint (memory-mapped: a quick look) with something left to do, or none at all
    beside args.json (a run stopped before its first checkpoint starts again from iteration 0)."""
    if not (Path(run_dir) / CHECKPOINT).exists() and (Path(run_dir) / "args.json").is_file():
        return
    checkpoint = load_checkpoint(run_dir, mmap=True)
    done = checkpoint["iter"]
    if done >= iters and any(r.get("final") for r in checkpoint["rows"]):
        print(f"{run_dir} has run its {done} iterations; pass --iters above {done} to continue it", file=sys.stderr)
        raise SystemExit(0)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_metadata(script: str, device) -> dict:
    """What args.json records besides the flags: the script, package versions, the git commit, the device."""
    import diffusers
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = commit and bool(subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain",
                                                "--untracked-files=no"], capture_output=True, text=True,
                                               timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    device = torch.device(device)
    return {"script": script, "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "git_commit": commit,
            "git_dirty": dirty, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__}}


def new_run_dir(name: str, reward: str, seed: int) -> Path:
    """A new runs/<name>__<reward>__<seed>__<time>, created exclusively: two runs started in the same second
    never share one."""
    reward = "".join(c if c.isalnum() or c in "._-" else "-" for c in reward)
    base = f"runs/{name}__{reward}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1000):
        path = Path(base + (f"-{k}" if k else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    fail(f"cannot create a new run directory {base}")


class Run:
    """The run directory and the loop's bookkeeping, the same for every script.

    RUN_DIR holds args.json (the flags, and `_meta`: script, command, package versions, git commit, device,
    ranks), metrics.jsonl (one row per iteration), eval grids, pytorch_lora_weights.safetensors and checkpoint.pt
    (LoRA, optimizer, RNG states, the method's `state`, the metrics so far, the compute count), both rewritten
    atomically every --save-every iterations, at the end and when stopped by Ctrl-C or SIGTERM. With --resume
    the loop continues from the checkpoint as the uninterrupted run would have (bitwise on the CPU). `state`
    is the method's own state between iterations, as plain data (e.g. DDPO's per-prompt reward buffers).
    Under torchrun every rank keeps the same rows, state and weights; rank 0 alone writes, evaluates and reports.
    """

    def __init__(self, script_file: str, args, unet, optimizer, device, name: str = "", state: dict | None = None):
        self.script, self.name = Path(script_file).name, name or Path(script_file).stem
        self.args, self.unet, self.optimizer = args, unet, optimizer
        self.state = {} if state is None else state
        self.rows, self.start_iter, self.saved_iter, self.rng = [], 0, None, None
        self.elapsed_before = self.eval_seconds = 0.0
        self.interrupted, self.finishing, self.lead = False, False, RANK == 0
        self.budget_reason, self.signal_handlers = "", {}
        join_process_group(device)
        COMPUTE.update(dict.fromkeys(COMPUTE, 0))  # a run counts from zero (or from its checkpoint)
        if args.resume:
            self.dir = Path(args.resume)
            self._restore()
        else:
            self.dir = self._new_dir(args.run_dir) if self.lead else None
            args.run_dir = str(self.dir)
        self.next_iter = self.start_iter
        self.start = self.last_progress = time.time()
        self.cuda = torch.device(device).type == "cuda"
        self.tty, self.tb, self.bar = sys.stderr.isatty(), None, None
        if not self.lead:
            return
        meta = run_metadata(self.script, device) | {"resumed_at": self.start_iter, "ranks": WORLD,
                                                   "global_batch": args.batch_size * WORLD * max(1, args.grad_accum)}
        settings = asdict(args) | {"_meta": meta}
        write_atomic(self.dir / "args.json", lambda f: f.write(json.dumps(settings, indent=2, default=str).encode()))
        self.metrics = open(self.dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir), purge_step=self.start_iter)
        except Exception:  # TensorBoard is optional
            self.tb = None
        from tqdm import tqdm

        self.bar = tqdm(total=args.iters, initial=self.start_iter, desc=self.dir.name, disable=not self.tty)
        if WORLD > 1:
            print(f"{self.name}: {WORLD} ranks, global batch {meta['global_batch']} (batch {args.batch_size} x "
                  f"{WORLD} ranks x grad-accum {max(1, args.grad_accum)})", file=sys.stderr, flush=True)

    def _new_dir(self, run_dir: str) -> Path:
        if not run_dir:
            return new_run_dir(self.name, self.args.reward, self.args.seed)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return Path(run_dir)

    def _restore(self):
        # Killed (or stopped by a failing reward) before its first checkpoint, a run has nothing to restore: it
        # starts again from iteration 0 with its saved settings, which is what it did the first time.
        saved = self.lead and (self.dir / CHECKPOINT).exists()
        checkpoint = load_checkpoint(self.dir) if saved else None
        if WORLD > 1:  # rank 0 reads it and hands it on: no other node needs to see the run directory
            import torch.distributed as dist

            box = [checkpoint]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
        if checkpoint is None:
            if self.lead:  # its rows belong to iterations that will run again
                write_atomic(self.dir / "metrics.jsonl", lambda f: None)
            return
        if checkpoint.get("ranks", 1) != WORLD:
            fail(f"--resume {self.dir}: it ran on {checkpoint.get('ranks', 1)} ranks, now {WORLD}: the global batch "
                 "would change the run")
        params = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        if set(params) != set(checkpoint["lora"]):
            fail(f"--resume {self.dir}: the checkpoint's LoRA has other layers than this run's")
        with torch.no_grad():
            for n, value in checkpoint["lora"].items():
                params[n].copy_(value)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state.update(checkpoint["state"])
        # A final evaluation row ends a finished run; continuing it (a larger --iters), the loop takes over.
        self.rows = [r for r in checkpoint["rows"] if not r.get("final") or checkpoint["iter"] >= self.args.iters]
        self.start_iter, self.saved_iter, self.rng = checkpoint["iter"], checkpoint["iter"], checkpoint["rng"]
        self.elapsed_before, self.eval_seconds = checkpoint["elapsed"], checkpoint["eval_seconds"]
        COMPUTE.update(checkpoint["compute"])
        if self.lead:  # rows logged after the checkpoint belong to iterations that will run again: drop them
            write_atomic(self.dir / "metrics.jsonl",
                         lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.rows).encode()))

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def last(self, key: str, default=0):
        """A value of the last logged row (e.g. samples_seen when resuming), else `default`."""
        return self.rows[-1].get(key, default) if self.rows else default

    def iterations(self):
        """The loop: iterations from the resumed one to --iters. After each, a checkpoint every --save-every;
        it stops early, checkpointed, on Ctrl-C / SIGTERM or once the budget is spent."""
        if self.rng is not None:  # last, after all of setup: the stream continues where the checkpoint left it
            set_rng_state(self.rng)
        # Under torchrun a signal means teardown (the agent stops every rank): no rank waits for the others.
        # Otherwise the signals stay ours until the run is closed: a graceful stop still writes its checkpoint
        # after the loop, and a second Ctrl-C there must end as cleanly as one during an iteration.
        if WORLD == 1 and threading.current_thread() is threading.main_thread():
            self.signal_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for it in range(self.start_iter, self.args.iters):
                yield it
                self.next_iter = it + 1
                if self.interrupted:
                    break
                self.budget_reason = self.budget_spent()
                if self.budget_reason:
                    break
                if self.args.save_every and self.next_iter % self.args.save_every == 0:
                    self.save()
        except BaseException:  # the loop died (or was abandoned): finish() will not run to hand the signals back
            self._release_signals()
            raise

    def _release_signals(self):
        for s, handler in self.signal_handlers.items():
            signal.signal(s, handler)
        self.signal_handlers = {}

    def _resume_hint(self) -> str:
        return f"continue with: python {self.script} --resume {self.dir}"

    def _kept(self, what: str = "the last checkpoint") -> str:
        if self.saved_iter is None:
            return f"no checkpoint had been written yet in {self.dir}"
        return f"{what} (after {plural(self.saved_iter, 'iteration')}) is in {self.dir}"

    def _on_signal(self, signum, frame):
        if self.interrupted:
            # The second time: stop at once. Whatever was being written is written aside and renamed over the old
            # file, so the last checkpoint stays whole; SystemExit (not KeyboardInterrupt) unwinds without a traceback.
            self._release_signals()
            print(f"\n{self.name}: stopped at once; {self._kept()}; {self._resume_hint()}", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.interrupted = True
        doing = "writing the final evaluation and checkpoint" if self.finishing else \
            "stopping after this iteration, with a checkpoint"
        print(f"\n{self.name}: {doing} (again to stop at once)", file=sys.stderr, flush=True)

    def budget_spent(self) -> str:
        """Why the run has spent its budget ('' while it has not): --budget (compute units, see compute_units) or
        --budget-seconds (training time: evaluation left out); 0 = no limit. Every rank decides alike."""
        seconds = self.args.budget_seconds and self.elapsed() - self.eval_seconds >= self.args.budget_seconds
        if self.args.budget and compute_units() >= self.args.budget:
            return f"--budget {self.args.budget:g} reached"
        if any_rank(bool(seconds)):
            return f"--budget-seconds {self.args.budget_seconds:g} reached"
        return ""

    def evaluation(self, evaluate):
        """Decorates the script's evaluate(it) -> row: rank 0 alone runs it (the others get {}), and its time is
        kept (eval_time_s) and left out of --budget-seconds."""
        def timed(it):
            if not self.lead:
                return {}
            start = time.time()
            row = evaluate(it)
            self.eval_seconds += time.time() - start
            return row

        return timed

    def guard(self, it: int, **values):
        """The NaN guard, before every optimizer step: a non-finite reward, loss or gradient norm (on any rank)
        stops the run before it reaches the weights; the last good checkpoint stays as it is."""
        found = ""
        for name, value in values.items():
            value = torch.as_tensor(value).detach().float().cpu()
            if not torch.isfinite(value).all():
                found = found or f"non-finite {name} ({value[~torch.isfinite(value)].flatten()[0].item()})"
        found = next((f for f in gather_objects(found) if f), "")
        if found:
            self.stop(f"iteration {it}: {found}")

    def stop(self, reason: str):
        self._close()
        if self.lead:
            print(f"error: {self.name}: {reason}; stopped, {self._kept('the last good checkpoint')}", file=sys.stderr,
                  flush=True)
        raise SystemExit(3)

    def log(self, row: dict):
        row = {"wall_time_s": round(self.elapsed(), 3), "eval_time_s": round(self.eval_seconds, 3)} | row
        row |= {k: v * WORLD for k, v in COMPUTE.items()} | {"compute": compute_units()}  # the global batch's
        if self.cuda:
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row = {k: (v.item() if torch.is_tensor(v) or isinstance(v, np.generic) else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.lead:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.tb.add_scalar(key, value, row["iter"])
        if row.get("final"):
            return
        self.bar.update(1)
        shown = {k: f"{row[k]:.4g}" for k in ("reward_mean", "loss") if isinstance(row.get(k), (int, float))}
        self.bar.set_postfix(shown)
        now = time.time()
        if not self.tty and (now - self.last_progress >= self.args.progress_every or row["iter"] + 1 == self.args.iters):
            # Outside a terminal (nohup, a cluster log): a plain line every --progress-every seconds.
            self.last_progress, done = now, row["iter"] + 1
            per_it = (now - self.start) / max(1, done - self.start_iter)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_it * (self.args.iters - done)))
            print(f"{self.name}: iter {done}/{self.args.iters}  " + "  ".join(f"{k} {v}" for k, v in shown.items())
                  + f"  {per_it:.2f} s/it  ETA {eta}", file=sys.stderr, flush=True)

    def save_images(self, images, name: str):
        save_grid(images, self.dir / name)

    def save(self):
        """checkpoint.pt and pytorch_lora_weights.safetensors, each written aside and swapped in (rank 0)."""
        lora = {n: p.detach().cpu().clone() for n, p in self.unet.named_parameters() if p.requires_grad}
        bad = [n for n, value in lora.items() if not torch.isfinite(value).all()]
        if bad:  # never written as a result
            self.stop(f"iteration {self.next_iter - 1}: non-finite LoRA weights after the update ({bad[0]})")
        if len(set(gather_objects(lora_digest(lora)))) > 1:  # the peers' worst bug, caught where it would start
            self.stop(f"iteration {self.next_iter - 1}: the ranks hold different LoRA weights")
        if self.lead:
            save_lora(self.unet, self.dir)
            checkpoint = {"iter": self.next_iter, "lora": lora, "optimizer": self.optimizer.state_dict(),
                          "rng": rng_state(), "state": self.state, "rows": self.rows, "compute": dict(COMPUTE),
                          "elapsed": self.elapsed(), "eval_seconds": self.eval_seconds, "ranks": WORLD}
            write_atomic(self.dir / CHECKPOINT, lambda f: torch.save(checkpoint, f))
        self.saved_iter = self.next_iter

    def _close(self):
        self._release_signals()
        if self.lead:
            self.bar.close()
            self.metrics.close()
            if self.tb:
                self.tb.close()

    def finish(self, evaluate):
        """After the loop: the evaluation of the final model as a row of its own ({"iter": N, "final": true}, N
        iterations done), the final checkpoint and LoRA, and the run's one-line summary on stdout. Every message
        counts iterations done ("after 7 iterations", as the progress line's 7/40); `iteration k` names the row
        of metrics.jsonl with iter k."""
        stopped, self.finishing = self.interrupted, True  # a Ctrl-C from here on asks for no early stop
        if not stopped and not (self.rows and self.rows[-1].get("final")):
            self.log({"iter": self.next_iter, "final": True} | evaluate(self.next_iter))
        if self.next_iter != self.saved_iter or not stopped:
            self.save()
        self._close()
        done = f"{self.next_iter} of {plural(self.args.iters, 'iteration')}"
        if stopped:
            print(f"{self.name}: stopped after {done}, with a checkpoint; {self._resume_hint()}", file=sys.stderr,
                  flush=True)
            raise SystemExit(130)
        evals = [r["eval_reward_mean"] for r in self.rows if "eval_reward_mean" in r]
        change = f"eval reward {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else "no eval"
        spent = f"{self.elapsed():.0f} s, compute {compute_units():.4g}"
        ended = f"{done} ({self.budget_reason}; {spent})" if self.budget_reason else \
            f"{plural(self.next_iter, 'iteration')} ({spent})"
        if self.lead:
            print(f"{self.name}: {change} after {ended}; run dir {self.dir}", flush=True)
