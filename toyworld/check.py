"""Score a toy-world model, optionally with a run's LoRA: symmetry, CLIP score and prompt fidelity.

    python toyworld/check.py                          # the pretrained toy model
    python toyworld/check.py --lora runs/drtune__...  # after fine-tuning (loaded with load_lora_weights)
    python toyworld/check.py --lora my_lora.safetensors

Samples `--n` images over the evaluation prompts with fixed noise (deterministic DDIM, as the scripts'
evaluation), then reports the mean asymmetry (DRTune eq. 6), the toy CLIP score, and how often the
picture shows the prompted colour, shape and background according to a pixel classifier (world.classify).
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import hub  # noqa: E402
import rewards  # noqa: E402
import runner  # noqa: E402
from toyworld import world  # noqa: E402


@dataclass
class Args:
    lora: str = ""
    """a run directory holding pytorch_lora_weights.safetensors, or a LoRA .safetensors file (empty: the pretrained
    model)"""
    model: str = ""
    """toy-flow (the toy world's flow-matching model), toy (its Stable Diffusion) or any diffusers folder drawing the
    toy world; default: the model of the run --lora names (its args.json), else the scripts' default (toy-flow)"""
    prompts: str = "toy_eval"
    """prompt set or file; prompts must follow the toy caption grammar"""
    n: int = 96
    """samples (the prompts cycled)"""
    num_steps: int = 20
    """sampling steps, deterministic (DDIM at eta 0, or a flow model's ODE)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale"""
    grid: str = ""
    """save the samples as a PNG grid here (row by row, --grid-cols per row)"""
    grid_cols: int = 12
    """images per grid row"""
    threads: int = 1
    """CPU threads for torch"""


def check_args(args: Args) -> list[str]:
    """Every flag checked before any work (one line on stderr, exit status 2); returns the prompts."""
    for name in ("n", "num_steps", "grid_cols", "threads"):
        if getattr(args, name) < 1:
            hub.fail(f"{hub.flag(name)} must be at least 1 (got {getattr(args, name)})")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        hub.fail(f"--guidance-scale must be a finite non-negative number (got {args.guidance_scale})")
    prompts = runner.load_prompts(args.prompts)
    for prompt in prompts:  # the classifier reads colour, shape and background off the caption
        words = prompt.split()
        if len(words) != 7 or words[1] not in world.COLOURS or words[2] not in world.SHAPES or \
                words[5] not in world.BACKGROUNDS:
            hub.fail(f"--prompts {args.prompts}: {prompt!r} is not a toy caption "
                     f"(\"a <colour> <shape> on a <background> background\")")
    if args.grid:
        grid = Path(args.grid).expanduser()
        if not grid.parent.is_dir() or grid.suffix.lower() not in Image.registered_extensions():
            hub.fail(f"--grid {args.grid}: needs an existing folder and an image suffix such as .png")
    if args.lora:
        common.read_lora(args.lora, "--lora")  # a missing or damaged file fails here, in one line
    run_args = Path(args.lora).expanduser() / "args.json" if args.lora else None
    if not args.model and run_args and run_args.is_file():
        args.model = json.loads(run_args.read_text()).get("model") or ""
    args.model = args.model or hub.DEFAULT_MODEL
    hub.resolve_model(args.model)
    return prompts


def main():
    args = runner.cli(Args, prog="check.py")
    prompts = check_args(args)
    torch.set_num_threads(args.threads)
    pipe = common.load_pipeline(args.model)
    if args.lora:  # diffusers' own route, as a user would load it; the alpha comes from the file's metadata
        lora = Path(args.lora).expanduser()
        if lora.is_dir():
            pipe.load_lora_weights(str(lora))
        else:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    batch = [prompts[i % len(prompts)] for i in range(args.n)]
    asym, images = common.evaluate(pipe, batch, lambda x, p: rewards.asymmetry(x), num_steps=args.num_steps,
                                   guidance_scale=args.guidance_scale, resolution=common.native_resolution(pipe),
                                   batch_size=32)
    with torch.no_grad():
        clip = rewards.clipscore(images, batch, hub.TOY_CLIP)
    hits = torch.tensor([[a == b for a, b in zip(world.classify(x), world.parse(p))] for x, p in zip(images, batch)])
    colour, shape, background = hits.float().mean(dim=0).tolist()
    report = {"asymmetry": asym.mean().item(), "clipscore": clip.mean().item(), "colour": colour, "shape": shape,
              "background": background, "n": args.n, "model": args.model, "lora": args.lora}
    print(json.dumps(report))
    if args.grid:
        runner.save_grid(images, args.grid, ncols=args.grid_cols)


if __name__ == "__main__":
    main()
