"""Where weights come from: the toy world's models and CLIP, local folders and hub ids, checked without loading
anything, and the tests' embedded tiny model, built; and the one-line failure every check in the project ends in.

The lowest floor of the house: it imports neither torch nor any module of the project (the embedded model's
builder imports them when called), so `rewards.py` and `common.py` can both stand on it.
"""

import json
import os
import socket
import sys
from pathlib import Path

# The toy world's trained Stable Diffusion (toyworld/: 32x32 coloured shapes, text encoder = the toy CLIP's text
# tower; committed, 4.8 MB).
TOY_MODEL = "toy"
TOY_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "sd"
TOY_CLIP = str(Path(__file__).resolve().parent / "toyworld" / "clip")  # the toy world's CLIP (the rewards' default)
# The toy world's flow-matching model (an SD3-style transformer, the same toy CLIP and VAE; toyworld/flow).
TOY_FLOW_MODEL = "toy-flow"
TOY_FLOW_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "flow"
# The default `--model` of every script: the flow-matching toy model. On it the flagship holds on 10 of 10 seeds x
# float paths, on the toy Stable Diffusion on 3 of 10 with the same recipe (README "Do the defaults hold?").
DEFAULT_MODEL = TOY_FLOW_MODEL
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
                                f"or a hub snapshot; default: {DEFAULT_MODEL})",
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


# The embedded tiny Stable Diffusion (random weights: the mechanics without meaning)
EMBEDDED_RESOLUTION = 32  # its native image size (VAE factor 2 -> 16x16 latents)


def build_embedded_pipeline(path: str):
    """Write the embedded tiny Stable Diffusion (random weights, fixed seed) in diffusers format: the tests' model,
    built offline in a second and then loaded like any folder (common.load_pipeline)."""
    import torch  # here, not at the top: this module stands below torch (see its docstring)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # A byte-level BPE vocabulary with no merges: every character is a token, so no file is downloaded.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    codepoints, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codepoints.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codepoints]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(
        sample_size=EMBEDDED_RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=EMBEDDED_RESOLUTION)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
