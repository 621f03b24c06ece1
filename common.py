"""Machinery shared by the seven method scripts: loading Stable Diffusion, LoRA, the DDIM step with
log-probability, one configurable sampling rollout, decoding, prompts, evaluation and the run directory.

No method's loss or estimator lives here. `rollout` carries out a gradient routing but does not choose
one: each script decides which steps carry gradient, whether the UNet input is detached and where
sampling stops, what is rewarded and how the loss is built, and passes those choices in as knobs.
"""

import functools
import inspect
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices at import
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
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
# Attention projections (what the public implementations train) and the ResNet 3x3 convolutions: the toy
# UNet has no attention at full latent resolution, and without the convs LoRA can hardly move a shape.
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"
diffusers_logging.disable_progress_bar()


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


def resolve_model(model: str) -> str:
    """Check `--model` without loading it: the toy model, the embedded one, a local folder or a hub id."""
    if model == EMBEDDED_MODEL:
        return model
    if model == TOY_MODEL:
        return str(TOY_MODEL_DIR)
    return resolve_pretrained(model, "--model", "model_index.json",
                              "a diffusers Stable Diffusion folder (StableDiffusionPipeline.save_pretrained or a "
                              f"hub snapshot; default: {TOY_MODEL})", "stable-diffusion-v1-5/stable-diffusion-v1-5")


def resolve_clip(name: str) -> str:
    """Check `--clip-model`: `toy` (the toy world's CLIP), a local CLIPModel folder or a hub id."""
    import rewards

    if name == TOY_MODEL:
        return rewards.TOY_CLIP
    return resolve_pretrained(name, "--clip-model", "config.json", "a transformers CLIPModel folder",
                              "openai/clip-vit-large-patch14")


def _uses_clip(fn, args) -> bool:
    """Whether the reward will load `--clip-model`: it takes one, and its CLIP weight (if any) is not 0."""
    taken = inspect.signature(fn).parameters
    return "clip_model" in taken and ("clip_weight" not in taken or args.clip_weight > 0)


def reward_function(args):
    """The `--reward` function with the CLIP flags bound where it takes them."""
    import rewards

    fn = rewards.REWARDS[args.reward][0]
    taken = inspect.signature(fn).parameters
    options = {"clip_weight": args.clip_weight}
    if _uses_clip(fn, args):
        options["clip_model"] = resolve_clip(args.clip_model)
    return functools.partial(fn, **{k: v for k, v in options.items() if k in taken})


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Stable Diffusion 1.x/2.x from a hub id, a local folder or the embedded tiny model.

    VAE and text encoder frozen; the UNet frozen too (LoRA adds the trainable part); DDIM scheduler
    built from the model's own betas and prediction type (epsilon or v).
    """
    source = resolve_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        if source == EMBEDDED_MODEL:  # built to disk, then loaded through the same path as any model
            build_embedded_pipeline(tmp)
            source = tmp
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_lora(unet, rank: int, alpha: float | None = None, targets: str = LORA_TARGETS):
    """LoRA on the UNet layers whose names end in one of `targets` (comma-separated); returns the trainable
    parameters (kept in fp32). The reference policy is the same UNet under `unet.disable_adapters()`: no copy.
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
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(unet, run_dir, optimizer=None, state: dict | None = None):
    """Write `pytorch_lora_weights.safetensors` so `pipe.load_lora_weights(run_dir)` loads it; with an
    optimizer and a state dict (iteration, samples seen), also what a resume needs."""
    lora = get_peft_model_state_dict(unet)  # PEFT key names: diffusers loads them for every module kind
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:  # write aside, then swap in: never half-written
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora, safe_serialization=True)
        names = ["pytorch_lora_weights.safetensors"]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
            (Path(tmp) / "state.json").write_text(json.dumps(state or {}))
            names += ["optimizer.pt", "state.json"]
        for name in names:
            os.replace(Path(tmp) / name, Path(run_dir) / name)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def decode(vae, latents, checkpoint: bool = False):
    """Latents -> images (N,3,H,W) in [0,1], float32, differentiable (optionally checkpointed).

    The clamp to [0,1] passes its gradient straight through: a plain clamp has zero gradient on saturated
    pixels (the toy world's white and black backgrounds), so a reward could push a picture into saturation
    and nothing, not even the CLIP regulariser, could pull it back.
    """
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
    """The (guided) UNet output in fp32; cond and uncond go through one batched call."""
    if uncond is None or guidance_scale == 1.0:
        return unet(latents.to(unet.dtype), t, cond.to(unet.dtype)).sample.float()
    if torch.is_tensor(t) and t.ndim == 1:  # one timestep per row: the doubled batch needs them twice
        t = torch.cat([t, t])
    out = unet(torch.cat([latents, latents]).to(unet.dtype), t, torch.cat([uncond, cond]).to(unet.dtype))
    out_uncond, out_cond = out.sample.float().chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


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
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
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
    shape = (batch_size, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor,
             resolution // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generator, device=pipe.unet.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Prompts, seeding, evaluation, the run directory
# ---------------------------------------------------------------------------------------------


def load_prompts(spec: str) -> list[str]:
    """A prompt set name (a file in prompts/) or a text file with one prompt per line."""
    path = PROMPT_SETS.get(spec, Path(spec).expanduser())
    if not path.is_file():
        fail(f"--prompts {spec}: neither a prompt set ({', '.join(PROMPT_SETS)}) nor a text file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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


def check_common_args(args, differentiable: bool):
    """Validate the flags every script shares, before any work; returns the prompt list."""
    import rewards

    if args.reward not in rewards.REWARDS:
        fail(f"--reward {args.reward}: unknown; choose one of {', '.join(rewards.REWARDS)}")
    if differentiable and not rewards.REWARDS[args.reward][1]:
        names = ", ".join(n for n, (_, d) in rewards.REWARDS.items() if d)
        fail(f"--reward {args.reward} is not differentiable; this method needs one of {names}")
    for name in ("batch_size", "iters", "num_steps", "lora_rank"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.resolution < 0 or args.resolution % 8:
        fail(f"--resolution must be a positive multiple of 8, or 0 for the model's own size (got {args.resolution})")
    if args.lr <= 0:
        fail(f"--lr must be positive (got {args.lr})")
    if getattr(args, "grad_clip", 1.0) <= 0:
        fail(f"--grad-clip must be positive (got {args.grad_clip})")
    if getattr(args, "weight_decay", 0.0) < 0:
        fail(f"--weight-decay must be non-negative (got {args.weight_decay})")
    if args.dtype not in ("auto", "fp32", "bf16", "fp16"):
        fail(f"--dtype must be auto, fp32, bf16 or fp16 (got {args.dtype})")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        fail(f"--device must be auto, cpu, cuda or cuda:N (got {args.device})")
    if args.eval_every < 0:
        fail(f"--eval-every must be 0 (start and end only) or positive (got {args.eval_every})")
    if args.eval_size < 2:
        fail(f"--eval-size must be at least 2 (the eval reward's std needs two images; got {args.eval_size})")
    if args.clip_weight < 0:
        fail(f"--clip-weight must be non-negative (got {args.clip_weight})")
    if _uses_clip(rewards.REWARDS[args.reward][0], args):
        resolve_clip(args.clip_model)
    if args.run_dir and (Path(args.run_dir) / "metrics.jsonl").exists():
        fail(f"--run-dir {args.run_dir} already holds a run (metrics.jsonl); choose another directory")
    resolve_model(args.model)
    return load_prompts(args.prompts)


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_device(device: str, dtype: str, threads: int):
    """Resolve `auto` device/dtype: bf16 frozen weights on a GPU, fp32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if device == "cpu" and threads > 0:
        # Measured on 2 cores: with anything else running, torch's default threading made an iteration
        # of the tiny model 4-80x slower than one thread; alone, two threads gain only ~1.4x.
        torch.set_num_threads(threads)
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


@torch.no_grad()
def evaluate(pipe, prompts, reward_fn, *, num_steps, guidance_scale, resolution, batch_size=16):
    """Full T-step deterministic DDIM sampling (eta 0) on fixed prompts and fixed noise: (rewards, images)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    uncond_one = encode_prompts(pipe, [""])
    rewards, images = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = encode_prompts(pipe, chunk)
        x_T = initial_latents(pipe, len(chunk), resolution, generator=generator)
        out = rollout(pipe, cond, uncond_one.expand(len(chunk), -1, -1), x_T, num_steps=num_steps,
                      guidance_scale=guidance_scale, eta=0.0, generator=generator).output
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


def default_run_dir(script: str, reward: str, seed: int) -> str:
    return f"runs/{Path(script).stem}__{reward}__{seed}__{int(time.time())}"


class RunLog:
    """The run directory: args.json, metrics.jsonl (one JSON object per iteration), sample grids,
    the LoRA weights, optional TensorBoard scalars, a progress bar and the final summary line."""

    def __init__(self, run_dir: str, args, total: int):
        self.dir = Path(run_dir)
        if (self.dir / "metrics.jsonl").exists():
            fail(f"--run-dir {run_dir} already holds a run (metrics.jsonl); choose another directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "args.json").write_text(json.dumps(asdict(args), indent=2, default=str))
        self.metrics = open(self.dir / "metrics.jsonl", "a")
        self.start = time.time()
        self.rows = []
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir))
        except Exception:  # TensorBoard is optional
            self.tb = None
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=self.dir.name, disable=not sys.stderr.isatty())

    def log(self, row: dict):
        row = {"wall_time_s": round(time.time() - self.start, 3)} | row
        row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in row.items()}
        self.rows.append(row)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.tb.add_scalar(key, value, row["iter"])
        self.bar.update(1)
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("reward_mean", "loss") if row.get(k) is not None})

    def save_images(self, images, name: str):
        save_grid(images, self.dir / name)

    def close(self, name: str):
        self.bar.close()
        self.metrics.close()
        if self.tb:
            self.tb.close()
        evals = [r["eval_reward_mean"] for r in self.rows if "eval_reward_mean" in r]
        print(f"{name}: eval reward {evals[0]:.4f} -> {evals[-1]:.4f} after {len(self.rows)} iterations "
              f"({time.time() - self.start:.0f} s); run dir {self.dir}")
