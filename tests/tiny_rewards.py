"""Tiny random-weight reward models written to disk in the layout of the real ones (for tests: nothing downloaded).

Each builder saves into a folder that `rewards.check`/`rewards.make` then load exactly as they would load a hub
snapshot: a transformers folder (CLIP as CLIPScore/PickScore/aesthetic backbone, OWL-ViT), a folder holding
aesthetic-model.pth, an HPS folder (open_clip_config.json + HPS_v2.1_compressed.pt and/or HPS_v2_compressed.pt)
and an ImageReward folder whose ImageReward.pt uses the ORIGINAL checkpoint's key names (BLIP's ViT and BERT), so
the key mapping is tested.
"""

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "and", "of", "on", "the", "photo", "painting", "cat", "dog", "red", "blue", "books", "book",
         "castle", "forest", "portrait", "##s"]


def clip_tokenizer(max_length: int = 77):
    """A byte-level CLIPTokenizer (every character a token, no merges) with <|startoftext|> and <|endoftext|> as its
    two largest ids, as in the real vocabulary: OWL-ViT pools the text at the largest id and ignores a query whose
    first id is 0."""
    from transformers import CLIPTokenizer

    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))  # GPT-2's printable bytes first
    codepoints = keep + [256 + i for i in range(256 - len(keep))]
    vocab = {chr(c): i for i, c in enumerate(codepoints)} | {chr(c) + "</w>": 256 + i for i, c in enumerate(codepoints)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = max_length
    return tokenizer


def _text_config(max_positions: int):
    return dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=max_positions, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def tiny_clip(path, projection_dim: int = 16, image_size: int = 32, tokenizer: bool = True, seed: int = 0):
    """A CLIPModel folder (config.json, model.safetensors, tokenizer files unless tokenizer=False)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=_text_config(77), projection_dim=projection_dim,
                        vision_config=dict(image_size=image_size, patch_size=16, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(config).save_pretrained(path)
    if tokenizer:
        clip_tokenizer().save_pretrained(path)
    return str(path)


def aesthetic_head_state(seed: int = 0):
    """A random LAION-layout head: layers.{0,2,4,6,7} of Linear(768,1024)...Linear(16,1)."""
    torch.manual_seed(seed)
    sizes = [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    return {f"layers.{i}.{p}": t for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes, strict=True)
            for p, t in (("weight", torch.randn(n_out, n_in) / n_in ** 0.5), ("bias", torch.randn(n_out) * 0.1))}


def tiny_aesthetic_head(path, seed: int = 0):
    """A folder holding aesthetic-model.pth (the layout of trl-lib/ddpo-aesthetic-predictor)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_head_state(seed), Path(path) / "aesthetic-model.pth")
    return str(path)


def tiny_owlvit(path, image_size: int = 32, seed: int = 0):
    """An OwlViTForObjectDetection folder with its tokenizer and preprocessor_config.json."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor

    torch.manual_seed(seed)
    config = OwlViTConfig(text_config=_text_config(16), projection_dim=32,  # projection = text width (class head)
                          vision_config=dict(image_size=image_size, patch_size=16, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
    model = OwlViTForObjectDetection(config)
    with torch.no_grad():  # logit scale 1, shift 0: logits are cosines, so the sigmoid never saturates to a 0 gradient
        for layer in (model.class_head.logit_scale, model.class_head.logit_shift):
            layer.weight.zero_()
            layer.bias.zero_()
    model.save_pretrained(path)
    clip_tokenizer(16).save_pretrained(path)
    OwlViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


HPS_CONFIG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}  # the names in xswu/HPSv2


def tiny_hps(path, seed: int = 0, version: str = "2.1"):
    """An HPS folder: open_clip_config.json (open_clip's own format) and the version's checkpoint
    (HPS_v2.1_compressed.pt, or HPS_v2_compressed.pt for 2.0) as {"state_dict"}; called again with the other version
    on the same folder, it holds both. The model is built from the same config registered under a name with
    open_clip.add_model_config."""
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny-hps-vit.json").write_text(json.dumps(HPS_CONFIG))
    open_clip.add_model_config(path / "tiny-hps-vit.json")
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-hps-vit", pretrained=None)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": HPS_CONFIG}))
    torch.save({"state_dict": model.state_dict()}, path / HPS_FILES[version])
    return str(path), model.eval()


def bert_vocab(path):
    """A tiny BERT vocab.txt ([PAD] first: BLIP's BERT pads with id 0)."""
    specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    Path(path).write_text("\n".join(specials + WORDS + letters) + "\n")
    return len(specials + WORDS + letters)


def _original_vision_name(key: str) -> str:
    """transformers' BlipVisionModel key -> BLIP's own ViT key (models/vit.py), spelled out per kind of weight."""
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    if key in fixed:
        return fixed[key]
    _, _, layer, *rest = key.split(".")  # encoder.layers.N.<module>.<param>
    module, param = ".".join(rest[:-1]), rest[-1]
    module = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj", "layer_norm1": "norm1",
              "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[module]
    return f"blocks.{layer}.{module}.{param}"


def tiny_imagereward(path, vocab: bool = True, seed: int = 0):
    """An ImageReward folder: ImageReward.pt with the original key names (blip.visual_encoder.*, blip.text_encoder.*,
    the unused blip.vision_proj/text_proj and BERT's saved position_ids, mlp.layers.*), med_config.json and a tiny
    vocab.txt. Returns the folder and the modules it was written from (vision, text, head), for reference scores."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = bert_vocab(path / "vocab.txt") + 2  # + BLIP's [DEC] and [ENC], as the real 30522 + 2
    if not vocab:
        (path / "vocab.txt").unlink()
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
           "encoder_width": 128, "add_cross_attention": True}
    (path / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(image_size=32, patch_size=16, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=2, num_attention_heads=2, layer_norm_eps=1e-6,
                                              initializer_range=0.1))  # the defaults make the image all but invisible
    text = BlipTextModel(BlipTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                                        encoder_hidden_size=128, pad_token_id=0, initializer_range=0.1),
                         add_pooling_layer=False)
    head = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    state = {"blip.visual_encoder." + _original_vision_name(k): v for k, v in vision.state_dict().items()}
    state |= {"blip.text_encoder." + k: v for k, v in text.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    state |= {"blip.vision_proj.weight": torch.randn(16, 128), "blip.vision_proj.bias": torch.zeros(16),
              "blip.text_proj.weight": torch.randn(16, 32), "blip.text_proj.bias": torch.zeros(16)}
    state |= {"mlp.layers." + k: v for k, v in head.state_dict().items()}
    torch.save(state, path / "ImageReward.pt")
    return str(path), (vision.eval(), text.eval(), head.eval())
