"""Reward functions: images (N,3,H,W) float in [0,1] and prompts list[str] -> tensor (N,), higher is better.

`REWARDS` at the bottom names each one and says whether it is differentiable (the gradient methods
need that; the RL methods call any of them under no_grad). The CLIP-based ones also take `clip_model`
(a hub id or local folder; scripts pass `--clip-model`) and symmetry takes `clip_weight`.
"""

import io
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

TOY_CLIP = str(Path(__file__).resolve().parent / "toyworld" / "clip")  # the toy world's CLIP (default)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


# --- CLIP: one differentiable preprocessing shared by every CLIP-based reward --------------------------


@lru_cache(maxsize=4)
def load_clip(name: str, device: str = "cpu"):
    """A transformers CLIPModel (hub id or local folder), its tokenizer and preprocessing constants; frozen fp32."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = CLIPModel.from_pretrained(name, dtype=torch.float32).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name)
    try:  # the mean/std of its preprocessor_config.json (the config only: no torchvision needed)
        config = ImageProcessingMixin.get_image_processor_dict(name)[0]
    except OSError:
        config = {}
    mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
    return model, tokenizer, (model.config.vision_config.image_size, tuple(mean), tuple(std))


def clip_preprocess(images, size: int, mean, std, mode: str = "bicubic", antialias: bool = True):
    """CLIPImageProcessor, differentiably: short side to `size`, center crop, normalise.

    Bicubic with antialiasing is the closest to the PIL resize of the real processor
    (../shared/reference/rewards.md section 0.2); `mode`/`antialias` can match other recipes exactly.
    """
    h, w = images.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(h, w), mode=mode, antialias=antialias, align_corners=False)
    top, left = (h - size) // 2, (w - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def _projected(output):  # transformers 5 returns an output object (projection in pooler_output), 4.x a tensor
    return output if torch.is_tensor(output) else output.pooler_output


def clipscore(images, prompts, clip_model: str = TOY_CLIP):
    """CLIPScore (Hessel et al. 2021) without its clamp at 0, so it has a gradient: 100 * cos(image, text)."""
    model, tokenizer, (size, mean, std) = load_clip(clip_model, str(images.device))
    ids = tokenizer(list(prompts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(images.device)
    text = _projected(model.get_text_features(input_ids=ids))
    image = _projected(model.get_image_features(pixel_values=clip_preprocess(images, size, mean, std)))
    return 100 * F.cosine_similarity(image, text.detach(), dim=-1)


def asymmetry(images):
    """DRTune eq. 6: mean|I - flip(I)| / std(I) per image, horizontal mirror (0 is symmetric).

    Dividing by the image's std stops the flat-image hack (a constant image is trivially symmetric).
    """
    return (images - images.flip(-1)).abs().mean(dim=(1, 2, 3)) / (images.std(dim=(1, 2, 3)) + 1e-6)


def symmetry(images, prompts, clip_weight: float = 0.0, clip_model: str = TOY_CLIP):
    """DRTune section 4.1: minus the asymmetry of eq. 6, plus `clip_weight` x CLIPScore, the regulariser
    that keeps the picture on the prompt (without it the model draws one large symmetric blob).
    clip_weight 0 is eq. 6 alone."""
    reward = -asymmetry(images)
    if clip_weight:
        reward = reward + clip_weight * clipscore(images, prompts, clip_model)
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


# name -> (function, differentiable)
REWARDS = {
    "jpeg_compressibility": (jpeg_compressibility, False),
    "jpeg_incompressibility": (jpeg_incompressibility, False),
    "symmetry": (symmetry, True),
    "clipscore": (clipscore, True),
    "compression": (compression, True),
    "brightness": (brightness, True),
    "colorfulness": (colorfulness, True),
}
