"""DDPO: Denoising Diffusion Policy Optimization (Black et al., ICLR 2024, "Training Diffusion Models with
Reinforcement Learning", arXiv 2305.13301), appendix C.3.

Denoising is a T-step MDP whose policy p_theta(x_{t-1} | x_t, c) is the Gaussian of a stochastic DDIM step
(eta > 0), so the log-likelihood of every action is exact. Each iteration (a "round"):
  1. sample trajectories with the current model, recording x_T..x_0 and log p of every step;
  2. score x_0 with the reward (any reward: no gradient needed) and normalise it per prompt (F.3);
  3. re-score the stored steps with gradient and update:
     --estimator sf: score-function / REINFORCE, one update per round (eq. 3);
     --estimator is: importance sampling with PPO clipping, several updates per round (eq. 4, F.1).

Quick run on the toy world (colourfulness, raised by drawing larger shapes: README "Do the defaults hold?"):
    python ddpo.py
The paper's settings (F.6: SD 1.4, T = 50, w = 5, 256 samples per round, lr 1e-5; DDPO-IS: 4 updates
of 64 samples, clip 1e-4; the paper tunes the whole UNet, here LoRA) on a GPU:
    python ddpo.py --estimator is --model CompVis/stable-diffusion-v1-4 --reward jpeg_compressibility \
        --prompts imagenet_animals --num-steps 50 --guidance-scale 5.0 --batch-size 8 --sample-batches 32 \
        --grad-accum 8 --clip-range 1e-4 --lr 1e-5 --samples-per-prompt 1 --stat-min-count 16 --lora-rank 4 --iters 200
and DDPO-SF with the same flags but `--estimator sf --grad-accum 32` (one update per round).
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
    estimator: str = "is"
    """sf: score-function gradient, one update per round (eq. 3); is: importance sampling + PPO clip (eq. 4)"""
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
    """T: DDIM sampling steps, each one an MDP step (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale, used for sampling and, with --cfg-training, training (paper: 5.0)"""
    eta: float = 1.0
    """DDIM noise scale in (0, 1]; the policy is Gaussian only when eta > 0 (paper: 1.0, ancestral); on a flow model
    the noise level a of Flow-GRPO's SDE (Flow-GRPO: 0.7)"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per sampling batch, and per training micro-batch (equal, so re-scoring repeats sampling)"""
    sample_batches: int = 4
    """sampling batches per round: samples per round = batch_size x sample_batches (paper: 256)"""
    samples_per_prompt: int = 8
    """each round draws (samples per round) / this many prompts, each sampled this many times, so that per-prompt
    statistics hold from the first round; 1 = iid prompts, as the paper and ddpo-pytorch (their statistics then
    fill up over rounds: on the toy world a far worse DDPO-SF, README "DDPO Fig. 3")"""
    grad_accum: int = 0
    """sampling batches per optimizer update (must divide --sample-batches); 0 = all of them for sf (one update
    per round, eq. 3), a quarter for is (4 updates per round, as the paper's IS)"""
    inner_epochs: int = 1
    """passes over each round's samples (is only; paper: 1)"""
    iters: int = 20
    """iterations, each one round: sampling --sample-batches batches, then their updates"""
    lr: float = 0.0
    """AdamW learning rate; 0 = the toy world's best of each estimator, 1e-2 for sf, 1e-3 for is (README "DDPO
    Fig. 3"; paper: 1e-5 on the full UNet, where each step moves the policy far less)"""
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
    clip_range: float = 1e-2
    """PPO clip range on the importance ratio (is only; paper F.1: 1e-4, which no toy learning rate that learns
    keeps: README "DDPO Fig. 3")"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max] (ddpo-pytorch: 5)"""
    timestep_fraction: float = 1.0
    """fraction of the T steps of every trajectory trained per epoch, a random subset, in (0, 1]"""
    cfg_training: bool = True
    """train the guided epsilon with the sampling guidance scale (appendix G.1)"""
    per_prompt_stats: bool = True
    """normalise rewards per prompt with a running buffer (F.3); off = across the round's batch"""
    stat_buffer: int = 16
    """per-prompt buffer length (ddpo-pytorch: 16)"""
    stat_min_count: int = 8
    """below this many buffered rewards a prompt uses the round's batch statistics (ddpo-pytorch: 16); 8 = a
    prompt's own statistics from its first round at --samples-per-prompt 8"""
    kl_coeff: float = 0.0
    """beta: weight of a per-step KL penalty to the pretrained policy (the LoRA disabled) added to the loss; 0 =
    DDPO. With --samples-per-prompt G on a flow model this is Flow-GRPO's objective (beta 0.01-0.04)"""
    ratio_tol: float = 1e-4
    """stop if any importance ratio before the round's first update differs from 1 by more than this"""
    # a shared flag (runner.RunArgs) with this script's own default
    eval_every: int = 5
    """evaluate every N iterations (0 = only before the first and after the last)"""


def check_args(args: Args):
    if args.estimator not in ("sf", "is"):
        fail(f"--estimator must be sf or is (got {args.estimator})")
    args.lr = args.lr or {"sf": 1e-2, "is": 1e-3}[args.estimator]  # resolved here, so args.json records it
    prompts = runner.check_common_args(args, differentiable=False)
    if not 0 < args.eta <= 1:
        fail(f"--eta must be in (0, 1]: at eta = 0 the DDIM step is deterministic and its log-prob "
             f"is undefined (got {args.eta})")
    if not args.cfg_training and args.guidance_scale != 1.0:
        fail("--no-cfg-training with guidance would re-score with another policy than the one that sampled "
             "(the ratio is not 1); use --guidance-scale 1.0 with it, or keep CFG training (appendix G.1)")
    if args.kl_coeff < 0:
        fail(f"--kl-coeff must be >= 0 (got {args.kl_coeff})")
    if not 0 < args.timestep_fraction <= 1:
        fail(f"--timestep-fraction must be in (0, 1] (got {args.timestep_fraction})")
    for name in ("sample_batches", "samples_per_prompt", "inner_epochs", "stat_buffer", "stat_min_count", "eval_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if (args.batch_size * args.sample_batches) % args.samples_per_prompt:
        fail(f"--samples-per-prompt {args.samples_per_prompt} must divide the samples per round "
             f"(--batch-size x --sample-batches = {args.batch_size * args.sample_batches})")
    grad_accum = args.grad_accum or (args.sample_batches if args.estimator == "sf" else max(1, args.sample_batches // 4))
    if args.estimator == "sf" and (grad_accum != args.sample_batches or args.inner_epochs != 1):
        fail("--estimator sf is on-policy (eq. 3): exactly one update per round; leave --grad-accum at 0 "
             "(= --sample-batches) and --inner-epochs at 1, or use --estimator is")
    if grad_accum < 0 or args.sample_batches % grad_accum:
        fail(f"--grad-accum {grad_accum} must divide --sample-batches {args.sample_batches} "
             "(each update takes a whole number of sampling batches)")
    for name in ("clip_range", "adv_clip_max", "grad_clip", "ratio_tol"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    return prompts, grad_accum


class PerPromptStatTracker:
    """Reward -> advantage, normalised per prompt by a running buffer (F.3, ddpo-pytorch's tracker).

    Each prompt keeps its last `buffer_size` rewards across rounds; until it has `min_count` of them it is
    normalised with the statistics of the whole current batch instead. Population std (ddof 0) + 1e-6.
    """

    def __init__(self, buffer_size: int, min_count: int, buffers: dict[str, list]):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = buffers  # prompt -> its last rewards; the run's checkpointed state

    def update(self, prompts: list[str], rewards) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in order of first appearance
            mask = np.array([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, [])
            buffer.extend(rewards[mask].tolist())
            del buffer[:-self.buffer_size]
            stats = np.array(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - stats.mean()) / (stats.std() + 1e-6)
        return advantages


def batch_advantages(rewards) -> np.ndarray:
    """Global normalisation over the round's samples (--no-per-prompt-stats)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


def ppo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """Per-sample clipped surrogate (eq. 4 with PPO's trust region, F.1): max(-A r, -A clip(r, 1 +- eps)).

    r = p_theta / p_old = exp(log_prob - old_log_prob); its gradient is r * grad log p, eq. 4's estimator,
    and zero wherever the clipped branch is the larger one.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def sf_loss(log_prob, advantages):
    """Per-sample score-function surrogate (eq. 3): gradient -A grad log p (the advantage is a constant)."""
    return -advantages * log_prob


def rescore(pipe, latents, next_latents, timesteps, cond, uncond, guidance_scale: float, eta: float):
    """log p_theta(x_{t-1} | x_t, c) of stored transitions, with gradient, one timestep per row (B,), and the model
    output (for the KL). The UNet call, CFG batching and sampler step are sampling's (common.rollout), so with
    unchanged weights and the same batch size this reproduces the recorded log-prob (ratio exactly 1)."""
    out = common.unet_output(pipe.unet, latents, timesteps, cond, uncond, guidance_scale)
    _, log_prob = common.step_with_logprob(pipe.scheduler, out, timesteps, latents, eta, prev_sample=next_latents)
    return log_prob, out


def kl_to_pretrained(pipe, out, latents, timesteps, cond, uncond, guidance_scale: float, eta: float):
    """Flow-GRPO's KL term: KL(p_theta(. | x_t) || p_ref(. | x_t)) of one step, both Gaussians with the step's std,
    = ||mean_theta - mean_ref||^2 / (2 std^2), averaged over the latent dimensions as the log-prob is; (B,).
    The reference is the pretrained model: the same UNet with the LoRA disabled."""
    out_ref = common.pretrained_output(pipe.unet, latents, timesteps, cond, uncond, guidance_scale)
    mean, std = common.step_mean_std(pipe.scheduler, out, timesteps, latents, eta)
    mean_ref, _ = common.step_mean_std(pipe.scheduler, out_ref, timesteps, latents, eta)
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std.flatten() ** 2)


def main():
    # TRY NOT TO MODIFY: setup
    args = runner.parse_args(Args, __file__)
    prompts, grad_accum = check_args(args)
    device, dtype = runner.setup_device(args.device, args.dtype, args.threads)
    runner.seed_everything(args.seed)
    pipe = common.load_pipeline(args.model, dtype, device, args.vae)
    resolution = args.resolution or common.native_resolution(pipe)
    params = common.add_lora(pipe.unet, args.lora_rank, args.lora_alpha or None, args.lora_targets, args.init_lora)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = runner.reward_function(args, device, dtype)
    eval_set = runner.eval_prompts(args.prompts, prompts, args.eval_size)
    run = runner.Run(__file__, args, pipe.unet, optimizer, device, name=f"ddpo_{args.estimator}")
    B, T = args.batch_size, args.num_steps
    uncond = common.encode_prompts(pipe, [""]).expand(B, -1, -1)
    train_uncond = uncond if args.cfg_training else None
    tracker = PerPromptStatTracker(args.stat_buffer, args.stat_min_count, run.state.setdefault("reward_buffers", {}))

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

        # ALGO LOGIC: sampling round with the current policy, recording every transition (C.3's MDP)
        # The global round's prompts (every rank draws them; each samples its share of every batch), in groups
        # of --samples-per-prompt so that a prompt's rewards can be normalised among themselves (F.3).
        n_round = B * args.sample_batches * distributed.WORLD
        round_prompts = [p for p in random.choices(prompts, k=n_round // args.samples_per_prompt)
                         for _ in range(args.samples_per_prompt)]
        latents, log_probs, timesteps, conds, batch_prompts, reward_list = [], [], [], [], [], []
        for b in range(args.sample_batches):
            batch_global = round_prompts[b * B * distributed.WORLD:(b + 1) * B * distributed.WORLD]
            batch = distributed.shard(batch_global)
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, B, resolution)
            with torch.no_grad():
                out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                     eta=args.eta, record=True)
                reward_list.append(distributed.gather(reward_fn(common.decode(pipe.vae, out.output), batch).float()))
            latents.append(torch.stack(out.latents, dim=1))  # (B, T+1, C, h, w): x_T .. x_0
            log_probs.append(torch.stack(out.log_probs, dim=1))  # (B, T)
            timesteps.append(torch.stack([torch.as_tensor(t) for t in out.timesteps]).to(device).expand(B, T))
            conds.append(cond)
            batch_prompts += batch_global
        latents, log_probs, timesteps, conds = (torch.cat(v) for v in (latents, log_probs, timesteps, conds))
        reward_all = torch.cat(reward_list)  # the round's, all ranks' (with batch_prompts: the global round)
        run.guard(it, reward=reward_all)
        N = len(latents)  # this rank's samples; global sample index of each (batch, rank, row):
        own = (torch.arange(N) // B) * B * distributed.WORLD + distributed.RANK * B + torch.arange(N) % B

        # F.3: the normalised reward is the advantage of every step of its trajectory (the reward comes only
        # at t = 0 and there is no discount); clipped as ddpo-pytorch does.
        round_advantages = (tracker.update(batch_prompts, reward_all.cpu()) if args.per_prompt_stats
                            else batch_advantages(reward_all.cpu()))  # over the global round, alike on every rank
        advantages = torch.as_tensor(round_advantages, dtype=torch.float32)[own].to(device)  # this rank's share
        advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max)

        # ALGO LOGIC: updates. Gradients accumulate over samples x trained timesteps (F.1), one
        # micro-batch and one timestep per backward so memory does not grow with T.
        n_train_t = max(1, int(T * args.timestep_fraction))
        stats = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": [], "kl": []}
        grad_norms, first_update_done = [], False
        for _ in range(args.inner_epochs):
            # Drawn for the global round (the stream stays alike on every rank); this rank visits its own
            # samples in that order.
            row_of = torch.full((N * distributed.WORLD,), -1)
            row_of[own] = torch.arange(N)  # global sample index -> this rank's row, or -1
            perm = row_of[torch.randperm(N * distributed.WORLD)]
            perm = perm[perm >= 0].to(device)
            # Per-sample time shuffling (ddpo-pytorch): each row visits its steps in its own random order,
            # so one micro-batch mixes timesteps; with fraction < 1 the first n_train_t form the subset.
            time_perm = torch.stack([torch.randperm(T) for _ in range(N * distributed.WORLD)])[own].to(device)
            for m in range(args.sample_batches):
                idx = perm[m * B:(m + 1) * B]
                for j in range(n_train_t):
                    k = time_perm[idx, j]
                    log_prob, out = rescore(pipe, latents[idx, k], latents[idx, k + 1], timesteps[idx, k], conds[idx],
                                            train_uncond, args.guidance_scale, args.eta)
                    if args.estimator == "is":
                        loss, ratio = ppo_loss(log_prob, log_probs[idx, k], advantages[idx], args.clip_range)
                    else:
                        loss = sf_loss(log_prob, advantages[idx])
                        ratio = torch.exp(log_prob - log_probs[idx, k])
                    if args.kl_coeff:  # Flow-GRPO: loss + beta KL(pi_theta || pi_ref), step by step
                        kl = kl_to_pretrained(pipe, out, latents[idx, k], timesteps[idx, k], conds[idx],
                                              train_uncond, args.guidance_scale, args.eta)
                        loss = loss + args.kl_coeff * kl
                        stats["kl"].append(kl.mean().item())
                    (loss.mean() / (grad_accum * n_train_t)).backward()
                    ratio = ratio.detach()
                    # Before the round's first update the policy is the sampling policy: the ratio must be 1.
                    # If not, re-scoring differs from sampling (precision, batching) and eq. 4 is wrong.
                    if not first_update_done and (ratio - 1).abs().max() > args.ratio_tol:
                        run.stop(f"iteration {it}: importance ratio off by {(ratio - 1).abs().max().item():.2e} before "
                                 f"the first update, more than --ratio-tol {args.ratio_tol}: re-scoring does not "
                                 "reproduce sampling (try --dtype fp32)")
                    stats["loss"].append(loss.mean().item())
                    stats["approx_kl"].append(0.5 * ((log_prob.detach() - log_probs[idx, k]) ** 2).mean().item())
                    stats["clipfrac"].append(((ratio - 1).abs() > args.clip_range).float().mean().item())
                    stats["ratio"].append(ratio.mean().item())
                if (m + 1) % grad_accum == 0:
                    distributed.average_gradients(params)  # over the ranks, before clipping
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item())
                    run.guard(it, loss=stats["loss"][-grad_accum * n_train_t:], grad_norm=grad_norms[-1])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    first_update_done = True
        samples_seen += len(reward_all)

        # TRY NOT TO MODIFY: logging
        row |= {"reward_mean": reward_all.mean().item(), "reward_std": reward_all.std().item(),
                "loss": distributed.mean_over_ranks(np.mean(stats["loss"])),
                "approx_kl": float(np.mean(stats["approx_kl"])), "clipfrac": float(np.mean(stats["clipfrac"])),
                "ratio_mean": float(np.mean(stats["ratio"])),
                "grad_norm": float(np.mean(grad_norms)), "updates": len(grad_norms), "samples_seen": samples_seen,
                "advantage_abs_mean": float(np.abs(round_advantages).mean())}
        row |= {"kl_to_pretrained": float(np.mean(stats["kl"]))} if args.kl_coeff else {}
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
