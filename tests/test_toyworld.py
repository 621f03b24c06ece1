import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from transformers import CLIPModel, CLIPTokenizer

from rewards import _projected

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

    pipe = common.load_pipeline(hub.TOY_MODEL)  # the toy Stable Diffusion (`--model toy`)
    combos = world.all_combinations() * 4
    _, images = common.evaluate(pipe, [world.caption(*k) for k in combos], brightness, num_steps=30,
                                guidance_scale=5.0, resolution=world.SIZE, batch_size=32)
    hits = torch.tensor([[a == b for a, b in zip(classify(image), k)] for k, image in zip(combos, images)]).float()
    colour, shape, background = hits.mean(dim=0).tolist()
    assert background >= 0.95 and colour >= 0.95 and shape >= 0.90, (colour, shape, background)


def test_toy_flow_model_draws_what_the_prompt_says():
    """The toy flow world (toyworld/flow, an SD3-style flow-matching model), sampled by the ODE through the scripts'
    own path: the same ~100 captions and classifier, the same bar."""
    import common
    import hub
    from rewards import brightness

    pipe = common.load_pipeline(hub.TOY_FLOW_MODEL)
    assert common.is_flow(pipe.scheduler) and pipe.text_encoder_3 is None
    combos = world.all_combinations() * 4
    protocol = common.EVAL_PROTOCOL["toy"]
    _, images = common.evaluate(pipe, [world.caption(*k) for k in combos], brightness, resolution=world.SIZE,
                                batch_size=32, **protocol)
    hits = torch.tensor([[a == b for a, b in zip(classify(image), k)] for k, image in zip(combos, images)]).float()
    colour, shape, background = hits.mean(dim=0).tolist()
    assert background >= 0.95 and colour >= 0.95 and shape >= 0.90, (colour, shape, background)


def test_a_toy_flow_run_saves_a_lora_its_model_cards_snippet_loads(tmp_path, monkeypatch):
    """drtune.py --model toy-flow: the LoRA on the transformer, the card's snippet (run from the repository root, as
    the card says) loads the toy flow model without T5 and the LoRA into diffusers' own pipeline."""
    import re
    import sys

    import drtune

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["drtune.py", "--model", "toy-flow", "--iters", "1", "--num-steps", "4", "--K", "2",
                                      "--early-stop", "1", "--batch-size", "2", "--eval-size", "2", "--eval-num-steps",
                                      "3", "--threads", "1", "--run-dir", str(run)])
    drtune.main()
    card = (run / "README.md").read_text()
    assert "stable-diffusion-3" in card and "transformer" in card
    (snippet,) = re.findall(r"```python\n(.*?)```", card, re.S)
    monkeypatch.chdir(CLIP_DIR.rsplit("/", 2)[0])
    scope = {}
    exec(snippet, scope)
    (adapter,) = scope["pipe"].transformer.peft_config.values()
    assert adapter.r == drtune.Args.lora_rank


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


# --- the toy flow world's files (toyworld/train_flow.py wrote them) -----------------------------------------------

TOY = Path(world.__file__).resolve().parent
FLOW, CLIP = TOY / "flow", TOY / "clip"
CAPTIONS = ["a red triangle on a black background", ""]


@pytest.fixture(scope="module")
def flow():
    # model_index.json records text_encoder_3/tokenizer_3 as null; diffusers wants them named at load time
    return StableDiffusion3Pipeline.from_pretrained(FLOW, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)


def test_folder_is_an_sd3_pipeline_without_t5():
    index = json.loads((FLOW / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert sum(f.stat().st_size for f in FLOW.rglob("*") if f.is_file()) <= 10 * 2**20


def test_conditioning_contract_shapes(flow):
    assert isinstance(flow.scheduler, FlowMatchEulerDiscreteScheduler) and flow.tokenizer_max_length == 16
    assert flow.vae.config.shift_factor == 0.0
    embeds, _, pooled, _ = flow.encode_prompt(prompt=CAPTIONS, prompt_2=CAPTIONS, prompt_3=CAPTIONS, device="cpu",
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=flow.tokenizer_max_length)
    assert embeds.shape == (2, 32, 128) and pooled.shape == (2, 128)
    assert not embeds[:, 16:].any()  # the 16 zero "T5" tokens
    side = world.SIZE // flow.vae_scale_factor
    x = torch.randn(2, flow.transformer.config.in_channels, side, side)
    sigma = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        v = flow.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                             pooled_projections=pooled).sample
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_clip_encoders_are_the_toy_clip_text_tower(flow):
    clip = CLIPModel.from_pretrained(CLIP, dtype=torch.float32).eval()
    ids = flow.tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    for encoder, tokenizer in [(flow.text_encoder, flow.tokenizer), (flow.text_encoder_2, flow.tokenizer_2)]:
        state = encoder.state_dict()
        for name, weight in clip.text_model.state_dict().items():
            assert torch.equal(state["text_model." + name], weight), name
        assert torch.equal(state["text_projection.weight"], clip.text_projection.weight)
        assert tokenizer.get_vocab() == flow.tokenizer.get_vocab() and tokenizer.model_max_length == 16
        with torch.no_grad():
            assert torch.equal(encoder(ids).text_embeds, _projected(clip.get_text_features(input_ids=ids)))
