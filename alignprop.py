"""AlignProp: Aligning Text-to-Image Diffusion Models with Reward Backpropagation (Prabhudesai, Goyal, Pathak,
Fragkiadaki, 2023, arXiv 2310.03739), as written in DRTune's Algorithm 1 line 2.

Backpropagate a differentiable reward through the sampling chain with randomised truncated backpropagation:
per trajectory draw a truncation point k, and only the steps i >= k (the last T - k) carry gradient, each UNet
call checkpointed so memory does not grow with the number of trained steps.
  --truncation gaussian: k = int(N(42, 5)) at T = 50, scaled to T (the 2024 code's default; ~ the last 8 steps)
  --truncation uniform:  k ~ randint(1, T - 1)  (DRTune Alg. 1 line 2: {i}_{i >= randint(1, T)})
  --truncation fixed:    k = T - 1, only the last step (the paper's K = 1, for low memory)

Quick run on the toy world (CPU, minutes):
    python alignprop.py                 # symmetry with the CLIP regulariser
The paper's settings on Stable Diffusion 1.5 (a GPU; batch 128 = 4 GPUs x 4 x 8 accumulated):
    python alignprop.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward symmetry \
        --prompts simple_animals --num-steps 50 --guidance-scale 7.5 --lora-rank 4 --lr 1e-3 \
        --weight-decay 0.1 --grad-clip 5.0 --loss-coeff 0.01 --batch-size 4 --grad-accum 32 --iters 14
"""

import random
from dataclasses import dataclass

import torch

import common
import distributed
import runner
from hub import DEFAULT_MODEL, fail

TRUNCATIONS = ("gaussian", "uniform", "fixed")


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
    num_steps: int = 10
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 7.5
    """classifier-free guidance scale (paper: 7.5; the 2024 code: 5.0)"""
    eta: float = 0.0
    """DDIM noise scale; 0.0 is the paper-era deterministic DDIM (the 2024 code: 1.0); on a flow model 0 is the ODE,
    above 0 the SDE's noise level"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per micro-batch (paper: 4 per GPU)"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 60
    """iterations, each one optimizer update (on the toy world 30 updates of 4 images gained less than
    seed-to-seed noise, README "Do the defaults hold?")"""
    lr: float = 5e-3
    """AdamW learning rate (paper: 1e-3; on the toy world 3e-3 gained on 3 of 6 runs, README "Do the defaults
    hold?")"""
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
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer"""
    truncation: str = "gaussian"
    """where backpropagation is truncated, drawn once per trajectory: gaussian, uniform or fixed (K = 1)"""
    stop_grad_input: bool = False
    """DRTune eq. 3 on this method: feed sg(x_t) to the UNet, so gradient reaches an earlier step only through the
    linear part of the DDIM update (DRTune sec. 4.2, Fig. 6-7: it helps DRaFT and AlignProp too)"""
    loss_coeff: float = 0.01
    """loss = -loss_coeff * reward (paper: 0.01)"""
    gradient_checkpointing: bool = True
    """recompute every differentiable UNet call in backward: activation memory O(1) in the trained steps"""
    vae_gradient_checkpointing: bool = False
    """gradient checkpointing of the VAE decoder"""


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=True)
    if args.truncation not in TRUNCATIONS:
        fail(f"--truncation {args.truncation}: unknown; choose one of {', '.join(TRUNCATIONS)}")
    if args.num_steps < 2:
        fail(f"--num-steps must be at least 2: truncation leaves 1 <= k < T (got {args.num_steps})")
    if args.loss_coeff <= 0:
        fail(f"--loss-coeff must be positive (got {args.loss_coeff})")
    if args.grad_accum < 1 or args.eval_size < 1:
        fail("--grad-accum and --eval-size must be at least 1")
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
    T = args.num_steps

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

        rewards_seen, loss_total, trained = [], 0.0, []
        for _ in range(args.grad_accum):
            # ALGO LOGIC: a fresh truncation point per trajectory (here per micro-batch, shared by its images)
            grad_steps = alignprop_steps(T, args.truncation)
            trained.append(grad_steps)
            batch = distributed.choices(prompts, args.batch_size)  # this rank's share
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=grad_steps,
                                 stop_grad_input=args.stop_grad_input, checkpoint=args.gradient_checkpointing)
            images = common.decode(pipe.vae, out.output, checkpoint=args.vae_gradient_checkpointing)
            reward = reward_fn(images, batch)
            # The originals use loss_coeff * (10 - r) (trl), |r - 10| (aesthetic) or 1 - r (HPS): the same
            # gradient while r is below the target.
            loss = -args.loss_coeff * reward.mean() / args.grad_accum
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
                "samples_seen": samples_seen,
                "truncation": [steps[0] for steps in trained]}  # k per micro-batch: steps k..T-1 trained
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
