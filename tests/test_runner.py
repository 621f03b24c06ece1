"""What a run leaves for the tools researchers use: W&B tracking (--track, tested offline with a real wandb), the eval
grids in TensorBoard, the model card (README.md) whose snippet loads the LoRA, and `accelerate launch` giving what
torchrun gives. The rest of runner.py (flags, checks, checkpoints, resume) is tested in test_common.py."""

import base64
import hashlib
import importlib
import json
import os
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hub
import runner
from test_common import DDP_METHODS, ROOT, TINY_RUN, finish, launch, lora, metrics, torchrun

DRTUNE = ["--num-steps", "4", "--K", "2", "--early-stop", "1", "--batch-size", "2"]
TRACKED = [*TINY_RUN[:-2], *DRTUNE, "--track", "--wandb-project-name", "tests"]


def run_main(script, argv):
    sys.argv = [script, *argv]
    importlib.import_module(Path(script).stem).main()


def wandb_env(monkeypatch, folder: Path):
    """A real wandb, offline: everything it writes under `folder` (its runs in folder/wandb), nothing reaches out."""
    for name, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_CONFIG_DIR", "config")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(folder / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # in-process: leave pytest's capture of stdout and stderr alone
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_records(offline_run: Path):
    """The records of an offline run's run-<id>.wandb (W&B's log: a 7-byte header, then LevelDB-style chunks of at
    most 32 KiB blocks, each with a 7-byte header of checksum, length and type; full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = offline_run.glob("run-*.wandb")
    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def wandb_run(offline_run: Path) -> dict:
    """An offline run as plain data: its run record, config, history rows (without W&B's own _ keys) and artifacts."""
    out = {"run": None, "config": {}, "history": [], "artifacts": []}
    for record in wandb_records(offline_run):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"] |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "artifact":
            out["artifacts"].append(record.artifact)
    return out


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A tracked 2-iteration DRTune run, resumed to 3 (offline W&B); an untracked 3-iteration run beside it."""
    base = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        wandb_env(mp, base / "wb")
        mp.setattr(sys, "argv", list(sys.argv))
        run_main("drtune.py", [*TRACKED, "--iters", "2", "--run-dir", str(base / "run")])
        first = {"rows": metrics(base / "run"), "lora_md5": md5_b64(base / "run" / "pytorch_lora_weights.safetensors"),
                 "card": (base / "run" / "README.md").read_text(), "grids": {
                     p.name: pixels(p) for p in (base / "run").glob("eval_*.png")}}
        run_main("drtune.py", ["--resume", str(base / "run"), "--iters", "3"])
        run_main("drtune.py", [*TINY_RUN[:-2], *DRTUNE, "--iters", "3", "--run-dir", str(base / "plain")])
    return types.SimpleNamespace(dir=base / "run", plain=base / "plain", wandb=base / "wb" / "wandb", first=first)


# --- --track: Weights & Biases -------------------------------------------------------------------------------


def test_track_without_wandb_fails_in_one_line_naming_the_extra_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as stop:
        run_main("drtune.py", [*TRACKED, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --track") and '".[track]"' in err and "wandb" in err
    assert not (tmp_path / "run").exists()


def test_track_without_a_login_fails_in_one_line_before_any_work(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "drtune.py"), *TRACKED, "--run-dir", str(tmp_path / "run")],
                            cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--track" in result.stderr and "wandb login" in result.stderr and "WANDB_MODE=offline" in result.stderr
    assert not (tmp_path / "run").exists()


def test_track_logs_settings_every_row_the_grids_and_the_lora_offline_and_resume_continues_the_run(tracked):
    meta = json.loads((tracked.dir / "args.json").read_text())["_meta"]
    run_id = meta["wandb_run_id"]
    first, second = sorted(tracked.wandb.glob("offline-run-*"))  # the first start, then the --resume
    assert first.name.endswith(run_id) and second.name.endswith(run_id)  # the same W&B run, continued
    started, resumed = wandb_run(first), wandb_run(second)
    for part in (started, resumed):
        assert part["run"].run_id == run_id and part["run"].display_name == tracked.dir.name
        assert part["run"].project == "tests"
    # the config: the resolved settings and their _meta (auto resolved, as args.json records them)
    config = started["config"]
    assert config["K"] == 2 and config["eval_num_steps"] == 3 and config["clip_model"] == hub.TOY_MODEL
    assert config["_meta"]["script"] == "drtune.py" and config["_meta"]["wandb_run_id"] == run_id
    assert resumed["config"]["_meta"]["resumed_at"] == 2 and resumed["config"]["_meta"]["wandb_run_id"] == run_id
    # every metrics row, as metrics.jsonl has it: the first start's, then the resumed iterations'
    for part, rows in ((started, tracked.first["rows"]), (resumed, metrics(tracked.dir)[2:])):
        history = [{k: v for k, v in h.items() if not k.startswith("eval_grid")} for h in part["history"]]
        assert [{k: h.get(k) for k in row} for h, row in zip(history, rows)] == rows and len(history) == len(rows)
    # the eval grids: the same pixels as the run directory's, at the rows that evaluated
    for part, grids in ((started, tracked.first["grids"]), (resumed, None)):
        logged = {h["iter"]: h["eval_grid/path"] for h in part["history"] if "eval_grid/path" in h}
        assert sorted(logged) == [r["iter"] for r in (tracked.first["rows"] if grids else metrics(tracked.dir)[2:])
                                  if "eval_reward_mean" in r]
        folder = first if grids else second
        for it, path in logged.items():
            expected = grids[f"eval_{it:05d}.png"] if grids else pixels(tracked.dir / f"eval_{it:05d}.png")
            assert np.array_equal(pixels(folder / "files" / path), expected)
    # the LoRA as a model artifact at each end, the file it had then
    for part, digest in ((started, tracked.first["lora_md5"]),
                         (resumed, md5_b64(tracked.dir / "pytorch_lora_weights.safetensors"))):
        (artifact,) = part["artifacts"]
        assert artifact.name == f"lora-{run_id}" and artifact.type == "model"
        files = {entry.path: entry.digest for entry in artifact.manifest.contents}
        assert files["pytorch_lora_weights.safetensors"] == digest and {"README.md", "args.json"} <= set(files)


def test_a_tracked_run_computes_what_an_untracked_one_does(tracked):
    assert metrics(tracked.dir) == metrics(tracked.plain)
    a, b = lora(tracked.dir), lora(tracked.plain)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "wandb_run_id" not in json.loads((tracked.plain / "args.json").read_text())["_meta"]


# --- TensorBoard: the eval grids as images -------------------------------------------------------------------


def test_tensorboard_holds_the_eval_grids_as_images_at_their_iterations(tracked):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(tracked.dir), size_guidance={IMAGES: 0})
    events.Reload()
    images = events.Images("eval_grid")
    evaluated = [r["iter"] for r in metrics(tracked.dir) if "eval_reward_mean" in r]
    assert [image.step for image in images] == evaluated == [0, 2, 3]  # the resume purged the first start's step 2
    for image in images:
        from io import BytesIO

        drawn = np.asarray(Image.open(BytesIO(image.encoded_image_string)).convert("RGB"))
        assert np.array_equal(drawn, pixels(tracked.dir / f"eval_{image.step:05d}.png"))
    assert events.Scalars("eval_reward_mean")[-1].value == pytest.approx(metrics(tracked.dir)[-1]["eval_reward_mean"])


# --- the model card ------------------------------------------------------------------------------------------


def test_the_model_card_describes_the_run_and_its_snippet_loads_the_lora(tracked, embedded_dir):
    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard
    from peft.utils import get_peft_model_state_dict

    path = tracked.dir / "README.md"
    card, rows = path.read_text(), metrics(tracked.dir)
    data = ModelCard.load(path).data.to_dict()  # the front matter as the Hub reads it
    assert data["library_name"] == "diffusers" and "base_model" not in data  # the embedded model is no hub id
    assert {"lora", "text-to-image", "drtune", "arxiv:2405.00760"} <= set(data["tags"])
    assert "Deep Reward Supervisions for Tuning Text-to-Image Diffusion Models" in card
    assert "`tests/user_rewards.py:brightness`" in card and "| `--K` | 2 |" in card
    # the command the run was started with (not the --resume that finished it)
    assert f"`python drtune.py {' '.join(TRACKED[:4])}" in card and "--resume" not in card.split("## Use it")[0]
    # the eval reward before and after, and the last grid, linked relative to the folder
    assert f"{rows[0]['eval_reward_mean']:.4f}" in card and f"{rows[-1]['eval_reward_mean']:.4f}" in card
    assert "after 3 iterations |" in card and "after 2 iterations |" in tracked.first["card"]
    (grid,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert grid == "eval_00003.png" and (tracked.dir / grid).is_file()

    # the snippet, run as written, with the embedded model's folder in its place, as the card says
    (snippet,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippet.strip().splitlines()) == 3
    assert "put that folder's path in place of `embedded-tiny-sd`" in card
    namespace = {}
    exec(snippet.replace(json.dumps(hub.EMBEDDED_MODEL), json.dumps(str(embedded_dir))), namespace)
    pipe = namespace["pipe"]
    assert pipe.get_active_adapters()  # loaded, with the run's weights
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    saved = {k.removeprefix("unet."): v for k, v in lora(tracked.dir).items()}
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)

    def draw():
        return pipe("a red circle on a white background", num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    tuned = draw()
    pipe.disable_lora()
    base = draw()
    assert (tuned - base).abs().max() > 1e-4  # the LoRA changes the picture
    assert torch.equal(base, DiffusionPipeline.from_pretrained(str(embedded_dir))(
        "a red circle on a white background", num_inference_steps=3, output_type="pt",
        generator=torch.Generator().manual_seed(0)).images)  # and nothing else does


def fake_run(tmp_path, model, rows, ranks=1, xl=False):
    import drtune

    args = drtune.Args(model=model, clip_model=hub.REAL_CLIP, prompts="general", run_dir=str(tmp_path))
    return types.SimpleNamespace(
        args=args, meta={"started_with": ["drtune.py", "--model", model], "ranks": ranks, "global_batch": 8 * ranks},
        unet=types.SimpleNamespace(config={"addition_embed_type": "text_time" if xl else None}), script="drtune.py",
        script_file=str(ROOT / "drtune.py"), name="drtune", rows=rows, dir=tmp_path, next_iter=rows[-1]["iter"])


@pytest.mark.parametrize("model, xl, license", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", False, "creativeml-openrail-m"),
    ("stabilityai/stable-diffusion-xl-base-1.0", True, "openrail++"),
    ("someone/a-merge", False, None),
])
def test_the_card_of_a_hub_model_names_it_as_base_model_with_its_licence(model, xl, license, tmp_path):
    from huggingface_hub import ModelCard

    rows = [{"iter": 0, "eval_reward_mean": 5.25, "eval_reward_std": 0.5}, {"iter": 1},
            {"iter": 2, "eval_reward_mean": 5.75, "eval_reward_std": 0.25}]  # a checkpoint mid-run: no final row
    card = runner.model_card(fake_run(tmp_path, model, rows, ranks=2, xl=xl))
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == model and data.get("license") == license
    assert ("stable-diffusion-xl" in data["tags"]) == xl
    assert f'DiffusionPipeline.from_pretrained("{model}")' in card
    assert (license is None) == ("add it as `license:`" in card)
    assert "`torchrun --nproc-per-node 2 drtune.py --model" in card and "| global batch | 16 (2 ranks) |" in card
    assert "| after 2 iterations (so far) | 5.7500 ± 0.2500 |" in card and "| before (iteration 0) | 5.2500" in card


# --- accelerate launch ---------------------------------------------------------------------------------------


def accelerate(script, *flags, env=None):
    """`accelerate launch` of 2 processes on the CPU (its multi-GPU launcher is torchrun's, run in-process; no GPU
    is needed), on a free port, no config file."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(ROOT / script), *flags]
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


@pytest.mark.slow  # two 2-process launches per method: ~50 s each on one core
@pytest.mark.parametrize("method", ["drtune", "ddpo"])
def test_accelerate_launch_gives_the_lora_torchrun_gives(method, tmp_path):
    script, *flags = DDP_METHODS[method]
    flags = [*TINY_RUN[:-2], *flags, "--iters", "2", "--batch-size", "1"]
    if method == "drtune":  # tracked, offline: rank 0 alone logs to W&B
        flags += ["--track"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for name in ("accelerate", "torchrun"):
        (tmp_path / f"wb_{name}").mkdir()
    runs = {name: launcher(script, *flags, "--run-dir", str(tmp_path / name),
                           env=env | {"WANDB_DIR": str(tmp_path / f"wb_{name}"), "WANDB_DATA_DIR": str(tmp_path / "d"),
                                      "WANDB_CACHE_DIR": str(tmp_path / "c"), "WANDB_CONFIG_DIR": str(tmp_path / "c")})
            for name, launcher in (("accelerate", accelerate), ("torchrun", torchrun))}
    for name, process in runs.items():
        result = finish(process)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert "2 ranks, global batch 2" in result.stderr
    assert metrics(tmp_path / "accelerate") == metrics(tmp_path / "torchrun")
    a, b = lora(tmp_path / "accelerate"), lora(tmp_path / "torchrun")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    if method == "drtune":
        for name in runs:
            assert len(list((tmp_path / f"wb_{name}" / "wandb").glob("offline-run-*"))) == 1  # rank 0's only
