"""DRTune: Deep Reward Tuning (Wu et al., ECCV 2024, "Deep Reward Supervisions for Tuning Text-to-Image
Diffusion Models", arXiv 2405.00760), Algorithm 1.

Backpropagate a differentiable reward through the sampling chain, but
  1. stop the gradient of the UNet input, eps_theta(sg(x_t), t) (eq. 3), so the chain is linear in the
     gradient and early steps can be trained without exploding gradients (eq. 4-5);
  2. train only K equally spaced steps with a random offset (Alg. 1 lines 5-6);
  3. stop early at a random t_min <= m and score the x0 prediction made there (lines 8, 19-21).

Quick run on the toy world (CPU, about 3 minutes; symmetry with the toy CLIP as regulariser):
    python drtune.py --reward symmetry --K 5
The paper's settings on Stable Diffusion 1.5 (a GPU; batch 32 = 8 x 4 accumulated; DDPM-like eta 1):
    python drtune.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward symmetry \
        --clip-model openai/clip-vit-large-patch14 --prompts my_prompts.txt --num-steps 50 --K 5 --m 20 \
        --eta 1 --guidance-scale 7.5 --lora-rank 128 --lr 2e-5 --grad-clip 0.1 --batch-size 8 --grad-accum 4
"""

import random
from dataclasses import dataclass

import torch
import tyro

import common


@dataclass
class Args:
    model: str = common.TOY_MODEL
    """diffusers Stable Diffusion 1.x/2.x: hub id or local folder; toy = the toy world's model (toyworld/sd)"""
    reward: str = "symmetry"
    """reward name from rewards.py (must be differentiable)"""
    clip_model: str = common.TOY_MODEL
    """CLIP for the clipscore reward and the symmetry regulariser: hub id or local folder; toy = toyworld/clip"""
    clip_weight: float = 0.01
    """symmetry: weight of the CLIP-score regulariser (0 = DRTune eq. 6 alone; toy CLIP scores are ~90, ~25
    for a picture without the prompted shape)"""
    prompts: str = "toy"
    """prompt set name (a file in prompts/; evaluation uses <set>_eval if it exists) or a text file, one prompt per line"""
    num_steps: int = 20
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale (paper: 7.5)"""
    eta: float = 0.0
    """DDIM noise scale (paper: DDPM, i.e. 1.0); 0 trains on the deterministic sampler the evaluation uses"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 70
    """optimizer updates"""
    lr: float = 3e-3
    """AdamW learning rate (paper: 2e-5 at LoRA rank 128)"""
    weight_decay: float = 1e-2
    """AdamW weight decay (PyTorch default, as in the paper)"""
    grad_clip: float = 0.1
    """gradient-norm clip (paper: 0.1)"""
    lora_rank: int = 8
    """LoRA rank (paper: 128)"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    K: int = 5
    """number of trained sampling steps, equally spaced (paper: 5)"""
    m: int = 3
    """early stop: t_min ~ randint(1, m) (paper: 20 at T = 50, i.e. 0.4 T)"""
    checkpoint: bool = True
    """gradient checkpointing of every differentiable UNet call"""
    vae_checkpoint: bool = False
    """gradient checkpointing of the VAE decoder"""
    seed: int = 0
    """random seed (same seed on the CPU -> identical run)"""
    run_dir: str = ""
    """output folder; default runs/drtune__<reward>__<seed>__<time>"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """frozen weights: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16; LoRA stays fp32"""
    threads: int = 2
    """CPU threads for torch (0 = torch's default, often slower for small models); 1 per job when sharing a CPU"""
    eval_every: int = 35
    """evaluate every N iterations (0 = only at the start and the end)"""
    eval_size: int = 8
    """number of fixed evaluation prompts (fixed noise, deterministic DDIM)"""


def check_args(args: Args):
    prompts = common.check_common_args(args, differentiable=True)
    if not 1 <= args.K <= args.num_steps:
        common.fail(f"--K must be in [1, T = {args.num_steps}] (got {args.K})")
    if not 1 <= args.m < args.num_steps:
        common.fail(f"--m must be in [1, T - 1 = {args.num_steps - 1}] (got {args.m})")
    if args.grad_accum < 1 or args.eval_size < 1:
        common.fail("--grad-accum and --eval-size must be at least 1")
    return prompts


def drtune_steps(T: int, K: int, m: int):
    """Algorithm 1 lines 5-8 -> (rollout step indices that carry gradient, rollout step index to stop at).

    Paper timesteps t run T..1 (t = T is the first, noisiest step); the rollout counts steps i = T - t.
    """
    stride = T // K
    # Line 5 draws s ~ randint(1, T - K*floor(T/K)), an empty range when K divides T. We draw
    # s ~ randint(1, T - (K-1)*floor(T/K)): the largest range that keeps all K steps inside 1..T;
    # when K divides T every timestep is then trained equally often.
    s = random.randint(1, T - (K - 1) * stride)
    train_timesteps = [s + j * stride for j in range(K)]  # line 6: K equally spaced steps
    t_min = random.randint(1, m)  # line 8: stop at t_min and score the x0 prediction made there
    # Trained steps with t < t_min are never reached and so contribute nothing, as in Algorithm 1.
    return sorted(T - t for t in train_timesteps), T - t_min


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
    T, K = args.num_steps, args.K

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

        # ALGO LOGIC: which steps carry gradient, and where sampling stops (Algorithm 1 lines 5-8)
        grad_steps, stop_step = drtune_steps(T, K, args.m)

        rewards_seen, loss_total = [], 0.0
        for _ in range(args.grad_accum):
            batch = random.choices(prompts, k=args.batch_size)
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=grad_steps,
                                 stop_grad_input=True,  # eq. 3: eps_theta(sg(x_t), t)
                                 stop_step=stop_step, checkpoint=args.checkpoint)
            images = common.decode(pipe.vae, out.output, checkpoint=args.vae_checkpoint)
            reward = reward_fn(images, batch)
            loss = -reward.mean() / args.grad_accum  # line 23: ascend the reward of the x0 prediction
            if loss.requires_grad:  # all trained steps may lie below t_min (e.g. K = 1): then no gradient
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
                "t_min": T - stop_step, "trained_steps": grad_steps}
        if it == args.iters - 1:
            row |= evaluate(it + 1)  # the final model, after the last update
        log.log(row)
    common.save_lora(pipe.unet, log.dir, optimizer, {"iter": args.iters, "samples_seen": samples_seen})
    log.close("drtune")


if __name__ == "__main__":
    main()
