import io

import numpy as np
import pytest
import torch
from PIL import Image

import rewards

DIFFERENTIABLE = [name for name, (_, d) in rewards.REWARDS.items() if d]


def test_table_marks_the_jpeg_size_rewards_as_not_differentiable():
    assert not rewards.REWARDS["jpeg_compressibility"][1]
    assert not rewards.REWARDS["jpeg_incompressibility"][1]
    assert set(DIFFERENTIABLE) == {"symmetry", "clipscore", "compression", "brightness", "colorfulness"}


@pytest.mark.parametrize("name", list(rewards.REWARDS))
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


def test_clip_preprocess_matches_the_real_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    y, x = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 128), indexing="ij")
    image = torch.stack([x, y, (x * y).sqrt()]).unsqueeze(0)  # smooth, so PIL's resize and ours agree
    array = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    real = torch.as_tensor(np.array(processor(images=Image.fromarray(array), return_tensors="np")["pixel_values"]))
    ours = rewards.clip_preprocess(image, 48, processor.image_mean, processor.image_std)
    assert ours.shape == real.shape == (1, 3, 48, 48)
    assert (ours - real).abs().max() < 0.05


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
