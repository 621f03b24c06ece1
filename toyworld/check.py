"""Score a toy-world model, optionally with a run's LoRA: symmetry, CLIP score and prompt fidelity.

    python toyworld/check.py                          # the pretrained toy model
    python toyworld/check.py --lora runs/drtune__...  # after fine-tuning (loaded with load_lora_weights)

Samples `--n` images over the evaluation prompts with fixed noise (deterministic DDIM, as the scripts'
evaluation), then reports the mean asymmetry (DRTune eq. 6), the toy CLIP score, and how often the
picture shows the prompted colour, shape and background according to a pixel classifier (world.classify).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rewards  # noqa: E402
from toyworld import world  # noqa: E402


@dataclass
class Args:
    lora: str = ""
    """run directory holding pytorch_lora_weights.safetensors (empty: the pretrained model)"""
    model: str = common.TOY_MODEL
    """the toy model (or any diffusers folder drawing the toy world)"""
    prompts: str = "toy_eval"
    """prompt set or file; prompts must follow the toy caption grammar"""
    n: int = 96
    """samples (the prompts cycled)"""
    num_steps: int = 20
    """DDIM steps (eta 0)"""
    guidance_scale: float = 5.0
    """classifier-free guidance scale"""
    grid: str = ""
    """save the samples as a PNG grid here (row by row, --grid-cols per row)"""
    grid_cols: int = 12
    """images per grid row"""
    threads: int = 1
    """CPU threads for torch"""


def main():
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    prompts = common.load_prompts(args.prompts)
    if args.lora and not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
        common.fail(f"--lora {args.lora}: no pytorch_lora_weights.safetensors there")
    pipe = common.load_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    batch = [prompts[i % len(prompts)] for i in range(args.n)]
    asym, images = common.evaluate(pipe, batch, lambda x, p: rewards.asymmetry(x), num_steps=args.num_steps,
                                   guidance_scale=args.guidance_scale, resolution=common.native_resolution(pipe),
                                   batch_size=32)
    with torch.no_grad():
        clip = rewards.clipscore(images, batch, rewards.TOY_CLIP)
    hits = torch.tensor([[a == b for a, b in zip(world.classify(x), world.parse(p))] for x, p in zip(images, batch)])
    colour, shape, background = hits.float().mean(dim=0).tolist()
    report = {"asymmetry": asym.mean().item(), "clipscore": clip.mean().item(), "colour": colour, "shape": shape,
              "background": background, "n": args.n, "lora": args.lora}
    print(json.dumps(report))
    if args.grid:
        common.save_grid(images, args.grid, ncols=args.grid_cols)


if __name__ == "__main__":
    main()
