"""Stable Diffusion architectures built from their configs with random weights, written in diffusers format.

The folder loads through the same path as a hub model (`--model DIR`: the pipeline its model_index.json names),
so every script and benchmark runs its real code at full size without downloading any weights. Speed and memory
do not depend on the weight values (the UNet and VAE have no data-dependent control flow); the images are noise.

    python benchmarks/sd_arch.py --arch sd15 --out /tmp/sd15-random     # 2.1 GB on disk (fp16), ~1 min
    python drtune.py --model /tmp/sd15-random --reward brightness --prompts simple_animals ...

Architectures (ARCHS):
  sd15  the exact configs of stable-diffusion-v1-5: UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text tower 123.1 M,
        its scheduler (PNDM, as the hub ships it; the scripts switch to DDIM with the same betas). Tokenizer: CLIP's
        byte-level BPE with its 512 byte tokens and its special tokens at their real ids (49406 start, 49407 end),
        but no merges, so every character is a token: no file is downloaded, every id a real tokenizer can emit
        is < 49408, and prompts are padded to 77 tokens either way, so the text encoder's cost is unchanged.
        `--tokenizer DIR` copies a real CLIP tokenizer folder instead (e.g. the `tokenizer/` of an SD 1.5 snapshot).
  tiny  hub.build_embedded_pipeline: the random-weight tiny model the tests use (32 px, seconds on a CPU;
        its seed is fixed inside common).
  sdxl  the exact configs of stable-diffusion-xl-base-1.0: UNet 2.57 B (transformer depths 1, 2, 10, cross-attention
        2048, the "text_time" added embedding of the pooled text and six time ids), the SDXL VAE (scaling 0.13025,
        force_upcast), CLIP ViT-L/14's text tower and OpenCLIP ViT-bigG/14's (with projection), its Euler scheduler
        (the scripts switch to DDIM with the same betas); the character tokenizer for both encoders. ~5 GB (fp16).
  tiny-sdxl  the same structure at the embedded model's size (32 px), for the tests.
  sd35-medium  the flow-matching Stable Diffusion 3.5 Medium: MMDiT transformer (24 layers, 1536 wide, dual attention in
        the first 13), CLIP-L and CLIP-G text towers with projections, T5-XXL, the 16-channel VAE (scale 1.5305,
        shift 0.0609), the flow-matching Euler scheduler with shift 3. bf16 on disk, ~20 GB: build it on the GPU
        machine.
  flux-dev  FLUX.1-dev: 19 double + 38 single transformer blocks (3072 wide), guidance embedding, CLIP-L (pooled) and
        T5-XXL, the 16-channel VAE (scale 0.3611, shift 0.1159), dynamic timestep shift. bf16, ~33 GB.
  tiny-sd3, tiny-flux  the same structures at the test size (random weights, seconds on a CPU; tiny-flux's native
        size is FLUX's default 128 latent pixels x its VAE factor 2, but it runs at any even latent size).
benchmarks/gpu.py's analytic FLOP count refuses UNet configs it does not cover (SDXL).

Weights: the default initialisation of diffusers / transformers under a fixed seed (same seed and library versions
-> the same files). Saved in fp16 (half the disk; the scripts load them in the dtype they run in). `--check` loads
the folder back and checks that the text encoder, one CFG UNet call and a VAE decode give finite outputs in fp32
and bf16 (random weights in fp16 can overflow; bf16 has fp32's range).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import hub  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/, vae/, text_encoder/ and scheduler/ config.json values.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768,  # diffusers' default is 1280
    attention_head_dim=8)  # in SD 1.x this is the number of heads (head dim = channels / 8)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(  # transformers' CLIPTextConfig defaults are ViT-B sizes; these are ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the hub's legacy ids: pooling then takes argmax(ids) = end token
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def char_clip_tokenizer(vocab_size: int = 49408):
    """CLIP's byte-level BPE without merges: CLIP's first 512 tokens (each byte, then each byte + </w>, in CLIP's
    order) and its start/end tokens at the top of the vocabulary, where the real tokenizer has them."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))  # CLIP's bytes_to_unicode order
    codepoints = keep + [256 + i for i in range(256 - len(keep))]
    chars = [chr(c) for c in codepoints]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def build_sd15(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write Stable Diffusion 1.5 (random weights, `seed`) in diffusers format, fp16 on disk."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else char_clip_tokenizer()
    # One seed per component: each one's weights do not depend on the others being built.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET).half()  # halved at once: the fp32 UNet alone is 3.4 GB
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD15_VAE).half()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


# stabilityai/stable-diffusion-xl-base-1.0's unet/, vae/, text_encoder_2/ and scheduler/ config.json values.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, upcast_attention=False)
SDXL_VAE = SD15_VAE | dict(scaling_factor=0.13025, force_upcast=True, sample_size=1024)
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection (the pooled embedding)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)
# The tiny SDXL: SDXL's structure at the embedded model's size (VAE factor 2, 32 px, two 32-wide text encoders).
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
TINY_SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=32, scaling_factor=0.13025, force_upcast=True)
TINY_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def _save_sdxl(out, unet, vae, text_encoder, text_encoder_2, tokenizer, dtype):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae.to(dtype), text_encoder=text_encoder.to(dtype),
                                     text_encoder_2=text_encoder_2.to(dtype), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet.to(dtype),
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def build_sdxl(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write Stable Diffusion XL 1.0 base (random weights, `seed`) in diffusers format, fp16 on disk."""
    from transformers import CLIPTextModelWithProjection

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else char_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET).half()  # 10 GB in fp32: halved at once
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SDXL_VAE).half()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).half()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).half()
    _save_sdxl(out, unet, vae, text_encoder, text_encoder_2, tokenizer, torch.float16)


def build_tiny_sdxl(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write the tiny SDXL (random weights, `seed`), fp32, through the same save_pretrained as the real one."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT))
    _save_sdxl(out, unet, vae, text_encoder, text_encoder_2, char_clip_tokenizer(514), torch.float32)


def build_tiny(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """The embedded tiny model of common (its seed is fixed there; `seed` and `tokenizer_dir` are not used)."""
    hub.build_embedded_pipeline(out)


# ---------------------------------------------------------------------------------------------
# Flow-matching models: Stable Diffusion 3.5 Medium and FLUX.1-dev, and their tiny versions for the tests
# ---------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium's transformer/, vae/ and scheduler/ config.json values.
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLOW_VAE = SD15_VAE | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
SD3_VAE = FLOW_VAE | dict(scaling_factor=1.5305, shift_factor=0.0609)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# black-forest-labs/FLUX.1-dev's.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56))
FLUX_VAE = FLOW_VAE | dict(scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
CLIP_L_TEXT = SD15_TEXT | dict(projection_dim=768)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)
# The tiny ones: the same structure at the embedded model's size (32 px, VAE factor 2, 32-wide text encoders).
TINY_SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=8, out_channels=8, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                             attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
TINY_FLOW_VAE = TINY_SDXL_VAE | dict(force_upcast=False, shift_factor=0.1, scaling_factor=1.5)
TINY_T5 = dict(d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def char_t5_tokenizer():
    """A T5 tokenizer with no file to download: unigram pieces for every lowercase letter, digit and some
    punctuation (each word tokenizes into characters), T5's <pad>, </s>, <unk> at their ids 0, 1, 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz0123456789,.'-")
    tokenizer = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def _save_flow(out, kind, transformer, vae, scheduler, text_encoders, tokenizers, dtype):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    parts = {n: m.to(dtype) for n, m in zip(names, text_encoders)}
    parts |= {n.replace("text_encoder", "tokenizer"): t for n, t in zip(names, tokenizers)}
    cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[kind]
    cls(transformer=transformer.to(dtype), vae=vae.to(dtype), scheduler=scheduler, **parts).save_pretrained(
        out, safe_serialization=True)


def _flow_parts(kind, transformer_config, vae_config, clip, clip_g, t5, tokenizer, seed):
    """The components of an SD3 (CLIP-L and CLIP-G with projections, T5) or FLUX (CLIP-L, T5) pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    t5_tokenizer = char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = (SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel)(**transformer_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed + 2)
    if kind == "sd3":
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))]
    else:
        encoders = [CLIPTextModel(CLIPTextConfig(**clip))]
    torch.manual_seed(seed + 3)
    encoders.append(T5EncoderModel(T5Config(**t5)))
    tokenizers = [tokenizer] * (len(encoders) - 1) + [t5_tokenizer]
    scheduler = FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER if kind == "sd3" else FLUX_SCHEDULER))
    return transformer, vae, scheduler, encoders, tokenizers


def build_sd35_medium(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write Stable Diffusion 3.5 Medium (random weights, `seed`) in diffusers format, bf16 on disk (~20 GB with
    T5-XXL). Needs ~40 GB of memory to build: meant for the GPU machine."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else char_clip_tokenizer()
    parts = _flow_parts("sd3", SD35M_TRANSFORMER, SD3_VAE, CLIP_L_TEXT, SDXL_TEXT_2, T5_XXL, tokenizer, seed)
    _save_flow(out, "sd3", *parts, torch.bfloat16)


def build_flux_dev(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write FLUX.1-dev (random weights, `seed`), bf16 on disk (~33 GB with T5-XXL). Needs ~80 GB of memory to
    build: meant for the GPU machine."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else char_clip_tokenizer()
    parts = _flow_parts("flux", FLUX_DEV_TRANSFORMER, FLUX_VAE, SD15_TEXT, None, T5_XXL, tokenizer, seed)
    _save_flow(out, "flux", *parts, torch.bfloat16)


def build_tiny_sd3(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write the tiny SD3 (random weights, `seed`; with a 64-wide T5, as wide as its joint attention), fp32."""
    t5 = TINY_T5 | dict(vocab_size=len(char_t5_tokenizer()), d_model=64)
    parts = _flow_parts("sd3", TINY_SD3_TRANSFORMER, TINY_FLOW_VAE | dict(latent_channels=8), TINY_TEXT, TINY_TEXT,
                        t5, char_clip_tokenizer(514), seed)
    _save_flow(out, "sd3", *parts, torch.float32)


def build_tiny_flux(out: str, seed: int = 0, tokenizer_dir: str = ""):
    """Write the tiny FLUX (random weights, `seed`; guidance-distilled like FLUX.1-dev), fp32."""
    t5 = TINY_T5 | dict(vocab_size=len(char_t5_tokenizer()), d_model=32)
    parts = _flow_parts("flux", TINY_FLUX_TRANSFORMER, TINY_FLOW_VAE | dict(use_quant_conv=False,
                        use_post_quant_conv=False), TINY_TEXT, None, t5, char_clip_tokenizer(514), seed)
    _save_flow(out, "flux", *parts, torch.float32)


# Native image size of each architecture (pixels), for callers that pick a default resolution.
ARCHS = {"sd15": build_sd15, "tiny": build_tiny, "sdxl": build_sdxl, "tiny-sdxl": build_tiny_sdxl,
         "sd35-medium": build_sd35_medium, "flux-dev": build_flux_dev, "tiny-sd3": build_tiny_sd3,
         "tiny-flux": build_tiny_flux}
NATIVE_RESOLUTION = {"sd15": 512, "tiny": hub.EMBEDDED_RESOLUTION, "sdxl": 1024, "tiny-sdxl": 32,
                     "sd35-medium": 1024, "flux-dev": 1024, "tiny-sd3": 32, "tiny-flux": 256}


def build(arch: str, out: str, seed: int = 0, tokenizer_dir: str = "") -> str:
    """Write architecture `arch` to folder `out` (created); returns `out`. The importable entry point."""
    if arch not in ARCHS:
        hub.fail(f"--arch {arch}: unknown; choose one of {', '.join(ARCHS)}")
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        hub.fail(f"--tokenizer {tokenizer_dir}: no tokenizer_config.json there; pass a CLIP tokenizer folder")
    Path(out).mkdir(parents=True, exist_ok=True)
    ARCHS[arch](str(out), seed, tokenizer_dir)
    return str(out)


@torch.no_grad()
def check_finite(path: str, resolution: int, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """Load the folder as the scripts do and run text encoder -> one CFG UNet call -> VAE decode per dtype.

    Returns {dtype name: (max |UNet output|, max |decoded image|)}; raises if anything is not finite.
    """
    result = {}
    for dtype in dtypes:
        pipe = common.load_pipeline(path, dtype)
        cond = common.encode_prompts(pipe, ["a photo of a cat"])
        uncond = common.encode_prompts(pipe, [""])
        latents = common.initial_latents(pipe, 1, resolution, generator=torch.Generator().manual_seed(0))
        pipe.scheduler.set_timesteps(50)
        eps = common.unet_output(pipe.unet, latents, pipe.scheduler.timesteps[0], cond, uncond, 7.5)
        image = pipe.vae.decode(latents.to(dtype) / pipe.vae.config.scaling_factor).sample.float()
        name = str(dtype).removeprefix("torch.")
        for what, x in (("text encoder", cond), ("UNet", eps), ("VAE decode", image)):
            if not torch.isfinite(x).all():
                raise RuntimeError(f"{path}: {what} output is not finite in {name}")
        result[name] = (eps.abs().max().item(), image.abs().max().item())
        del pipe
    return result


@dataclass
class Args:
    arch: str = "sd15"
    """architecture: sd15, sdxl, sd35-medium, flux-dev (full size), tiny, tiny-sdxl, tiny-sd3, tiny-flux (test sizes)"""
    out: str = ""
    """output folder (created); pass it to any script as --model"""
    seed: int = 0
    """seed of the random weights"""
    tokenizer: str = ""
    """optional: a CLIP tokenizer folder to copy (default: the character-level CLIP vocabulary, offline)"""
    check: bool = False
    """after writing, load the folder in fp32 and bf16 and check the outputs are finite"""
    check_resolution: int = 64
    """image size of the --check forward pass (512 = the real size; ~2 min on 2 CPU cores)"""


def main():
    args = tyro.cli(Args)
    if not args.out:
        hub.fail("--out DIR is required: the folder to write the model to")
    if (Path(args.out) / "model_index.json").exists():
        hub.fail(f"--out {args.out} already holds a model (model_index.json); choose another folder")
    if args.check_resolution < 8 or args.check_resolution % 8:
        hub.fail(f"--check-resolution must be a positive multiple of 8 (got {args.check_resolution})")
    build(args.arch, args.out, args.seed, args.tokenizer)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file()) / 1e9
    print(f"sd_arch: {args.arch} written to {args.out} ({size:.2f} GB)")
    if args.check:
        for name, (eps, image) in check_finite(args.out, args.check_resolution).items():
            print(f"sd_arch: {name} at {args.check_resolution} px: finite; max |eps| {eps:.3g}, "
                  f"max |decoded| {image:.3g}")


if __name__ == "__main__":
    main()
