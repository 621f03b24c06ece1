"""DRaFT: Direct Reward Fine-Tuning (Clark, Vicol, Swersky, Fleet, ICLR 2024, "Directly Fine-Tuning Diffusion
Models on Differentiable Rewards", arXiv 2309.17400), with its variants DRaFT-K and DRaFT-LV.

Backpropagate a differentiable reward of the final sample through the DDIM sampling chain into LoRA weights:
  DRaFT     (--K -1): through all T steps, each UNet call checkpointed so memory does not grow with T;
  DRaFT-K   (--K k):  only through the last k steps; the earlier ones run under no_grad (DRTune Alg. 1 line 2);
  DRaFT-LV  (--K 1 --lv n): the paper's DRaFT-LV algorithm: the whole rollout runs without gradient; its final
            sample x0 is re-noised n times to the last step's noise level with fresh noise, and each copy is
            denoised by one differentiable last step; the loss is minus the mean of the n copies' rewards over
            the n * B terms (the paper sums the n gradients: the same direction, a constant factor apart). The
            rollout's own reward is logged, not trained on. --lv-with-rollout adds the rollout's differentiable
            last step as a (1 + n)-th term, as FlowBP's port does.
Optional DRaFT+ (NeMo-Aligner): --kl-coeff c adds c * mean (eps_theta - eps_pretrained)^2 on the trained steps.

Quick run on the toy world (CPU, minutes):
    python draft.py                     # DRaFT (full backprop) on symmetry with the CLIP regulariser
    python draft.py --K 1               # DRaFT-1
    python draft.py --K 1 --lv 2        # DRaFT-LV
The paper's small-scale settings on Stable Diffusion 1.4 (a GPU):
    python draft.py --model CompVis/stable-diffusion-v1-4 --reward symmetry --prompts my_prompts.txt \
        --num-steps 50 --guidance-scale 7.5 --K 1 --lv 2 --lora-rank 8 --lr 4e-4 --weight-decay 0.1 \
        --batch-size 4 --iters 2000 --eval-every 100
"""

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
    """symmetry: weight of the CLIP-score regulariser (toy CLIP scores are ~90, ~25 for a picture without the
    prompted shape; DRTune's 0.015)"""
    prompts: str = "auto"
    """a prompt set of prompts/ (evaluated on <set>_eval if it exists) or a text file, one prompt per line; auto =
    toy for the toy model, else the reward's set (simple_animals, general or books)"""
    num_steps: int = 10
    """T: DDIM sampling steps (paper: 50)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale (paper: 7.5)"""
    eta: float = 0.0
    """DDIM noise scale; 0.0 is the deterministic DDIM sampler of the paper (and NeMo DRaFT+); on a flow model 0 is
    the ODE, above 0 the SDE's noise level"""
    resolution: int = 0
    """image size in pixels; 0 = the model's native size"""
    batch_size: int = 8
    """images per micro-batch (paper: 4 small-scale, 16 large-scale)"""
    grad_accum: int = 1
    """micro-batches per optimizer update"""
    iters: int = 60
    """iterations, each one optimizer update (paper: 2k small-scale, 10k large-scale; on the toy world 30 updates
    of 4 images gained less than seed-to-seed noise, README "Do the defaults hold?")"""
    lr: float = 3e-3
    """AdamW learning rate (paper: 4e-4 at LoRA rank 8, 2e-4 at rank 32; on the toy flow model 5e-3 drew pictures
    without the prompted shape, README "Do the defaults hold?")"""
    weight_decay: float = 0.1
    """AdamW weight decay (paper: 0.1)"""
    grad_clip: float = 1.0
    """gradient-norm clip (not given in the paper's summary; NeMo DRaFT+: 10)"""
    lora_rank: int = 8
    """LoRA rank (paper: 8 small-scale, 32 large-scale)"""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 = equal to the rank"""
    lora_targets: str = common.LORA_TARGETS
    """UNet layers given LoRA (comma-separated name suffixes): attention projections and ResNet convs;
    to_q,to_k,to_v,to_out.0 = attention only, as the public implementations"""
    init_lora: str = ""
    """start from this LoRA (a run directory or a diffusers LoRA .safetensors file), with a fresh optimizer"""
    K: int = -1
    """backpropagate through the last K sampling steps; -1 (or >= T) = all of them (plain DRaFT)"""
    lv: int = 0
    """DRaFT-LV: number n of re-noised copies of the final sample, each denoised by one differentiable last step
    (needs --K 1; paper: 2); 0 = off"""
    lv_with_rollout: bool = False
    """DRaFT-LV with 1 + n reward terms (FlowBP's port): the rollout's own last step carries gradient too; off = the
    paper's n terms"""
    stop_grad_input: bool = False
    """DRTune eq. 3 on this method: feed sg(x_t) to the UNet, so gradient reaches an earlier step only through the
    linear part of the DDIM update (DRTune sec. 4.2, Fig. 6-7: it helps DRaFT and AlignProp too)"""
    kl_coeff: float = 0.0
    """DRaFT+ (NeMo-Aligner): weight of the eps-difference penalty to the pretrained model; 0 = off (NeMo: 1.0)"""
    gradient_checkpointing: bool = True
    """recompute every differentiable UNet call in backward: activation memory O(1) in the trained steps"""
    vae_gradient_checkpointing: bool = False
    """gradient checkpointing of the VAE decoder"""


def check_args(args: Args):
    prompts = runner.check_common_args(args, differentiable=True)
    if args.K == 0 or args.K < -1:
        fail(f"--K must be -1 (all steps) or at least 1 (got {args.K})")
    if args.lv < 0:
        fail(f"--lv must be 0 (off) or a positive number of re-noised copies (got {args.lv})")
    if args.lv and args.K != 1:
        fail(f"--lv {args.lv} is DRaFT-LV, which is defined for --K 1 only (got --K {args.K})")
    if args.lv_with_rollout and not args.lv:
        fail("--lv-with-rollout adds the rollout's last step to DRaFT-LV's terms; it needs --lv n")
    if args.kl_coeff < 0:
        fail(f"--kl-coeff must be non-negative (got {args.kl_coeff})")
    if args.grad_accum < 1 or args.eval_size < 1:
        fail("--grad-accum and --eval-size must be at least 1")
    return prompts


def draft_steps(T: int, K: int):
    """DRTune Alg. 1 line 2 (DRaFT-K) -> the rollout step indices (0 = noisiest) that carry gradient."""
    if K == -1 or K >= T:
        return list(range(T))  # plain DRaFT: the whole chain
    return list(range(T - K, T))  # DRaFT-K: the last K steps; earlier ones sg(eps) (Alg. 1 lines 17-18)


def lv_terms(pipe, x0, cond, uncond, n: int, *, guidance_scale: float, eta: float, checkpoint: bool = True):
    """DRaFT-LV: n re-noised copies of the final latent, each denoised by one differentiable last step.

    The paper's DRaFT-LV algorithm: x0 = sg(x0) (the rollout ran without gradient), for i = 1..n noised to the
    level of the last step's input x_{t_1} with q(x_{t_1} | x_0) = N(sqrt(a_1) x0, (1 - a_1) I) (a flow model:
    (1 - sigma_1) x0 + sigma_1 eps), fresh noise per copy (latents, not re-encoded pixels, as in FlowBP's port),
    then denoised by the very update the rollout's last step uses (same sampler step, eta and CFG). Returns the
    n * B denoised latents, the copies stacked along the batch.
    """
    scheduler = pipe.scheduler
    t_last = scheduler.timesteps[-1]  # set by the rollout that produced x0
    noise = torch.cat([distributed.randn(x0.shape, x0.device) for _ in range(n)])  # a fresh draw per copy
    x0 = x0.detach().repeat(n, 1, 1, 1)
    x_t = common.noised(scheduler, x0, noise, t_last)
    cond, uncond = cond.repeat(n, 1, 1), uncond.repeat(n, 1, 1)
    if checkpoint:
        out = torch.utils.checkpoint.checkpoint(common.unet_output, pipe.unet, x_t, t_last, cond, uncond,
                                                guidance_scale, use_reentrant=False)
    else:
        out = common.unet_output(pipe.unet, x_t, t_last, cond, uncond, guidance_scale)
    return common.step_with_logprob(scheduler, out, t_last, x_t, eta)[0]


def kl_to_pretrained(pipe, latents, timesteps, grad_steps, cond, uncond, guidance_scale: float,
                     checkpoint: bool = True):
    """DRaFT+ (NeMo-Aligner): mean (eps_theta(x_t) - eps_pretrained(x_t))^2 over the trained steps.

    Evaluated on the recorded sg(x_t) (for DRaFT-LV the rollout's input to its last step); NeMo uses the live
    x_t, which only differs for K > 1 (its penalty's gradient then also flows through x_t into earlier steps).
    The pretrained model is the same UNet with the LoRA adapter disabled, so no second copy is held.
    """
    penalty = 0.0
    for i in grad_steps:
        if checkpoint:
            eps = torch.utils.checkpoint.checkpoint(common.unet_output, pipe.unet, latents[i], timesteps[i], cond,
                                                    uncond, guidance_scale, use_reentrant=False)
        else:
            eps = common.unet_output(pipe.unet, latents[i], timesteps[i], cond, uncond, guidance_scale)
        eps_ref = common.pretrained_output(pipe.unet, latents[i], timesteps[i], cond, uncond, guidance_scale)
        penalty = penalty + ((eps - eps_ref) ** 2).mean() / len(grad_steps)
    return penalty


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

        # ALGO LOGIC: which steps carry gradient (DRaFT: all; DRaFT-K: the last K; DRaFT-LV: the last step, taken
        # again on n re-noised copies of the final sample, after a rollout without gradient)
        grad_steps = draft_steps(T, K)
        rollout_grad_steps = [] if args.lv and not args.lv_with_rollout else grad_steps

        rewards_seen, loss_total, kl_total = [], 0.0, 0.0
        for _ in range(args.grad_accum):
            batch = distributed.choices(prompts, args.batch_size)  # this rank's share
            cond = common.encode_prompts(pipe, batch)
            x_T = common.initial_latents(pipe, args.batch_size, resolution)
            out = common.rollout(pipe, cond, uncond, x_T, num_steps=T, guidance_scale=args.guidance_scale,
                                 eta=args.eta, grad_steps=rollout_grad_steps,
                                 stop_grad_input=args.stop_grad_input, checkpoint=args.gradient_checkpointing,
                                 record=args.kl_coeff > 0)
            with torch.set_grad_enabled(bool(rollout_grad_steps)):  # DRaFT-LV: the rollout's reward is only logged
                images = common.decode(pipe.vae, out.output, checkpoint=args.vae_gradient_checkpointing)
                reward = reward_fn(images, batch)
            trained_rewards = [reward] if rollout_grad_steps else []
            if args.lv:  # DRaFT-LV: n reward terms, each through one differentiable last step (+ the rollout's)
                x0_lv = lv_terms(pipe, out.output, cond, uncond, args.lv, guidance_scale=args.guidance_scale,
                                 eta=args.eta, checkpoint=args.gradient_checkpointing)
                images_lv = common.decode(pipe.vae, x0_lv, checkpoint=args.vae_gradient_checkpointing)
                trained_rewards.append(reward_fn(images_lv, batch * args.lv))
            loss = -torch.cat(trained_rewards).mean()  # ascend the reward of the final sample(s)
            if args.kl_coeff:  # DRaFT+: stay close to the pretrained eps on the trained steps
                kl = kl_to_pretrained(pipe, out.latents, out.timesteps, grad_steps, cond, uncond,
                                      args.guidance_scale, args.gradient_checkpointing)
                loss = loss + args.kl_coeff * kl
                kl_total += kl.item() / args.grad_accum
            loss = loss / args.grad_accum
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
                "samples_seen": samples_seen, "trained_steps": grad_steps}
        if args.kl_coeff:
            row["kl"] = kl_total
        run.log(row)
    run.finish(evaluate)  # the final model's eval, the last checkpoint, the summary


if __name__ == "__main__":
    main()
