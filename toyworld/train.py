"""Train the toy world's models from scratch: a toy CLIP, then a toy Stable Diffusion whose text encoder
is that CLIP's text tower (frozen, as SD uses CLIP's). Seeded and reproducible; CPU is enough.

    python toyworld/train.py                      # writes toyworld/clip and toyworld/sd

Both are saved in Hugging Face formats (CLIPModel + CLIPTokenizer; a diffusers StableDiffusionPipeline)
in fp16 to keep the repository small; they load in any dtype.
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
from rewards import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD  # noqa: E402
from rewards import _projected as features, clip_preprocess  # noqa: E402
from toyworld import world  # noqa: E402


@dataclass
class Args:
    out: str = str(HERE)
    """folder that receives clip/ and sd/"""
    seed: int = 0
    clip_steps: int = 1500
    """contrastive steps, one image of every combination per step"""
    vae_steps: int = 600
    unet_steps: int = 3000
    batch_size: int = 64
    """VAE and UNet batch size"""
    threads: int = 2


def log(stage, step, total, loss, start):
    if step % 100 == 0 or step == total - 1:
        print(f"{stage} {step:5d}/{total} loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)


def clip_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, **special)
    vision = dict(image_size=world.SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_hidden_layers=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def normalise(images):  # the clipscore reward's preprocessing, so the toy CLIP is trained as it is used
    return clip_preprocess(images, world.SIZE, CLIP_MEAN, CLIP_STD)


def tokens(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 240, seed: int = 123):
    """Accuracy of colour, shape and background when each image picks its best caption out of all."""
    rng = np.random.default_rng(seed)
    combos = world.all_combinations()
    text = F.normalize(features(model.get_text_features(input_ids=tokens(tokenizer, [world.caption(*k) for k in combos]))), dim=-1)
    truth = [combos[i] for i in rng.integers(len(combos), size=n)]
    images = torch.from_numpy(np.stack([world.draw(*k, rng) for k in truth]))
    image = F.normalize(features(model.get_image_features(pixel_values=normalise(images))), dim=-1)
    guess = [combos[i] for i in (image @ text.T).argmax(dim=1).tolist()]
    return {name: float(np.mean([g[j] == t[j] for g, t in zip(guess, truth)]))
            for j, name in enumerate(["colour", "shape", "background"])}


def train_clip(args, tokenizer, rng):
    model = clip_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.clip_steps, pct_start=0.05)
    combos = world.all_combinations()
    ids = tokens(tokenizer, [world.caption(*k) for k in combos])
    start = time.time()
    for step in range(args.clip_steps):
        # every combination once per batch, so no two captions in a batch are the same (no false negatives)
        images = torch.from_numpy(np.stack([world.draw(*k, rng) for k in combos]))
        loss = model(input_ids=ids, pixel_values=normalise(images), return_loss=True).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log("clip", step, args.clip_steps, loss.item(), start)
    return model.eval()


def train_vae(args, rng):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=world.SIZE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.vae_steps, pct_start=0.05)
    start = time.time()
    for step in range(args.vae_steps):
        images = world.sample_batch(args.batch_size, rng)[0] * 2 - 1
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log("vae", step, args.vae_steps, loss.item(), start)
    with torch.no_grad():  # SD convention: scale latents to unit variance
        latents = vae.encode(world.sample_batch(256, rng)[0] * 2 - 1).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae.eval().requires_grad_(False)


def train_unet(args, vae, text_encoder, tokenizer, rng):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=4, norm_num_groups=16)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.unet_steps, pct_start=0.05)
    start = time.time()
    for step in range(args.unet_steps):
        images, captions = world.sample_batch(args.batch_size, rng)
        captions = [c if rng.random() > 0.1 else "" for c in captions]  # 10% unconditional, for CFG
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
            text = text_encoder(tokens(tokenizer, captions))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        loss = F.mse_loss(unet(noise_scheduler.add_noise(latents, noise, t), t, text).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log("unet", step, args.unet_steps, loss.item(), start)
    return unet.eval()


def main():
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTextModel

    tokenizer = world.build_tokenizer()
    clip = train_clip(args, tokenizer, rng)
    print("toy CLIP zero-shot accuracy:", zero_shot_accuracy(clip, tokenizer), flush=True)
    out = Path(args.out)
    clip.half().save_pretrained(out / "clip")
    clip.float()
    tokenizer.save_pretrained(out / "clip")
    CLIPImageProcessor(size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out / "clip")

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    vae = train_vae(args, rng)
    unet = train_unet(args, vae, text_encoder, tokenizer, rng)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out / "sd")
    train, held_out = world.prompt_sets()
    prompts = HERE.parent / "prompts"
    (prompts / "toy.txt").write_text("\n".join(train) + "\n")
    (prompts / "toy_eval.txt").write_text("\n".join(held_out) + "\n")
    print(f"wrote {out / 'clip'}, {out / 'sd'}, prompts/toy.txt, prompts/toy_eval.txt")


if __name__ == "__main__":
    main()
