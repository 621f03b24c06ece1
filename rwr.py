"""RWR: reward-weighted regression for diffusion models, the baseline of Black et al. (ICLR 2024, "Training
Diffusion Models with Reinforcement Learning", arXiv 2305.13301), appendix C.2, F.2, F.3.

Each iteration (a "round"):
  1. sample images from the current model (ancestral DDIM, CFG) and score them with the reward;
  2. weight every sample, per prompt (F.3):
     --weighting softmax: w = n_p * softmax(beta * r) over the n_p samples of the prompt (w_RWR, mean 1);
     --weighting sparse:  w = 1 for the top samples of the prompt, the bottom --percentile % dropped (w_sparse);
  3. train the standard denoising loss (eq. 1, epsilon or v target) on the latents of the model's own
     samples at random t, each sample's term multiplied by its weight, with the guided prediction (G.1).
The rewards need no gradient. RWR ignores the denoising chain and sees only x_0: a one-step MDP (C.2).

Quick run on the toy world (CPU, a few minutes; deterministic samples and a pull toward the pretrained model, which
the paper has not: without it self-training on its own samples erases the toy pictures, README "Do the defaults
hold?"):
    python rwr.py --weighting softmax
The paper's settings (F.6: SD 1.4, T = 50, w = 5, 10k samples and 400 updates of 128 per round,
lr 1e-5, beta 0.2 on the raw reward as in the JAX code; sparse: percentile 90; the paper tunes the whole
UNet, here LoRA) on a GPU:
    python rwr.py --weighting softmax --model CompVis/stable-diffusion-v1-4 --reward jpeg_compressibility \
        --prompts imagenet_animals --eta 1 --kl-coeff 0 --num-steps 50 --guidance-scale 5.0 --batch-size 16 \
        --sample-batches 625 --samples-per-prompt 1 --grad-accum 8 --updates-per-round 400 --lr 1e-5 \
        --inverse-temperature 0.2 --no-normalize --lora-rank 4 --iters 6
and RWR-sparse with the same flags but `--weighting sparse --percentile 90`.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

import common
import distributed
import runner
from hub import DEFAULT_MODEL, fail


@dataclass
class Args(runner.RunArgs):
    weighting: str = "softmax"
    """softmax: w = n * softmax(beta r) per prompt (w_RWR); sparse: keep the top of each prompt (w_sparse)"""
    model: str = DEFAULT_MODEL
    """diffusers Stable Diffusion 1.x/2.x/XL/3 or FLUX: hub id or local folder; toy-flow = the toy world's
    flow-matching model (toyworld/flow), toy = its Stable Diffusion (toyworld/sd)"""
    reward: str = "colorfulness"
    """a reward of rewards.py, a weighted sum (hpsv2+0.5*clipscore) or module:function (need not be differentiable);
    colorfulness: the toy world's honest task (larger shapes; paper: jpeg_compressibility, aesthetic)"""
    prompts: str = "auto"
    """a prompt set of prompts/ (evaluated on <set>_eval if it exists) or a text file, one prompt per line; auto =
    toy for the toy model, else the reward's set (simple_animals, general or books)"""
    num_steps: int = 10
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale, used for sampling and, with --cfg-training, training (paper: 5.0)"""
    eta: float = 0.0
    """DDIM noise scale for sampling (paper: 1.0, ancestral); on a flow model the SDE's noise level. RWR sees only x_0
    (C.2), so 0 (deterministic) serves: its samples are then those the evaluation draws"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per sampling batch and per training micro-batch"""
    sample_batches: int = 8
    """sampling batches per round: samples per round = batch_size x sample_batches (paper: 10k; 8 prompts x 8 here)"""
    samples_per_prompt: int = 8
    """each round draws (samples per round) / this many prompts, each sampled this many times; 1 = iid prompts"""
    grad_accum: int = 1
    """micro-batches per optimizer update (paper: 128 samples per update)"""
    updates_per_round: int = 8
    """optimizer updates per round, cycling over the round's kept samples (paper: 400)"""
    iters: int = 24
    """iterations, each one round: sampling, then --updates-per-round updates (paper: 6 rounds)"""
    lr: float = 3e-3
    """AdamW learning rate (paper: 1e-5 on the full UNet; 3e-3 is the toy world's best for both weightings, README
    "DDPO Fig. 3")"""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper: 1e-4)"""
    grad_clip: float = 1.0
    """gradient-norm clip (paper: 1.0)"""
    lora_rank: int = 4
    """LoRA rank"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer"""
    inverse_temperature: float = 1.0
    """beta of the softmax weights w = exp(beta r) / Z (paper: 0.2 on the raw reward)"""
    normalize: bool = True
    """standardise rewards per prompt before the softmax (F.3), so beta does not depend on the reward's scale"""
    percentile: float = 90.0
    """sparse: drop this bottom percentage of each prompt's samples, keep the rest (paper: 90)"""
    cfg_training: bool = True
    """train the guided prediction with the sampling guidance scale (appendix G.1)"""
    kl_coeff: float = 3.0
    """weight of a pull toward the pretrained model: kl_coeff x ||prediction - pretrained prediction||^2 on the same
    noised sample, the step KL between the two models' Gaussians up to a constant (0 = the paper's RWR, which on the
    toy world erases the pictures within 8 rounds, README "Do the defaults hold?")"""
    # a shared flag (runner.RunArgs) with this script's own default
    eval_every: int = 4
    """evaluate every N iterations (0 = only before the first and after the last)"""


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=False)
    if args.weighting not in ("softmax", "sparse"):
        fail(f"--weighting must be softmax or sparse (got {args.weighting})")
    if not 0 <= args.eta <= 1:
        fail(f"--eta must be in [0, 1] (got {args.eta})")
    if not 0 < args.percentile < 100:
        fail(f"--percentile must be in (0, 100) (got {args.percentile})")
    for name in ("sample_batches", "samples_per_prompt", "grad_accum", "updates_per_round", "eval_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if (args.batch_size * args.sample_batches) % args.samples_per_prompt:
        fail(f"--samples-per-prompt {args.samples_per_prompt} must divide the samples per round "
             f"(--batch-size x --sample-batches = {args.batch_size * args.sample_batches})")
    if args.inverse_temperature <= 0:
        fail(f"--inverse-temperature must be positive (got {args.inverse_temperature})")
    if args.kl_coeff < 0:
        fail(f"--kl-coeff must be >= 0 (got {args.kl_coeff})")
    return prompts


def prompt_groups(prompts: list[str]) -> list[np.ndarray]:
    """Indices of the samples of each distinct prompt (the 'context' of F.3)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return [np.array(g) for g in groups.values()]


def softmax_weights(rewards, prompts: list[str], beta: float, normalize: bool = True) -> np.ndarray:
    """w_RWR (C.2) per prompt (F.3): n_p * softmax(beta * r) over the prompt's n_p samples, so each prompt's
    weights average 1 (Z = mean of exp(beta r)). With normalize, r is first standardised within the prompt."""
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.empty_like(rewards)
    for g in prompt_groups(prompts):
        r = rewards[g]
        if normalize and len(g) > 1:
            r = (r - r.mean()) / (r.std() + 1e-8)
        z = np.exp(beta * (r - r.max()))  # shifting by the max changes nothing after normalising; no overflow
        weights[g] = len(g) * z / z.sum()
    return weights


def sparse_weights(rewards, prompts: list[str], percentile: float) -> np.ndarray:
    """w_sparse (C.2) with a per-prompt percentile threshold (F.2, F.3): of a prompt's n samples the bottom
    floor(n * percentile / 100) are dropped and the rest (at least one) kept; ties broken by order."""
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.zeros_like(rewards)
    for g in prompt_groups(prompts):
        keep = max(1, len(g) - int(np.floor(len(g) * percentile / 100)))
        best = g[np.argsort(-rewards[g], kind="stable")[:keep]]
        weights[best] = 1.0
    return weights


def weighted_denoising_loss(prediction, target, weights):
    """Eq. 1 with per-sample weights: mean_i w_i * ||target - prediction||^2 (mean over dims, as the
    diffusers training loss does); the weights are constants, no gradient through the reward."""
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
    return (weights * per_sample).mean()


def anchor_to_pretrained(pipe, pred, x_t, t, cond, uncond, guidance_scale: float):
    """mean ||pred - pred_ref||^2 with pred_ref the pretrained model's (the same UNet, its LoRA disabled) on the same
    input. Self-training on its own samples drifts from the pretrained model every round, whatever the weights;
    this bounds the drift as a KL penalty does (two Gaussians of one std: KL is the squared mean gap, scaled)."""
    pred_ref = common.pretrained_output(pipe.unet, x_t, t, cond, uncond, guidance_scale)
    return ((pred - pred_ref) ** 2).mean()


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
    run_name = f"rwr_{args.weighting}"
    run = runner.Run(__file__, args, pipe.unet, optimizer, device, name=run_name)
    B, T, scheduler = args.batch_size, args.num_steps, pipe.scheduler
    uncond = common.encode_prompts(pipe, [""]).expand(B, -1, -1)
    N = B * args.sample_batches

    @run.evaluation  # rank 0 alone; the same protocol in every script (common.EVAL_PROTOCOL)
    def evaluate(it):
        scores, images = common.evaluate(pipe, eval_set, reward_fn, num_steps=args.eval_num_steps,
                                         guidance_scale=args.eval_guidance_scale, resolution=resolution)
        run.save_images(images, f"eval_{it:05d}.png")
        row = {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item()}
        # the objective this method optimises: its own sampler (T, CFG, eta) on the same prompts and noise
        scores, _ = common.evaluate(pipe, eval_set, reward_fn, num_steps=T, guidance_scale=args.guidance_scale,
                                    eta=args.eta, resolution=resolution)
        return row | {"policy_reward_mean": scores.mean().item(), "policy_reward_std": scores.std().item()}

    samples_seen = run.last("samples_seen")
    for it in run.iterations():
        row = {"iter": it}
        if it == 0 or (args.eval_every and it % args.eval_every == 0):
            row |= evaluate(it)

        # ALGO LOGIC: a round of data from the current model. Prompts come in groups so that every prompt has
        # several samples to be weighted against (F.3's per-prompt normalisation needs more than one).
        round_prompts = [p for p in random.choices(prompts, k=N * distributed.WORLD // args.samples_per_prompt)
                         for _ in range(args.samples_per_prompt)]  # the global round; this rank samples its share
        local_prompts = distributed.shard(round_prompts)
        x0, conds, reward_list = [], [], []
        for b in range(args.sample_batches):
            batch = local_prompts[b * B:(b + 1) * B]
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, B, resolution)
            with torch.no_grad():
                out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                     eta=args.eta).output
                reward_list.append(reward_fn(common.decode(pipe.vae, out), batch).float())
            # The sample's own latent stands in for VAE-encoding its decoded image (the JAX code stored images
            # and re-encoded them): the same data without the VAE's reconstruction error.
            x0.append(out)
            conds.append(cond)
        x0, conds, reward_all = torch.cat(x0), torch.cat(conds), distributed.gather(torch.cat(reward_list))
        run.guard(it, reward=reward_all)  # the round's rewards, all ranks', in the order of round_prompts

        if args.weighting == "softmax":
            weights = softmax_weights(reward_all.cpu(), round_prompts, args.inverse_temperature, args.normalize)
        else:
            weights = sparse_weights(reward_all.cpu(), round_prompts, args.percentile)
        weights = distributed.shard(torch.as_tensor(weights, dtype=torch.float32)).to(device)  # this rank's samples'
        kept = torch.nonzero(weights > 0).squeeze(1)  # sparse: the discarded samples are never trained on
        # Ranks keep different numbers of samples: each shuffles its own with a generator of its own, seeded from
        # the shared stream (which every rank must consume alike).
        order_rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())) + distributed.RANK)

        # ALGO LOGIC: weighted denoising updates, cycling through the kept samples in shuffled order
        order, losses, grad_norms, kls = torch.empty(0, dtype=torch.long, device=device), [], [], []
        for _ in range(args.updates_per_round):
            for _ in range(args.grad_accum):
                while len(order) < B:
                    order = torch.cat([order, kept[torch.randperm(len(kept), generator=order_rng).to(device)]])
                idx, order = order[:B], order[B:]
                # Eq. 1: noise the sample to a random training timestep (drawn as the model was pre-trained:
                # uniform for DDPM, logit-normal sigma for a flow model) and regress the noise
                # (or v, for a v-prediction model; the velocity noise - x0, the flow-matching loss, for a flow
                # model) from the guided output (G.1).
                t = common.training_timesteps(scheduler, B, device)
                noise = distributed.randn(x0[idx].shape, device)
                x_t = common.noised(scheduler, x0[idx], noise, t)
                target = common.denoising_target(scheduler, x0[idx], noise, t)
                pred = common.unet_output(pipe.unet, x_t, t, conds[idx], uncond if args.cfg_training else None,
                                          args.guidance_scale)
                loss = weighted_denoising_loss(pred, target, weights[idx])
                if args.kl_coeff:  # not in the paper: the toy defaults' pull toward the pretrained model
                    kl = anchor_to_pretrained(pipe, pred, x_t, t, conds[idx], uncond if args.cfg_training else None,
                                              args.guidance_scale)
                    loss = loss + args.kl_coeff * kl
                    kls.append(kl.item())
                (loss / args.grad_accum).backward()
                losses.append(loss.item())
            distributed.average_gradients(params)  # over the ranks, before clipping
            grad_norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item())
            run.guard(it, loss=losses[-args.grad_accum:], grad_norm=grad_norms[-1])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        samples_seen += N * distributed.WORLD

        # TRY NOT TO MODIFY: logging
        row |= {"reward_mean": reward_all.mean().item(), "reward_std": reward_all.std().item(),
                "loss": distributed.mean_over_ranks(np.mean(losses)), "grad_norm": float(np.mean(grad_norms)),
                "kept": len(kept), "weight_max": weights.max().item(), "samples_seen": samples_seen}
        row |= {"kl_to_pretrained": distributed.mean_over_ranks(np.mean(kls))} if args.kl_coeff else {}
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
