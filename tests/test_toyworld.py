import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from toyworld import check, world
from toyworld.train import zero_shot_accuracy

CLIP_DIR = world.__file__.rsplit("/", 1)[0] + "/clip"


classify = world.classify


def test_drawings_match_their_captions_pixel_for_pixel():
    rng = np.random.default_rng(0)
    for k in world.all_combinations() * 4:
        image = torch.from_numpy(world.draw(*k, rng))
        assert image.shape == (3, world.SIZE, world.SIZE) and 0 <= image.min() and image.max() <= 1
        assert classify(image) == k


def test_held_out_combinations_are_only_in_the_eval_prompts():
    train, held_out = world.prompt_sets()
    assert len(train) + len(held_out) == len(world.all_combinations()) and not set(train) & set(held_out)
    assert held_out == [world.caption(*k) for k in world.HELD_OUT]


def test_tokenizer_has_one_token_per_word():
    tokenizer = world.build_tokenizer()
    ids = tokenizer("a yellow triangle on a black background").input_ids
    assert len(ids) == 7 + 2  # bos, seven words, eos
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in "a yellow triangle on a black background".split()]


def test_toy_clip_zero_shot_accuracy_on_new_drawings():
    model = CLIPModel.from_pretrained(CLIP_DIR, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_DIR)
    accuracy = zero_shot_accuracy(model, tokenizer, n=240, seed=2026)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_toy_stable_diffusion_draws_what_the_prompt_says():
    """~100 samples over the caption grammar (fixed noise), checked by the pixel classifier world.classify."""
    import common
    import hub
    from rewards import brightness

    pipe = common.load_pipeline(hub.TOY_MODEL)  # the default --model of every script
    combos = world.all_combinations() * 4
    _, images = common.evaluate(pipe, [world.caption(*k) for k in combos], brightness, num_steps=30,
                                guidance_scale=5.0, resolution=world.SIZE, batch_size=32)
    hits = torch.tensor([[a == b for a, b in zip(classify(image), k)] for k, image in zip(combos, images)]).float()
    colour, shape, background = hits.mean(dim=0).tolist()
    assert background >= 0.95 and colour >= 0.95 and shape >= 0.90, (colour, shape, background)


def test_check_refuses_bad_input_in_one_line_before_loading_anything(tmp_path, monkeypatch, capsys):
    """Also a damaged LoRA in a run directory: diffusers' loader raised it as a traceback after the model loaded."""
    corrupt = tmp_path / "lora.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json and no tensors")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "pytorch_lora_weights.safetensors").write_bytes(corrupt.read_bytes())
    cases = [(["--n", "0"], "--n must be at least 1"), (["--num-steps", "0"], "--num-steps"),
             (["--lora", str(corrupt)], f"--lora {corrupt}: not a LoRA file"),
             (["--lora", str(run_dir)], f"--lora {run_dir}: not a LoRA file"),
             (["--n", "many"], "--n"), (["--prompts", "simple_animals"], "not a toy caption"),
             (["--grid", str(tmp_path / "no" / "grid.png")], "--grid")]
    monkeypatch.setattr(check.common, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    for flags, needle in cases:
        monkeypatch.setattr("sys.argv", ["check.py", *flags])
        with pytest.raises(SystemExit) as stop:
            check.main()
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, \
            (flags, err)
