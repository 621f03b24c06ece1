"""DRTune: Deep Reward Tuning (Wu et al., ECCV 2024, "Deep Reward Supervisions for Tuning Text-to-Image
Diffusion Models", arXiv 2405.00760), Algorithm 1.

Backpropagate a differentiable reward through the sampling chain, but
  1. stop the gradient of the UNet input, eps_theta(sg(x_t), t) (eq. 3), so the chain is linear in the
     gradient and early steps can be trained without exploding gradients (eq. 4-5);
  2. train only K equally spaced steps with a random offset (Alg. 1 lines 5-6);
  3. stop early at a random t_min <= m and score the x0 prediction made there (lines 8, 19-21).

Quick run on the toy world (CPU, under 3 minutes on 2 cores; symmetry with the toy CLIP as regulariser):
    python drtune.py --reward symmetry --K 5
The paper's settings on Stable Diffusion 1.5 (a GPU; batch 32 = 8 x 4 accumulated; DDPM-like eta 1):
    python drtune.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward symmetry \
        --clip-model openai/clip-vit-large-patch14 --prompts my_prompts.txt --num-steps 50 --K 5 --early-stop 20 \
        --eta 1 --guidance-scale 7.5 --lora-rank 128 --lr 2e-5 --grad-clip 0.1 --batch-size 8 --grad-accum 4
"""

import random
from dataclasses import dataclass

import torch

import common
import distributed
import runner
from hub import DEFAULT_MODEL, fail


@dataclass
class Args(runner.RunArgs):
    model: str = DEFAULT_MODEL
    """diffusers Stable Diffusion 1.x/2.x/XL/3 or FLUX: hub id or local folder; toy-flow = the toy world's
    flow-matching model (toyworld/flow), toy = its Stable Diffusion (toyworld/sd)"""
    reward: str = "symmetry"
    """a reward of rewards.py, a weighted sum (hpsv2+0.5*clipscore) or module:function (must be differentiable)"""
    clip_weight: float = 0.015  # a shared flag (runner.RunArgs) with this script's own default
    """symmetry: weight of the CLIP-score regulariser (0 = DRTune eq. 6 alone; toy CLIP scores are ~90, ~25
    for a picture without the prompted shape; 0.015 keeps the shapes where 0.01 let some runs bend them)"""
    prompts: str = "auto"
    """a prompt set of prompts/ (evaluated on <set>_eval if it exists) or a text file, one prompt per line; auto =
    toy for the toy model, else the reward's set (simple_animals, general or books)"""
    num_steps: int = 20
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale (paper: 7.5)"""
    eta: float = 0.0
    """DDIM noise scale (paper: DDPM, i.e. 1.0); 0 trains on the deterministic sampler the evaluation uses (on a flow
    model: the ODE; above 0 the SDE's noise level)"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 100
    """iterations, each one optimizer update"""
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
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer"""
    K: int = 5
    """number of trained sampling steps, equally spaced (paper: 5)"""
    early_stop: int = 3
    """m of Alg. 1: sampling stops at t_min ~ randint(1, m) (paper: 20 at T = 50, i.e. 0.4 T)"""
    gradient_checkpointing: bool = True
    """recompute every differentiable UNet call in backward: activation memory O(1) in the trained steps"""
    vae_gradient_checkpointing: bool = False
    """gradient checkpointing of the VAE decoder"""
    # a shared flag (runner.RunArgs) with this script's own default
    eval_every: int = 50
    """evaluate every N iterations (0 = only before the first and after the last)"""


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=True)
    if not 1 <= args.K <= args.num_steps:
        fail(f"--K must be in [1, T = {args.num_steps}] (got {args.K})")
    if not 1 <= args.early_stop < args.num_steps:
        fail(f"--early-stop must be in [1, T - 1 = {args.num_steps - 1}] (got {args.early_stop})")
    if args.grad_accum < 1 or args.eval_size < 1:
        fail("--grad-accum and --eval-size must be at least 1")
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
    args = runner.parse_args(Args, __file__)
    prompts = check_args(args)
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
    T, K = args.num_steps, args.K

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

        # ALGO LOGIC: which steps carry gradient, and where sampling stops (Algorithm 1 lines 5-8)
        grad_steps, stop_step = drtune_steps(T, K, args.early_stop)

        rewards_seen, loss_total = [], 0.0
        for _ in range(args.grad_accum):
            batch = distributed.choices(prompts, args.batch_size)  # this rank's share
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=grad_steps,
                                 stop_grad_input=True,  # eq. 3: eps_theta(sg(x_t), t)
                                 stop_step=stop_step, checkpoint=args.gradient_checkpointing)
            images = common.decode(pipe.vae, out.output, checkpoint=args.vae_gradient_checkpointing)
            reward = reward_fn(images, batch)
            loss = -reward.mean() / args.grad_accum  # line 23: ascend the reward of the x0 prediction
            if loss.requires_grad:  # all trained steps may lie below t_min (e.g. K = 1): then no gradient
                loss.backward()
            rewards_seen.append(reward.detach())
            loss_total += loss.item()
        distributed.average_gradients(params)  # over the ranks, before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        reward_all = distributed.gather(torch.cat(rewards_seen))  # the global batch's
        run.guard(it, reward=reward_all, loss=loss_total, grad_norm=grad_norm)  # no NaN reaches the weights
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += args.batch_size * args.grad_accum * distributed.WORLD

        # TRY NOT TO MODIFY: logging
        row |= {"reward_mean": reward_all.mean().item(), "reward_std": reward_all.std().item(),
                "loss": distributed.mean_over_ranks(loss_total), "grad_norm": grad_norm.item(),
                "samples_seen": samples_seen, "t_min": T - stop_step, "trained_steps": grad_steps}
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
