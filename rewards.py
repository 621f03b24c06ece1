"""Reward functions: images (N,3,H,W) float in [0,1] and prompts list[str] -> tensor (N,), higher is better.

`REWARDS` names each one, says whether it is differentiable (the gradient methods need that; the RL methods
call any of them under no_grad) and which prompt set suits it on a real Stable Diffusion model. Rewards that
load a model take their options as keywords: `clip_model` (hub id or folder; the scripts' --clip-model, for
clipscore and symmetry), `backbone` (aesthetic's CLIP ViT-L/14; --aesthetic-clip), `reward_model` (the pretrained
weights, a hub id, folder or file; --reward-model), `version` (hpsv2: 2.0 or 2.1; --hps-version), `query`
(objectness; --reward-query), `clip_weight` (symmetry) and `dtype`. Each model is loaded once per process, frozen,
in eval mode; the gradient reaches the pixels and never the reward's weights.

`--reward` is a sum of terms `[weight*]name` joined by `+`: `hpsv2+0.5*clipscore`, `aesthetic+-0.1*brightness`,
`1e-3*compression`. A name is a reward of `REWARDS` or a user's function `module:function` (an importable
module) or `path/to/file.py:function`, called as fn(images, prompts) -> (N,); it is differentiable only if the
function says so with the attribute `fn.differentiable = True`. `check` validates a spec and finds every model
it needs without loading one; `make` loads them and returns the summed function.
"""

import importlib.util
import inspect
import io
import json
import logging
import math
import re
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import hub
from hub import TOY_CLIP, fail  # TOY_CLIP: the default CLIP of the rewards below

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Default weights of the pretrained rewards (hub ids; --reward-model replaces them with a hub id or local copy).
AESTHETIC_BACKBONE = "openai/clip-vit-large-patch14"  # the LAION head was fit on ViT-L/14 embeddings
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor"  # trl's copy of sac+logos+ava1-l14-linearMSE.pth
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's README takes its processor from here
HPS = "xswu/HPSv2"
# HPS v2's two releases in its hub repo: v2.0 (AlignProp and DRaFT trained on it) and v2.1 (DRTune, the default)
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
HPS_VERSION = "2.1"
IMAGEREWARD = "THUDM/ImageReward"
BERT = "google-bert/bert-base-uncased"  # ImageReward's tokenizer (BLIP's init_tokenizer); not in its hub repo
OWLVIT = "google/owlvit-base-patch32"
OBJECTNESS_QUERY = "book"  # DRTune section 4.1: remove the books from "[concept name], and books"
# ImageReward.py's published normalisation of the raw MLP output (scores then are about N(0, 1) on its data).
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072

# reward -> (default weights, the files they need). A folder is checked by its config.json; a (file, repo) pair
# is a file the weights may lack, then taken from repo: BERT's vocab.txt for ImageReward, LAION's CLIP-H
# tokenizer for a PickScore folder saved without one.
WEIGHTS = {
    "aesthetic": (AESTHETIC_HEAD, ("aesthetic-model.pth",)),
    "pickscore": (PICKSCORE, ("config.json", ("tokenizer_config.json", PICKSCORE_PROCESSOR))),
    "hpsv2": (HPS, (HPS_FILES[HPS_VERSION],)),  # the file of --hps-version (_plan)
    "imagereward": (IMAGEREWARD, ("ImageReward.pt", "med_config.json", ("vocab.txt", BERT))),
    "objectness": (OWLVIT, ("config.json",)),
}


def _to_uint8(images):
    return (images.detach().float() * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images, quality: int = 95):
    """DDPO's measure (appendix F.4): the size in kB (1000 bytes) of the PIL JPEG at quality 95."""
    sizes = []
    for array in _to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, device=images.device)


def jpeg_compressibility(images, prompts):
    """DDPO: minus the JPEG size in kB (smaller files are better). Not differentiable."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts):
    """DDPO: the JPEG size in kB (larger files are better). Not differentiable."""
    return jpeg_size_kb(images)


# --- One differentiable preprocessing shared by every model ----------------------------------------------


def clip_preprocess(images, size: int, mean, std, mode: str = "bicubic", antialias: bool = True,
                    resize_mode: str = "shortest"):
    """CLIPImageProcessor, differentiably: short side to `size`, center crop, normalise.

    Bicubic with antialiasing is the closest to the PIL resize of the real processor
    (../shared/reference/rewards.md section 0.2); `mode`/`antialias` can match other recipes exactly.
    `resize_mode` names the fit as open_clip does: "shortest" (short side to `size`, center crop: CLIP,
    BLIP), "longest" (long side to `size`, centered black padding: HPS v2's eval transform) or "squash"
    (both sides to `size`, no aspect kept: OWL-ViT).
    """
    images = images.float()  # resample in fp32 whatever the decoder's dtype
    h, w = images.shape[-2:]
    resize = partial(F.interpolate, mode=mode, antialias=antialias, align_corners=False)
    if resize_mode == "squash":
        if (h, w) != (size, size):
            images = resize(images, size=(size, size))
    elif resize_mode == "longest":
        scale = size / max(h, w)
        h, w = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
        if (h, w) != tuple(images.shape[-2:]):
            images = resize(images, size=(h, w))
        pad_h, pad_w = size - h, size - w  # zeros are black pixels, open_clip's fill 0
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    elif resize_mode == "shortest":
        if min(h, w) != size:
            scale = size / min(h, w)
            h, w = max(size, round(h * scale)), max(size, round(w * scale))
            images = resize(images, size=(h, w))
        top, left = (h - size) // 2, (w - size) // 2
        images = images[..., top:top + size, left:left + size]
    else:
        raise ValueError(f"resize_mode {resize_mode!r}: expected shortest, longest or squash")
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _freeze(model, device, dtype=None):
    model = model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _processor_mean_std(name: str):
    """The mean/std of a folder's preprocessor_config.json (the config only: no torchvision needed), else OpenAI's."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        config = ImageProcessingMixin.get_image_processor_dict(name)[0]
    except OSError:
        config = {}
    return tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), tuple(config.get("image_std", OPENAI_CLIP_STD))


@lru_cache(maxsize=None)
def load_clip(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, tokenizer: str | None = None):
    """A transformers CLIPModel (hub id or local folder), frozen, its tokenizer (from `tokenizer` if given) and
    preprocessing constants (image size, mean, std)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = _freeze(CLIPModel.from_pretrained(name, dtype=dtype), device)
    mean, std = _processor_mean_std(name)
    return model, AutoTokenizer.from_pretrained(tokenizer or name), (model.config.vision_config.image_size, mean, std)


def _projected(output):  # transformers 5 returns an output object (projection in pooler_output), 4.x a tensor
    return output if torch.is_tensor(output) else output.pooler_output


def _clip_features(model, tokenizer, images, prompts, size, mean, std):
    """CLIP image (with gradient) and text (without: it does not depend on the pixels) embeddings, in fp32."""
    ids = tokenizer(list(prompts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(images.device)
    with torch.no_grad():
        text = _projected(model.get_text_features(input_ids=ids)).float()
    pixels = clip_preprocess(images, size, mean, std).to(model.dtype)
    return _projected(model.get_image_features(pixel_values=pixels)).float(), text


def clipscore(images, prompts, clip_model: str = TOY_CLIP, dtype: torch.dtype = torch.float32):
    """CLIPScore (Hessel et al. 2021) without its clamp at 0, so it has a gradient: 100 * cos(image, text)."""
    model, tokenizer, (size, mean, std) = load_clip(clip_model, str(images.device), dtype)
    image, text = _clip_features(model, tokenizer, images, prompts, size, mean, std)
    return 100 * F.cosine_similarity(image, text, dim=-1)


def asymmetry(images):
    """DRTune eq. 6: mean|I - flip(I)| / std(I) per image, horizontal mirror (0 is symmetric).

    Dividing by the image's std stops the flat-image hack (a constant image is trivially symmetric).
    """
    return (images - images.flip(-1)).abs().mean(dim=(1, 2, 3)) / (images.std(dim=(1, 2, 3)) + 1e-6)


def symmetry(images, prompts, clip_weight: float = 0.0, clip_model: str = TOY_CLIP, dtype: torch.dtype = torch.float32):
    """DRTune section 4.1: minus the asymmetry of eq. 6, plus `clip_weight` x CLIPScore, the regulariser
    that keeps the picture on the prompt (without it the model draws one large symmetric blob).
    clip_weight 0 is eq. 6 alone."""
    reward = -asymmetry(images)
    if clip_weight:
        reward = reward + clip_weight * clipscore(images, prompts, clip_model, dtype)
    return reward


# --- A differentiable JPEG codec for DRTune eq. 7 (colour transform, 8x8 DCT, quantisation) ----------

_LUMA_TABLE = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
               14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
               49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA_TABLE = [17, 18, 24, 47] + [99] * 4 + [18, 21, 26, 66] + [99] * 4 + [24, 26, 56] + [99] * 5 + [47, 66] + [99] * 38


def _quant_table(table, quality):
    """The standard table scaled for a quality in [1, 100], as libjpeg does."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.tensor([min(max((v * scale + 50) // 100, 1), 255) for v in table], dtype=torch.float32).view(8, 8)


def _dct_matrix():
    k, n = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    m = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m  # orthonormal: m @ m.T = I


def _soft_round(x):
    # Shin & Song (2017): round in the forward pass, with a cubic term that keeps a non-zero gradient.
    return torch.round(x) + (x - torch.round(x)) ** 3


def jpeg_roundtrip(images, quality: int = 50):
    """Differentiable JPEG encode + decode (YCbCr, 8x8 DCT, quantisation; no chroma subsampling)."""
    n, _, h, w = images.shape
    pad_h, pad_w = -h % 8, -w % 8
    x = torch.nn.functional.pad(images.float(), (0, pad_w, 0, pad_h), mode="replicate") * 255
    r, g, b = x.unbind(1)
    ycc = torch.stack([0.299 * r + 0.587 * g + 0.114 * b - 128,
                       -0.168736 * r - 0.331264 * g + 0.5 * b,
                       0.5 * r - 0.418688 * g - 0.081312 * b], dim=1)
    H, W = ycc.shape[-2:]
    blocks = ycc.view(n, 3, H // 8, 8, W // 8, 8).transpose(3, 4)  # (n, 3, bh, bw, 8, 8)
    dct = _dct_matrix().to(images.device)
    tables = torch.stack([_quant_table(_LUMA_TABLE, quality)] + [_quant_table(_CHROMA_TABLE, quality)] * 2)
    tables = tables.to(images.device).view(1, 3, 1, 1, 8, 8)
    coefficients = dct @ blocks @ dct.T
    restored = dct.T @ (_soft_round(coefficients / tables) * tables) @ dct
    y, cb, cr = restored.transpose(3, 4).reshape(n, 3, H, W).unbind(1)
    rgb = torch.stack([y + 128 + 1.402 * cr, y + 128 - 0.344136 * cb - 0.714136 * cr, y + 128 + 1.772 * cb], dim=1)
    return (rgb / 255)[..., :h, :w]


def compression(images, prompts):
    """DRTune eq. 7, negated: -||I - d(c(I))||^2 (mean over pixels) through the differentiable JPEG."""
    return -((images - jpeg_roundtrip(images)) ** 2).mean(dim=(1, 2, 3))


def brightness(images, prompts):
    """Mean pixel value (D3PO's brightness reward)."""
    return images.mean(dim=(1, 2, 3))


def colorfulness(images, prompts):
    """Hasler & Suesstrunk (2003) colourfulness on 0-255 RGB; eps inside the roots keeps grey images finite."""
    r, g, b = (images * 255).unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(dim=1) + yb.var(dim=1) + 1e-6).sqrt()
    offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + 1e-6).sqrt()
    return spread + 0.3 * offset

# --- Pretrained reward models ----------------------------------------------------------------------------
# Backbones run in the dtype they are given (bf16 on a GPU, like the frozen UNet); the small score heads, the
# feature normalisation and the score itself stay in fp32: bf16 keeps 8 bits of mantissa, so an aesthetic score
# near 5.2 would move in steps of 0.03, as large as the differences the RL methods normalise per prompt.


def _cached(repo: str, filename: str):
    """The path of a hub file in the local Hugging Face cache, or None (never touches the network)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return None


def _fetch(name: str, filename: str, fallback: str | None = None) -> str:
    """The local path of `filename` of `name` (the file itself, a folder holding it, or a hub id: the cache, else a
    download); where `name` has no such file, the one of the hub repo `fallback`."""
    path = Path(name).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        return str(path / filename) if (path / filename).is_file() or not fallback else _fetch(fallback, filename)
    if found := _cached(name, filename):
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(name, filename)
    except EntryNotFoundError:  # not in the repo, or offline and not cached: the fallback may have it
        if not fallback:
            raise
        return _fetch(fallback, filename)


def _mlp(input_size: int):
    """The LAION aesthetic head, also ImageReward's MLP: five linear layers and dropouts, no activation (the
    ReLUs are commented out in both originals), so in eval mode it is one affine map. Keys layers.{0,2,4,6,7}."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return torch.nn.ModuleDict({"layers": layers})


@lru_cache(maxsize=None)
def load_aesthetic_head(name: str = AESTHETIC_HEAD, device: str = "cpu"):
    """The LAION aesthetic head from a .pth file, a folder holding aesthetic-model.pth, or a hub id; fp32."""
    head = _mlp(768)
    state = torch.load(_fetch(name, "aesthetic-model.pth"), map_location="cpu", weights_only=True)
    head.load_state_dict(state, strict=True)
    return _freeze(head, device)


def aesthetic(images, prompts, backbone: str = AESTHETIC_BACKBONE, reward_model: str = AESTHETIC_HEAD,
              dtype: torch.dtype = torch.float32):
    """LAION aesthetic predictor (DDPO, AlignProp, DRaFT, DRTune): the head on the L2-normalised CLIP ViT-L/14
    image embedding (`backbone`), a 1-10 rating scale (unbounded: it is linear). Prompts are not used."""
    model, _, (size, mean, std) = load_clip(backbone, str(images.device), dtype)
    head = load_aesthetic_head(reward_model, str(images.device))
    pixels = clip_preprocess(images, size, mean, std).to(model.dtype)
    embedding = _projected(model.get_image_features(pixel_values=pixels)).float()
    return head.layers(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)


@lru_cache(maxsize=None)
def _pickscore_tokenizer(name: str):
    """None for PickScore's own tokenizer when it has one, else LAION's CLIP-H tokenizer (the README's processor).
    Decided by the files: AutoTokenizer on a folder without tokenizer files returns an empty tokenizer, silently."""
    path = Path(name).expanduser()
    if path.is_dir():
        has_own = (path / "tokenizer_config.json").is_file()
    else:
        from huggingface_hub import file_exists

        try:
            has_own = bool(_cached(name, "tokenizer_config.json")) or file_exists(name, "tokenizer_config.json")
        except Exception:  # the Hub cannot say: from_pretrained will
            has_own = True
    if has_own:
        return None
    found = _cached(PICKSCORE_PROCESSOR, "tokenizer_config.json")
    return str(Path(found).parent) if found else PICKSCORE_PROCESSOR


def pickscore(images, prompts, reward_model: str = PICKSCORE, dtype: torch.dtype = torch.float32):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, text), about 100 * cos, of a CLIP-H fine-tuned
    on Pick-a-Pic. Preprocessing as laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor: 224, OpenAI mean/std."""
    tokenizer_from = _pickscore_tokenizer(reward_model)
    model, tokenizer, (size, _, _) = load_clip(reward_model, str(images.device), dtype, tokenizer_from)
    image, text = _clip_features(model, tokenizer, images, prompts, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return model.logit_scale.float().exp() * F.cosine_similarity(image, text, dim=-1)


@lru_cache(maxsize=None)
def load_hps(name: str = HPS, version: str = HPS_VERSION, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """HPS v2.0 or v2.1: open_clip ViT-H-14 (a folder may describe another one in open_clip_config.json, open_clip's
    own format) with the {"state_dict": ...} of the version's file, HPS_FILES (a .pt file, a folder holding it or a
    hub id)."""
    import open_clip

    path = Path(name).expanduser()
    arch = f"local-dir:{path}" if (path / "open_clip_config.json").is_file() else "ViT-H-14"
    logging.disable(logging.WARNING)  # open_clip warns on the root logger that it loaded no weights: they come next
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    state = torch.load(_fetch(name, HPS_FILES[version]), map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"], strict=True)
    return _freeze(model, device, dtype), open_clip.get_tokenizer(arch)


def hpsv2(images, prompts, reward_model: str = HPS, version: str = HPS_VERSION, dtype: torch.dtype = torch.float32):
    """Human Preference Score v2 (Wu et al. 2023), release `version` (2.0 or 2.1): cos(image, text) of a CLIP-H
    fine-tuned on HPD v2, no logit scale (about 0.2-0.35 on Stable Diffusion images). Needs open_clip (pip install
    -e ".[hps]")."""
    model, tokenizer = load_hps(reward_model, version, str(images.device), dtype)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(list(prompts)).to(images.device)).float(), dim=-1)
    pixels = clip_preprocess(images, size, mean, std, resize_mode="longest").to(next(model.parameters()).dtype)
    return (F.normalize(model.encode_image(pixels).float(), dim=-1) * text).sum(dim=-1)


def _blip_vision_key(key: str) -> str:
    """A key of BLIP's own ViT (ImageReward's blip.visual_encoder.*) as transformers' BlipVisionModel names it
    (the renames of transformers' convert_blip_original_pytorch_to_hf.py, rewards.md section 2)."""
    for old, new in ((r"^blocks\.", "encoder.layers."), (r"\.attn\.proj\.", ".self_attn.projection."),
                     (r"\.attn\.", ".self_attn."), (r"\.norm([12])\.", r".layer_norm\1."),
                     (r"^norm\.", "post_layernorm."),
                     (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
                     (r"^pos_embed$", "embeddings.position_embedding"), (r"^cls_token$", "embeddings.class_embedding")):
        key = re.sub(old, new, key)
    return key


def _strip(state: dict, prefix: str, rename=lambda key: key):
    return {rename(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}


@lru_cache(maxsize=None)
def load_imagereward(name: str = IMAGEREWARD, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """ImageReward rebuilt on transformers' BLIP classes: BlipVisionModel, BlipTextModel (BERT with cross-attention
    to the image tokens, configured by med_config.json), the MLP(768) head (fp32) and the BERT tokenizer with
    BLIP's [DEC] and [ENC]. `name`: a hub id or a folder holding ImageReward.pt and med_config.json, and
    vocab.txt (else bert-base-uncased's)."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    state = torch.load(_fetch(name, "ImageReward.pt"), map_location="cpu", weights_only=True)
    med = json.loads(Path(_fetch(name, "med_config.json")).read_text())
    vision_state = _strip(state, "blip.visual_encoder.", _blip_vision_key)
    # position_ids is a constant arange, a saved buffer in BLIP's BERT and a non-persistent one in transformers'.
    text_state = {k: v for k, v in _strip(state, "blip.text_encoder.").items() if not k.endswith("position_ids")}
    width = vision_state["embeddings.class_embedding"].shape[-1]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers.")),
        num_attention_heads=width // 64,  # BLIP's ViTs (base 768/12, large 1024/16) all use 64-wide heads
        patch_size=patch, image_size=patch * math.isqrt(vision_state["embeddings.position_embedding"].shape[1] - 1),
        layer_norm_eps=1e-6))  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
    text = BlipTextModel(BlipTextConfig(
        **{k: med[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
                               "pad_token_id") if k in med},
        encoder_hidden_size=width), add_pooling_layer=False)
    head = _mlp(med["hidden_size"])
    vision.load_state_dict(vision_state, strict=True)
    text.load_state_dict(text_state, strict=True)
    head.load_state_dict(_strip(state, "mlp."), strict=True)
    tokenizer = BertTokenizer(_fetch(name, "vocab.txt", fallback=BERT))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return _freeze(vision, device, dtype), _freeze(text, device, dtype), _freeze(head, device), tokenizer


def imagereward(images, prompts, reward_model: str = IMAGEREWARD, dtype: torch.dtype = torch.float32):
    """ImageReward (Xu et al. 2023): BLIP ViT-L/16 image tokens, cross-attended by the BERT text encoder; its [CLS]
    state through the MLP head, normalised to about N(0, 1) by the published mean and std. ReFL's reward."""
    vision, text, head, tokenizer = load_imagereward(reward_model, str(images.device), dtype)
    size = vision.config.image_size
    # ImageReward's _transform: Resize(224, bicubic), CenterCrop(224), OpenAI mean/std
    pixels = clip_preprocess(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(vision.dtype)
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_tokens = vision(pixel_values=pixels).last_hidden_state
    state = text(input_ids=tokens.input_ids.to(images.device), attention_mask=tokens.attention_mask.to(images.device),
                 encoder_hidden_states=image_tokens,
                 encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=images.device))
    raw = head.layers(state.last_hidden_state[:, 0].float()).squeeze(-1)
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


@lru_cache(maxsize=None)
def load_owlvit(name: str = OWLVIT, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """An OWL-ViT (v1) detector, its tokenizer and its processor's mean/std."""
    from transformers import AutoTokenizer, OwlViTForObjectDetection

    model = _freeze(OwlViTForObjectDetection.from_pretrained(name, dtype=dtype), device)
    return model, AutoTokenizer.from_pretrained(name), _processor_mean_std(name)


def objectness(images, prompts, reward_model: str = OWLVIT, query: str = OBJECTNESS_QUERY,
               dtype: torch.dtype = torch.float32):
    """DRTune's object removal: minus the largest OWL-ViT probability of the class `query` over all predicted boxes.
    Its gradient flows through the class logits (OWLv2's objectness head sees detached features: no gradient).
    Preprocessing as OwlViTImageProcessor: both sides to the model's size, bicubic, OpenAI mean/std. Prompts are
    not used: the query is the object to remove."""
    model, tokenizer, (mean, std) = load_owlvit(reward_model, str(images.device), dtype)
    pixels = clip_preprocess(images, model.config.vision_config.image_size, mean, std, resize_mode="squash")
    tokens = tokenizer([query], padding="max_length", truncation=True, return_tensors="pt",
                       max_length=model.config.text_config.max_position_embeddings)
    n = images.shape[0]
    logits = model(input_ids=tokens.input_ids.repeat(n, 1).to(images.device), pixel_values=pixels.to(model.dtype),
                   attention_mask=tokens.attention_mask.repeat(n, 1).to(images.device)).logits  # (N, boxes, 1)
    return -logits[..., 0].float().sigmoid().amax(dim=1)


# name -> (function, differentiable, prompt set for a real Stable Diffusion model: the kind its paper trained on).
# DDPO trained aesthetic and the JPEG sizes on its animals (the other weight-free rewards take them too); DRTune
# trained every one of its rewards, symmetry and compression included, on HPS v2's training prompts, which
# `general` imitates; objectness removes the books of `books` ("[concept name], and books", DRTune 4.1).
REWARDS = {
    "jpeg_compressibility": (jpeg_compressibility, False, "simple_animals"),
    "jpeg_incompressibility": (jpeg_incompressibility, False, "simple_animals"),
    "symmetry": (symmetry, True, "general"),
    "clipscore": (clipscore, True, "general"),
    "compression": (compression, True, "general"),
    "brightness": (brightness, True, "simple_animals"),
    "colorfulness": (colorfulness, True, "simple_animals"),
    "aesthetic": (aesthetic, True, "simple_animals"),
    "pickscore": (pickscore, True, "general"),
    "hpsv2": (hpsv2, True, "general"),
    "imagereward": (imagereward, True, "general"),
    "objectness": (objectness, True, "books"),
}


# --- --reward: weighted sums of rewards and users' functions ---------------------------------------------

_TERM = re.compile(r"\s*(?:([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?([^\s*+]+)\s*")


def parse(spec: str) -> list[tuple[float, str]]:
    """`--reward` as [(weight, name)]: terms `[weight*]name` joined by `+`, e.g. `aesthetic+-0.1*brightness`."""
    terms, pos = [], 0
    while True:
        match = _TERM.match(spec, pos)
        if not match:
            fail(f"--reward {spec!r}: expected terms [weight*]name joined by + (e.g. hpsv2+0.5*clipscore)")
        terms.append((float(match[1]) if match[1] else 1.0, match[2]))
        pos = match.end()
        if pos == len(spec):
            return terms
        if spec[pos] != "+":
            fail(f"--reward {spec!r}: expected terms [weight*]name joined by + (e.g. hpsv2+0.5*clipscore)")
        pos += 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@lru_cache(maxsize=None)
def _import(module: str):
    """A user's module by import name or file path, run once per process (check and make both look)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module).expanduser().resolve()
    spec = importlib.util.spec_from_file_location(f"user_reward_{path.stem}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _user_reward(name: str):
    """The function of `module:function` or `path/to/file.py:function`, and whether it says it is differentiable."""
    module, _, attr = name.rpartition(":")
    if not module or not attr.isidentifier():
        fail(f"--reward {name}: a user reward is module:function or path/to/file.py:function")
    if module.endswith(".py") and not Path(module).expanduser().is_file():
        fail(f"--reward {name}: no such file {module}")
    try:
        fn = getattr(_import(module), attr, None)
    except Exception as error:  # the user's code: whatever it raised, one line names it
        fail(f"--reward {name}: importing {module} failed: {_one_line(error)}")
    if not callable(fn):
        fail(f"--reward {name}: {module} has no function {attr}")
    return fn, getattr(fn, "differentiable", False) is True


def _user_scores(name: str, value, n: int, device) -> torch.Tensor:
    """A user's reward must give one score per image. Anything else (a float, a (N, 1) tensor) would end in a
    traceback deep in the training loop, or worse broadcast silently against the other terms of a sum."""
    try:
        scores = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError):
        scores = None
    if scores is None or scores.shape != (n,) or scores.dtype == torch.bool or scores.is_complex():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            got = f"a {type(value).__name__} of shape {tuple(value.shape)}"
            got += f" and dtype {value.dtype}" if tuple(value.shape) == (n,) else ""
        elif isinstance(value, (list, tuple)):
            got = f"a {type(value).__name__} of {len(value)} items"
        else:
            got = f"a {type(value).__name__} ({repr(value)[:40]})"
        fail(f"--reward {name} returned {got} for {n} images; a reward returns one score per image, a tensor of "
             f"shape ({n},)")
    return scores


def _split_reward_model(value: str | None, spec: str, names: list[str]) -> dict:
    """--reward-model as {reward: weights}: one value for the only pretrained term, or name=path,name=path."""
    pretrained = [name for name in dict.fromkeys(names) if name in WEIGHTS]
    if not value:
        return {}
    if "=" not in value:
        if len(pretrained) == 1:
            return {pretrained[0]: value}
        if pretrained:
            fail(f"--reward-model {value}: --reward {spec} has several pretrained rewards ({', '.join(pretrained)}); "
                 "name each, as name=path,name=path")
        hint = " (its CLIP is --clip-model)" if {"clipscore", "symmetry"} & set(names) else ""
        fail(f"--reward-model {value}: --reward {spec} has no pretrained weights to replace{hint}")
    chosen = {}
    for item in value.split(","):
        key, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not key or not path:
            fail(f"--reward-model {value}: expected a path, or name=path,name=path")
        if key not in pretrained:
            fail(f"--reward-model {value}: {key} is not a pretrained reward of --reward {spec} "
                 f"(those are: {', '.join(pretrained) or 'none'})")
        chosen[key] = path
    return chosen


def _resolve_weights(name: str, value: str | None, files: tuple | None = None) -> str:
    """Find the weights of the pretrained reward `name` (the files of WEIGHTS, or `files`) without loading them;
    returns its `reward_model`: a local file or folder, the cached snapshot of a hub id, or the hub id itself when
    the Hub is reachable."""
    default, table_files = WEIGHTS[name]
    files = files or table_files
    where = value or default
    label = f"--reward-model {where}" if value else f"--reward {name}: its weights {where}"
    needed = [f for f in files if isinstance(f, str)]
    path = Path(where).expanduser()
    if path.is_file():
        if len(needed) > 1 or needed == ["config.json"]:
            fail(f"{label}: is a file; {name} needs a folder holding {' and '.join(needed)}")
        return str(path)
    if path.is_dir():
        for file in needed:
            if not (path / file).is_file():
                fail(f"{label}: no {file} there; {name} needs a folder holding {' and '.join(needed)}")
        folder = path
    elif where.startswith(("/", ".", "~")) or where.count("/") != 1:
        fail(f"{label}: no such file or folder, nor a hub id (owner/name)")
    else:
        found = [_cached(where, file) for file in needed]
        if not all(found):
            if hub.reachable():
                return where
            which = "" if needed == ["config.json"] else " " + " ".join(needed)
            fail(f"{label}: not in the local Hugging Face cache and the Hub cannot be reached; download it where "
                 f"there is network (`hf download {where}{which}`) or pass a local copy with --reward-model")
        folder = Path(found[0]).parent
    for file, repo in (f for f in files if not isinstance(f, str)):
        if not (folder / file).is_file() and not _cached(repo, file) and not hub.reachable():
            fail(f"--reward {name}: {folder} has no {file} and {repo} is not in the local Hugging Face cache (the Hub "
                 f"cannot be reached); put {repo}'s {file} there, or download it where there is network "
                 f"(`hf download {repo} --include '*.json' '*.txt'`)")
    return str(folder)


def _require_open_clip():
    try:
        import open_clip  # noqa: F401
    except Exception as error:  # not installed, or installed beside a torchvision that does not load with this torch
        fail(f'--reward hpsv2 needs open_clip_torch: pip install -e ".[hps]" (import open_clip: {_one_line(error)})')


def _aesthetic_backbone(name: str) -> str:
    """Check --aesthetic-clip without loading it: a CLIP whose image embedding is 768-d, as ViT-L/14's."""
    folder = hub.resolve_pretrained(name, "--aesthetic-clip", "config.json", "a transformers CLIPModel folder",
                                    AESTHETIC_BACKBONE)
    config = Path(folder) / "config.json"
    if config.is_file():
        width = json.loads(config.read_text()).get("projection_dim", 512)  # CLIPConfig's default when absent
        if width != 768:
            fail(f"--reward aesthetic: the LAION head reads CLIP ViT-L/14 embeddings (768-d) and --aesthetic-clip "
                 f"{name} gives {width}-d; pass --aesthetic-clip {AESTHETIC_BACKBONE} or a local copy of it")
    return folder


def _plan(spec, clip_model, clip_weight, reward_model, reward_query, aesthetic_clip, hps_version):
    """Validate `spec` and find everything it needs: ([(weight, name, function, options)], differentiable)."""
    terms = parse(spec)
    names = [name for _, name in terms]
    chosen = _split_reward_model(reward_model, spec, names)
    if reward_query and "objectness" not in names:
        fail(f"--reward-query {reward_query}: only objectness takes a query, and --reward {spec} has none")
    if hps_version not in HPS_FILES:
        fail(f"--hps-version {hps_version}: choose {' or '.join(HPS_FILES)}")
    plan, differentiable = [], True
    for weight, name in terms:
        options = {}
        if ":" in name:
            fn, term_differentiable = _user_reward(name)
        elif name in REWARDS:
            fn, term_differentiable = REWARDS[name][0], REWARDS[name][1]
            taken = inspect.signature(fn).parameters
            if "clip_model" in taken and ("clip_weight" not in taken or clip_weight > 0):
                options["clip_model"] = hub.resolve_clip(clip_model)
            if "clip_weight" in taken:
                options["clip_weight"] = clip_weight
            if name == "aesthetic":
                options["backbone"] = _aesthetic_backbone(aesthetic_clip)
            if name == "hpsv2":
                _require_open_clip()
                options["version"] = hps_version
            if name in WEIGHTS:
                files = (HPS_FILES[hps_version],) if name == "hpsv2" else None
                options["reward_model"] = _resolve_weights(name, chosen.get(name), files)
            if "query" in taken:
                options["query"] = reward_query or OBJECTNESS_QUERY
        else:
            fail(f"--reward {name}: unknown; choose from {', '.join(REWARDS)}, or a user's module:function or "
                 "path/to/file.py:function")
        plan.append((weight, name, fn, options))
        differentiable = differentiable and term_differentiable
    return plan, differentiable


def check(spec: str, *, clip_model: str = "toy", clip_weight: float = 0.0, reward_model: str | None = None,
          reward_query: str | None = None, aesthetic_clip: str = AESTHETIC_BACKBONE,
          hps_version: str = HPS_VERSION) -> bool:
    """Validate `--reward` and find every model and file it needs (local, cached, or a reachable Hub) without
    loading any; one line on stderr and exit status 2 if something is wrong. Returns whether it is differentiable."""
    return _plan(spec, clip_model, clip_weight, reward_model, reward_query, aesthetic_clip, hps_version)[1]


def make(spec: str, *, clip_model: str = "toy", clip_weight: float = 0.0, reward_model: str | None = None,
         reward_query: str | None = None, aesthetic_clip: str = AESTHETIC_BACKBONE, hps_version: str = HPS_VERSION,
         device="cpu", dtype: torch.dtype = torch.float32):
    """The `--reward` function, fn(images, prompts) -> (N,) fp32, the weighted sum of its terms, and whether it is
    differentiable. Loads every model now (once per process) on `device`, backbones in `dtype`."""
    plan, differentiable = _plan(spec, clip_model, clip_weight, reward_model, reward_query, aesthetic_clip,
                                 hps_version)
    parts = []
    for weight, name, fn, options in plan:
        if ":" not in name and "dtype" in inspect.signature(fn).parameters:
            options["dtype"] = dtype
        part = partial(fn, **options)
        if options.keys() & {"clip_model", "backbone", "reward_model"}:
            # one call on a grey image loads the models now and shows they run, before any training step
            with torch.no_grad():
                part(torch.full((1, 3, 64, 64), 0.5, device=device), [""])
        parts.append((weight, name, part))

    def reward(images, prompts):
        total = 0
        for weight, name, part in parts:
            value = part(images, prompts)
            # as_tensor: a user's non-differentiable reward may return numpy
            scores = _user_scores(name, value, len(images), images.device) if ":" in name else torch.as_tensor(value)
            total = total + weight * scores.to(images.device).float()
        return total

    return reward, differentiable
