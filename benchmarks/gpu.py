"""Every method and variant at Stable Diffusion 1.5 scale on one GPU: throughput, memory, batch limits, MFU.

    python benchmarks/gpu.py                 # everything: 512 px, T = 50 DDIM, CFG 7.5, bf16 (1-2 h on an H100)
    python benchmarks/gpu.py --methods drtune,ddpo-is --batches 1,4 --iters 3    # a few minutes
    python benchmarks/gpu.py --small         # the same code on the tiny model on the CPU (the tests)

The model is Stable Diffusion 1.5 with random weights (benchmarks/sd_arch.py, built into a temporary folder; no
download), or `--model DIR` for any diffusers SD 1.x/2.x folder. Training numbers come from the real scripts: each
variant runs through its command line in a subprocess, at batch 1, 2, 4, ... until the card runs out of memory or
the run no longer fits the largest cap; seconds per iteration and memory are read from its metrics.jsonl. The
rollout (the sampler every script shares: common.rollout + VAE decode, no gradient) is timed in this process.
MFU = model FLOPs / time / the GPU's dense bf16 peak; the UNet's FLOPs are counted analytically from its config
(checked against torch's FlopCounterMode on the meta device every run), the VAE's with FlopCounterMode, and each
iteration's number of UNet passes and VAE decodes comes from the counters the scripts log (unet_forwards, ...).
Results: benchmarks/results/gpu-<gpu name>.json and .md. Columns: benchmarks/README.md.
"""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import hub  # noqa: E402
import runner  # noqa: E402
from benchmarks import sd_arch  # noqa: E402

# name -> (script, its flags). Names of one script share its stem, so --methods ddpo selects both DDPO variants.
VARIANTS = {
    "ddpo-sf": ("ddpo.py", ["--estimator", "sf", "--samples-per-prompt", "1"]),  # any batch; speed is the same
    "ddpo-is": ("ddpo.py", ["--estimator", "is", "--samples-per-prompt", "1"]),
    # the paper's RWR (ancestral, no pull) with 4 sampling batches per round (a batch of 1 cannot form groups of 8)
    "rwr-softmax": ("rwr.py", ["--weighting", "softmax", "--eta", "1", "--kl-coeff", "0", "--sample-batches", "4"]),
    "rwr-sparse": ("rwr.py", ["--weighting", "sparse", "--eta", "1", "--kl-coeff", "0", "--sample-batches", "4"]),
    "draft-full": ("draft.py", ["--K", "-1"]),
    "draft-k1": ("draft.py", ["--K", "1"]),
    "draft-lv": ("draft.py", ["--K", "1", "--lv", "2"]),
    "refl": ("refl.py", ["--guidance-scale", "1.0", "--eta", "1"]),  # the original's sampler (no CFG)
    "alignprop": ("alignprop.py", []),
    "drtune-k5": ("drtune.py", ["--K", "5"]),
    "d3po": ("d3po.py", ["--samples-per-prompt", "2"]),  # the paper's pairs
}
GRADIENT_SCRIPTS = {"draft.py", "refl.py", "alignprop.py", "drtune.py"}  # reward backpropagated through the VAE
# Rewards that need no weights: the scripts' defaults load a CLIP from the Hub for any model but the toy one.
# Neither costs matmul FLOPs (brightness is a mean; the JPEG reward runs in PIL on the CPU).
REWARD = {"gradient": "brightness", "rl": "jpeg_compressibility"}
# Variants whose trained UNet calls mostly take a differentiable input (the chain carries gradient from the
# first trained step on); the others detach it or start from a no-grad chain. Costs ~1 % of a backward.
INPUT_GRAD = {"draft-full", "alignprop"}
# Dense bf16 tensor-core peaks (datasheets, no sparsity); first match of the device name wins.
PEAK_TFLOPS = [(r"H100.*PCIe", 756.0), (r"H100|H200|GH200", 989.4), (r"A100", 312.0), (r"L40S", 362.0),
               (r"\bL4\b", 121.0), (r"RTX 4090", 165.2), (r"\bA10G?\b", 125.0)]


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's count (its formula table, flop_registry) without its per-module bookkeeping, which slows a
    whole script run down another 1.7x on the CPU; the two agree exactly (tests/test_benchmarks.py)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


# Runs a script as its CLI does (runpy, same argv), optionally counting its FLOPs, and writes what only this
# process can see (CUDA allocator peaks, the CUDA context's share of the card, the FLOP count) to a JSON file.
LAUNCHER = r"""
import json, os, runpy, sys
import torch
script, stats_path, count = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.argv = [script, *sys.argv[4:]]
sys.path.insert(0, os.path.dirname(script))
stats = {}
try:
    if count:  # the math attention path: there is no FLOP formula for the CPU flash-attention kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from benchmarks.gpu import FlopCount
        import runner
        counter, stats["flops_at_rows"] = FlopCount(), []
        def log(self, row, _log=runner.Run.log):  # the running count at every metrics row
            _log(self, row)
            stats["flops_at_rows"].append(counter.total)
        runner.Run.log = log
        with sdpa_kernel(SDPBackend.MATH), counter:
            runpy.run_path(script, run_name="__main__")
        stats["flops"] = counter.total
    else:
        runpy.run_path(script, run_name="__main__")
finally:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        gib = 2 ** 30
        stats |= {"peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib,
                  "context_gib": max(0.0, (total - free - torch.cuda.memory_reserved()) / gib),
                  "device_total_gib": total / gib}
    with open(stats_path, "w") as f:
        json.dump(stats, f)
"""


@dataclass
class Args:
    small: bool = False
    """the tiny model on the CPU, small sizes (for the tests): same code, MFU and memory reported as n/a"""
    methods: str = ""
    """comma-separated variants (VARIANTS: ddpo-sf, ddpo-is, rwr-softmax, rwr-sparse, draft-full, draft-k1, draft-lv,
    refl, alignprop, drtune-k5, d3po) or script names for all their variants (e.g. drtune,ddpo); empty = all"""
    arch: str = ""
    """architecture to build with sd_arch.py: sd15 (default) or tiny (default with --small)"""
    model: str = ""
    """an existing diffusers SD 1.x/2.x folder to benchmark instead of building --arch"""
    resolution: int = 0
    """image size in pixels; 0 = 512 (32 with --small)"""
    num_steps: int = 0
    """T, DDIM steps; 0 = 50 (5 with --small: ReFL's default stop range needs T >= 5)"""
    guidance_scale: float = 7.5
    """classifier-free guidance scale (any value but 1 costs the same: cond and uncond in one batched call)"""
    dtype: str = ""
    """frozen weights: bf16 (default), fp16 or fp32 (default with --small); LoRA is fp32 in the scripts"""
    device: str = ""
    """cuda (default) or cpu (default with --small)"""
    batches: str = ""
    """training batch sizes to try, in order, until one fails for memory or exceeds the largest cap (a size the
    script refuses, e.g. RWR's 1, moves on to the next, doubling past the list); default 1,2,4,...,256
    (1 with --small)"""
    rollout_batches: str = ""
    """batch sizes of the rollout timing; default 1,2,4,...,64 (1,2 with --small)"""
    iters: int = 0
    """iterations per training run; every one after the first is timed; 0 = 5 (2 with --small)"""
    rollout_repeats: int = 0
    """timed rollouts per batch size, after one warm-up; 0 = 3 (1 with --small)"""
    caps: str = "24,40,80"
    """memory caps in GiB for the largest-batch columns"""
    peak_tflops: float = 0.0
    """the GPU's dense peak in TFLOPS for MFU; 0 = from the device name (table PEAK_TFLOPS)"""
    count_flops: bool = False
    """also count each run's FLOPs with FlopCounterMode and compare with the model (always on with --small);
    slows the runs down, so their timings are not the benchmark's"""
    threads: int = 1
    """--threads for the scripts and this process (CPU work: JPEG rewards, and everything with --small)"""
    timeout: int = 0
    """seconds per script run before it is killed; 0 = 3600 (600 with --small)"""
    out_dir: str = ""
    """where the .json and .md results go; default benchmarks/results"""
    work_dir: str = ""
    """where the model and run folders are written (a temporary folder inside it, removed at the end)"""
    keep: bool = False
    """keep the temporary folder (model and every run directory)"""


def settle(args: Args) -> Args:
    """Fill the mode-dependent defaults and check every flag before any work."""
    small = args.small
    args.arch = args.arch or ("tiny" if small else "sd15")
    args.resolution = args.resolution or (sd_arch.NATIVE_RESOLUTION.get(args.arch, 512) if small else 512)
    args.num_steps = args.num_steps or (5 if small else 50)
    args.dtype = args.dtype or ("fp32" if small else "bf16")
    args.device = args.device or ("cpu" if small else "cuda")
    args.batches = args.batches or ("1" if small else "1,2,4,8,16,32,64,128,256")
    args.rollout_batches = args.rollout_batches or ("1,2" if small else "1,2,4,8,16,32,64")
    args.iters = args.iters or (2 if small else 5)
    args.rollout_repeats = args.rollout_repeats or (1 if small else 3)
    args.timeout = args.timeout or (600 if small else 3600)
    args.count_flops = args.count_flops or small
    args.out_dir = args.out_dir or str(ROOT / "benchmarks" / "results")
    for name in ("methods", "batches", "rollout_batches", "caps"):
        setattr(args, name, getattr(args, name).replace(" ", ""))
    unknown = [m for m in args.methods.split(",") if m and not selected([m])]
    if unknown:
        hub.fail(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)} or a script name")
    for name in ("batches", "rollout_batches"):
        if not re.fullmatch(r"[1-9][0-9]*(,[1-9][0-9]*)*", getattr(args, name)):
            hub.fail(f"--{name.replace('_', '-')} must be positive integers separated by commas "
                     f"(got {getattr(args, name)!r})")
    number = r"[0-9]+(\.[0-9]*)?"
    if not re.fullmatch(f"{number}(,{number})*", args.caps) or any(float(c) <= 0 for c in args.caps.split(",")):
        hub.fail(f"--caps must be positive numbers (GiB) separated by commas (got {args.caps!r})")
    if args.iters < 2:
        hub.fail(f"--iters must be at least 2: the first iteration holds the start-up and is not timed "
                 f"(got {args.iters})")
    if args.rollout_repeats < 1 or args.timeout < 1 or args.threads < 0 or args.peak_tflops < 0:
        hub.fail("--rollout-repeats and --timeout must be at least 1, --threads and --peak-tflops non-negative")
    if args.resolution < 8 or args.resolution % 8 or args.num_steps < 5:
        hub.fail(f"--resolution must be a multiple of 8 and --num-steps at least 5 (DRTune K = 5, ReFL's stop "
                 f"range) (got {args.resolution}, {args.num_steps})")
    if args.dtype not in ("bf16", "fp16", "fp32"):
        hub.fail(f"--dtype must be bf16, fp16 or fp32 (got {args.dtype})")
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:[0-9]+)?", args.device)):
        hub.fail(f"--device must be cpu, cuda or cuda:N (got {args.device})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        hub.fail(f"--device {args.device}: CUDA is not available here; --small runs the benchmark on the CPU")
    if args.model and not (Path(args.model) / "model_index.json").is_file():
        hub.fail(f"--model {args.model}: no model_index.json there; pass a diffusers Stable Diffusion folder")
    if not args.model and args.arch not in ("sd15", "tiny"):  # the FLOP model covers SD 1.x/2.x UNets, not SDXL's
        hub.fail(f"--arch {args.arch}: gpu.py benchmarks sd15 or tiny (its FLOP model has no SDXL UNet yet)")
    return args


def selected(methods: list[str]) -> list[str]:
    """Variant names matching --methods items (a variant name, or a script stem for all its variants)."""
    return [name for name, (script, _) in VARIANTS.items()
            if not methods or any(m in (name, Path(script).stem) for m in methods)]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


# ---------------------------------------------------------------------------------------------
# FLOPs: the UNet analytically from its config, the VAE with FlopCounterMode on the meta device
# ---------------------------------------------------------------------------------------------


def unet_layers(config: dict, height: int, width: int, context_len: int):
    """Every matmul of one UNet sample at a latent of height x width, from a diffusers UNet2DConditionModel config:
    ("mm", name, source, tokens, c_in, c_out, kernel) for each conv / linear, ("attn", q_tokens, kv_tokens,
    channels) for the two products of each attention. `source` says what the layer reads: the activation
    stream, the text context or the time embedding. Ordered so that gradient flow is monotone along the list
    (a resnet's shortcut, which reads the resnet's input, before its convs)."""
    unsupported = {k: config.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim",
                                              "time_cond_proj_dim") if config.get(k) is not None}
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn" or unsupported or any(
            b not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
            for b in (*config["down_block_types"], *config["up_block_types"])):
        raise ValueError(f"unet_layers covers SD 1.x/2.x UNets; this config has {unsupported or 'other blocks'}")
    channels = list(config["block_out_channels"])
    n = len(channels)

    def per_block(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    layers_per = per_block(config["layers_per_block"])
    depth = per_block(config.get("transformer_layers_per_block") or 1)
    temb = channels[0] * 4
    shift = 2 if config.get("resnet_time_scale_shift", "default") == "scale_shift" else 1
    ctx = config["cross_attention_dim"]
    out = [("mm", "time_embedding.linear_1", "temb", 1, channels[0], temb, 1),
           ("mm", "time_embedding.linear_2", "temb", 1, temb, temb, 1)]

    def resnet(c_in, c_out, tokens):
        if c_in != c_out:
            out.append(("mm", "conv_shortcut", "stream", tokens, c_in, c_out, 1))
        out.extend([("mm", "conv1", "stream", tokens, c_in, c_out, 3),
                    ("mm", "time_emb_proj", "temb", 1, temb, c_out * shift, 1),
                    ("mm", "conv2", "stream", tokens, c_out, c_out, 3)])

    def transformer(c, tokens, blocks):  # Transformer2DModel: inner dim = c in every SD 1.x/2.x config
        out.append(("mm", "proj_in", "stream", tokens, c, c, 1))
        for _ in range(blocks):
            out.extend([("mm", "attn1.to_q", "stream", tokens, c, c, 1),
                        ("mm", "attn1.to_k", "stream", tokens, c, c, 1),
                        ("mm", "attn1.to_v", "stream", tokens, c, c, 1), ("attn", tokens, tokens, c),
                        ("mm", "attn1.to_out.0", "stream", tokens, c, c, 1),
                        ("mm", "attn2.to_q", "stream", tokens, c, c, 1),
                        ("mm", "attn2.to_k", "context", context_len, ctx, c, 1),
                        ("mm", "attn2.to_v", "context", context_len, ctx, c, 1), ("attn", tokens, context_len, c),
                        ("mm", "attn2.to_out.0", "stream", tokens, c, c, 1),
                        ("mm", "ff.net.0.proj", "stream", tokens, c, 8 * c, 1),  # GEGLU: 2 x 4c
                        ("mm", "ff.net.2", "stream", tokens, 4 * c, c, 1)])
        out.append(("mm", "proj_out", "stream", tokens, c, c, 1))

    h, w, c = height, width, channels[0]
    out.append(("mm", "conv_in", "stream", h * w, config["in_channels"], c, config.get("conv_in_kernel", 3)))
    skips = [(c, h, w)]  # what the down path hands the up path, in order
    for i, kind in enumerate(config["down_block_types"]):
        for _ in range(layers_per[i]):
            resnet(c, channels[i], h * w)
            c = channels[i]
            if kind == "CrossAttnDownBlock2D":
                transformer(c, h * w, depth[i])
            skips.append((c, h, w))
        if i < n - 1:  # stride-2 3x3 conv, padding 1
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append(("mm", "downsamplers.0.conv", "stream", h * w, c, c, 3))
            skips.append((c, h, w))
    resnet(c, c, h * w)
    transformer(c, h * w, depth[-1])
    resnet(c, c, h * w)
    for j, kind in enumerate(config["up_block_types"]):
        for _ in range(layers_per[::-1][j] + 1):
            skip, h, w = skips.pop()
            resnet(c + skip, channels[::-1][j], h * w)
            c = channels[::-1][j]
            if kind == "CrossAttnUpBlock2D":
                transformer(c, h * w, depth[::-1][j])
        if j < n - 1:  # nearest upsampling to the next skip's size, then a 3x3 conv there
            _, h, w = skips[-1]
            out.append(("mm", "upsamplers.0.conv", "stream", h * w, c, c, 3))
    out.append(("mm", "conv_out", "stream", h * w, channels[0], config["out_channels"],
                config.get("conv_out_kernel", 3)))
    return out


def unet_flops(config: dict, height: int, width: int, context_len: int = 77, lora_rank: int = 0,
               lora_targets=(), input_grad: bool = False) -> tuple[int, int]:
    """(forward, backward) FLOPs of one UNet sample (2 per multiply-add; convs, linears and attention products,
    which is what FlopCounterMode counts; norms and activations are left out).

    LoRA (peft) on the layers whose names end in one of `lora_targets`: A (c_in -> r, the layer's kernel) and B
    (r -> c_out, 1x1). Backward with frozen base weights: an input gradient for every layer whose input carries
    gradient (from the first LoRA layer on, or from the start with `input_grad`; never the text context or the
    time embedding), LoRA weight gradients, and four products per attention (dQ, dK, dV, dP; no recomputation).
    """
    forward = backward = 0
    live = input_grad  # does the activation stream carry gradient here?
    qkv = []
    for layer in unet_layers(config, height, width, context_len):
        if layer[0] == "attn":
            _, q_tokens, kv_tokens, c = layer
            forward += 4 * q_tokens * kv_tokens * c
            if any(qkv):
                backward += 8 * q_tokens * kv_tokens * c
                live = True
            qkv = []
            continue
        _, name, source, tokens, c_in, c_out, k = layer
        base = 2 * tokens * c_in * c_out * k * k
        lora = lora_rank > 0 and any(name == t or name.endswith("." + t) for t in lora_targets)
        input_grad_here = live and source == "stream"
        forward += base
        backward += base if input_grad_here else 0
        if lora:
            a, b = 2 * tokens * c_in * lora_rank * k * k, 2 * tokens * lora_rank * c_out
            forward += a + b
            backward += a + 2 * b + (a if input_grad_here else 0)  # dW_A, dW_B and dX_B, dX_A when needed
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            qkv.append(input_grad_here or lora)
        elif source == "stream" and (input_grad_here or lora):
            live = True
    return forward, backward


def count_flops(fn) -> int:
    """FLOPs of fn() by FlopCounterMode, with attention on the math path (products it can count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_configs(model_dir: str) -> tuple[dict, dict]:
    """The UNet and VAE config.json of a diffusers Stable Diffusion folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (dict(UNet2DConditionModel.load_config(Path(model_dir) / "unet")),
            dict(AutoencoderKL.load_config(Path(model_dir) / "vae")))


def latent_shape(vae_config: dict, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)  # pipe.vae_scale_factor
    return vae_config["latent_channels"], resolution // factor, resolution // factor


def check_unet_count(unet_config: dict, height: int, width: int, lora_rank: int = 4,
                     lora_targets: str = common.LORA_TARGETS) -> dict:
    """The analytic UNet count against FlopCounterMode on the meta device (no memory, no weights): base forward,
    forward with the scripts' LoRA, and LoRA forward + backward with and without a gradient at the input.
    Returns {what: (analytic, counted)}."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.requires_grad_(False)
    x, t = torch.zeros(1, unet_config["in_channels"], height, width, device="meta"), torch.tensor([500], device="meta")
    context = torch.zeros(1, 77, unet_config["cross_attention_dim"], device="meta")
    checks = {"forward": (unet_flops(unet_config, height, width)[0], count_flops(lambda: unet(x, t, context)))}
    common.add_lora(unet, lora_rank, None, lora_targets)
    targets = lora_targets.split(",")
    forward, backward = unet_flops(unet_config, height, width, 77, lora_rank, targets)
    checks["lora_forward"] = (forward, count_flops(lambda: unet(x, t, context)))
    checks["lora_forward_backward"] = (forward + backward,
                                       count_flops(lambda: unet(x, t, context).sample.sum().backward()))
    x_grad = x.clone().requires_grad_(True)
    backward_input_grad = unet_flops(unet_config, height, width, 77, lora_rank, targets, input_grad=True)[1]
    checks["lora_forward_backward_input_grad"] = (
        forward + backward_input_grad, count_flops(lambda: unet(x_grad, t, context).sample.sum().backward()))
    return checks


def component_flops(unet_config: dict, vae_config: dict, resolution: int, lora_rank: int, lora_targets: str) -> dict:
    """FLOPs per UNet sample (analytic) and per VAE decode (counted on the meta device) at this resolution."""
    from diffusers import AutoencoderKL

    channels, h, w = latent_shape(vae_config, resolution)
    targets = [t for t in lora_targets.split(",") if t]
    forward, backward = unet_flops(unet_config, h, w, 77, lora_rank, targets, input_grad=False)
    backward_input_grad = unet_flops(unet_config, h, w, 77, lora_rank, targets, input_grad=True)[1]
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    vae.requires_grad_(False)
    z = torch.zeros(1, channels, h, w, device="meta", requires_grad=True)
    decode = count_flops(lambda: vae.decode(z).sample)
    decode_backward = count_flops(lambda: vae.decode(z).sample.sum().backward()) - decode
    return {"unet_forward_base": unet_flops(unet_config, h, w)[0], "unet_forward": forward, "unet_backward": backward,
            "unet_backward_input_grad": backward_input_grad, "vae_decode": decode,
            "vae_decode_backward": decode_backward}


def differentiated_decodes(variant: str, decodes: float) -> float:
    """How many of an iteration's VAE decodes are backpropagated: all of a gradient script's, except that
    DRaFT-LV (without --lv-with-rollout) decodes its rollout without gradient: n of every n + 1 decodes."""
    script, flags = VARIANTS[variant]
    if script not in GRADIENT_SCRIPTS:
        return 0
    if "--lv" in flags and "--lv-with-rollout" not in flags:
        n = int(flags[flags.index("--lv") + 1])
        return decodes * n / (n + 1)
    return decodes


def iteration_flops(variant: str, delta: dict, flops: dict, checkpoint: bool) -> tuple[float, float] | None:
    """(model FLOPs, hardware FLOPs) of one iteration from the counters its metrics row adds: UNet image-steps
    forward (a checkpointed call's recomputation counted again) and backward, VAE decodes. Model FLOPs leave
    the recomputation out (the usual MFU); hardware FLOPs keep it (what FlopCounterMode sees). Text encoder and
    rewards are left out (< 0.1 % at SD scale; the benchmark's rewards have no matmuls). None without counters."""
    if not all(k in delta for k in ("unet_forwards", "unet_backwards", "vae_decodes")):
        return None
    script = VARIANTS[variant][0]
    forwards, backwards, decodes = delta["unet_forwards"], delta["unet_backwards"], delta["vae_decodes"]
    backward = flops["unet_backward_input_grad" if variant in INPUT_GRAD else "unet_backward"]
    hardware = forwards * flops["unet_forward"] + backwards * backward + decodes * flops["vae_decode"]
    hardware += differentiated_decodes(variant, decodes) * flops["vae_decode_backward"]
    if script == "d3po.py":  # each policy pass has a reference pass with the adapter disabled: no LoRA FLOPs
        hardware -= backwards * (flops["unet_forward"] - flops["unet_forward_base"])
    recompute = backwards * flops["unet_forward"] if (script in GRADIENT_SCRIPTS and checkpoint) else 0
    return hardware - recompute, hardware


# ---------------------------------------------------------------------------------------------
# Training: the real scripts through their command line
# ---------------------------------------------------------------------------------------------


def script_flags(variant: str, args: Args, model: str, batch: int, iters: int, run_dir: Path) -> list[str]:
    script, flags = VARIANTS[variant]
    reward = REWARD["gradient" if script in GRADIENT_SCRIPTS else "rl"]
    return ["--model", model, "--iters", str(iters), "--batch-size", str(batch), "--num-steps", str(args.num_steps),
            "--resolution", str(args.resolution), "--guidance-scale", str(args.guidance_scale), "--eval-size", "2",
            "--eval-every", "0", "--run-dir", str(run_dir), "--device", args.device, "--dtype", args.dtype,
            "--threads", str(args.threads), "--reward", reward, "--prompts", "simple_animals", *flags]


def run_script(script: str, flags: list[str], run_dir: Path, count: bool, timeout: int) -> dict:
    """One script run in a subprocess; returns its status, metrics rows, args.json and the launcher's stats."""
    stats_path = run_dir.with_name(run_dir.name + ".stats.json")  # beside the run dir, which the script creates
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", LAUNCHER, str(ROOT / script), str(stats_path), "1" if count else "0", *flags]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, ""
    lines = [line for line in err.splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith(("error", "torch.OutOfMemoryError",
                                                                          "RuntimeError"))), lines[-1] if lines else "")
    if rc == 0:
        status = "ok"
    elif rc is None:
        status, message = "timeout", f"killed after {timeout} s"
    elif "out of memory" in err.lower():
        status = "oom"
    else:  # 2: the script refused the flags (e.g. a batch it cannot split); 3: it stopped itself (NaN guard, ...)
        status = {2: "refused", 3: "stopped"}.get(rc, "error")
    metrics, settings = run_dir / "metrics.jsonl", run_dir / "args.json"
    return {"status": status, "rc": rc, "message": message[-400:],
            "rows": [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else [],
            "settings": json.loads(settings.read_text()) if settings.is_file() else {},
            "stats": json.loads(stats_path.read_text()) if stats_path.is_file() else {}}


COUNTERS = ("unet_forwards", "unet_backwards", "vae_decodes", "reward_evals")


def timed_rows(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(previous row, row) for every iteration after the first with no evaluation in it: the timed ones."""
    rows = [r for r in rows if not r.get("final")]
    return [(rows[i - 1], rows[i]) for i in range(1, len(rows)) if "eval_reward_mean" not in rows[i]]


def summarise(variant: str, batch: int, run: dict, flops_for) -> dict:
    """A training run -> seconds per iteration, samples, memory, FLOPs and MFU of its timed iterations."""
    result = {"batch": batch, "status": run["status"], "message": run["message"] if run["status"] != "ok" else ""}
    rows, stats = run["rows"], run["stats"]
    if run["status"] != "ok":
        return result
    pairs = timed_rows(rows)
    finite = all(math.isfinite(r.get("reward_mean", math.nan)) and math.isfinite(r.get("loss", math.nan))
                 for r in rows if not r.get("final"))
    seconds = [r["wall_time_s"] - p["wall_time_s"] for p, r in pairs]
    samples = [r["samples_seen"] - p["samples_seen"] for p, r in pairs if "samples_seen" in r]
    result |= {"finite": finite, "timed_iters": len(pairs),
               "s_per_iter": statistics.median(seconds) if seconds else None,
               "samples_per_iter": statistics.median(samples) if samples else None}
    if result["s_per_iter"] and result["samples_per_iter"]:
        result["samples_per_s"] = result["samples_per_iter"] / result["s_per_iter"]
    peaks = [r["peak_mem_gb"] for r in rows if "peak_mem_gb" in r]
    result["peak_mem_gib"] = max(peaks) if peaks else stats.get("peak_allocated_gib")
    result["peak_mem_source"] = "metrics peak_mem_gb" if peaks else ("max_memory_allocated" if stats else None)
    if "peak_reserved_gib" in stats:  # what the caching allocator took from the card, plus the CUDA context
        result["footprint_gib"] = stats["peak_reserved_gib"] + stats.get("context_gib", 0.0)
    settings = run["settings"]
    flops = flops_for(settings.get("lora_rank", 4), settings.get("lora_targets", common.LORA_TARGETS))
    per_iter = [iteration_flops(variant, {k: r[k] - p[k] for k in COUNTERS if k in r and k in p}, flops,
                                settings.get("gradient_checkpointing", True)) for p, r in pairs]
    if per_iter and all(per_iter):
        result["model_flops_per_iter"] = statistics.median(f[0] for f in per_iter)
        result["hardware_flops_last_iter"] = per_iter[-1][1]
        result["model_tflops_per_s"] = sum(f[0] for f in per_iter) / sum(seconds) / 1e12 if sum(seconds) else None
    result["counted_flops_run"] = stats.get("flops")
    marks = stats.get("flops_at_rows") or []
    if pairs and len(marks) == len(rows):  # the last timed iteration's FLOPs, counted as the script ran
        last = rows.index(pairs[-1][1])
        result["counted_flops_last_iter"] = marks[last] - marks[last - 1]
    return result


def bench_variant(variant: str, args: Args, model: str, work: Path, flops_for, caps: list[float]) -> dict:
    """Training runs at growing batch sizes, then (with FLOP counting) the check of the FLOP model."""
    script = VARIANTS[variant][0]
    runs, batches = [], ints(args.batches)
    while batches:
        batch = batches.pop(0)
        run_dir = work / "runs" / f"{variant}-b{batch}"
        started = time.time()
        run = run_script(script, script_flags(variant, args, model, batch, args.iters, run_dir), run_dir,
                         args.count_flops, args.timeout)
        summary = summarise(variant, batch, run, flops_for) | {"wall_s": round(time.time() - started, 1)}
        runs.append(summary)
        print(f"gpu.py: {variant} batch {batch}: {summary['status']}"
              + (f", {summary['s_per_iter']:.3g} s/iter" if summary.get("s_per_iter") else "")
              + (f" ({summary['message']})" if summary["message"] else ""), flush=True)
        if summary["status"] == "refused" and not any(r["status"] == "ok" for r in runs):
            # e.g. RWR cannot split a batch of 1 into its per-prompt groups: the next size, or twice this one
            if not batches and len(runs) < 4:
                batches = [2 * batch]
            continue
        if summary["status"] != "ok" or summary.get("footprint_gib", 0) > max(caps):
            break
    result = {"script": script, "flags": VARIANTS[variant][1], "runs": runs}
    ok = [r for r in runs if r["status"] == "ok"]
    result["status"] = "ok" if ok else (runs[-1]["status"] if runs else "not run")
    if not ok:
        return result
    first = ok[0]
    fitting = [r for r in ok if r.get("footprint_gib", 0) <= max(caps)] or [first]
    best = max(fitting, key=lambda r: r.get("samples_per_s") or 0)
    result |= {"first": first, "best": best,
               "max_batch": {f"{c:g}": max((r["batch"] for r in ok if "footprint_gib" in r and r["footprint_gib"] <= c),
                                           default=None) for c in caps}}
    if args.count_flops and first.get("counted_flops_last_iter") is None and first.get("counted_flops_run"):
        # Without the running count per row: this run minus the same run one iteration shorter (same seed, same
        # draws, same evaluations) is the last iteration's count.
        run_dir = work / "runs" / f"{variant}-b{first['batch']}-short"
        short = run_script(script, script_flags(variant, args, model, first["batch"], args.iters - 1, run_dir),
                           run_dir, True, args.timeout)
        if short["status"] == "ok" and short["stats"].get("flops") is not None:
            first["counted_flops_last_iter"] = first["counted_flops_run"] - short["stats"]["flops"]
    counted, modelled = first.get("counted_flops_last_iter"), first.get("hardware_flops_last_iter")
    if counted and modelled:
        result["flop_check"] = {"batch": first["batch"], "counted": counted, "modelled": modelled,
                                "rel_error": modelled / counted - 1}
    return result


# ---------------------------------------------------------------------------------------------
# Rollout: the sampler every script shares, timed in this process
# ---------------------------------------------------------------------------------------------


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def bench_rollout(model: str, args: Args, flops: dict, caps: list[float]) -> dict:
    """Images/s of text encoding + T-step CFG DDIM sampling (eta 1, trajectory recorded, as DDPO samples; the
    cost does not depend on eta) + VAE decode, LoRA attached as in the scripts, no gradient, no reward."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cuda = args.device.startswith("cuda")
    pipe = common.load_pipeline(model, dtype, args.device)
    common.add_lora(pipe.unet, 4)
    prompts = runner.load_prompts("simple_animals")
    uncond = common.encode_prompts(pipe, [""])
    guided = 2 if args.guidance_scale != 1 else 1
    per_image = args.num_steps * guided * flops["unet_forward"] + flops["vae_decode"]
    results = []
    for batch in ints(args.rollout_batches):
        times = []
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(1 + args.rollout_repeats):  # the first one warms up (allocator, kernel selection)
                sync(args.device)
                start = time.perf_counter()
                cond = common.encode_prompts(pipe, [prompts[i % len(prompts)] for i in range(batch)])
                x_T = common.initial_latents(pipe, batch, args.resolution)
                out = common.rollout(pipe, cond, uncond.expand(batch, -1, -1), x_T, num_steps=args.num_steps,
                                     guidance_scale=args.guidance_scale, eta=1.0, record=True)
                common.decode(pipe.vae, out.output)
                sync(args.device)
                times.append(time.perf_counter() - start)
                del cond, x_T, out
        except torch.OutOfMemoryError:
            results.append({"batch": batch, "status": "oom"})
            print(f"gpu.py: rollout batch {batch}: out of memory", flush=True)
            break
        seconds = statistics.median(times[1:])
        row = {"batch": batch, "status": "ok", "s": seconds, "images_per_s": batch / seconds,
               "model_tflops_per_s": batch * per_image / seconds / 1e12}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            context = max(0.0, (total - free - torch.cuda.memory_reserved()) / 2**30)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["footprint_gib"] = torch.cuda.max_memory_reserved() / 2**30 + context
        results.append(row)
        print(f"gpu.py: rollout batch {batch}: {row['images_per_s']:.3g} images/s", flush=True)
    del pipe
    ok = [r for r in results if r["status"] == "ok"]
    return {"runs": results, "first": ok[0] if ok else None,
            "best": max(ok, key=lambda r: r["images_per_s"]) if ok else None,
            "max_batch": {f"{c:g}": max((r["batch"] for r in ok if r.get("footprint_gib", math.inf) <= c), default=None)
                          for c in caps}}


def add_mfu(summary: dict | None, peak_tflops: float | None):
    """MFU of a run or rollout summary: its model FLOP rate over the GPU's peak (n/a without a peak)."""
    if summary and peak_tflops and summary.get("model_tflops_per_s"):
        summary["mfu"] = summary["model_tflops_per_s"] / peak_tflops


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def device_info(device: str, peak_flag: float) -> dict:
    import diffusers
    import peft
    import transformers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}
    if not device.startswith("cuda"):
        return {"name": "cpu", "cpu_threads": torch.get_num_threads(), "peak_tflops": None} | info
    name = torch.cuda.get_device_name(torch.device(device))
    peak = peak_flag or next((t for pattern, t in PEAK_TFLOPS if re.search(pattern, name)), None)
    info |= {"name": name, "peak_tflops": peak, "cuda": torch.version.cuda,
             "memory_gib": torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30}
    try:  # driver, clocks and power limit, as the protocol asks; absent without nvidia-smi
        query = "driver_version,clocks.max.sm,power.limit"
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def method_row(name: str, result: dict, rollout: dict) -> dict:
    """The flat per-method fields of the table (None = n/a)."""
    first, best = result.get("first") or {}, result.get("best") or {}
    r_first, r_best = rollout.get("first") or {}, rollout.get("best") or {}
    return {"method": name, "status": result["status"],
            "rollout_images_per_s_b1": r_first.get("images_per_s"),
            "rollout_images_per_s_best": r_best.get("images_per_s"),
            "rollout_best_batch": r_best.get("batch"),
            "train_batch_first": first.get("batch"), "train_s_per_iter_first": first.get("s_per_iter"),
            "train_samples_per_iter_first": first.get("samples_per_iter"),
            "train_best_batch": best.get("batch"), "train_s_per_iter_best": best.get("s_per_iter"),
            "train_samples_per_s_best": best.get("samples_per_s"),
            "peak_mem_gib_first": first.get("peak_mem_gib"),
            "max_batch": result.get("max_batch"), "mfu_first": first.get("mfu"), "mfu_best": best.get("mfu"),
            "model_flops_per_iter_first": first.get("model_flops_per_iter"),
            "flop_check_rel_error": (result.get("flop_check") or {}).get("rel_error")}


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}" if isinstance(value, (int, float)) else str(value)


def markdown(report: dict) -> str:
    d, s = report["device"], report["settings"]
    versions = ", ".join(f"{k} {d[k]}" for k in ("torch", "diffusers", "transformers", "peft", "cuda") if d.get(k))
    lines = [f"# Benchmark on {d['name']}", "",
             f"{versions}; peak {fmt(d.get('peak_tflops'))} TFLOPS dense bf16; {report['date']}", "",
             f"Model {s['model']}, {s['resolution']} px, T = {s['num_steps']} DDIM, CFG {s['guidance_scale']}, frozen "
             f"weights {s['dtype']}, LoRA fp32 (each script's rank and targets); {s['iters']} iterations per run, "
             "all but the first timed (median); memory in GiB.", "",
             "| method | rollout img/s b=1 | rollout img/s best (b) | train s/iter (b) | samples/iter | "
             "train s/iter best (b) | samples/s best | peak GiB (first b) | max b " + "/".join(s["caps"].split(","))
             + " GiB | MFU first b | MFU best | status |",
             "|---|" + "---|" * 11]
    for row in report["table"]:
        fits = list((row["max_batch"] or {}).values())
        caps = "/".join(fmt(v) for v in fits) if any(v is not None for v in fits) else "n/a"
        lines.append(
            f"| {row['method']} | {fmt(row['rollout_images_per_s_b1'])} | {fmt(row['rollout_images_per_s_best'])} "
            f"({fmt(row['rollout_best_batch'])}) | {fmt(row['train_s_per_iter_first'])} "
            f"({fmt(row['train_batch_first'])}) | "
            f"{fmt(row['train_samples_per_iter_first'])} | {fmt(row['train_s_per_iter_best'])} "
            f"({fmt(row['train_best_batch'])}) | {fmt(row['train_samples_per_s_best'])} | "
            f"{fmt(row['peak_mem_gib_first'], '.2f')} | {caps} | {fmt(row['mfu_first'], '.1%')} | "
            f"{fmt(row['mfu_best'], '.1%')} | {row['status']} |")
    checks = [f"{row['method']} {row['flop_check_rel_error']:+.2%}" for row in report["table"]
              if row["flop_check_rel_error"] is not None]
    if checks:
        lines += ["", "FLOP model of one iteration vs FlopCounterMode (hardware FLOPs, recomputation included): "
                  + ", ".join(checks) + "."]
    f = report["flops"]
    lines += ["", f"UNet forward per sample: {f['unet_forward_base'] / 1e9:.1f} GFLOP analytic, "
              f"{f['unet_check']['forward'][1] / 1e9:.1f} GFLOP by FlopCounterMode; VAE decode "
              f"{f['vae_decode'] / 1e9:.1f} GFLOP. Rollout images/s is the shared sampler (common.rollout + decode), "
              "the same for every method."]
    return "\n".join(lines) + "\n"


def main():
    args = settle(tyro.cli(Args))
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = [float(c) for c in args.caps.split(",")]
    variants = selected([m for m in args.methods.split(",") if m])
    root = Path(args.work_dir or tempfile.gettempdir())
    if not args.model and args.arch == "sd15" and shutil.disk_usage(root if root.exists() else "/").free < 4e9:
        hub.fail(f"--work-dir {root}: less than 4 GB free for the 2.1 GB model and the runs")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sdbench-", dir=root))
    try:
        model = args.model
        if not model:
            print(f"gpu.py: building {args.arch} with random weights in {work / 'model'}", flush=True)
            model = sd_arch.build(args.arch, str(work / "model"))
        unet_config, vae_config = model_configs(model)
        try:
            unet_layers(unet_config, 8, 8, 77)
        except ValueError as e:
            hub.fail(f"--model {model}: {e}")
        checks = check_unet_count(unet_config, *latent_shape(vae_config, args.resolution)[1:])
        for what, (analytic, counted) in checks.items():
            if abs(analytic / counted - 1) > 0.01:
                print(f"gpu.py: warning: analytic UNet {what} {analytic:.4g} FLOPs differs from FlopCounterMode "
                      f"{counted:.4g} by more than 1 %; MFU uses the analytic count", file=sys.stderr)
        cache = {}

        def flops_for(rank, targets):
            if (rank, targets) not in cache:
                cache[rank, targets] = component_flops(unet_config, vae_config, args.resolution, rank, targets)
            return cache[rank, targets]

        # The training runs first: this process must hold no CUDA context while the scripts measure memory.
        methods = {v: bench_variant(v, args, model, work, flops_for, caps) for v in variants}
        rollout = bench_rollout(model, args, flops_for(4, common.LORA_TARGETS), caps)
        device = device_info(args.device, args.peak_tflops)
        for summary in [*rollout["runs"], *(r for m in methods.values() for r in m["runs"])]:
            add_mfu(summary, device["peak_tflops"])
        report = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "settings": asdict(args) | {"model": args.model or f"{args.arch} (random weights)"},
                  "flops": flops_for(4, common.LORA_TARGETS) | {"unet_check": checks, "lora_rank": 4},
                  "rollout": rollout, "methods": methods,
                  "table": [method_row(v, methods[v], rollout) for v in variants]}
        slug = "cpu-small" if args.small else re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
        out = Path(args.out_dir) / f"gpu-{slug}"
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        print(f"gpu.py: results in {out}.json and {out}.md", flush=True)
    finally:
        if args.keep:
            print(f"gpu.py: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
