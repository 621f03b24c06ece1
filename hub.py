"""Where weights come from: the toy world's model and CLIP, local folders and hub ids, checked without loading
anything; and the one-line failure every check in the project ends in.

The lowest floor of the house: it imports neither torch nor any module of the project, so `rewards.py` and
`common.py` can both stand on it.
"""

import json
import os
import socket
import sys
from pathlib import Path

# The default `--model` of every script, kept in this one place: the toy world's trained Stable Diffusion
# (toyworld/: 32x32 coloured shapes, text encoder = the toy CLIP's text tower; committed, 4.8 MB).
TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "sd"
TOY_CLIP = str(Path(__file__).resolve().parent / "toyworld" / "clip")  # the toy world's CLIP (the rewards' default)
# The toy world's flow-matching model (an SD3-style transformer, the same toy CLIP and VAE; toyworld/flow).
TOY_FLOW_MODEL = "toy-flow"
TOY_FLOW_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "flow"
# A random-weight tiny Stable Diffusion built offline in a second: the mechanics without meaning (tests).
EMBEDDED_MODEL = "embedded-tiny-sd"
REAL_CLIP = "openai/clip-vit-large-patch14"  # `--clip-model auto` for any model but the toy one
# The pipelines --model may name (model_index.json's _class_name), and the options each is loaded with.
PIPELINES = {"StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
             "StableDiffusionXLPipeline": {"add_watermarker": False},
             "StableDiffusion3Pipeline": {}, "FluxPipeline": {}}  # the flow-matching models


def fail(message: str):
    """Stop on bad user input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def flag(name: str) -> str:
    """An Args field's command-line flag: lora_rank -> --lora-rank."""
    return "--" + name.replace("_", "-")


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (never under HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name: str, flag: str, marker: str, what: str, example: str) -> str:
    """Check a pretrained-model flag without loading: a local folder holding `marker`, or a hub id that is
    cached or reachable. Returns what `from_pretrained` should be given."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            fail(f"{flag} {name}: no {marker} there; expected {what}")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        fail(f"{flag} {name}: no such directory; pass {what} or a hub id such as {example}")
    from huggingface_hub import snapshot_download

    try:  # already in the local Hugging Face cache?
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if not reachable():
        fail(f"{flag} {name}: not in the local Hugging Face cache and the Hub cannot be reached; download it "
             f"where there is network (`hf download {name}`) or pass its local directory")
    return name


def resolve_model(model: str) -> str:
    """Check `--model` without loading it: the toy model (or its flow twin), the embedded one, a local folder or a
    hub id of a Stable Diffusion 1.x/2.x/XL/3 or FLUX pipeline."""
    if model == EMBEDDED_MODEL:
        return model
    if model == TOY_MODEL:
        return str(TOY_MODEL_DIR)
    if model == TOY_FLOW_MODEL:
        return str(TOY_FLOW_MODEL_DIR)
    source = resolve_pretrained(model, "--model", "model_index.json",
                                "a diffusers Stable Diffusion (1.x, 2.x, XL, 3) or FLUX folder (save_pretrained "
                                f"or a hub snapshot; default: {TOY_MODEL})",
                                "stable-diffusion-v1-5/stable-diffusion-v1-5")
    index = Path(source) / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if index.is_file() and kind not in PIPELINES:
        fail(f"--model {model} is a {kind}; the scripts take {' or '.join(PIPELINES)}")
    return source


def is_toy(model: str) -> bool:
    """The toy world's models (its diffusion and flow models, and the embedded test model): the toy CLIP, the toy
    captions and the toy evaluation protocol go with them."""
    return (model in (TOY_MODEL, TOY_FLOW_MODEL, EMBEDDED_MODEL)
            or Path(model).expanduser().resolve() in (TOY_MODEL_DIR, TOY_FLOW_MODEL_DIR))


def resolve_vae(name: str) -> str:
    """Check `--vae`: an AutoencoderKL folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    return resolve_pretrained(name, "--vae", "config.json", "a diffusers AutoencoderKL folder",
                              "madebyollin/sdxl-vae-fp16-fix")


def resolve_clip(name: str) -> str:
    """Check `--clip-model`: `toy` (the toy world's CLIP), a local CLIPModel folder or a hub id."""
    if name == TOY_MODEL:
        return TOY_CLIP
    return resolve_pretrained(name, "--clip-model", "config.json", "a transformers CLIPModel folder",
                              "openai/clip-vit-large-patch14")
