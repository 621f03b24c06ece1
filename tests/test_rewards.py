import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
import tiny_rewards as tiny

ROOT = Path(__file__).resolve().parents[1]
LAION_HEAD = ROOT.parent / "shared" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"  # read there, never copied
WEIGHT_FREE = [name for name in rewards.REWARDS if name not in rewards.WEIGHTS]  # clipscore's CLIP is the toy one
DIFFERENTIABLE = [name for name in WEIGHT_FREE if rewards.REWARDS[name][1]]
PRETRAINED = ["clipscore", "pickscore", "aesthetic", "imagereward", "objectness", "hpsv2"]
PROMPTS = ["a photo of a cat", "a red castle, and books", "portrait of a dog on the forest"]
_OPENAI = (rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD)
PREPROCESS_TOLERANCE = 0.05  # max abs error in normalised units against each model's own processor


def _open_clip():
    # importorskip catches ImportError only; open_clip beside a torchvision built for another torch raises RuntimeError
    try:
        import open_clip
    except Exception as error:
        pytest.skip(f"open_clip is not importable ({type(error).__name__}); pip install -e '.[hps]'")
    return open_clip


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Every tiny reward model, written once per session; HPS separately (it needs open_clip)."""
    root = tmp_path_factory.mktemp("tiny_rewards")
    imagereward, modules = tiny.tiny_imagereward(root / "imagereward")
    return {"clip": tiny.tiny_clip(root / "clip"), "clip768": tiny.tiny_clip(root / "clip768", projection_dim=768),
            "clip_without_tokenizer": tiny.tiny_clip(root / "clip_without_tokenizer", tokenizer=False),
            "head": tiny.tiny_aesthetic_head(root / "head"), "owlvit": tiny.tiny_owlvit(root / "owlvit"),
            "imagereward": imagereward, "imagereward_modules": modules,
            "imagereward_without_vocab": tiny.tiny_imagereward(root / "imagereward_without_vocab", vocab=False)[0]}


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    _open_clip()
    return tiny.tiny_hps(tmp_path_factory.mktemp("tiny_hps") / "hps")


def _options(name, tiny_models, request):
    """The make/check options that point reward `name` at its tiny model (as --clip-model / --aesthetic-clip /
    --reward-model would)."""
    if name == "hpsv2":
        return {"reward_model": request.getfixturevalue("tiny_hps")[0]}
    return {"clipscore": {"clip_model": tiny_models["clip"]},
            "pickscore": {"reward_model": tiny_models["clip"]},
            "aesthetic": {"aesthetic_clip": tiny_models["clip768"], "reward_model": tiny_models["head"]},
            "imagereward": {"reward_model": tiny_models["imagereward"]},
            "objectness": {"reward_model": tiny_models["owlvit"]}}.get(name, {})


def _fails(capsys, call, *needles):
    """`call` stops with exit status 2 and one line on stderr that holds every needle; returns that line."""
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# --- The table and the weight-free rewards ---------------------------------------------------------------


def test_table_marks_differentiability_and_names_existing_prompt_sets():
    assert not rewards.REWARDS["jpeg_compressibility"][1]
    assert not rewards.REWARDS["jpeg_incompressibility"][1]
    assert {name for name, entry in rewards.REWARDS.items() if entry[1]} == {
        "symmetry", "clipscore", "compression", "brightness", "colorfulness", *PRETRAINED}
    for name, (fn, _, prompt_set) in rewards.REWARDS.items():
        assert callable(fn) and (ROOT / "prompts" / f"{prompt_set}.txt").is_file(), name


def test_new_prompt_sets_are_sized_and_held_out():
    read = lambda name: (ROOT / "prompts" / f"{name}.txt").read_text().splitlines()  # noqa: E731
    general, books = read("general"), read("books")
    assert 40 <= len(general) <= 60 and 20 <= len(books) <= 40
    assert all(line.endswith(", and books") for line in books + read("books_eval"))
    for name in ("general", "books"):
        train, held_out = read(name), read(f"{name}_eval")
        assert all(line.strip() for line in train + held_out) and len(set(train)) == len(train)
        assert not set(train) & set(held_out)


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_every_reward_maps_a_batch_to_one_score_per_image(name):
    images = torch.rand(3, 3, 24, 40)
    scores = rewards.REWARDS[name][0](images, ["a", "b", "c"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("kind", ["noise", "grey", "black"])
def test_gradients_are_finite_and_reach_the_pixels(name, kind):
    images = {"noise": torch.rand(2, 3, 32, 32), "grey": torch.full((2, 3, 32, 32), 0.5),
              "black": torch.zeros(2, 3, 32, 32)}[kind].requires_grad_()
    rewards.REWARDS[name][0](images, ["a", "b"]).sum().backward()
    assert torch.isfinite(images.grad).all()
    if kind == "noise":
        assert images.grad.abs().sum() > 0


def test_mirror_symmetric_image_has_zero_asymmetry_and_noise_does_not():
    half = torch.rand(2, 3, 16, 8)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    assert torch.allclose(rewards.symmetry(symmetric, None), torch.zeros(2))
    assert (rewards.symmetry(torch.rand(2, 3, 16, 16), None) < -0.5).all()


def test_symmetry_is_eq6_negated():
    image = torch.rand(1, 3, 16, 16)
    expected = -(image - image.flip(-1)).abs().mean() / image.std()
    torch.testing.assert_close(rewards.symmetry(image, None), expected.reshape(1), rtol=1e-4, atol=1e-6)


def test_symmetry_clip_weight_zero_is_exactly_eq6_and_never_loads_clip(monkeypatch):
    monkeypatch.setattr(rewards, "clipscore", lambda *a, **k: pytest.fail("weight 0 must not score with CLIP"))
    image = torch.rand(2, 3, 16, 16)
    expected = -(image - image.flip(-1)).abs().mean(dim=(1, 2, 3)) / image.std(dim=(1, 2, 3))
    torch.testing.assert_close(rewards.symmetry(image, ["a", "b"], clip_weight=0.0), expected)


def test_symmetry_regulariser_adds_weighted_clipscore():
    images, prompts = _toy_drawings(4)
    plain = rewards.symmetry(images, prompts, clip_weight=0.0)
    clip = rewards.clipscore(images, prompts)
    torch.testing.assert_close(rewards.symmetry(images, prompts, clip_weight=0.02), plain + 0.02 * clip)


def _toy_drawings(n, seed=0):
    from toyworld import world

    return world.sample_batch(n, np.random.default_rng(seed))


def test_clipscore_prefers_the_true_caption_and_is_100_cos():
    from toyworld import world

    images, prompts = _toy_drawings(12)
    colours = list(world.COLOURS)
    recoloured = [world.caption(colours[(colours.index(c) + 1) % len(colours)], s, b)  # same picture, next colour
                  for c, s, b in map(world.parse, prompts)]
    right, wrong = rewards.clipscore(images, prompts), rewards.clipscore(images, recoloured)
    assert (right > wrong).float().mean() >= 0.9 and right.mean() > wrong.mean() + 20
    assert (right.abs() <= 100 + 1e-3).all() and (wrong.abs() <= 100 + 1e-3).all()


def test_clipscore_gradient_reaches_every_pixel_region_and_climbs():
    images, prompts = _toy_drawings(2, seed=1)
    x = images.clone().requires_grad_()
    score = rewards.clipscore(x, prompts)
    score.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=(0, 1)) > 0).float().mean() > 0.9  # the gradient reaches (almost) every pixel
    stepped = (images - 3e-4 * x.grad.sign()).clamp(0, 1)  # a small step against the gradient lowers it
    assert (rewards.clipscore(stepped, prompts) < score.detach()).all()


def test_flat_image_compresses_better_than_noise():
    flat, noise = torch.full((1, 3, 64, 64), 0.3), torch.rand(1, 3, 64, 64)
    both = torch.cat([flat, noise])
    for name in ("jpeg_compressibility", "compression"):
        score = rewards.REWARDS[name][0](both, ["", ""])
        assert score[0] > score[1], name
    size = rewards.jpeg_incompressibility(both, ["", ""])
    assert size[1] > 5 * size[0]


def test_jpeg_size_is_pil_quality_95_in_kilobytes():
    image = torch.rand(1, 3, 32, 32)
    buffer = io.BytesIO()
    array = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert rewards.jpeg_incompressibility(image, [""]).item() == pytest.approx(len(buffer.getvalue()) / 1000)


def test_differentiable_jpeg_is_close_to_a_real_jpeg_roundtrip():
    # A smooth image with some texture, and PIL's encoder without chroma subsampling (as ours).
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2]).unsqueeze(0) * 0.8 + 0.1 * torch.rand(1, 3, 64, 64)
    buffer = io.BytesIO()
    Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(
        buffer, format="JPEG", quality=50, subsampling=0)
    real = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float().unsqueeze(0) / 255
    ours = rewards.jpeg_roundtrip(image, quality=50)
    real_error, our_error = ((image - real) ** 2).mean(), ((image - ours) ** 2).mean()
    assert (ours - real).abs().mean() < 0.01
    assert 0.5 < our_error / real_error < 2


def test_brightness_and_colorfulness_closed_forms():
    image = torch.zeros(1, 3, 4, 4)
    image[:, 0] = 1.0  # pure red
    assert rewards.brightness(image, [""]).item() == pytest.approx(1 / 3)
    # rg = 255, yb = 127.5, no spread: 0.3 * sqrt(255^2 + 127.5^2)
    assert rewards.colorfulness(image, [""]).item() == pytest.approx(0.3 * (255**2 + 127.5**2) ** 0.5, rel=1e-4)
    grey = torch.full((1, 3, 4, 4), 0.5)
    assert rewards.colorfulness(grey, [""]).item() < rewards.colorfulness(image, [""]).item()


def test_clipscore_loads_a_clip_from_a_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from toyworld import world

    torch.manual_seed(0)
    tokenizer = world.build_tokenizer()
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=24, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_attention_heads=2, num_hidden_layers=1), projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # no preprocessor_config.json: OpenAI's mean and std are used
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    score = rewards.clipscore(images, ["a red circle on a white background"] * 2, clip_model=str(tmp_path))
    score.sum().backward()
    assert score.shape == (2,) and images.grad.abs().sum() > 0


# --- One preprocessing, within PREPROCESS_TOLERANCE of each model's own processor ---------------------------


def _smooth_image(h, w):
    """A smooth test picture (PIL's resize and ours agree on smooth content) as a tensor and a PIL image."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = torch.stack([x, y, (x * y).sqrt()]).unsqueeze(0)
    return image, Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy())


def _processed(processor, pil):
    return torch.as_tensor(np.array(processor(images=pil, return_tensors="np")["pixel_values"]))


def test_clip_preprocess_matches_the_real_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    image, pil = _smooth_image(96, 128)
    real = _processed(processor, pil)
    ours = rewards.clip_preprocess(image, 48, processor.image_mean, processor.image_std)
    assert ours.shape == real.shape == (1, 3, 48, 48)
    assert (ours - real).abs().max() < PREPROCESS_TOLERANCE  # measured 0.017 (0.014 for 512 -> 224)


def test_squash_preprocess_matches_the_owlvit_image_processor():
    from transformers import OwlViTImageProcessor

    processor = OwlViTImageProcessor(size={"height": 48, "width": 48})
    image, pil = _smooth_image(96, 128)  # not square: OWL-ViT v1 squashes, keeping no aspect
    real = _processed(processor, pil)
    ours = rewards.clip_preprocess(image, 48, processor.image_mean, processor.image_std, resize_mode="squash")
    assert ours.shape == real.shape == (1, 3, 48, 48)
    assert (ours - real).abs().max() < PREPROCESS_TOLERANCE  # measured 0.016


def test_imagereward_preprocess_matches_the_blip_image_processor():
    from transformers import BlipImageProcessor

    # BlipImageProcessor squashes to its size; ImageReward's own transform is CLIP's (short side, center crop),
    # tested above. On the square pictures Stable Diffusion makes the two are the same resize.
    processor = BlipImageProcessor(size={"height": 48, "width": 48})
    image, pil = _smooth_image(112, 112)
    real = _processed(processor, pil)
    ours = rewards.clip_preprocess(image, 48, rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD)
    assert tuple(processor.image_mean) == rewards.OPENAI_CLIP_MEAN and ours.shape == real.shape == (1, 3, 48, 48)
    assert (ours - real).abs().max() < PREPROCESS_TOLERANCE  # measured 0.013


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_preprocess_matches_open_clip_eval_transforms(resize_mode):
    open_clip = _open_clip()
    # HPS v2 scores with resize_longest_max (long side to 224, centered black padding): open_clip's "longest"
    transform = open_clip.image_transform(48, is_train=False, resize_mode=resize_mode)
    image, pil = _smooth_image(96, 128)
    real = transform(pil).unsqueeze(0)
    ours = rewards.clip_preprocess(image, 48, rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD,
                                   resize_mode=resize_mode)
    assert ours.shape == real.shape == (1, 3, 48, 48)
    assert (ours - real).abs().max() < PREPROCESS_TOLERANCE  # measured 0.014-0.017


# --- The pretrained rewards on tiny random models, loaded through make/check as a hub snapshot would be ------


def _loaded_modules(name, options):
    """The cached models a reward loaded (the loaders are memoised: same arguments, same objects)."""
    model = options.get("reward_model")
    if name == "clipscore":
        return [rewards.load_clip(options["clip_model"], "cpu", torch.float32)[0]]
    if name == "pickscore":
        return [rewards.load_clip(model, "cpu", torch.float32, None)[0]]
    if name == "aesthetic":
        return [rewards.load_clip(options["aesthetic_clip"], "cpu", torch.float32)[0],
                rewards.load_aesthetic_head(model, "cpu")]
    if name == "imagereward":
        return list(rewards.load_imagereward(model, "cpu", torch.float32)[:3])
    if name == "objectness":
        return [rewards.load_owlvit(model, "cpu", torch.float32)[0]]
    return [rewards.load_hps(model, rewards.HPS_VERSION, "cpu", torch.float32)[0]]


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_reward_scores_differentiably_and_the_same_under_no_grad(name, tiny_models, request):
    options = _options(name, tiny_models, request)
    assert rewards.check(name, **options) is True
    fn, differentiable = rewards.make(name, **options)
    assert differentiable
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scores = fn(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        again = fn(images, PROMPTS)
    torch.testing.assert_close(again, scores.detach(), rtol=0, atol=1e-5)
    for module in _loaded_modules(name, options):  # frozen, eval mode: nothing flows into the reward's weights
        assert not module.training and not any(p.requires_grad or p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_reward_runs_its_backbone_in_bf16_and_its_head_in_fp32(name, tiny_models, request):
    options = _options(name, tiny_models, request)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    full = rewards.make(name, **options)[0](images, PROMPTS[:2]).detach()
    half = rewards.make(name, **options, dtype=torch.bfloat16)[0](images, PROMPTS[:2])
    half.sum().backward()
    assert half.dtype == torch.float32 and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert ((half.detach() - full).abs() <= 0.05 * (full.abs() + 1)).all()
    if name == "aesthetic":
        assert rewards.load_clip(options["aesthetic_clip"], "cpu", torch.bfloat16)[0].dtype == torch.bfloat16
        assert rewards.load_aesthetic_head(options["reward_model"], "cpu").layers[0].weight.dtype == torch.float32
    if name == "imagereward":
        vision, text, head, _ = rewards.load_imagereward(options["reward_model"], "cpu", torch.bfloat16)
        assert vision.dtype == text.dtype == torch.bfloat16 and head.layers[0].weight.dtype == torch.float32


def test_models_are_loaded_once_per_process(tiny_models):
    options = {"reward_model": tiny_models["imagereward"]}
    rewards.make("imagereward", **options)
    loaded = rewards.load_imagereward.cache_info().currsize
    fn = rewards.make("imagereward", **options)[0]
    fn(torch.rand(1, 3, 32, 32), ["a"])
    assert rewards.load_imagereward.cache_info().currsize == loaded


def _clip_embeddings(folder, images, prompts, mean=rewards.OPENAI_CLIP_MEAN, std=rewards.OPENAI_CLIP_STD):
    from transformers import AutoTokenizer, CLIPModel

    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    pixels = rewards.clip_preprocess(images, model.config.vision_config.image_size, mean, std)
    ids = tokenizer(prompts, padding=True, return_tensors="pt").input_ids
    image = model.get_image_features(pixel_values=pixels).pooler_output
    return model, image, model.get_text_features(input_ids=ids).pooler_output


def test_pickscore_is_logit_scale_times_cosine(tiny_models):
    images = torch.rand(3, 3, 32, 32)
    model, image, text = _clip_embeddings(tiny_models["clip"], images, PROMPTS)
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text)
    torch.testing.assert_close(rewards.pickscore(images, PROMPTS, reward_model=tiny_models["clip"]), expected)


def test_aesthetic_is_the_head_on_the_unit_clip_embedding(tiny_models):
    images = torch.rand(3, 3, 32, 32)
    _, image, _ = _clip_embeddings(tiny_models["clip768"], images, PROMPTS)
    state = tiny.aesthetic_head_state()
    x = image / image.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # eval mode: the dropouts are identities and there is no activation
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    score = rewards.aesthetic(images, PROMPTS, backbone=tiny_models["clip768"], reward_model=tiny_models["head"])
    torch.testing.assert_close(score, x.squeeze(-1))


def test_imagereward_maps_the_original_checkpoint_keys(tiny_models):
    from transformers import BertTokenizer

    # The reference runs the modules the ORIGINAL-named checkpoint was written from: a weight mapped to the wrong
    # place (or left at its initial value) changes the score.
    vision, text, head = tiny_models["imagereward_modules"]
    images = torch.rand(3, 3, 40, 56)
    tokenizer = BertTokenizer(str(Path(tiny_models["imagereward"]) / "vocab.txt"))
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_tokens = vision(pixel_values=rewards.clip_preprocess(images, 32, rewards.OPENAI_CLIP_MEAN,
                                                                rewards.OPENAI_CLIP_STD)).last_hidden_state
    state = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_tokens,
                 encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long)).last_hidden_state
    expected = (head(state[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    score = rewards.imagereward(images, PROMPTS, reward_model=tiny_models["imagereward"])
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-5)
    _, _, _, ours = rewards.load_imagereward(tiny_models["imagereward"], "cpu", torch.float32)
    assert ours.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tokenizer), len(tokenizer) + 1]


def test_objectness_is_minus_the_largest_box_probability_of_the_query(tiny_models):
    from transformers import AutoTokenizer, OwlViTForObjectDetection

    folder = tiny_models["owlvit"]
    model, tokenizer = OwlViTForObjectDetection.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    images = torch.rand(3, 3, 40, 56)
    pixels = rewards.clip_preprocess(images, 32, *_OPENAI, resize_mode="squash")
    for query in ("book", "castle"):
        ids = tokenizer([query] * 3, padding="max_length", max_length=16, return_tensors="pt")
        logits = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels).logits
        expected = -logits[..., 0].sigmoid().amax(dim=1)
        fn = rewards.make("objectness", reward_model=folder, **({"reward_query": query} if query != "book" else {}))[0]
        torch.testing.assert_close(fn(images, PROMPTS), expected)
    assert not torch.equal(fn(images, PROMPTS), rewards.objectness(images, PROMPTS, reward_model=folder))


def test_hpsv2_is_the_cosine_of_the_checkpoint_model(tiny_hps):
    open_clip = _open_clip()
    folder, model = tiny_hps
    images = torch.rand(3, 3, 40, 56)
    pixels = rewards.clip_preprocess(images, 32, *_OPENAI, resize_mode="longest")
    image, text, _ = model(pixels, open_clip.get_tokenizer("ViT-H-14")(PROMPTS))  # unit features
    torch.testing.assert_close(rewards.hpsv2(images, PROMPTS, reward_model=folder), (image * text).sum(-1),
                               rtol=1e-4, atol=1e-5)


def test_hps_version_chooses_the_v2_0_or_the_v2_1_checkpoint(tiny_hps, tmp_path, capsys):
    """AlignProp and DRaFT scored with HPS v2.0 (HPS_v2_compressed.pt), DRTune with v2.1 (the default): one folder
    (or hub snapshot) holds both, and --hps-version picks the file."""
    open_clip = _open_clip()
    folder = tmp_path / "hps"
    models = {version: tiny.tiny_hps(folder, seed=seed, version=version)[1]
              for version, seed in (("2.0", 1), ("2.1", 0))}
    images = torch.rand(3, 3, 32, 32)
    pixels = rewards.clip_preprocess(images, 32, *_OPENAI, resize_mode="longest")
    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    expected = {}
    for version, model in models.items():
        image, text, _ = model(pixels, tokens)  # unit features
        expected[version] = (image * text).sum(-1)
    assert not torch.allclose(expected["2.0"], expected["2.1"])  # two different models: the test can tell
    for version in ("2.0", "2.1"):
        fn = rewards.make("hpsv2", reward_model=str(folder), hps_version=version)[0]
        torch.testing.assert_close(fn(images, PROMPTS), expected[version], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rewards.make("hpsv2", reward_model=str(folder))[0](images, PROMPTS), expected["2.1"],
                               rtol=1e-4, atol=1e-5)
    only_v21 = tiny_hps[0]  # a folder with HPS_v2.1_compressed.pt alone
    _fails(capsys, lambda: rewards.check("hpsv2", reward_model=only_v21, hps_version="2.0"),
           "no HPS_v2_compressed.pt there")
    _fails(capsys, lambda: rewards.check("hpsv2", reward_model=only_v21, hps_version="2"), "--hps-version 2", "2.0")


# --- The real LAION aesthetic head (the one weight file available offline) ---------------------------------

needs_laion_head = pytest.mark.skipif(not LAION_HEAD.is_file(), reason=f"{LAION_HEAD} is not there")


@needs_laion_head
def test_real_laion_head_loads_strictly_and_is_one_affine_map():
    head = rewards.load_aesthetic_head(str(LAION_HEAD))
    assert set(head.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    w, b = torch.eye(768), torch.zeros(768)
    for i in (0, 2, 4, 6, 7):  # compose the five linear layers: w . e + b
        layer = head.layers[i]
        w, b = layer.weight @ w, layer.weight @ b + layer.bias
    assert b.item() == pytest.approx(5.2366, abs=1e-3) and w.norm().item() == pytest.approx(17.996, abs=1e-2)
    e = torch.nn.functional.normalize(torch.randn(256, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(head.layers(e).squeeze(-1), (e @ w.T + b).squeeze(-1), rtol=0, atol=1e-4)


@needs_laion_head
def test_real_laion_head_scores_a_tiny_clip_end_to_end(tiny_models):
    fn, differentiable = rewards.make("aesthetic", aesthetic_clip=tiny_models["clip768"], reward_model=str(LAION_HEAD))
    images = torch.rand(4, 3, 32, 32).requires_grad_()
    scores = fn(images, [""] * 4)
    scores.sum().backward()
    assert differentiable and ((-12.8 < scores) & (scores < 23.3)).all()  # b -/+ |w| on unit embeddings
    assert images.grad.abs().sum() > 0


# --- --reward: sums, users' functions, errors ------------------------------------------------------------


@pytest.mark.parametrize("spec, terms", [
    ("hpsv2+0.5*clipscore", [(1.0, "hpsv2"), (0.5, "clipscore")]),
    ("aesthetic+-0.1*brightness", [(1.0, "aesthetic"), (-0.1, "brightness")]),
    ("2*symmetry", [(2.0, "symmetry")]),
    ("1e-3*x", [(1e-3, "x")]),
    (" 1.5E+2 * a + .5*b ", [(150.0, "a"), (0.5, "b")]),
    ("my_module:my_fn+dir/file.py:fn", [(1.0, "my_module:my_fn"), (1.0, "dir/file.py:fn")]),
])
def test_parse_reads_weighted_terms(spec, terms):
    assert rewards.parse(spec) == terms


@pytest.mark.parametrize("spec", ["", "+", "a+", "2*", "2**a", "a*2", "*a", "a++b", "0.5 a"])
def test_bad_syntax_is_one_line_and_exit_2(spec, capsys):
    _fails(capsys, lambda: rewards.parse(spec), "[weight*]name")


@pytest.mark.parametrize("spec, names", [
    ("brightness+0.5*colorfulness", ["brightness", "colorfulness"]),
    ("2*symmetry", ["symmetry"]),
    ("1e-3*colorfulness+-0.1*brightness", ["colorfulness", "brightness"]),
    ("aesthetic+-0.1*brightness", ["aesthetic", "brightness"]),
    ("aesthetic+0.01*clipscore", ["aesthetic", "clipscore"]),  # two CLIPs: --aesthetic-clip and --clip-model
    ("pickscore+0.5*imagereward+-2*objectness", ["pickscore", "imagereward", "objectness"]),
])
def test_weighted_sum_is_exactly_the_sum_of_its_parts(spec, names, tiny_models, request):
    options = {name: _options(name, tiny_models, request) for name in names}
    weights = [f"{name}={o['reward_model']}" for name, o in options.items() if "reward_model" in o]
    shared = {"clip_model": "toy", "clip_weight": 0.01}  # the flags every term sees
    shared |= {k: v for o in options.values() for k, v in o.items() if k in ("clip_model", "aesthetic_clip")}
    fn, differentiable = rewards.make(spec, **shared, reward_model=",".join(weights) or None)
    images = torch.rand(3, 3, 32, 32)
    expected = 0
    for weight, name in rewards.parse(spec):
        part = rewards.make(name, **shared, **{k: v for k, v in options[name].items() if k == "reward_model"})[0]
        expected = expected + weight * part(images, PROMPTS)
    assert differentiable and torch.equal(fn(images, PROMPTS), expected)


def test_unknown_reward_is_one_line_and_exit_2(capsys):
    _fails(capsys, lambda: rewards.check("brightness+nope"), "--reward nope: unknown", "hpsv2")


def test_reward_model_is_refused_where_no_term_has_weights(capsys, tiny_models):
    _fails(capsys, lambda: rewards.check("brightness", reward_model="some/model"), "no pretrained weights")
    _fails(capsys, lambda: rewards.check("clipscore", reward_model="some/model"), "--clip-model")
    _fails(capsys, lambda: rewards.check("my_module:fn", reward_model="some/model"), "no pretrained weights")


def test_reward_model_must_name_its_term_when_several_take_weights(capsys, tiny_models):
    spec = "pickscore+imagereward"
    _fails(capsys, lambda: rewards.check(spec, reward_model=tiny_models["clip"]), "several", "name=path")
    _fails(capsys, lambda: rewards.check(spec, reward_model=f"hpsv2={tiny_models['clip']}"), "hpsv2 is not")
    _fails(capsys, lambda: rewards.check(spec, reward_model="pickscore="), "name=path")
    both = f"pickscore={tiny_models['clip']},imagereward={tiny_models['imagereward']}"
    assert rewards.check(spec, reward_model=both)


def test_reward_query_is_refused_without_objectness(capsys):
    _fails(capsys, lambda: rewards.check("brightness", reward_query="cat"), "--reward-query cat", "objectness")


def test_weights_in_the_wrong_shape_are_refused(capsys, tiny_models, tmp_path):
    _fails(capsys, lambda: rewards.check("imagereward", reward_model=str(tmp_path)), "no ImageReward.pt there")
    pt = Path(tiny_models["imagereward"]) / "ImageReward.pt"
    _fails(capsys, lambda: rewards.check("imagereward", reward_model=str(pt)), "needs a folder holding")
    _fails(capsys, lambda: rewards.check("objectness", reward_model=str(tmp_path / "missing")), "no such file")
    _fails(capsys, lambda: rewards.check("pickscore", reward_model=str(tmp_path)), "no config.json there")
    head_file = str(Path(tiny_models["head"]) / "aesthetic-model.pth")  # a .pth file itself is fine
    assert rewards.check("aesthetic", aesthetic_clip=tiny_models["clip768"], reward_model=head_file)


def test_aesthetic_refuses_a_clip_that_is_not_768_wide(capsys, tiny_models):
    clip16 = tiny_models["clip"]
    _fails(capsys, lambda: rewards.check("aesthetic", aesthetic_clip=clip16, reward_model=tiny_models["head"]),
           "768", f"--aesthetic-clip {clip16}", rewards.AESTHETIC_BACKBONE)


def test_aesthetic_backbone_does_not_follow_clip_model(tiny_models):
    """--clip-model is clipscore's and symmetry's CLIP (DRTune's CLIPScore: ViT-H/14); the aesthetic head keeps
    its ViT-L/14, --aesthetic-clip: a 16-d CLIP as --clip-model leaves the aesthetic score unchanged."""
    options = {"aesthetic_clip": tiny_models["clip768"], "reward_model": tiny_models["head"]}
    images = torch.rand(2, 3, 32, 32)
    alone = rewards.make("aesthetic", **options)[0](images, PROMPTS[:2])
    beside = rewards.make("aesthetic", clip_model=tiny_models["clip"], **options)[0](images, PROMPTS[:2])
    torch.testing.assert_close(beside, alone)
    torch.testing.assert_close(alone, rewards.aesthetic(images, PROMPTS[:2], backbone=tiny_models["clip768"],
                                                        reward_model=tiny_models["head"]))


def _write_user_module(folder: Path, name: str):
    (folder / f"{name}.py").write_text(
        "import torch\n\n"
        "def score(images, prompts):\n"
        "    return 2 * images.mean(dim=(1, 2, 3))\n\n"
        "score.differentiable = True\n\n"
        "def ranked(images, prompts):  # not differentiable: numpy, as DDPO's rewards return\n"
        "    return images.detach().mean(dim=(1, 2, 3)).numpy()\n")


def test_user_reward_from_a_module_on_the_path(tmp_path, monkeypatch):
    _write_user_module(tmp_path, "user_reward_on_path")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.check("user_reward_on_path:score") is True
    assert rewards.check("user_reward_on_path:ranked") is False
    assert rewards.check("user_reward_on_path:score+brightness") is True
    assert rewards.check("user_reward_on_path:ranked+brightness") is False
    fn, differentiable = rewards.make("user_reward_on_path:score+-0.5*brightness")
    images = torch.rand(2, 3, 8, 8).requires_grad_()
    total = fn(images, ["a", "b"])
    total.sum().backward()
    torch.testing.assert_close(total, 1.5 * images.detach().mean(dim=(1, 2, 3)))
    assert differentiable and images.grad.abs().sum() > 0


def test_user_reward_from_a_file(tmp_path):
    _write_user_module(tmp_path, "user_reward_file")
    spec = f"{tmp_path}/user_reward_file.py:ranked"
    fn, differentiable = rewards.make(f"{spec}+brightness")
    images = torch.rand(2, 3, 8, 8)
    assert not differentiable
    torch.testing.assert_close(fn(images, ["a", "b"]), 2 * images.mean(dim=(1, 2, 3)))
    assert rewards.check(f"{tmp_path}/user_reward_file.py:score") is True


def test_user_reward_errors_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_reward_broken.py").write_text("import torch\nraise ValueError('no GPU here\\nsecond line')\n")
    _write_user_module(tmp_path, "user_reward_fine")
    monkeypatch.syspath_prepend(str(tmp_path))
    _fails(capsys, lambda: rewards.check("user_reward_broken:score"), "ValueError: no GPU here")
    _fails(capsys, lambda: rewards.check(f"{tmp_path}/user_reward_broken.py:score"), "ValueError: no GPU here")
    _fails(capsys, lambda: rewards.check("user_reward_fine:missing"), "has no function missing")
    _fails(capsys, lambda: rewards.check("no_such_module_xyz:fn"), "ModuleNotFoundError")
    _fails(capsys, lambda: rewards.check(f"{tmp_path}/absent.py:fn"), "no such file")
    _fails(capsys, lambda: rewards.check("user_reward_fine:"), "module:function")


# --- Offline: a model that is not there fails at once, in one line, naming it ------------------------------


@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache (whatever this machine has cached)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def _offline_cases():
    def opened(name, **options):
        return lambda models: (name, {k: models.get(v, v) for k, v in options.items()})

    return {  # id -> (reward and options, the model the line must name)
        "aesthetic-head": (opened("aesthetic", aesthetic_clip="clip768"), rewards.AESTHETIC_HEAD),
        "aesthetic-clip": (opened("aesthetic", aesthetic_clip=rewards.AESTHETIC_BACKBONE, reward_model="head"),
                           rewards.AESTHETIC_BACKBONE),
        "clipscore": (opened("clipscore", clip_model="openai/clip-vit-large-patch14"), "openai/clip-vit-large-patch14"),
        "pickscore": (opened("pickscore"), rewards.PICKSCORE),
        "pickscore-tokenizer": (opened("pickscore", reward_model="clip_without_tokenizer"),
                                rewards.PICKSCORE_PROCESSOR),
        "hpsv2": (opened("hpsv2"), rewards.HPS),
        "hpsv2.0": (opened("hpsv2", hps_version="2.0"), "HPS_v2_compressed.pt"),
        "imagereward": (opened("imagereward"), rewards.IMAGEREWARD),
        "imagereward-vocab": (opened("imagereward", reward_model="imagereward_without_vocab"), rewards.BERT),
        "objectness": (opened("objectness"), rewards.OWLVIT),
    }


@pytest.mark.parametrize("case", list(_offline_cases()))
def test_offline_missing_model_fails_fast_in_one_line(case, tiny_models, empty_offline_cache, capsys):
    build, model = _offline_cases()[case]
    name, options = build(tiny_models)
    if name == "hpsv2":
        _open_clip()  # without it the line names the extra instead (tested below)
    start = time.monotonic()
    err = _fails(capsys, lambda: rewards.check(name, **options), model, "hf download")
    assert time.monotonic() - start < 20  # a behaviour (no waiting on the network), not a benchmark
    assert "--reward-model" in err or "--clip-model" in err or "--aesthetic-clip" in err or "put" in err


def test_make_fails_as_check_does(tiny_models, empty_offline_cache, capsys):
    _fails(capsys, lambda: rewards.make("imagereward"), rewards.IMAGEREWARD, "hf download")


def test_unreachable_hub_without_offline_flag_fails_fast(tiny_models, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://localhost")  # port 443 of this machine: refused at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    _fails(capsys, lambda: rewards.check("objectness"), rewards.OWLVIT, "cannot be reached")
    assert time.monotonic() - start < 20


def test_hpsv2_without_open_clip_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    _fails(capsys, lambda: rewards.check("hpsv2"), 'pip install -e ".[hps]"')


# --- Every new reward in the scripts: one iteration of drtune.py and ddpo.py, and clean offline failures -------


@pytest.mark.parametrize("script", ["drtune", "ddpo"])
@pytest.mark.parametrize("name", PRETRAINED)
def test_each_pretrained_reward_runs_one_iteration_of_a_script(script, name, tiny_models, request, tmp_path,
                                                                monkeypatch):
    """Through main(), as a user's command line: the tiny reward model passed by --reward-model / --clip-model /
    --aesthetic-clip."""
    import importlib

    options = _options(name, tiny_models, request)
    flags = ["--model", "embedded-tiny-sd", "--reward", name, "--iters", "1", "--num-steps", "2", "--batch-size", "2",
             "--eval-size", "2", "--eval-num-steps", "2", "--threads", "1", "--run-dir", str(tmp_path / "run")]
    flags += ["--K", "1", "--early-stop", "1"] if script == "drtune" else ["--sample-batches", "1", "--samples-per-prompt", "1"]
    if "clip_model" in options:
        flags += ["--clip-model", options["clip_model"]]
    if "aesthetic_clip" in options:
        flags += ["--aesthetic-clip", options["aesthetic_clip"]]
    if "reward_model" in options:
        flags += ["--reward-model", options["reward_model"]]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags])
    importlib.import_module(script).main()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["final"]
    assert all(math.isfinite(rows[0][k]) for k in ("reward_mean", "loss", "eval_reward_mean"))
    assert math.isfinite(rows[1]["eval_reward_mean"])


@pytest.mark.parametrize("name", ["aesthetic"] + [pytest.param(name, marks=pytest.mark.slow)  # a process each: ~9 s
                                  for name in ("pickscore", "hpsv2", "imagereward", "objectness", "clipscore")])
def test_a_new_reward_without_its_weights_fails_cleanly_offline_from_the_command_line(name, tmp_path):
    """`python drtune.py --reward NAME` with nothing downloaded: exit 2, one line naming what is missing, fast."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    flags = ["--clip-model", rewards.AESTHETIC_BACKBONE] if name == "clipscore" else []
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "drtune.py"), "--reward", name, *flags,
                             "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert time.monotonic() - start < 60
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert ("hf download" in lines[0] or 'pip install -e ".[hps]"' in lines[0]) and not (tmp_path / "run").exists()
