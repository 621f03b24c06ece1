"""ReFL: Reward Feedback Learning (Xu et al., NeurIPS 2023, "ImageReward: Learning and Evaluating Human
Preferences for Text-to-Image Generation", arXiv 2304.05977), as written in DRTune's Algorithm 1 lines 7-10.

Sample without gradient down to a random stop step t ~ randint(T1, T2) counted from the end (the original:
40 DDPM steps, t in [1, 10]); make one UNet call with gradient there, decode the x0 it predicts and score it;
loss = lambda * ReLU(phi - r). Optionally regularise with the pre-training (denoising) loss on a folder of
captioned images as the paper's Algorithm 1 does: each iteration first takes an optimizer step on the pre-training
loss, then one on the ReFL loss (ImageReward's ReFL_SDXL scripts do the same; its SD 1.4 ReFL.py has no
pre-training loss).

--pretrain-data DIR: a folder of images with a `metadata.jsonl`, one JSON object per line naming an image in
the folder and its caption, in the Hugging Face ImageFolder layout:
    DIR/metadata.jsonl   {"file_name": "0001.png", "text": "a photo of a cat"}
    DIR/0001.png         (any format PIL reads; centre-cropped and resized to the training resolution)

Quick run on the toy world (CPU, minutes):
    python refl.py --reward brightness
The original settings on Stable Diffusion 1.4 (a GPU; LoRA here, the original tunes the full UNet with EMA;
DDIM with eta 1 stands in for its 40-step DDPM sampler; batch 64 = 8 GPUs x 2 x 4 accumulated):
    python refl.py --model CompVis/stable-diffusion-v1-4 --reward <an ImageReward-like reward> --phi 2 \
        --lam 1e-3 --prompts my_prompts.txt --num-steps 40 --t1 1 --t2 10 --guidance-scale 1.0 --eta 1 --lr 1e-5 \
        --weight-decay 1e-2 --grad-clip 1.0 --batch-size 8 --grad-accum 8 --iters 100
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
import distributed
import runner
from hub import DEFAULT_MODEL, fail

# (phi, lambda) per reward when --phi / --lam are not given. ImageReward's are the original's (phi 2, lambda 1e-3:
# a normalised score, about N(0, 1), with large gradients). For the others phi is at or above the best value the
# reward can reach (symmetry: 100 x --clip-weight up to 0.1; cosines: 1 or 100; colourfulness stays below ~470),
# so the ReLU never cuts the gradient and the loss is lambda * (phi - r), plain reward ascent; lambda = 1 because
# Adam's update stalls once gradients approach its eps (1e-8): brightness gradients times 1e-3 are about 1e-8 per
# LoRA weight on the embedded model.
REWARD_DEFAULTS = {"imagereward": (2.0, 1e-3), "brightness": (1.0, 1.0), "symmetry": (10.0, 1.0),
                   "compression": (0.0, 1.0), "colorfulness": (500.0, 1.0), "clipscore": (100.0, 1.0),
                   "pickscore": (100.0, 1.0), "hpsv2": (1.0, 1.0), "aesthetic": (10.0, 1.0), "objectness": (0.0, 1.0)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Args(runner.RunArgs):
    model: str = DEFAULT_MODEL
    """diffusers Stable Diffusion 1.x/2.x/XL/3 or FLUX: hub id or local folder; toy-flow = the toy world's
    flow-matching model (toyworld/flow), toy = its Stable Diffusion (toyworld/sd)"""
    reward: str = "symmetry"
    """a reward of rewards.py, a weighted sum (hpsv2+0.5*clipscore) or module:function (must be differentiable)"""
    prompts: str = "auto"
    """a prompt set of prompts/ (evaluated on <set>_eval if it exists) or a text file, one prompt per line; auto =
    toy for the toy model, else the reward's set (simple_animals, general or books)"""
    num_steps: int = 20
    """T: sampling steps (original: 40 DDPM steps)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale, the evaluation's (original ReFL: 1.0, off; on the toy world a LoRA trained
    without guidance barely moves the guided samples it is evaluated on, README "Do the defaults hold?")"""
    eta: float = 0.0
    """DDIM noise scale, 0 = deterministic, the evaluation's sampler (original: 1.0, ancestral like its DDPM sampler;
    on a flow model: the SDE's noise level)"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 60
    """iterations, each one optimizer update (original: 100)"""
    lr: float = 3e-3
    """AdamW learning rate (original: 1e-5, full UNet; 3e-3 and clip 0.1 as DRTune's toy defaults: with 5e-3 and
    clip 1.0 the default symmetry run drew empty black images by iteration 10)"""
    weight_decay: float = 1e-2
    """AdamW weight decay (original: 1e-2)"""
    grad_clip: float = 0.1
    """gradient-norm clip (original: 1.0; DRTune compared every method at 0.1)"""
    lora_rank: int = 8
    """LoRA rank (the original tunes the full UNet)"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer"""
    t1: int = 1
    """stop range [T1, T2]: the gradient step is drawn among the last T2..T1 steps (original: 1 of 40)"""
    t2: int = 5
    """upper end of the stop range, counted from the last step (original: 10 of 40)"""
    phi: float | None = None
    """ReLU threshold in lambda * ReLU(phi - r) (ImageReward: 2); default: per reward (REWARD_DEFAULTS)"""
    lam: float | None = None
    """lambda, the ReFL loss weight (ImageReward: 1e-3); default: per reward (REWARD_DEFAULTS)"""
    pretrain_data: str = ""
    """folder of captioned images for the pre-training loss (format in the docstring); empty = off"""
    pretrain_weight: float = 1.0
    """weight of the pre-training (denoising) loss in its own optimizer step, when --pretrain-data is given (the
    paper: 1, no weight)"""
    gradient_checkpointing: bool = True
    """recompute every differentiable UNet call in backward: activation memory O(1) in the trained steps"""
    vae_gradient_checkpointing: bool = False
    """gradient checkpointing of the VAE decoder"""


def read_pretrain_data(folder: str):
    """--pretrain-data -> [(image path, caption)], or a one-line error naming what is wrong."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        fail(f"--pretrain-data {folder}: no such folder")
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        fail(f"--pretrain-data {folder}: no metadata.jsonl there (one {{\"file_name\", \"text\"}} per line)")
    pairs = []
    for n, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path, caption = root / entry["file_name"], str(entry["text"])
        except (ValueError, KeyError, TypeError):
            fail(f"--pretrain-data {folder}: metadata.jsonl line {n} is not {{\"file_name\": ..., \"text\": ...}}")
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            fail(f"--pretrain-data {folder}: metadata.jsonl line {n} names {entry['file_name']}, not an image there")
        pairs.append((path, caption))
    if not pairs:
        fail(f"--pretrain-data {folder}: metadata.jsonl lists no images")
    return pairs


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=True)
    if not 1 <= args.t1 <= args.t2 <= args.num_steps:
        fail(f"--t1/--t2: need 1 <= T1 <= T2 <= T = {args.num_steps} (got [{args.t1}, {args.t2}])")
    if (args.lam is not None and args.lam <= 0) or args.pretrain_weight < 0:
        fail("--lam must be positive and --pretrain-weight non-negative")
    if (args.phi is None or args.lam is None) and args.reward not in REWARD_DEFAULTS:
        fail(f"--reward {args.reward} has no default phi and lambda; pass --phi and --lam")
    if args.grad_accum < 1 or args.eval_size < 1:
        fail("--grad-accum and --eval-size must be at least 1")
    return prompts, (read_pretrain_data(args.pretrain_data) if args.pretrain_data else [])


def refl_steps(T: int, t1: int, t2: int):
    """DRTune Alg. 1 line 8 for ReFL -> (rollout step indices that carry gradient, rollout step index to stop at).

    The stop step t ~ randint(T1, T2) counts from the end (t = 1 is the last step; the original's
    randint(30, 39) over 40 steps); the rollout counts steps i = T - t from 0 (the noisiest).
    """
    t = random.randint(t1, t2)
    return [T - t], T - t  # the only gradient step is the one where sampling stops (Alg. 1 lines 17-21)


def load_images(paths, resolution: int):
    """Centre-crop to a square, resize, -> (N, 3, H, W) in [0, 1]."""
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def pretrain_loss(pipe, pairs, batch_size: int, resolution: int):
    """The pre-training loss: noise-prediction MSE (a flow model's: velocity) at a random t, drawn as the model was
    pre-trained (common.training_timesteps), on real captioned images."""
    scheduler, unet = pipe.scheduler, pipe.unet
    chosen = distributed.choices(pairs, batch_size)
    images = load_images([p for p, _ in chosen], resolution).to(unet.device)
    latents = common.encode_images(pipe.vae, images)
    cond = common.encode_prompts(pipe, [c for _, c in chosen])
    noise = distributed.randn(latents.shape, latents.device)
    t = common.training_timesteps(scheduler, batch_size, latents.device)
    noisy = common.noised(scheduler, latents, noise, t)
    target = common.denoising_target(scheduler, latents, noise, t)
    prediction = common.unet_output(unet, noisy, t, cond)
    return torch.nn.functional.mse_loss(prediction, target)


def update(run, it: int, params, optimizer, grad_clip: float, **logged):
    """One optimizer step on the gradients accumulated so far: averaged over the ranks, clipped, the NaN guard
    (`logged` values and the gradient norm), step. Returns the gradient norm before clipping."""
    distributed.average_gradients(params)  # over the ranks, before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    run.guard(it, **logged, grad_norm=grad_norm)  # no NaN reaches the weights
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def main():
    # TRY NOT TO MODIFY: setup
    args = runner.parse_args(Args, __file__)
    prompts, pretrain_pairs = check_args(args)
    device, dtype = runner.setup_device(args.device, args.dtype, args.threads)
    runner.seed_everything(args.seed)
    pipe = common.load_pipeline(args.model, dtype, device, args.vae)
    resolution = args.resolution or common.native_resolution(pipe)
    params = common.add_lora(pipe.unet, args.lora_rank, args.lora_alpha or None, args.lora_targets, args.init_lora)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = runner.reward_function(args, device, dtype)
    eval_set = runner.eval_prompts(args.prompts, prompts, args.eval_size)
    run = runner.Run(__file__, args, pipe.unet, optimizer, device)
    uncond = common.encode_prompts(pipe, [""]).expand(args.batch_size, -1, -1)
    T = args.num_steps
    phi, lam = REWARD_DEFAULTS.get(args.reward, (args.phi, args.lam))
    phi, lam = phi if args.phi is None else args.phi, lam if args.lam is None else args.lam

    @run.evaluation  # rank 0 alone; the same protocol in every script (common.EVAL_PROTOCOL)
    def evaluate(it):
        scores, images = common.evaluate(pipe, eval_set, reward_fn, num_steps=args.eval_num_steps,
                                         guidance_scale=args.eval_guidance_scale, resolution=resolution)
        run.save_images(images, f"eval_{it:05d}.png")
        return {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item()}

    samples_seen = run.last("samples_seen")
    for it in run.iterations():
        row = {"iter": it}
        if it == 0 or (args.eval_every and it % args.eval_every == 0):
            row |= evaluate(it)

        # ALGO LOGIC: one gradient step, where sampling stops (DRTune's Algorithm 1 lines 7-10, 17-21)
        grad_steps, stop_step = refl_steps(T, args.t1, args.t2)

        if pretrain_pairs:  # ImageReward Alg. 1: first an update w <- w - lr grad L_pre on captioned images
            pretrain_total = 0.0
            for _ in range(args.grad_accum):
                pretrain = pretrain_loss(pipe, pretrain_pairs, args.batch_size, resolution) / args.grad_accum
                (args.pretrain_weight * pretrain).backward()
                pretrain_total += pretrain.item()
            norm = update(run, it, params, optimizer, args.grad_clip, pretrain_loss=pretrain_total)
            row |= {"pretrain_loss": distributed.mean_over_ranks(pretrain_total), "pretrain_grad_norm": norm}

        # then the ReFL update, on the model the pre-training step left (Alg. 1's second update)
        rewards_seen, loss_total = [], 0.0
        for _ in range(args.grad_accum):
            batch = distributed.choices(prompts, args.batch_size)  # this rank's share
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=grad_steps, stop_step=stop_step,
                                 checkpoint=args.gradient_checkpointing)
            # the decoded x0 prediction
            images = common.decode(pipe.vae, out.output, checkpoint=args.vae_gradient_checkpointing)
            reward = reward_fn(images, batch)
            loss = lam * torch.relu(phi - reward).mean() / args.grad_accum  # ReFL loss: lambda * ReLU(phi - r)
            loss.backward()
            rewards_seen.append(reward.detach())
            loss_total += loss.item()
        reward_all = distributed.gather(torch.cat(rewards_seen))  # the global batch's
        grad_norm = update(run, it, params, optimizer, args.grad_clip, reward=reward_all, loss=loss_total)
        samples_seen += args.batch_size * args.grad_accum * distributed.WORLD

        # TRY NOT TO MODIFY: logging
        row |= {"reward_mean": reward_all.mean().item(), "reward_std": reward_all.std().item(),
                "loss": distributed.mean_over_ranks(loss_total), "grad_norm": grad_norm.item(),
                "samples_seen": samples_seen, "t_stop": T - stop_step, "trained_steps": grad_steps}
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
