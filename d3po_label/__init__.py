"""D3PO's human feedback on disk, beside its labelling page (page.html): the sample folder that `d3po.py --phase
sample` writes (images, trajectories, label.html, samples.json) and the label files people export from the page,
read back and checked by `--phase train`. No part of the algorithm: d3po.py samples and trains.

A sample folder: images/KKKK_I.png, trajectories.safetensors (latents (prompts, n, T+1, C, h, w) and the T
timesteps; its hash is the samples' id), label.html (the page with every image inlined) and samples.json (the
prompts, the sampling flags, the LoRA sampled from), written last, so a crash leaves no usable half.
"""

import base64
import hashlib
import io
import json
import math
import shlex
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save

import common
import distributed
import runner
from hub import fail, flag

LABEL_PAGE_TEMPLATE = Path(__file__).parent / "page.html"
SAMPLES_FORMAT, LABELS_FORMAT = "d3po-samples/1", "d3po-labels/1"
# Flags that define the sampled transitions; training on stored trajectories must replay them identically.
SAMPLING_FLAGS = ("model", "num_steps", "guidance_scale", "eta", "resolution", "samples_per_prompt")


# ---------------------------------------------------------------------------------------------
# Writing the samples and the labelling page (--phase sample)
# ---------------------------------------------------------------------------------------------


def to_png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def lora_id(path: str) -> str:
    """What samples.json records of the LoRA they were drawn with: a hash of its weights ('' = none)."""
    if not path:
        return ""
    return distributed.lora_digest(common.read_lora(path))[:16]


def write_samples(run_dir: Path, prompts: list[str], latents, timesteps, pngs: list[bytes], args):
    """The sample folder of `prompts`, n = --samples-per-prompt trajectories each: latents (prompts, n, T+1, ...),
    the T timesteps and the PNGs of the final images in the same order; each file written atomically."""
    n = args.samples_per_prompt
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{k:04d}_{i}.png" for k in range(len(prompts)) for i in range(n)]
    for name, png in zip(names, pngs):
        runner.write_atomic(run_dir / name, lambda f: f.write(png))
    trajectories = {"latents": latents.contiguous(), "timesteps": timesteps.cpu().long()}
    data = save({k: v.cpu() for k, v in trajectories.items()})  # bytes, written with the umask's mode as the rest
    samples_id = hashlib.sha256(data).hexdigest()[:16]
    runner.write_atomic(run_dir / "trajectories.safetensors", lambda f: f.write(data))
    page_data = {"format": LABELS_FORMAT, "samples_id": samples_id, "per_prompt": n,
                 "items": [{"prompt": p, "images": ["data:image/png;base64," + base64.b64encode(png).decode()
                                                    for png in pngs[k * n:(k + 1) * n]]} for k, p in enumerate(prompts)]}
    # Images inlined as data URIs: one file that works opened from disk; "</" escaped to stay inside <script>.
    page = LABEL_PAGE_TEMPLATE.read_text().replace("/*D3PO_DATA*/null", json.dumps(page_data).replace("</", "<\\/"))
    runner.write_atomic(run_dir / "label.html", lambda f: f.write(page.encode()))
    meta = {"format": SAMPLES_FORMAT, "samples_id": samples_id, "prompts": prompts,
            "images": [names[k * n:(k + 1) * n] for k in range(len(prompts))], "seed": args.seed,
            "init_lora": args.init_lora, "init_lora_id": lora_id(args.init_lora)}
    meta |= {name: getattr(args, name) for name in SAMPLING_FLAGS}
    runner.write_atomic(run_dir / "samples.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    print(f"d3po: {len(prompts)} prompts x {n} images in {run_dir}; label them in {run_dir / 'label.html'}, then\n"
          f"  python d3po.py --feedback human --phase train --samples {run_dir}{train_flags(args)} "
          "--labels <exported files>")


def train_flags(args) -> str:
    """The flags --phase train must repeat to accept these samples: the sampling settings and the LoRA they were
    drawn with (its shape too), wherever they differ from the defaults."""
    default = type(args)()
    names = (*SAMPLING_FLAGS, "init_lora", "lora_rank", "lora_alpha", "lora_targets")
    return "".join(f" {flag(name)} {shlex.quote(str(getattr(args, name)))}" for name in names
                   if getattr(args, name) != getattr(default, name))


# ---------------------------------------------------------------------------------------------
# Reading them back (--phase train), every check before any work
# ---------------------------------------------------------------------------------------------


def read_json(path: Path, what: str):
    if not path.is_file():
        fail(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{what} {path}: cannot be read as JSON ({type(e).__name__}: {str(e).splitlines()[0]})")


def load_samples(args) -> dict:
    """samples.json of a --phase sample run dir, checked against the flags that define its transitions."""
    if not args.samples:
        fail("--phase train needs --samples DIR: the run dir written by --phase sample")
    meta_path = Path(args.samples) / "samples.json"
    if not meta_path.is_file():
        fail(f"--samples {args.samples}: no samples.json there; run --feedback human --phase sample first")
    meta = read_json(meta_path, "--samples")
    if not isinstance(meta, dict) or meta.get("format") != SAMPLES_FORMAT:
        fail(f"--samples {args.samples}: samples.json is not a {SAMPLES_FORMAT} file")
    for name in SAMPLING_FLAGS:
        if meta.get(name) != getattr(args, name):
            option = flag(name)
            fail(f"{option} {getattr(args, name)} differs from the samples in {args.samples} ({meta.get(name)}); "
                 f"training replays their transitions, so pass {option} {meta.get(name)}")
    if meta.get("init_lora_id", "") != lora_id(args.init_lora):
        fail(f"--init-lora {args.init_lora or '(none)'} is not the model the samples in {args.samples} were drawn "
             f"from ({meta.get('init_lora') or 'the pretrained model'}); training starts from the sampling model")
    trajectories = Path(args.samples) / "trajectories.safetensors"
    if not trajectories.is_file():
        fail(f"--samples {args.samples}: trajectories.safetensors is missing")
    # The id the label files quote is this file's hash: labels can only ever train the pairs they judged.
    if hashlib.sha256(trajectories.read_bytes()).hexdigest()[:16] != meta.get("samples_id"):
        fail(f"--samples {args.samples}: trajectories.safetensors changed since sampling (hash differs "
             "from samples.json); its labels no longer describe it")
    return meta


def load_labels(files, meta: dict) -> torch.Tensor:
    """Label files -> (prompts, n) scores averaged over the annotators who labelled each prompt; NaN = unlabelled.

    A file holds one entry per sampled prompt, in order: n scores (the page writes 1 for the chosen image and
    0 for the others; all 0 for a tie or "all bad") or null when skipped. As in the official code, several
    annotators' scores are averaged, and a pair is trained only if its two averaged scores differ (d3po.check_args
    refuses files that leave no such pair).
    """
    k, n = len(meta["prompts"]), meta["samples_per_prompt"]
    total, count = torch.zeros(k, n, dtype=torch.float64), torch.zeros(k, 1, dtype=torch.float64)
    for file in files:
        data = read_json(Path(file), "--labels")
        if not isinstance(data, dict) or data.get("format") != LABELS_FORMAT or not isinstance(data.get("labels"), list):
            fail(f"--labels {file}: not a {LABELS_FORMAT} file exported by label.html")
        if data.get("samples_id") != meta["samples_id"] or len(data["labels"]) != k:
            fail(f"--labels {file}: made for other samples (id {data.get('samples_id')}, "
                 f"{len(data['labels'])} prompts), not samples {meta['samples_id']} ({k} prompts)")
        for i, entry in enumerate(data["labels"]):
            if not isinstance(entry, dict) or entry.get("prompt") != meta["prompts"][i]:
                fail(f"--labels {file}: entry {i} is not for prompt {meta['prompts'][i]!r}")
            scores = entry.get("scores")
            if scores is None:
                continue
            if (not isinstance(scores, list) or len(scores) != n or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
                fail(f"--labels {file}: entry {i} needs {n} finite scores or null (got {scores!r})")
            total[i] += torch.tensor(scores, dtype=torch.float64)
            count[i] += 1
    scores = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return scores.float()
