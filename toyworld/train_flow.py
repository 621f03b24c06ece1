"""Train the toy FLOW world: a tiny SD3-style flow-matching model (an MMDiT, `SD3Transformer2DModel`) of the toy
world, on the toy SD's VAE and the toy CLIP's text tower (both reused, frozen, not retrained). Seeded and
reproducible; CPU only (39 minutes on one core, --threads 1).

    python toyworld/train_flow.py                 # writes toyworld/flow (a StableDiffusion3Pipeline, fp16, 6 MB)

The conditioning contract, in training as at runtime (embeddings always through the pipeline's own encode_prompt):

    prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions,
        device="cpu", do_classifier_free_guidance=False, max_sequence_length=pipe.tokenizer_max_length)
    v = pipe.transformer(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                         pooled_projections=pooled).sample

Both CLIP encoders (`text_encoder`, `text_encoder_2`) are the toy CLIP's text tower with its projection
(`CLIPTextModelWithProjection`, checked bit for bit against CLIPModel.get_text_features): 16 tokens of 2 x 64 = 128
wide, pooled 2 x 64 = 128; no T5 (`text_encoder_3` None), so the pipeline appends max_sequence_length = 16 zero
tokens: 32 text tokens in all. model_index.json records text_encoder_3 and tokenizer_3 as null, and diffusers'
from_pretrained wants them named: `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
tokenizer_3=None)`. The unconditional prompt is "" (10 % of the training captions), for classifier-free guidance.

The transformer: 4 joint blocks of 4 heads x 32 (width 128), patch 2 (an 8x8 token grid on the 16x16 latents),
2.3 M parameters, DiT's adaLN-Zero initialisation. Width and that initialisation mattered (validation loss after
800 steps: width 96 0.456, with adaLN-Zero 0.431, width 128 with it 0.398; shape fidelity 0.48, 0.48, 0.64).

Rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler assumes: x_sigma = (1 - sigma) x0 + sigma eps, the
transformer regresses the velocity eps - x0 (MSE); sigma ~ SD3's logit-normal, sigmoid(N(0, 1)). The latents are
the VAE posterior's samples times its scaling factor, as train.py's: `--pool` drawings are encoded once and their
posteriors sampled afresh at every step (encoding every batch cost a third of each step). The scheduler's shift is
1.0 (none): the shift moves only the sampler's sigmas here (training does not use it), and SD3's 3.0 is for 128^2
latents; on these 16x16 latents shifts 1, 1.5 and 3 all meet the fidelity target (shape 0.948, 0.969, 0.958 at
CFG 5: within two samples of 96 of each other), so none is warranted.

At the end the saved folder is loaded back (float32) and sampled with the deterministic Euler ODE (20 steps,
CFG 5, fixed noise) over the held-out prompts; the pixel classifier world.classify scores colour, shape and
background, and rewards.asymmetry the layouts (check.py's measures). Measured: colour 1.000, shape 0.948,
background 1.000, asymmetry 0.369.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from rewards import _projected as projected, asymmetry  # noqa: E402
from toyworld import world  # noqa: E402

EVAL_SEED = 1234  # common.EVAL_SEED: the fixed evaluation noise


@dataclass
class Args:
    out: str = str(HERE / "flow")
    """folder that receives the StableDiffusion3Pipeline"""
    clip: str = str(HERE / "clip")
    """the toy CLIP (its text tower and tokenizer become both CLIP text encoders)"""
    vae: str = str(HERE / "sd" / "vae")
    """the toy VAE"""
    seed: int = 0
    steps: int = 3600
    batch_size: int = 64
    pool: int = 40960
    """drawings encoded once (the VAE encoder was a third of a step); each step samples their VAE posteriors afresh"""
    lr: float = 1e-3
    """peak learning rate (one-cycle, AdamW)"""
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    shift: float = 1.0
    """the FlowMatchEulerDiscreteScheduler's timestep shift saved with the model"""
    guidance_scale: float = 5.0
    """CFG scale of the final fidelity check"""
    eval_steps: int = 20
    """Euler steps of the final fidelity check"""
    eval_n: int = 96
    """samples of the final fidelity check (the held-out prompts cycled)"""
    threads: int = 1


def log(step, total, loss, start):
    if step % 100 == 0 or step == total - 1:
        print(f"flow {step:5d}/{total} loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)


def text_encoder(clip):
    """The toy CLIP's text tower and text projection as a CLIPTextModelWithProjection (weights copied exactly)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return encoder.eval().requires_grad_(False)


def build_pipeline(args):
    """The StableDiffusion3Pipeline with an untrained transformer (float32)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(args.clip, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.clip)
    encoders = [text_encoder(clip) for _ in range(2)]
    ids = tokenizer([world.caption(*k) for k in world.all_combinations()] + [""], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        for encoder in encoders:  # the pooled embedding is CLIP's text feature, bit for bit
            assert torch.equal(encoder(ids).text_embeds, projected(clip.get_text_features(input_ids=ids)))
    vae = AutoencoderKL.from_pretrained(args.vae, dtype=torch.float32).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    side = world.SIZE // 2 ** (len(vae.config.block_out_channels) - 1)  # 16x16 latents
    width = args.heads * args.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=args.patch_size, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=args.layers, attention_head_dim=args.head_dim,
        num_attention_heads=args.heads, joint_attention_dim=2 * encoders[0].config.hidden_size,
        caption_projection_dim=width, pooled_projection_dim=2 * encoders[0].config.projection_dim,
        pos_embed_max_size=side // args.patch_size)
    adaln_zero(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=args.shift)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adaln_zero(transformer):
    """DiT's adaLN-Zero initialisation: every block starts as the identity (its modulation, gates included, zero)
    and the output projection at zero."""
    for module in transformer.modules():
        for name in ("norm1", "norm1_context", "norm_out"):
            norm = getattr(module, name, None)
            if norm is not None and hasattr(norm, "linear"):
                torch.nn.init.zeros_(norm.linear.weight)
                torch.nn.init.zeros_(norm.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def encode(pipe, captions):
    """(prompt_embeds (B, 32, 128), pooled (B, 128)): the conditioning contract."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions, device="cpu",
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=pipe.tokenizer_max_length)
    return embeds, pooled


def velocity(pipe, x, sigma, embeds, pooled):
    return pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                            pooled_projections=pooled).sample


@torch.no_grad()
def encode_pool(args, vae, rng):
    """`args.pool` random drawings: their VAE posteriors' means and stds, and their captions."""
    means, stds, captions = [], [], []
    for _ in range(0, args.pool, 64):
        images, text = world.sample_batch(64, rng)
        posterior = vae.encode(images * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += text
    return torch.cat(means)[:args.pool], torch.cat(stds)[:args.pool], captions[:args.pool]


def train(args, pipe, rng):
    transformer, vae = pipe.transformer.train(), pipe.vae
    start = time.time()
    means, stds, pool_captions = encode_pool(args, vae, rng)
    print(f"encoded {len(means)} drawings ({time.time() - start:.0f} s)", flush=True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    start = time.time()
    for step in range(args.steps):
        pick = torch.from_numpy(rng.integers(len(means), size=args.batch_size))
        captions = [pool_captions[i] if rng.random() > 0.1 else "" for i in pick.tolist()]  # 10% "", for CFG
        with torch.no_grad():  # = vae.encode(images * 2 - 1).latent_dist.sample() * scaling_factor
            x0 = (means[pick] + stds[pick] * torch.randn_like(means[pick])) * vae.config.scaling_factor
            embeds, pooled = encode(pipe, captions)
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(len(x0)))  # SD3's logit-normal (0, 1)
        s = sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(velocity(pipe, (1 - s) * x0 + s * noise, sigma, embeds, pooled), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log(step, args.steps, loss.item(), start)
    transformer.eval().requires_grad_(False)


@torch.no_grad()
def sample(pipe, prompts, *, num_steps, guidance_scale, generator, shift=None):
    """Deterministic Euler ODE from fixed noise with CFG (uncond ""), decoded to images (B,3,32,32) in [0,1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = pipe.scheduler.config if shift is None else {**pipe.scheduler.config, "shift": shift}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    side = pipe.transformer.config.sample_size
    x = torch.randn((len(prompts), pipe.transformer.config.in_channels, side, side), generator=generator)
    embeds, pooled = encode(pipe, list(prompts))
    uncond, uncond_pooled = encode(pipe, [""] * len(prompts))
    embeds, pooled = torch.cat([uncond, embeds]), torch.cat([uncond_pooled, pooled])
    sigmas = scheduler.sigmas  # 1 -> 0, the terminal 0 appended
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v_uncond, v_cond = velocity(pipe, torch.cat([x, x]), sigma.expand(2 * len(x)), embeds, pooled).chunk(2)
        x = x + (sigma_next - sigma) * (v_uncond + guidance_scale * (v_cond - v_uncond))
    z = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


def fidelity(pipe, *, n=96, num_steps=20, guidance_scale=5.0, shift=None, batch_size=32):
    """check.py's figures on the held-out prompts: colour, shape, background hit rates and the mean asymmetry."""
    prompts = world.prompt_sets()[1]
    batch = [prompts[i % len(prompts)] for i in range(n)]
    generator = torch.Generator().manual_seed(EVAL_SEED)
    images = torch.cat([sample(pipe, batch[i:i + batch_size], num_steps=num_steps, guidance_scale=guidance_scale,
                               generator=generator, shift=shift) for i in range(0, n, batch_size)])
    hits = torch.tensor([[a == b for a, b in zip(world.classify(x), world.parse(p))] for x, p in zip(images, batch)])
    colour, shape, background = hits.float().mean(dim=0).tolist()
    return {"colour": colour, "shape": shape, "background": background,
            "asymmetry": asymmetry(images).mean().item()}, images


def main():
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    from diffusers import StableDiffusion3Pipeline

    pipe = build_pipeline(args)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer: {params} parameters, {dict(pipe.transformer.config)}", flush=True)
    train(args, pipe, rng)
    out = Path(args.out)
    pipe.to(torch.float16).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")

    # The folder records text_encoder_3 and tokenizer_3 as null; diffusers' from_pretrained still wants them named.
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    check = dict(n=args.eval_n, num_steps=args.eval_steps)
    report, _ = fidelity(pipe, guidance_scale=args.guidance_scale, **check)
    print(f"fidelity (shift {pipe.scheduler.config.shift}, CFG {args.guidance_scale}, {args.eval_steps} Euler steps, "
          f"{args.eval_n} samples): " + " ".join(f"{k} {v:.3f}" for k, v in report.items()), flush=True)
    start = time.time()
    sample(pipe, world.prompt_sets()[1] * 2, num_steps=20, guidance_scale=args.guidance_scale,
           generator=torch.Generator().manual_seed(0))
    print(f"one 20-step CFG sample of batch 8: {time.time() - start:.2f} s ({torch.get_num_threads()} threads)")
    for shift, guidance_scale in [(1.0, 3.0), (1.0, 7.0), (1.5, 5.0), (3.0, 5.0)]:  # how the choices were made
        report, _ = fidelity(pipe, guidance_scale=guidance_scale, shift=shift, **check)
        print(f"  shift {shift} CFG {guidance_scale}: " + " ".join(f"{k} {v:.3f}" for k, v in report.items()))


if __name__ == "__main__":
    main()
