"""AlignProp: Aligning Text-to-Image Diffusion Models with Reward Backpropagation (Prabhudesai, Goyal, Pathak,
Fragkiadaki, 2023, arXiv 2310.03739), as written in DRTune's Algorithm 1 line 2.

Backpropagate a differentiable reward through the sampling chain with randomised truncated backpropagation:
per trajectory draw a truncation point k, and only the steps i >= k (the last T - k) carry gradient, each UNet
call checkpointed so memory does not grow with the number of trained steps.
  --truncation gaussian: k = int(N(42, 5)) at T = 50, scaled to T (the 2024 code's default; ~ the last 8 steps)
  --truncation uniform:  k ~ randint(1, T - 1)  (DRTune Alg. 1 line 2: {i}_{i >= randint(1, T)})
  --truncation fixed:    k = T - 1, only the last step (the paper's K = 1, for low memory)

Quick run on the toy world (CPU, minutes):
    python alignprop.py --reward brightness
The paper's settings on Stable Diffusion 1.5 (a GPU; batch 128 = 4 GPUs x 4 x 8 accumulated):
    python alignprop.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward symmetry \
        --prompts simple_animals --num-steps 50 --guidance-scale 7.5 --lora-rank 4 --lr 1e-3 \
        --weight-decay 0.1 --grad-clip 5.0 --loss-coeff 0.01 --batch-size 4 --grad-accum 32 --iters 14
"""

import random
from dataclasses import dataclass

import torch
import tyro

import common

TRUNCATIONS = ("gaussian", "uniform", "fixed")


@dataclass
class Args:
    model: str = common.TOY_MODEL
    """diffusers Stable Diffusion 1.x/2.x: hub id or local folder; toy = the toy world's model (toyworld/sd)"""
    reward: str = "symmetry"
    """reward name from rewards.py (must be differentiable)"""
    clip_model: str = common.TOY_MODEL
    """CLIP for the clipscore reward and the symmetry regulariser: hub id or local folder; toy = toyworld/clip"""
    clip_weight: float = 0.01
    """symmetry: weight of the CLIP-score regulariser (0 = DRTune eq. 6 alone)"""
    prompts: str = "toy"
    """prompt set name (a file in prompts/; evaluation uses <set>_eval if it exists) or a text file, one prompt per line"""
    num_steps: int = 10
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance scale (paper: 7.5; the 2024 code: 5.0)"""
    eta: float = 0.0
    """DDIM noise scale; 0.0 is the paper-era deterministic DDIM (the 2024 code: 1.0)"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 4
    """images per micro-batch (paper: 4 per GPU)"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 30
    """optimizer updates"""
    lr: float = 5e-3
    """AdamW learning rate (paper: 1e-3)"""
    weight_decay: float = 0.1
    """AdamW weight decay (paper-era code: 0.1; the 2024 code: 1e-4)"""
    grad_clip: float = 5.0
    """gradient-norm clip (paper-era code: 5.0; the 2024 code: 1.0)"""
    lora_rank: int = 4
    """LoRA rank (paper: 4)"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    truncation: str = "gaussian"
    """where backpropagation is truncated, drawn once per trajectory: gaussian, uniform or fixed (K = 1)"""
    loss_coeff: float = 0.01
    """loss = -loss_coeff * reward (paper: 0.01)"""
    checkpoint: bool = True
    """gradient checkpointing of every differentiable UNet call"""
    vae_checkpoint: bool = False
    """gradient checkpointing of the VAE decoder"""
    seed: int = 0
    """random seed (same seed on the CPU -> identical run)"""
    run_dir: str = ""
    """output folder; default runs/alignprop__<reward>__<seed>__<time>"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """frozen weights: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16; LoRA stays fp32"""
    threads: int = 2
    """CPU threads for torch (0 = torch's default, often slower for small models); 1 per job when sharing a CPU"""
    eval_every: int = 10
    """evaluate every N iterations (0 = only at the start and the end)"""
    eval_size: int = 16
    """number of fixed evaluation prompts (fixed noise, deterministic DDIM)"""


def check_args(args: Args):
    prompts = common.check_common_args(args, differentiable=True)
    if args.truncation not in TRUNCATIONS:
        common.fail(f"--truncation {args.truncation}: unknown; choose one of {', '.join(TRUNCATIONS)}")
    if args.num_steps < 2:
        common.fail(f"--num-steps must be at least 2: truncation leaves 1 <= k < T (got {args.num_steps})")
    if args.loss_coeff <= 0:
        common.fail(f"--loss-coeff must be positive (got {args.loss_coeff})")
    if args.grad_accum < 1 or args.eval_size < 1:
        common.fail("--grad-accum and --eval-size must be at least 1")
    return prompts


def draw_truncation(T: int, truncation: str) -> int:
    """The truncation point k (a rollout step index, 0 = noisiest) drawn once per trajectory, 1 <= k < T.

    As in the 2024 code (backprop_strategy), a draw outside [1, T) is redrawn. The 2023 code instead drew
    randint(0, 50) afresh at every step and detached that step when i < draw, so step i kept its gradient
    with probability (i + 1) / 51, not a contiguous window.
    """
    if truncation == "fixed":
        return T - 1
    while True:
        if truncation == "gaussian":
            k = int(random.gauss(42 / 50 * T, 5 / 50 * T))
        else:
            k = random.randint(0, T)
        if 1 <= k < T:
            return k


def alignprop_steps(T: int, truncation: str):
    """DRTune Alg. 1 line 2 for AlignProp -> the rollout step indices that carry gradient: all i >= k."""
    return list(range(draw_truncation(T, truncation), T))


def main():
    # TRY NOT TO MODIFY: setup
    args = tyro.cli(Args)
    prompts = check_args(args)
    device, dtype = common.setup_device(args.device, args.dtype, args.threads)
    common.seed_everything(args.seed)
    pipe = common.load_pipeline(args.model, dtype, device)
    resolution = args.resolution or common.native_resolution(pipe)
    params = common.add_lora(pipe.unet, args.lora_rank, args.lora_alpha or None, args.lora_targets)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = common.reward_function(args)
    eval_set = common.eval_prompts(args.prompts, prompts, args.eval_size)
    log = common.RunLog(args.run_dir or common.default_run_dir(__file__, args.reward, args.seed), args, args.iters)
    uncond = common.encode_prompts(pipe, [""]).expand(args.batch_size, -1, -1)
    T = args.num_steps

    def evaluate(it):
        scores, images = common.evaluate(pipe, eval_set, reward_fn, num_steps=T,
                                         guidance_scale=args.guidance_scale, resolution=resolution)
        log.save_images(images, f"eval_{it:05d}.png")
        return {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item()}

    samples_seen = 0
    for it in range(args.iters):
        row = {"iter": it}
        if it == 0 or (args.eval_every and it % args.eval_every == 0):
            row |= evaluate(it)

        rewards_seen, loss_total, trained = [], 0.0, []
        for _ in range(args.grad_accum):
            # ALGO LOGIC: a fresh truncation point per trajectory (here per micro-batch, shared by its images)
            grad_steps = alignprop_steps(T, args.truncation)
            trained.append(grad_steps)
            batch = random.choices(prompts, k=args.batch_size)
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=grad_steps, checkpoint=args.checkpoint)
            images = common.decode(pipe.vae, out.output, checkpoint=args.vae_checkpoint)
            reward = reward_fn(images, batch)
            # The originals use loss_coeff * (10 - r) (trl), |r - 10| (aesthetic) or 1 - r (HPS): the same
            # gradient while r is below the target.
            loss = -args.loss_coeff * reward.mean() / args.grad_accum
            loss.backward()
            rewards_seen.append(reward.detach())
            loss_total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += args.batch_size * args.grad_accum

        # TRY NOT TO MODIFY: logging
        reward_all = torch.cat(rewards_seen)
        row |= {"reward_mean": reward_all.mean().item(), "reward_std": reward_all.std().item(),
                "loss": loss_total, "grad_norm": grad_norm.item(), "samples_seen": samples_seen,
                "truncation": [steps[0] for steps in trained]}  # k per micro-batch: steps k..T-1 trained
        if it == args.iters - 1:
            row |= evaluate(it + 1)  # the final model, after the last update
        log.log(row)
    common.save_lora(pipe.unet, log.dir, optimizer, {"iter": args.iters, "samples_seen": samples_seen})
    log.close("alignprop")


if __name__ == "__main__":
    main()
