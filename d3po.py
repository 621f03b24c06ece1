"""D3PO: Direct Preference for Denoising Diffusion Policy Optimization (Yang et al., CVPR 2024, "Using Human
Feedback to Fine-tune Diffusion Models without Any Reward Model", arXiv 2311.13231), Algorithm 1.

DPO without a reward model, applied to every step of the denoising chain:
  1. for each prompt, sample n trajectories from the same x_T with stochastic DDIM (eta > 0), so the
     members of a group differ only through the sampling noise (Alg. 1 lines 5-8);
  2. rank the final images: by a reward of rewards.py (--feedback reward) or by people (--feedback human);
  3. for every timestep and every pair (winner w, loser l), minimise eq. 14:
         -log sigmoid(beta * (log pi_theta/pi_ref (a_w | s_w) - log pi_theta/pi_ref (a_l | s_l))).

Quick run on the toy world (CPU, minutes): colourfulness, 8 prompts x 6 trajectories (15 pairs each) per update,
T 10; with 4 pairs per update (4 prompts x 2) the toy runs lowered colourfulness whether asked to raise it or to
lower it, with 6 pairs per prompt one seed in three lost (README "Do the defaults hold?"):
    python d3po.py
Learning from people (see the README): sample, label in the browser, train on the labels:
    python d3po.py --feedback human --phase sample --run-dir runs/round1
    (open runs/round1/label.html, choose, export d3po-labels-*.json; several annotators are averaged)
    python d3po.py --feedback human --phase train --samples runs/round1 --labels alice.json bob.json
The paper's settings on Stable Diffusion 1.5 (a GPU):
    python d3po.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward jpeg_compressibility \
        --num-steps 20 --samples-per-prompt 2 --guidance-scale 5.0 --lr 3e-5 --lora-rank 4 --batch-size 10 \
        --iters 400
"""

import contextlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common
import d3po_label
import distributed
import runner
from hub import DEFAULT_MODEL, fail


@dataclass
class Args(runner.RunArgs):
    model: str = DEFAULT_MODEL
    """diffusers Stable Diffusion 1.x/2.x/XL/3 or FLUX: hub id or local folder; toy-flow = the toy world's
    flow-matching model (toyworld/flow), toy = its Stable Diffusion (toyworld/sd)"""
    reward: str = "colorfulness"
    """a reward of rewards.py, a weighted sum (hpsv2+0.5*clipscore) or module:function: the preference oracle for
    --feedback reward, the eval score for both modes; colorfulness: the toy world's honest task (larger shapes;
    paper: jpeg_compressibility, aesthetic)"""
    prompts: str = "auto"
    """a prompt set of prompts/ (evaluated on <set>_eval if it exists) or a text file, one prompt per line; auto =
    toy for the toy model, else the reward's set (simple_animals, general or books)"""
    feedback: str = "reward"
    """where preferences come from: reward (compare --reward, higher wins) or human (label files)"""
    phase: str = ""
    """--feedback human only: sample (write images, trajectories, label.html) or train (from --labels)"""
    samples: str = ""
    """--phase train: the run dir written by --phase sample"""
    labels: tuple[str, ...] = ()
    """--phase train: label files exported by label.html, one per annotator; their scores are averaged"""
    num_prompts: int = 16
    """--phase sample: how many prompts to sample for labelling"""
    samples_per_prompt: int = 6
    """n: trajectories per prompt from one x_T; every one of the n(n-1)/2 pairs is trained (paper, reward runs: 2;
    official human runs: 7)"""
    num_steps: int = 10
    """T: DDIM sampling steps (paper: 20)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale (paper: 5.0)"""
    eta: float = 1.0
    """DDIM noise scale, > 0 (paper: 1.0); eta = 0 is deterministic and has no log-probability; on a flow model the
    SDE's noise level (Flow-GRPO: 0.7)"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """prompts per micro-batch (each gives --samples-per-prompt images; paper: 10 per GPU)"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 20
    """iterations, each one optimizer update"""
    lr: float = 1e-3
    """AdamW learning rate (paper: 3e-5 at LoRA rank 4 on SD 1.5; the toy model's LoRA needs far more)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper Table 2: 1e-4)"""
    grad_clip: float = 1.0
    """gradient-norm clip (paper: 1.0)"""
    beta: float = 0.1
    """beta: DPO temperature of eq. 14 (paper: 0.1)"""
    clip_range: float = 0.1
    """official code, not in the paper: clamp pi_theta/pi_ref to [1 - eps, 1 + eps] (its eps; 0 = no clamp)"""
    lora_rank: int = 8
    """LoRA rank (official code: 4)"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer;
    --phase sample draws from it, and --phase train must start from the LoRA its samples were drawn with"""
    ref_lora: str = ""
    """pi_ref, the reference policy: a LoRA (run directory or file); empty = the --init-lora (each round of the
    paper's human loop is referenced to the previous round's model), or the pretrained model without one;
    pretrained = the pretrained model"""
    # a shared flag (runner.RunArgs) with this script's own default
    eval_every: int = 5
    """evaluate every N iterations (0 = only before the first and after the last)"""


# ---------------------------------------------------------------------------------------------
# Checking the flags, and the human label files (all before any work; reading them is d3po_label's)
# ---------------------------------------------------------------------------------------------


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=False)
    if args.feedback not in ("reward", "human"):
        fail(f"--feedback must be reward or human (got {args.feedback!r})")
    if args.feedback == "reward" and (args.phase or args.labels or args.samples):
        fail("--phase, --samples and --labels belong to --feedback human")
    if args.feedback == "human" and args.phase not in ("sample", "train"):
        fail(f"--feedback human needs --phase sample or --phase train (got {args.phase!r})")
    if args.samples_per_prompt < 2:
        fail(f"--samples-per-prompt must be at least 2: a preference needs a pair (got {args.samples_per_prompt})")
    if args.eta <= 0:
        fail(f"--eta must be > 0: deterministic DDIM (eta = 0) has no pi_theta(x_t-1 | x_t) (got {args.eta})")
    if args.beta <= 0 or not 0 <= args.clip_range < 1:
        fail(f"--beta must be > 0 and --clip-range in [0, 1) (got {args.beta}, {args.clip_range})")
    if args.grad_accum < 1 or args.num_prompts < 1:
        fail("--grad-accum and --num-prompts must be at least 1")
    if args.ref_lora not in ("", "pretrained"):
        common.check_lora_file(args.ref_lora, args.lora_rank, args.lora_targets, "--ref-lora",
                               alpha=args.lora_alpha or args.lora_rank)  # at another scale it is another policy
    if args.phase == "sample":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            fail("--phase sample writes one set of samples: run it as one process, not under torchrun")
        if args.labels or args.samples:
            fail("--phase sample writes new samples; --labels and --samples belong to --phase train")
        if args.run_dir and (Path(args.run_dir) / "samples.json").exists():
            fail(f"--run-dir {args.run_dir} already holds samples (samples.json); choose another directory")
        return prompts, None
    if args.phase == "train":
        if not args.labels:
            fail("--phase train needs --labels FILE [FILE ...] exported from label.html")
        meta = d3po_label.load_samples(args)
        scores = d3po_label.load_labels(args.labels, meta)
        if not (preferences(scores) != 0).any():
            fail(f"--labels {' '.join(args.labels)}: no prompt has a preferred image (all skipped or ties); nothing to "
                 "train")
        return prompts, (meta, scores)
    return prompts, None


# ---------------------------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_groups(pipe, cond, uncond, n: int, resolution: int, args: Args):
    """n stochastic-DDIM trajectories per prompt from one shared x_T (Alg. 1 lines 5-8).

    Returns latents (B, n, T+1, C, h, w) holding x_T .. x_0, and the T scheduler timesteps.
    """
    x_T = common.initial_latents(pipe, len(cond), resolution).repeat_interleave(n, dim=0)
    out = common.rollout(pipe, cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0), x_T,
                         num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta, record=True)
    latents = torch.stack(out.latents, dim=1)
    return latents.view(len(cond), n, *latents.shape[1:]), torch.stack(out.timesteps)


def preferences(scores: torch.Tensor):
    """(B, n) scores -> (B, P) signs over all pairs (i < j): +1 if i wins, -1 if j wins, 0 for a tie (or NaN)."""
    i, j = torch.combinations(torch.arange(scores.shape[1]), r=2).unbind(1)
    return torch.nan_to_num(torch.sign(scores[:, i] - scores[:, j]), nan=0.0)


def d3po_loss(log_ratio, prefs, beta: float, clip_range: float):
    """Eq. 14 for every pair at one timestep. log_ratio (B, n): log pi_theta/pi_ref of each member's transition;
    prefs (B, P) from `preferences`. Returns (B, P) losses; a tie (pref 0) is the constant log 2, no gradient.
    """
    if clip_range > 0:
        # Official code (not in the paper): ratio clamped to [1-eps, 1+eps], i.e. the log-ratio to its logs;
        # outside the band the pair stops pushing, a trust region against drifting far from pi_ref.
        log_ratio = log_ratio.clamp(math.log(1 - clip_range), math.log(1 + clip_range))
    i, j = torch.combinations(torch.arange(log_ratio.shape[1]), r=2).unbind(1)
    # Eq. 14: -log sigma(beta (log pi/pi_ref(a_w|s_w) - log pi/pi_ref(a_l|s_l))); the sign orients each pair
    # winner-minus-loser, as h_k = [1, -1] / [-1, 1] / [0, 0] does in Alg. 1 line 33.
    return -F.logsigmoid(beta * prefs * (log_ratio[:, i] - log_ratio[:, j]))


@contextlib.contextmanager
def reference_policy(unet, ref_lora: dict | None):
    """Within: the UNet is pi_ref. Without a reference LoRA that is the pretrained UNet, i.e. the adapter switched
    off (the official code keeps a full frozen deepcopy instead: the same outputs for no memory); with one
    (--ref-lora, or the --init-lora of a later round) its weights are swapped into the adapter meanwhile."""
    if ref_lora is None:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    params = {n.replace(".default.", "."): p for n, p in unet.named_parameters() if p.requires_grad}
    trained = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        try:
            for n, p in params.items():
                p.copy_(ref_lora[n])
            yield
        finally:
            for n, p in params.items():
                p.copy_(trained[n])


def step_log_ratio(pipe, x_t, x_prev, t, cond, uncond, ref_lora, args: Args):
    """log pi_theta(x_prev | x_t) - log pi_ref(x_prev | x_t) of stored transitions (Alg. 1 lines 28-31).
    pi_ref first: swapping weights in place must not touch a graph that backward still needs."""
    with torch.no_grad(), reference_policy(pipe.unet, ref_lora):
        out_ref = common.unet_output(pipe.unet, x_t, t, cond, uncond, args.guidance_scale)
        _, log_prob_ref = common.step_with_logprob(pipe.scheduler, out_ref, t, x_t, args.eta, prev_sample=x_prev)
    out = common.unet_output(pipe.unet, x_t, t, cond, uncond, args.guidance_scale)
    _, log_prob = common.step_with_logprob(pipe.scheduler, out, t, x_t, args.eta, prev_sample=x_prev)
    return log_prob - log_prob_ref


def accumulate_gradients(pipe, latents, timesteps, cond, uncond, prefs, ref_lora, args: Args):
    """Backward eq. 14 over every timestep (the sub-segments of eq. 13) and every pair; returns logging stats.

    One backward per timestep keeps only one UNet graph alive; the loss is averaged over timesteps and
    pairs, ties included, as the official code does (one update per batch, accumulated over the T steps),
    and over the --grad-accum micro-batches of an update.
    """
    b, n, steps = latents.shape[0], latents.shape[1], len(timesteps)
    flat = latents.flatten(0, 1)
    cond, uncond = cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0)
    loss_total, clipped, abs_log_ratio = 0.0, 0.0, 0.0
    for step in range(steps):
        log_ratio = step_log_ratio(pipe, flat[:, step], flat[:, step + 1], timesteps[step], cond, uncond, ref_lora,
                                   args)
        loss = d3po_loss(log_ratio.view(b, n), prefs, args.beta, args.clip_range).mean() / (steps * args.grad_accum)
        loss.backward()
        loss_total += loss.item()
        ratio = log_ratio.detach().exp()
        clipped += ((ratio - 1).abs() > args.clip_range).float().mean().item() / steps if args.clip_range else 0.0
        abs_log_ratio += log_ratio.detach().abs().mean().item() / steps
    return {"loss": loss_total, "clip_frac": clipped, "abs_log_ratio": abs_log_ratio}


# ---------------------------------------------------------------------------------------------
# Human feedback: sampling for the labelling page (its files are d3po_label's)
# ---------------------------------------------------------------------------------------------


def sample_for_labels(pipe, prompts, resolution: int, args: Args):
    """--phase sample: --num-prompts prompts (each set passed through in shuffled order), n trajectories each, written
    with their labelling page by d3po_label.write_samples."""
    run_dir = Path(args.run_dir) if args.run_dir else runner.new_run_dir("d3po_samples", args.reward, args.seed)
    chosen = [p for _ in range(-(-args.num_prompts // len(prompts))) for p in random.sample(prompts, len(prompts))]
    chosen = chosen[:args.num_prompts]
    uncond_one = common.encode_prompts(pipe, [""])
    latents, pngs = [], []
    for start in range(0, len(chosen), args.batch_size):
        batch = chosen[start:start + args.batch_size]
        group, timesteps = sample_groups(pipe, common.encode_prompts(pipe, batch),
                                         uncond_one.expand(len(batch), -1, -1), args.samples_per_prompt, resolution,
                                         args)
        with torch.no_grad():
            images = common.decode(pipe.vae, group[:, :, -1].flatten(0, 1))
        latents.append(group)
        pngs += [d3po_label.to_png(image) for image in images]
    d3po_label.write_samples(run_dir, chosen, torch.cat(latents), timesteps, pngs, args)


def main():
    # TRY NOT TO MODIFY: setup
    args = runner.parse_args(Args, __file__)
    prompts, human = check_args(args)
    device, dtype = runner.setup_device(args.device, args.dtype, args.threads)
    runner.seed_everything(args.seed)
    pipe = common.load_pipeline(args.model, dtype, device, args.vae)
    resolution = args.resolution or common.native_resolution(pipe)
    if args.phase == "sample":
        if args.init_lora:  # a later round of the human loop samples from the previous round's model
            common.add_lora(pipe.unet, args.lora_rank, args.lora_alpha or None, args.lora_targets, args.init_lora)
        return sample_for_labels(pipe, prompts, resolution, args)
    params = common.add_lora(pipe.unet, args.lora_rank, args.lora_alpha or None, args.lora_targets, args.init_lora)
    ref_path = args.init_lora if args.ref_lora == "" else "" if args.ref_lora == "pretrained" else args.ref_lora
    ref_lora = {k: v.to(device) for k, v in common.read_lora(ref_path, "--ref-lora").items()} if ref_path else None
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    reward_fn = runner.reward_function(args, device, dtype)
    eval_set = runner.eval_prompts(args.prompts, prompts, args.eval_size)
    run = runner.Run(__file__, args, pipe.unet, optimizer, device, name="d3po" if args.feedback == "reward" else "d3po_human")
    uncond_one = common.encode_prompts(pipe, [""])
    T, n = args.num_steps, args.samples_per_prompt

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

    if human:  # the labelled prompts with at least one preferred pair, visited in shuffled passes
        meta, label_scores = human
        stored = load_file(Path(args.samples) / "trajectories.safetensors")
        usable = [k for k in range(len(meta["prompts"])) if (preferences(label_scores[k:k + 1]) != 0).any()]
        if len(usable) < distributed.WORLD:
            fail(f"{len(usable)} labelled prompts with a preference, fewer than the {distributed.WORLD} ranks")
        queue = run.state.setdefault("queue", [])  # the prompts still to visit in this pass (checkpointed)

    samples_seen = run.last("samples_seen")
    for it in run.iterations():
        row = {"iter": it}
        if it == 0 or (args.eval_every and it % args.eval_every == 0):
            row |= evaluate(it)

        # ALGO LOGIC: D3PO Algorithm 1
        scores_seen, prefs_seen, stats = [], [], {"loss": 0.0, "clip_frac": 0.0, "abs_log_ratio": 0.0}
        for _ in range(args.grad_accum):
            if human:  # lines 12-22 happened offline: the stored trajectories with the averaged label scores
                take = min(args.batch_size, len(usable) // distributed.WORLD) * distributed.WORLD  # the global batch
                while len(queue) < take:
                    queue += random.sample(usable, len(usable))
                index = distributed.shard(queue[:take])  # this rank's share
                del queue[:take]
                batch = [meta["prompts"][k] for k in index]
                latents = stored["latents"][index].to(device)
                timesteps = stored["timesteps"].to(device)
                scores = label_scores[index].to(device)
                common.set_timesteps(pipe, T, latents)  # the log-prob needs the scheduler's step size
            else:  # lines 4-11: n trajectories per prompt from one x_T; line 14: the reward stands in for a person
                batch = distributed.choices(prompts, args.batch_size)  # this rank's share
                latents, timesteps = sample_groups(pipe, common.encode_prompts(pipe, batch),
                                                   uncond_one.expand(len(batch), -1, -1), n, resolution, args)
                with torch.no_grad():
                    images = common.decode(pipe.vae, latents[:, :, -1].flatten(0, 1))
                    scores = reward_fn(images, [p for p in batch for _ in range(n)]).float().view(len(batch), n)
            prefs = preferences(scores)  # lines 15-21: h = [1, -1], [-1, 1] or [0, 0] for every pair
            cond = common.encode_prompts(pipe, batch)
            micro = accumulate_gradients(pipe, latents, timesteps, cond, uncond_one.expand(len(batch), -1, -1),
                                         prefs, ref_lora, args)  # lines 24-33, all T timesteps
            stats = {k: stats[k] + micro[k] / (1 if k == "loss" else args.grad_accum) for k in stats}
            scores_seen.append(distributed.gather(scores.flatten()))  # the global batch's, for the log and the guard
            prefs_seen.append(distributed.gather(prefs.flatten()))
            samples_seen += len(batch) * n * distributed.WORLD
        distributed.average_gradients(params)  # over the ranks, before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scores, prefs = torch.cat(scores_seen), torch.cat(prefs_seen)
        finite = scores[scores.isfinite()]  # human feedback: the averaged label scores (unlabelled: NaN)
        run.guard(it, reward=finite, loss=stats["loss"], grad_norm=grad_norm)  # no NaN reaches the weights
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: logging
        row |= {"reward_mean": finite.mean().item(), "reward_std": finite.std().item() if finite.numel() > 1 else 0.0,
                **{k: distributed.mean_over_ranks(v) for k, v in stats.items()},
                "tie_frac": (prefs == 0).float().mean().item(), "grad_norm": grad_norm.item(), "samples_seen": samples_seen}
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
