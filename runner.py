"""The run around a method, the same for every script: its flags (RunArgs, the command line, the checks made
before any work), the prompt sets, the reward the flags name, seeding and the device, and the run directory
(args.json, metrics, eval grids, atomic checkpoints, resume, Ctrl-C, the NaN guard, progress, TensorBoard, W&B with
--track, the model card): `Run`.

No algorithm lives here: a method script reads `common` for the diffusion, this module for its run, and
`distributed` for its share of the batch.
"""

import contextlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image

import common
import distributed
import hub
import rewards
from hub import fail, flag

PROMPT_SETS = {p.stem: p for p in sorted((Path(__file__).parent / "prompts").glob("*.txt"))}


@dataclass
class RunArgs:
    """The flags every script shares and no algorithm reads: the run's seed, directory and length, where it runs,
    how it is evaluated, and which weights the VAE and the reward load. A method's `Args` extends this with its own
    hyperparameters, listed after these (CleanRL's order: the general flags, then the algorithm's); a method whose
    default differs redeclares the field."""

    seed: int = 0
    """random seed (same seed on the CPU -> identical run)"""
    run_dir: str = ""
    """output folder (a new one; see --resume); default runs/<method>__<reward>__<seed>__<time>"""
    resume: str = ""
    """continue the run in this directory from its checkpoint up to --iters (on the CPU: bitwise as if never stopped)"""
    config: str = ""
    """rerun with the settings of a run's args.json (flags given as well override them)"""
    save_every: int = 10
    """write the checkpoint every N iterations (0 = only at the end); also written on Ctrl-C or SIGTERM"""
    budget: float = 0.0
    """stop after the iteration in which the run's compute reaches this many UNet passes (backward = 2); 0 = none"""
    budget_seconds: float = 0.0
    """stop after the iteration in which the run's wall time reaches this many seconds; 0 = no limit"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """frozen weights: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16; LoRA stays fp32"""
    threads: int = 2
    """CPU threads for torch (0 = torch's default, often slower); 1 per job on a shared CPU; at most cores / ranks"""
    progress_every: float = 30.0
    """seconds between plain progress lines on stderr when it is not a terminal (nohup, cluster logs)"""
    track: bool = False
    """log the run to Weights & Biases (the track extra: pip install -e ".[track]"): its settings, every metrics row,
    the eval grids, the LoRA as an artifact at the end; --resume continues the same W&B run"""
    wandb_project_name: str = "reward-finetuning"
    """the W&B project of --track"""
    wandb_entity: str = ""
    """the W&B team or user of --track; empty = your default entity"""
    eval_every: int = 10
    """evaluate every N iterations (0 = only before the first and after the last)"""
    eval_size: int = 16
    """evaluation prompts (fixed prompts and noise; the same for every script, see common.EVAL_PROTOCOL)"""
    eval_num_steps: int = 0
    """T of the evaluation's deterministic DDIM; 0 = the shared protocol (20 on the toy world, 50 on SD)"""
    eval_guidance_scale: float = 0.0
    """guidance scale of the evaluation; 0 = the shared protocol (5.0 on the toy world, 7.5 on SD)"""
    vae: str = ""
    """a VAE instead of the model's (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16"""
    reward_model: str = ""
    """weights of a pretrained reward (hub id or local path; name=path,... in a sum); empty = the reward's default"""
    reward_query: str = ""
    """objectness: the object to remove; empty = book (DRTune)"""
    clip_model: str = "auto"
    """CLIP for clipscore and the symmetry regulariser: hub id or folder; auto = the toy CLIP (toyworld/clip) for the
    toy model, openai/clip-vit-large-patch14 for any other (DRTune's CLIPScore used
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """aesthetic: the CLIP ViT-L/14 whose image embedding the LAION head reads (hub id or a local copy)"""
    hps_version: str = "2.1"
    """hpsv2: 2.1 (HPS_v2.1_compressed.pt, DRTune) or 2.0 (HPS_v2_compressed.pt, AlignProp and DRaFT)"""
    clip_weight: float = 0.01
    """symmetry: weight of the CLIP-score regulariser (0 = DRTune eq. 6 alone)"""


# ---------------------------------------------------------------------------------------------
# The command line: tyro with one-line errors; --config reruns a run, --resume continues one
# ---------------------------------------------------------------------------------------------

# What a resumed run may change: how long it runs, how often it evaluates, saves and reports, where it runs
# and where it is tracked. Everything else would make the continuation a different run from the one that was started.
RESUME_MAY_CHANGE = {"iters", "eval_every", "save_every", "progress_every", "budget", "budget_seconds", "device",
                     "threads", "resume", "config", "run_dir", "track", "wandb_project_name", "wandb_entity"}


def _flag_value(argv, name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


def _one_line(box: str) -> str:
    """tyro's error box -> its message on one line (the box's lines up to its first rule, joined)."""
    lines = [line.strip().strip("│").strip() for line in box.splitlines()]
    content = [line for line in lines if line and not set(line) <= set("╭╮╰╯─ ")][:]
    message = []
    for line in lines[1:]:
        if not line or set(line) <= set("─╭╮╰╯ "):
            if message:
                break
            continue
        message.append(line)
    return " ".join(message or content[-1:] or ["could not parse the command line"])


def cli(Args, argv=None, default=None, prog=None):
    """tyro.cli, its parse errors as one line (exit status 2); --help as tyro prints it."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv, default=default, prog=prog)
    except SystemExit as stop:
        if stop.code not in (0, None):
            fail(_one_line(captured.getvalue()))
        sys.stderr.write(captured.getvalue())
        raise


def read_args_json(path: Path, Args, script: str, what: str):
    """A run's args.json -> an Args instance (the defaults of a --config or --resume parse)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{what}: cannot read {path} as a run's args.json ({type(e).__name__})")
    made_by = saved.get("_meta", {}).get("script") if isinstance(saved, dict) else None
    if made_by != script:
        fail(f"{what}: {path} was written by {made_by or 'something else'}, not {script}")
    known = {f.name: f for f in fields(Args)}
    unknown = sorted(set(saved) - set(known) - {"_meta"})
    if unknown:
        fail(f"{what}: {path} has settings {script} does not know ({', '.join(unknown)})")
    values = {k: tuple(v) if isinstance(getattr(Args(), k), tuple) else v for k, v in saved.items() if k in known}
    return Args(**values)


def parse_args(Args, script_file: str):
    """The script's Args from the command line. `--config RUN_DIR/args.json` takes a finished run's settings
    as the defaults (a rerun; flags given override them); `--resume RUN_DIR` does so for the run to continue
    and refuses any flag that would change what it computes (RESUME_MAY_CHANGE lists the ones allowed)."""
    script, argv = Path(script_file).name, sys.argv[1:]
    resume, config = _flag_value(argv, "--resume"), _flag_value(argv, "--config")
    if resume and config:
        fail("--resume continues a run with its own settings; it takes no --config")
    run_dir = _flag_value(argv, "--run-dir")
    if resume and run_dir and Path(run_dir).expanduser().resolve() != Path(resume).expanduser().resolve():
        fail(f"--resume {resume} continues the run in its own directory; it takes no --run-dir (got {run_dir}): "
             f"to rerun its settings elsewhere, pass --config {Path(resume) / 'args.json'} --run-dir {run_dir}")
    default = Args()
    if resume:
        default = read_args_json(Path(resume) / "args.json", Args, script, f"--resume {resume}")
    elif config:
        default = read_args_json(Path(config), Args, script, f"--config {config}")
        default.run_dir = ""  # a rerun gets a run directory of its own
    default.resume, default.config = "", ""
    args = cli(Args, argv, default, script)
    if resume:
        changed = [f.name for f in fields(Args)
                   if f.name not in RESUME_MAY_CHANGE and getattr(args, f.name) != getattr(default, f.name)]
        if changed:
            fail(f"--resume {resume}: {', '.join(f'{flag(n)} {getattr(args, n)}' for n in changed)} would change "
                 f"the run (it was {', '.join(str(getattr(default, n)) for n in changed)}); a resume may change only "
                 f"{', '.join(flag(n) for n in sorted(RESUME_MAY_CHANGE - {'resume', 'config', 'run_dir'}))}")
        args.run_dir = resume
    return args


# ---------------------------------------------------------------------------------------------
# Prompts, the reward, and the checks every script shares (all before any work)
# ---------------------------------------------------------------------------------------------


def load_prompts(spec: str) -> list[str]:
    """A prompt set name (a file in prompts/) or a UTF-8 text file with one prompt per line."""
    path = PROMPT_SETS.get(spec, Path(spec).expanduser())
    if not path.is_file():
        fail(f"--prompts {spec}: neither a prompt set ({', '.join(PROMPT_SETS)}) nor a text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        fail(f"--prompts {spec}: cannot be read ({e.strerror})")
    except UnicodeDecodeError:
        fail(f"--prompts {spec}: not a UTF-8 text file (one prompt per line)")
    if "\x00" in text:
        fail(f"--prompts {spec}: a binary file, not text (one prompt per line)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"--prompts {spec}: the file has no prompts")
    return prompts


def eval_prompts(spec: str, prompts: list[str], n: int) -> list[str]:
    """n fixed evaluation prompts: the set's held-out companion `<set>_eval` if there is one (toy ->
    toy_eval), else an evenly spread subset of the training prompts; cycled when there are fewer than n."""
    if f"{spec}_eval" in PROMPT_SETS:
        prompts = load_prompts(f"{spec}_eval")
    return [prompts[(i * len(prompts)) // n % len(prompts)] if n <= len(prompts) else prompts[i % len(prompts)]
            for i in range(n)]


def default_prompts(spec: str) -> str:
    """The prompt set `--prompts auto` takes for a real model: the reward's own (REWARDS' third column; in a sum,
    its first term's), general for a user's reward."""
    names = [name for _, name in rewards.parse(spec) if name in rewards.REWARDS]
    return rewards.REWARDS[names[0]][2] if names else "general"


def check_writable_dir(path: str, what: str):
    """A directory that is, or can be created as, a writable folder; probed by writing a file (root ignores modes)."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        fail(f"{what} {path} is a file, not a directory")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{what} {path}: {parent} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        fail(f"{what} {path}: {parent} is not writable ({e.strerror})")


def check_common_args(args, differentiable: bool):
    """Validate the flags every script shares, before any work; returns the prompt list."""
    for f in fields(args):  # tyro parses nan and inf; no flag of ours means either
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(f.name)} must be a finite number (got {value})")
    for name in ("batch_size", "iters", "num_steps", "lora_rank"):
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be at least 1 (got {getattr(args, name)})")
    for name in ("seed", "threads", "save_every", "eval_every", "lora_alpha", "weight_decay", "budget",
                 "budget_seconds", "clip_weight", "eval_num_steps", "eval_guidance_scale"):
        if getattr(args, name) < 0:
            fail(f"{flag(name)} must be non-negative (got {getattr(args, name)})")
    if args.seed > 2**32 - 1:  # numpy's generator takes no larger seed
        fail(f"--seed must be at most {2**32 - 1} (got {args.seed})")
    if args.resolution < 0 or args.resolution % 8:
        fail(f"--resolution must be a positive multiple of 8, or 0 for the model's own size (got {args.resolution})")
    for name in ("lr", "grad_clip", "progress_every"):
        if getattr(args, name) <= 0:
            fail(f"{flag(name)} must be positive (got {getattr(args, name)})")
    if args.lr > 1:  # AdamW moves each weight by about lr per step: above 1 it only destroys the model
        fail(f"--lr must be at most 1 (got {args.lr})")
    if not 0 <= args.eta <= 1:
        fail(f"--eta must be in [0, 1]: 0 is deterministic DDIM, 1 DDPM-like (got {args.eta})")
    if args.dtype not in ("auto", "fp32", "bf16", "fp16"):
        fail(f"--dtype must be auto, fp32, bf16 or fp16 (got {args.dtype})")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        fail(f"--device must be auto, cpu, cuda or cuda:N (got {args.device})")
    if args.eval_size < 2:
        fail(f"--eval-size must be at least 2 (the eval reward's std needs two images; got {args.eval_size})")
    if args.track:
        check_tracking(args)
    # `auto` follows the model: the toy world's CLIP and captions for the toy model (and the embedded one),
    # a real CLIP and the reward's prompt set for Stable Diffusion; resolved here, so args.json records them.
    toy = hub.is_toy(args.model)
    if args.clip_model == "auto":
        args.clip_model = hub.TOY_MODEL if toy else hub.REAL_CLIP
    protocol = common.EVAL_PROTOCOL["toy" if toy else "sd"]
    args.eval_num_steps = args.eval_num_steps or protocol["num_steps"]
    args.eval_guidance_scale = args.eval_guidance_scale or protocol["guidance_scale"]
    if args.prompts == "auto":
        args.prompts = "toy" if toy else default_prompts(args.reward)
    if not toy and (args.clip_model == hub.TOY_MODEL or Path(args.clip_model).resolve() == Path(hub.TOY_CLIP)):
        fail(f"--clip-model {args.clip_model} is the toy world's CLIP; with --model {args.model} use a real one "
             f"(auto = {hub.REAL_CLIP})")
    if not toy and args.prompts in ("toy", "toy_eval"):
        fail(f"--prompts {args.prompts} are the toy world's captions; with --model {args.model} use a set that suits "
             f"it (auto = the reward's: {default_prompts(args.reward)})")
    hub.resolve_model(args.model)
    if args.vae:
        hub.resolve_vae(args.vae)
    # Every model the reward needs is found (local, cached, or a reachable Hub) now, none loaded yet.
    if not rewards.check(args.reward, **reward_options(args)) and differentiable:
        fail(f"--reward {args.reward} is not differentiable; this method needs one of "
             f"{', '.join(n for n, entry in rewards.REWARDS.items() if entry[1])} (or a user reward whose function "
             "has the attribute differentiable = True)")
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 alone reads and writes the run directory
        pass
    elif args.resume:
        check_checkpoint(args.resume, args.iters)
    else:
        check_writable_dir(args.run_dir or "runs", "--run-dir")
        if args.run_dir and (Path(args.run_dir) / "metrics.jsonl").exists():
            fail(f"--run-dir {args.run_dir} already holds a run (metrics.jsonl); choose another directory, "
                 f"or continue it with --resume {args.run_dir}")
    if args.init_lora:
        common.check_lora_file(args.init_lora, args.lora_rank, args.lora_targets, "--init-lora",
                               alpha=args.lora_alpha or args.lora_rank)
    return load_prompts(args.prompts)


def check_tracking(args):
    """--track: wandb is installed and, unless WANDB_MODE says offline or disabled, logged in (rank 0 alone tracks)."""
    if not args.wandb_project_name.strip():
        fail("--wandb-project-name must not be empty with --track")
    if int(os.environ.get("RANK", "0")) > 0:
        return
    try:
        import wandb
    except ImportError:
        fail('--track needs Weights & Biases, the track extra: pip install -e ".[track]" (or pip install wandb)')
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    try:  # an API key from WANDB_API_KEY, ~/.netrc or `wandb login`; asks for one on a terminal
        wandb.login(verify=False)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"--track: no Weights & Biases login ({why}); run `wandb login`, set WANDB_API_KEY, or log offline "
             "with WANDB_MODE=offline")


def reward_options(args) -> dict:
    return {"clip_model": args.clip_model, "clip_weight": args.clip_weight, "reward_model": args.reward_model,
            "reward_query": args.reward_query, "aesthetic_clip": args.aesthetic_clip, "hps_version": args.hps_version}


def reward_function(args, device="cpu", dtype=torch.float32):
    """The `--reward` function (rewards.make: a reward, a weighted sum, a user's module:function), its models
    loaded once, on the run's device; each image scored counts in the compute count (distributed.COMPUTE)."""
    fn, _ = rewards.make(args.reward, **reward_options(args), device=device, dtype=dtype)

    def reward(images, prompts):
        distributed.count("reward_evals", len(images))
        return fn(images, prompts)

    return reward


# ---------------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_device(device: str, dtype: str, threads: int):
    """Resolve `auto` device/dtype (bf16 frozen weights on a GPU, fp32 on the CPU); join the process group when
    launched by torchrun (each rank on its own GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    device = distributed.init_distributed(device)
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if device == "cpu" and threads > 0:
        # Measured on 2 cores: with anything else running, torch's default threading made an iteration
        # of the tiny model 4-80x slower than one thread; alone, two threads gain only ~1.4x. Ranks on one
        # machine share its cores: 2 ranks x 2 threads on 2 cores ran 10x slower than 2 x 1.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) // local_ranks)))
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


# ---------------------------------------------------------------------------------------------
# The run directory: metrics, checkpoints, resume, the NaN guard, Ctrl-C, progress
# ---------------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def umask() -> int:
    """The process's umask, read without changing it where the system allows (os.umask can only set it, and
    setting it even for an instant races any thread creating a file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write):
    """write(file) into a temporary file beside `path`, flushed to disk, then renamed over it: a kill at any
    instant leaves either the old file or the new one, whole. The file gets the mode a plain open() would give
    (mkstemp's is 0600: nobody else could read a run's args.json or checkpoint)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_lora(unet, run_dir):
    """Write `pytorch_lora_weights.safetensors` (atomically) so `pipe.load_lora_weights(run_dir)` loads it, at the
    scale it was trained with."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    # PEFT key names under unet. (transformer. for a flow model's): what save_lora_weights writes, and what the
    # pipelines' load_lora_weights reads
    component = common.lora_component(unet)
    lora = {f"{component}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    config = unet.peft_config["default"]
    # Without its alpha in the file, load_lora_weights takes alpha = rank: a run with any other --lora-alpha would
    # draw other pictures than it trained on. Only the fields that shape the adapter, so any peft can build the
    # config; written here rather than by save_lora_weights, whose metadata argument diffusers < 0.35 lacks.
    adapter = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    header = {"format": "pt", common.LORA_METADATA_KEY: json.dumps({f"{component}.{k}": v for k, v in adapter.items()})}
    data = save(lora, metadata=header)
    write_atomic(Path(run_dir) / "pytorch_lora_weights.safetensors", lambda f: f.write(data))


def save_grid(images, path, ncols: int = 8):
    images = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = images.shape
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[(i // ncols) * h:(i // ncols + 1) * h, (i % ncols) * w:(i % ncols + 1) * w] = image
    Image.fromarray(grid).save(path)
    return grid


def load_checkpoint(run_dir, mmap: bool = False) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file() or not (Path(run_dir) / "args.json").is_file():
        fail(f"--resume {run_dir}: no {CHECKPOINT} and args.json there (a run directory written by a script)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged file: say so in one line
        fail(f"--resume {run_dir}: {CHECKPOINT} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def check_checkpoint(run_dir: str, iters: int):
    """--resume: a loadable checkpoint (memory-mapped: a quick look) with something left to do, or none at all
    beside args.json (a run stopped before its first checkpoint starts again from iteration 0)."""
    if not (Path(run_dir) / CHECKPOINT).exists() and (Path(run_dir) / "args.json").is_file():
        return
    checkpoint = load_checkpoint(run_dir, mmap=True)
    done = checkpoint["iter"]
    if done >= iters and any(r.get("final") for r in checkpoint["rows"]):
        print(f"{run_dir} has run its {done} iterations; pass --iters above {done} to continue it", file=sys.stderr)
        raise SystemExit(0)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_metadata(script: str, device) -> dict:
    """What args.json records besides the flags: the script, package versions, the git commit, the device."""
    import diffusers
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = commit and bool(subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain",
                                                "--untracked-files=no"], capture_output=True, text=True,
                                               timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    device = torch.device(device)
    return {"script": script, "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "git_commit": commit,
            "git_dirty": dirty, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__}}


def new_run_dir(name: str, reward: str, seed: int) -> Path:
    """A new runs/<name>__<reward>__<seed>__<time>, created exclusively: two runs started in the same second
    never share one."""
    reward = "".join(c if c.isalnum() or c in "._-" else "-" for c in reward)
    base = f"runs/{name}__{reward}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1000):
        path = Path(base + (f"-{k}" if k else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    fail(f"cannot create a new run directory {base}")


# ---------------------------------------------------------------------------------------------
# Tracking (--track: Weights & Biases) and the model card (README.md in the run directory)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def same_random_stream():
    """Whatever runs inside leaves Python's, numpy's and torch's random state as it found it: a tracked run draws
    what an untracked one does."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def wandb_run_id() -> str:
    """A new W&B run id (8 base-36 characters, as wandb's own), from the system's randomness, not the run's."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_wandb(args, run_dir: Path, settings: dict):
    """The W&B run of --track, named after the run directory; a resumed run continues the one its args.json names.
    Its config: the resolved settings and their `_meta`; metrics are plotted against `iter`."""
    import wandb

    with same_random_stream():
        run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity or None, name=run_dir.name,
                         id=settings["_meta"]["wandb_run_id"], resume="allow")
        run.config.update(settings, allow_val_change=True)
        # A resume logs again the iterations after its checkpoint: W&B's own step only grows, `iter` says which.
        run.define_metric("iter")
        run.define_metric("*", step_metric="iter")
    return run


def log_lora_artifact(run, run_dir: Path, rows: list):
    """The finished run's LoRA, with its model card and args.json, as a W&B model artifact lora-<run id>."""
    import wandb

    evals = [r["eval_reward_mean"] for r in rows if "eval_reward_mean" in r]
    with same_random_stream():
        artifact = wandb.Artifact(f"lora-{run.id}", type="model", metadata={
            "iterations": rows[-1]["iter"] if rows else 0,
            **({"eval_reward_before": evals[0], "eval_reward_after": evals[-1]} if evals else {})})
        for name in ("pytorch_lora_weights.safetensors", "README.md", "args.json"):
            artifact.add_file(str(run_dir / name))
        run.log_artifact(artifact)


# The licences of the base models whose cards state one; a LoRA trained on them is theirs to license alike.
BASE_MODEL_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-2": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


def method_paper(script_file: str) -> str:
    """The first paragraph of a method script's docstring: the method and its paper."""
    import ast

    path = Path(script_file)
    if not path.is_file():
        path = Path(__file__).parent / path.name
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError, ValueError):
        doc = ""
    return " ".join(doc.split("\n\n")[0].split())


def model_card(run) -> str:
    """README.md of a run directory, a folder the Hub takes as it is: diffusers' YAML front matter (base model,
    tags, library, licence), the method and its paper, the reward, the command, the key hyperparameters, the eval
    reward before and after, the last eval grid and three lines of diffusers that load the LoRA."""
    import shlex

    args, meta = run.args, run.meta
    local = (args.model in (hub.TOY_MODEL, hub.TOY_FLOW_MODEL, hub.EMBEDDED_MODEL)
             or Path(args.model).expanduser().exists())
    xl = run.unet.config.get("addition_embed_type") == "text_time"
    family = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "stable-diffusion-3"}.get(
        type(run.unet).__name__, "stable-diffusion-xl" if xl else "stable-diffusion")
    paper = method_paper(run.script_file)
    arxiv = re.findall(r"arXiv (\d{4}\.\d{4,5})", paper)
    front = ["---"]
    if not local:
        front.append(f"base_model: {json.dumps(args.model)}")
    if not local and args.model in BASE_MODEL_LICENSES:
        front.append(f"license: {BASE_MODEL_LICENSES[args.model]}")
    front += ["library_name: diffusers", "tags:"]
    front += [f"- {tag}" for tag in ("text-to-image", "diffusers", "diffusers-training", "lora",
                                     family, "reward-fine-tuning",
                                     Path(run.script).stem, *(f"arxiv:{a}" for a in arxiv))]
    front.append("---")

    if args.model == hub.TOY_MODEL:
        model, base = "toyworld/sd", ("the toy world's Stable Diffusion (`toyworld/sd` of the repository this run "
                                      "came from; the snippet's path is relative to its root)")
    elif args.model == hub.TOY_FLOW_MODEL:
        model, base = "toyworld/flow", ("the toy world's flow-matching model (`toyworld/flow` of the repository this "
                                        "run came from; the snippet's path is relative to its root)")
    elif args.model == hub.EMBEDDED_MODEL:
        model, base = args.model, ("the tests' embedded tiny Stable Diffusion (random weights), built in memory: "
                                   "write it to a folder with `hub.build_embedded_pipeline(folder)` and put that "
                                   "folder's path in place of `embedded-tiny-sd` in the snippet")
    elif local:
        model, base = args.model, f"the local folder `{args.model}`"
    else:
        model, base = args.model, f"[{args.model}](https://huggingface.co/{args.model})"
    if not local and args.model not in BASE_MODEL_LICENSES:
        base += " (licence: the base model's; add it as `license:` above before uploading)"
    if args.vae:
        base += f", with the VAE `{args.vae}`"

    if getattr(args, "feedback", "reward") == "human":
        reward = f"people's choices (D3PO label files); evaluated with `{args.reward}`"
    else:
        reward = f"`{args.reward}`"
    if "symmetry" in args.reward:
        reward += f" (CLIP-score regulariser weight {args.clip_weight}, CLIP `{args.clip_model}`)"
    if args.reward_model:
        reward += f", weights `{args.reward_model}`"
    command = "python " + shlex.join(meta["started_with"])
    if meta["ranks"] > 1:
        command = f"torchrun --nproc-per-node {meta['ranks']} " + shlex.join(meta["started_with"])
    shared = {f.name for f in fields(RunArgs)}  # the method's own flags are its hyperparameters
    values = [(f.name, getattr(args, f.name)) for f in fields(args) if f.name not in shared]
    table = [f"| `{flag(name)}` | {f'`{value}`' if isinstance(value, str) else json.dumps(value)} |"
             for name, value in values if value not in ("", None)]
    table += [f"| `--seed` | {args.seed} |", f"| global batch | {meta['global_batch']} ({meta['ranks']} "
              f"{'rank' if meta['ranks'] == 1 else 'ranks'}) |"]

    evals = [r for r in run.rows if "eval_reward_mean" in r]
    if evals:
        first, last = evals[0], evals[-1]
        rows = [(first, "before (iteration 0)" if first["iter"] == 0 else f"first (iteration {first['iter']})")]
        if len(evals) > 1:
            rows.append((last, f"after {plural(last['iter'], 'iteration')}{'' if last.get('final') else ' (so far)'}"))
        evaluation = ["| model | eval reward (mean ± std) |", "|---|---|"]
        evaluation += [f"| {what} | {r['eval_reward_mean']:.4f} ± {r.get('eval_reward_std', float('nan')):.4f} |"
                       for r, what in rows]
    else:
        evaluation = ["No evaluation yet."]
    grids = sorted((int(m[1]), p.name) for p in run.dir.glob("eval_*.png")
                   if (m := re.fullmatch(r"eval_(\d+)\.png", p.name)) and int(m[1]) <= run.next_iter)
    grid = [f"![the eval grid after {plural(grids[-1][0], 'iteration')}]({grids[-1][1]})",
            "", f"The last eval grid ({grids[-1][1]}): {args.eval_size} evaluation prompts, fixed noise, deterministic "
            f"{'ODE (Euler)' if common.lora_component(run.unet) == 'transformer' else 'DDIM'} with {args.eval_num_steps} "
            f"steps, guidance {args.eval_guidance_scale:g}."] if grids else []
    done = f"{plural(run.next_iter, 'iteration')} of {args.iters}"

    body = [
        f"# {run.name}: a reward fine-tuned LoRA",
        "",
        f"A LoRA (rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank:g}) on the "
        f"{'UNet' if common.lora_component(run.unet) == 'unet' else 'transformer'} of {base}, trained "
        f"by `{run.script}` for {done}.",
        "",
        f"- **Method**: {paper or run.name}" + "".join(f" [arXiv:{a}](https://arxiv.org/abs/{a})" for a in arxiv),
        f"- **Reward**: {reward}",
        f"- **Prompts**: `{args.prompts}`",
        f"- **Command**: `{command}` (every setting: `args.json`; `--config args.json` reruns them)",
        "",
        "## Use it",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(model)}"
        + "".join(f", {name}=None" for name in getattr(run.unet, "absent_text_components", [])) + ")",
        f"pipe.load_lora_weights({json.dumps(str(run.dir))})",
        "```",
        "",
        f"`{run.dir}` is this folder (or the Hub repository it is uploaded to); the LoRA file records its alpha, "
        "so it draws at the scale it was trained with.",
        "",
        "## Evaluation",
        "",
        *evaluation,
        "",
        *grid,
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
        *table,
        "",
        f"Files: `pytorch_lora_weights.safetensors` (the LoRA), `args.json` (the settings, package versions, git "
        f"commit), `metrics.jsonl` (one row per iteration), `eval_*.png`, `checkpoint.pt` (to `--resume`).",
    ]
    return "\n".join(front + [""] + body) + "\n"


class Run:
    """The run directory and the loop's bookkeeping, the same for every script.

    RUN_DIR holds args.json (the flags, and `_meta`: script, command, package versions, git commit, device,
    ranks), metrics.jsonl (one row per iteration), eval grids, pytorch_lora_weights.safetensors and checkpoint.pt
    (LoRA, optimizer, RNG states, the method's `state`, the metrics so far, the compute count) and README.md (the
    model card), all rewritten atomically every --save-every iterations, at the end and when stopped by Ctrl-C or
    SIGTERM; a TensorBoard log (scalars, eval grids) when tensorboard is installed, a W&B run with --track. With
    --resume the loop continues from the checkpoint as the uninterrupted run would have (bitwise on the CPU). `state`
    is the method's own state between iterations, as plain data (e.g. DDPO's per-prompt reward buffers).
    Under torchrun every rank keeps the same rows, state and weights; rank 0 alone writes, evaluates and reports.
    """

    def __init__(self, script_file: str, args, unet, optimizer, device, name: str = "", state: dict | None = None):
        self.script, self.name = Path(script_file).name, name or Path(script_file).stem
        self.args, self.unet, self.optimizer = args, unet, optimizer
        self.state = {} if state is None else state
        self.rows, self.start_iter, self.saved_iter, self.rng = [], 0, None, None
        self.elapsed_before = self.eval_seconds = 0.0
        self.interrupted, self.finishing, self.lead = False, False, distributed.RANK == 0
        self.budget_reason, self.signal_handlers = "", {}
        distributed.join_process_group(device)
        distributed.COMPUTE.update(dict.fromkeys(distributed.COMPUTE, 0))  # a run counts from zero (or from its checkpoint)
        if args.resume:
            self.dir = Path(args.resume)
            self._restore()
        else:
            self.dir = self._new_dir(args.run_dir) if self.lead else None
            args.run_dir = str(self.dir)
        self.next_iter = self.start_iter
        self.start = self.last_progress = time.time()
        self.cuda = torch.device(device).type == "cuda"
        self.tty, self.tb, self.bar, self.wandb, self.grids = sys.stderr.isatty(), None, None, None, []
        self.script_file = script_file
        if not self.lead:
            return
        world = distributed.WORLD
        meta = run_metadata(self.script, device) | {"resumed_at": self.start_iter, "ranks": world,
                                                   "global_batch": args.batch_size * world * max(1, args.grad_accum)}
        before = self._saved_meta() if args.resume else {}
        # the command of the run's first start (what its model card shows)
        meta["started_with"] = before.get("started_with") or before.get("command") or meta["command"]
        if before.get("wandb_run_id") or args.track:  # kept for a later --resume --track, if not tracked now
            meta["wandb_run_id"] = before.get("wandb_run_id") or wandb_run_id()
        self.meta, settings = meta, asdict(args) | {"_meta": meta}
        write_atomic(self.dir / "args.json", lambda f: f.write(json.dumps(settings, indent=2, default=str).encode()))
        self.metrics = open(self.dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir), purge_step=self.start_iter)
        except Exception:  # TensorBoard is optional
            self.tb = None
        if args.track:
            self.wandb = start_wandb(args, self.dir, settings)
        from tqdm import tqdm

        self.bar = tqdm(total=args.iters, initial=self.start_iter, desc=self.dir.name, disable=not self.tty)
        if world > 1:
            print(f"{self.name}: {world} ranks, global batch {meta['global_batch']} (batch {args.batch_size} x "
                  f"{world} ranks x grad-accum {max(1, args.grad_accum)})", file=sys.stderr, flush=True)

    def _saved_meta(self) -> dict:
        """The `_meta` of the args.json a resumed run was started with (parse_args has read it once already)."""
        try:
            meta = json.loads((self.dir / "args.json").read_text()).get("_meta")
        except (OSError, ValueError, AttributeError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def _new_dir(self, run_dir: str) -> Path:
        if not run_dir:
            return new_run_dir(self.name, self.args.reward, self.args.seed)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return Path(run_dir)

    def _restore(self):
        # Killed (or stopped by a failing reward) before its first checkpoint, a run has nothing to restore: it
        # starts again from iteration 0 with its saved settings, which is what it did the first time.
        saved = self.lead and (self.dir / CHECKPOINT).exists()
        checkpoint = load_checkpoint(self.dir) if saved else None
        if distributed.WORLD > 1:  # rank 0 reads it and hands it on: no other node needs to see the run directory
            import torch.distributed as dist

            box = [checkpoint]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
        if checkpoint is None:
            if self.lead:  # its rows belong to iterations that will run again
                write_atomic(self.dir / "metrics.jsonl", lambda f: None)
            return
        if checkpoint.get("ranks", 1) != distributed.WORLD:
            fail(f"--resume {self.dir}: it ran on {checkpoint.get('ranks', 1)} ranks, now {distributed.WORLD}: the "
                 "global batch would change the run")
        params = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        if set(params) != set(checkpoint["lora"]):
            fail(f"--resume {self.dir}: the checkpoint's LoRA has other layers than this run's")
        with torch.no_grad():
            for n, value in checkpoint["lora"].items():
                params[n].copy_(value)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.state.update(checkpoint["state"])
        # A final evaluation row ends a finished run; continuing it (a larger --iters), the loop takes over.
        self.rows = [r for r in checkpoint["rows"] if not r.get("final") or checkpoint["iter"] >= self.args.iters]
        self.start_iter, self.saved_iter, self.rng = checkpoint["iter"], checkpoint["iter"], checkpoint["rng"]
        self.elapsed_before, self.eval_seconds = checkpoint["elapsed"], checkpoint["eval_seconds"]
        distributed.COMPUTE.update(checkpoint["compute"])
        if self.lead:  # rows logged after the checkpoint belong to iterations that will run again: drop them
            write_atomic(self.dir / "metrics.jsonl",
                         lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.rows).encode()))

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def last(self, key: str, default=0):
        """A value of the last logged row (e.g. samples_seen when resuming), else `default`."""
        return self.rows[-1].get(key, default) if self.rows else default

    def iterations(self):
        """The loop: iterations from the resumed one to --iters. After each, a checkpoint every --save-every;
        it stops early, checkpointed, on Ctrl-C / SIGTERM or once the budget is spent."""
        if self.rng is not None:  # last, after all of setup: the stream continues where the checkpoint left it
            set_rng_state(self.rng)
        # Under torchrun a signal means teardown (the agent stops every rank): no rank waits for the others.
        # Otherwise the signals stay ours until the run is closed: a graceful stop still writes its checkpoint
        # after the loop, and a second Ctrl-C there must end as cleanly as one during an iteration.
        if distributed.WORLD == 1 and threading.current_thread() is threading.main_thread():
            self.signal_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for it in range(self.start_iter, self.args.iters):
                yield it
                self.next_iter = it + 1
                if self.interrupted:
                    break
                self.budget_reason = self.budget_spent()
                if self.budget_reason:
                    break
                if self.args.save_every and self.next_iter % self.args.save_every == 0:
                    self.save()
        except BaseException:  # the loop died (or was abandoned): finish() will not run to hand the signals back
            self._release_signals()
            raise

    def _release_signals(self):
        for s, handler in self.signal_handlers.items():
            signal.signal(s, handler)
        self.signal_handlers = {}

    def _resume_hint(self) -> str:
        return f"continue with: python {self.script} --resume {self.dir}"

    def _kept(self, what: str = "the last checkpoint") -> str:
        if self.saved_iter is None:
            return f"no checkpoint had been written yet in {self.dir}"
        return f"{what} (after {plural(self.saved_iter, 'iteration')}) is in {self.dir}"

    def _on_signal(self, signum, frame):
        if self.interrupted:
            # The second time: stop at once. Whatever was being written is written aside and renamed over the old
            # file, so the last checkpoint stays whole; SystemExit (not KeyboardInterrupt) unwinds without a traceback.
            self._release_signals()
            print(f"\n{self.name}: stopped at once; {self._kept()}; {self._resume_hint()}", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.interrupted = True
        doing = "writing the final evaluation and checkpoint" if self.finishing else \
            "stopping after this iteration, with a checkpoint"
        print(f"\n{self.name}: {doing} (again to stop at once)", file=sys.stderr, flush=True)

    def budget_spent(self) -> str:
        """Why the run has spent its budget ('' while it has not): --budget (compute units, see compute_units) or
        --budget-seconds (training time: evaluation left out); 0 = no limit. Every rank decides alike."""
        seconds = self.args.budget_seconds and self.elapsed() - self.eval_seconds >= self.args.budget_seconds
        if self.args.budget and distributed.compute_units() >= self.args.budget:
            return f"--budget {self.args.budget:g} reached"
        if distributed.any_rank(bool(seconds)):
            return f"--budget-seconds {self.args.budget_seconds:g} reached"
        return ""

    def evaluation(self, evaluate):
        """Decorates the script's evaluate(it) -> row: rank 0 alone runs it (the others get {}), and its time is
        kept (eval_time_s) and left out of --budget-seconds."""
        def timed(it):
            if not self.lead:
                return {}
            start = time.time()
            row = evaluate(it)
            self.eval_seconds += time.time() - start
            return row

        return timed

    def guard(self, it: int, **values):
        """The NaN guard, before every optimizer step: a non-finite reward, loss or gradient norm (on any rank)
        stops the run before it reaches the weights; the last good checkpoint stays as it is."""
        found = ""
        for name, value in values.items():
            value = torch.as_tensor(value).detach().float().cpu()
            if not torch.isfinite(value).all():
                found = found or f"non-finite {name} ({value[~torch.isfinite(value)].flatten()[0].item()})"
        found = next((f for f in distributed.gather_objects(found) if f), "")
        if found:
            self.stop(f"iteration {it}: {found}")

    def stop(self, reason: str):
        self._close(3)
        if self.lead:
            print(f"error: {self.name}: {reason}; stopped, {self._kept('the last good checkpoint')}", file=sys.stderr,
                  flush=True)
        raise SystemExit(3)

    def log(self, row: dict):
        row = {"wall_time_s": round(self.elapsed(), 3), "eval_time_s": round(self.eval_seconds, 3)} | row
        # the global batch's
        row |= {k: v * distributed.WORLD for k, v in distributed.COMPUTE.items()} | {"compute": distributed.compute_units()}
        if self.cuda:
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row = {k: (v.item() if torch.is_tensor(v) or isinstance(v, np.generic) else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.lead:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        grids, self.grids = self.grids, []  # the eval grids saved for this row
        if self.tb:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.tb.add_scalar(key, value, row["iter"])
            for _, grid in grids:
                self.tb.add_image("eval_grid", grid, row["iter"], dataformats="HWC")
        if self.wandb:
            import wandb

            with same_random_stream():
                images = [wandb.Image(str(self.dir / name), caption=f"{name}: {self.args.eval_size} eval prompts, "
                                      f"fixed noise (iteration {row['iter']})") for name, _ in grids]
                self.wandb.log(row | ({"eval_grid": images[0] if len(images) == 1 else images} if images else {}))
        if row.get("final"):
            return
        self.bar.update(1)
        shown = {k: f"{row[k]:.4g}" for k in ("reward_mean", "loss") if isinstance(row.get(k), (int, float))}
        self.bar.set_postfix(shown)
        now = time.time()
        if not self.tty and (now - self.last_progress >= self.args.progress_every or row["iter"] + 1 == self.args.iters):
            # Outside a terminal (nohup, a cluster log): a plain line every --progress-every seconds.
            self.last_progress, done = now, row["iter"] + 1
            per_it = (now - self.start) / max(1, done - self.start_iter)
            eta = time.strftime("%H:%M:%S", time.gmtime(per_it * (self.args.iters - done)))
            print(f"{self.name}: iter {done}/{self.args.iters}  " + "  ".join(f"{k} {v}" for k, v in shown.items())
                  + f"  {per_it:.2f} s/it  ETA {eta}", file=sys.stderr, flush=True)

    def save_images(self, images, name: str):
        """An eval grid: RUN_DIR/name, and in TensorBoard and W&B with the row logged next (rank 0)."""
        self.grids.append((name, save_grid(images, self.dir / name)))

    def save(self):
        """checkpoint.pt and pytorch_lora_weights.safetensors, each written aside and swapped in (rank 0)."""
        lora = {n: p.detach().cpu().clone() for n, p in self.unet.named_parameters() if p.requires_grad}
        bad = [n for n, value in lora.items() if not torch.isfinite(value).all()]
        if bad:  # never written as a result
            self.stop(f"iteration {self.next_iter - 1}: non-finite LoRA weights after the update ({bad[0]})")
        # the peers' worst bug, caught where it would start
        if len(set(distributed.gather_objects(distributed.lora_digest(lora)))) > 1:
            self.stop(f"iteration {self.next_iter - 1}: the ranks hold different LoRA weights")
        if self.lead:
            save_lora(self.unet, self.dir)
            checkpoint = {"iter": self.next_iter, "lora": lora, "optimizer": self.optimizer.state_dict(),
                          "rng": rng_state(), "state": self.state, "rows": self.rows, "compute": dict(distributed.COMPUTE),
                          "elapsed": self.elapsed(), "eval_seconds": self.eval_seconds, "ranks": distributed.WORLD}
            write_atomic(self.dir / CHECKPOINT, lambda f: torch.save(checkpoint, f))
            card = model_card(self)
            write_atomic(self.dir / "README.md", lambda f: f.write(card.encode()))
        self.saved_iter = self.next_iter

    def _close(self, exit_code: int = 0):
        self._release_signals()
        if self.lead:
            self.bar.close()
            self.metrics.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                with same_random_stream():
                    self.wandb.finish(exit_code=exit_code)
                self.wandb = None

    def finish(self, evaluate):
        """After the loop: the evaluation of the final model as a row of its own ({"iter": N, "final": true}, N
        iterations done), the final checkpoint and LoRA, and the run's one-line summary on stdout. Every message
        counts iterations done ("after 7 iterations", as the progress line's 7/40); `iteration k` names the row
        of metrics.jsonl with iter k."""
        stopped, self.finishing = self.interrupted, True  # a Ctrl-C from here on asks for no early stop
        if not stopped and not (self.rows and self.rows[-1].get("final")):
            self.log({"iter": self.next_iter, "final": True} | evaluate(self.next_iter))
        if self.next_iter != self.saved_iter or not stopped:
            self.save()
        if self.wandb and not stopped:
            log_lora_artifact(self.wandb, self.dir, self.rows)
        self._close(130 if stopped else 0)
        done = f"{self.next_iter} of {plural(self.args.iters, 'iteration')}"
        if stopped:
            print(f"{self.name}: stopped after {done}, with a checkpoint; {self._resume_hint()}", file=sys.stderr,
                  flush=True)
            raise SystemExit(130)
        evals = [r["eval_reward_mean"] for r in self.rows if "eval_reward_mean" in r]
        change = f"eval reward {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else "no eval"
        spent = f"{self.elapsed():.0f} s, compute {distributed.compute_units():.4g}"
        ended = f"{done} ({self.budget_reason}; {spent})" if self.budget_reason else \
            f"{plural(self.next_iter, 'iteration')} ({spent})"
        if self.lead:
            print(f"{self.name}: {change} after {ended}; run dir {self.dir}", flush=True)
