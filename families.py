"""What one model family needs beyond Stable Diffusion 1.x/2.x, kept out of common.py's reading path: SDXL's two
text encoders, pooled embedding and time ids; SD3's three text encoders (CLIP-L, CLIP-G, T5) and MMDiT
transformer; FLUX's CLIP + T5 conditioning, its latents packed into 2x2 patches with position ids, and its
guidance embedding (FLUX.1-dev is guidance-distilled: the guidance scale is an input, not a second pass).

Every family's text conditioning is one tensor (B, tokens + 1, width), so the scripts can batch, index and
repeat it alike: the pooled embedding rides along as one more token, zero-padded to the width, and `denoise`
splits it off again. Latents stay (B, C, h, w) everywhere; FLUX's packing happens inside `denoise` only.
"""

import torch
import torch.nn.functional as F
from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionXLPipeline)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

# SD3's T5 sequence length (the diffusers default). A model without T5 (text_encoder_3 = None: the toy flow model,
# or SD3 loaded without it to save memory) gets zeros in T5's place, as many as its CLIP tokenizer's length.
SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = 512  # FLUX.1-dev's (FluxPipeline's default)


def _with_pooled(embeds, pooled):
    """(B, L, W) and (B, P) -> (B, L + 1, W): the pooled embedding as a last, zero-padded token."""
    if pooled.shape[-1] > embeds.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the token width {embeds.shape[-1]}")
    return torch.cat([embeds, F.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))[:, None]], dim=1)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]):
    """The text conditioning of an SDXL, SD3 or FLUX pipeline, as its own encode_prompt makes it, plus the pooled
    embedding as one more token."""
    prompts, device = list(prompts), pipe.unet.device
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        if pipe.config.force_zeros_for_empty_prompt and not any(prompts):  # as its pipeline makes the unconditional
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    elif isinstance(pipe, StableDiffusion3Pipeline):
        t5_tokens = SD3_T5_TOKENS if pipe.text_encoder_3 is not None else pipe.tokenizer_max_length
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=t5_tokens)
    elif isinstance(pipe, FluxPipeline):
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=FLUX_T5_TOKENS)
    else:
        raise ValueError(f"no text conditioning for {type(pipe).__name__}")
    return _with_pooled(embeds, pooled)


def guidance_in_model(model) -> bool:
    """FLUX takes the guidance scale as an input (its distilled guidance; schnell ignores it): one pass, no CFG."""
    return isinstance(model, FluxTransformer2DModel)


def denoise(model, latents, t, cond, guidance_scale: float = 1.0):
    """One call of an SDXL UNet, an SD3 transformer or a FLUX transformer on (B, C, h, w) latents at scheduler
    timestep(s) t, conditioned on encode_prompts' tensor. Returns the model output in the latents' layout."""
    t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(len(latents))
    embeds, pooled = cond[:, :-1], cond[:, -1]
    if isinstance(model, SD3Transformer2DModel):
        pooled = pooled[:, :model.config.pooled_projection_dim]
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,  # t in fp32, as its pipeline
                     pooled_projections=pooled).sample
    if isinstance(model, FluxTransformer2DModel):
        return flux_denoise(model, latents, t, embeds, pooled[:, :model.config.pooled_projection_dim], guidance_scale)
    # SDXL: the pooled text embedding and the time ids (original size, crop corner, target size: the image's size,
    # no crop) as added conditions
    pooled = pooled[:, :model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim]
    h, w = (side * model.pixels_per_latent for side in latents.shape[-2:])
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond.dtype, device=cond.device).expand(len(latents), 6)
    return model(latents, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


# ---------------------------------------------------------------------------------------------
# FLUX: packed latents, position ids, guidance embedding
# ---------------------------------------------------------------------------------------------


def pack(latents):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's tokens are 2x2 latent patches."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h: int, w: int):
    """The inverse of pack: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_denoise(model, latents, t, embeds, pooled, guidance_scale: float):
    b, _, h, w = latents.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, torch.float32)  # for RoPE
    text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device)
    guidance = (torch.full((b,), float(guidance_scale), device=latents.device)
                if model.config.guidance_embeds else None)
    out = model(hidden_states=pack(latents), timestep=t.to(latents.dtype) / 1000, guidance=guidance,  # as FluxPipeline
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                img_ids=image_ids).sample
    return unpack(out, h, w)


def flux_shift(scheduler, h: int, w: int) -> float:
    """FLUX's resolution-dependent timestep shift mu for (h, w) latents: FluxPipeline's, linear in the token count."""
    c = scheduler.config
    return calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))
