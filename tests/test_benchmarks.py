"""benchmarks/: full-size Stable Diffusion 1.5 with random weights through every script, the GPU benchmark's CPU
mode (--small), and the FLOP counts behind its MFU against torch's FlopCounterMode."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import common
from benchmarks import gpu, sd_arch

ROOT = Path(__file__).resolve().parents[1]
FLOP_TOLERANCE = 1e-3  # the analytic UNet count vs FlopCounterMode (they agree exactly today)


def run(*command, timeout=900):
    """A repository script through its command line, offline."""
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="session")
def sd15_build(tmp_path_factory):
    """Stable Diffusion 1.5 with random weights, written once per session by the CLI with its finiteness check
    (in a subprocess: this process keeps none of its memory); 2.1 GB, removed at the end. -> (folder, stdout)"""
    path = tmp_path_factory.mktemp("sd15") / "model"
    if shutil.disk_usage(path.parent).free < 4e9:
        pytest.fail(f"less than 4 GB free in {path.parent} for the 2.1 GB SD 1.5 model")
    result = run("benchmarks/sd_arch.py", "--arch", "sd15", "--out", str(path), "--check", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    yield path, result.stdout
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sd15_dir(sd15_build):
    return sd15_build[0]


# ---------------------------------------------------------------------------------------------
# sd_arch.py
# ---------------------------------------------------------------------------------------------


def test_sd15_configs_have_the_known_parameter_counts():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_arch.SD15_UNET)
        vae = AutoencoderKL(**sd_arch.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**sd_arch.SD15_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def test_char_tokenizer_uses_clips_ids():
    tokenizer = sd_arch.char_clip_tokenizer()
    ids = tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    # CLIP's own ids for these byte tokens: "a" 64, "a</w>" 320, start 49406, end (and padding) 49407
    assert ids[:6] == [49406, 320, 66, 64, 339, 49407] and len(ids) == 77 and set(ids[6:]) == {49407}
    long = tokenizer(["x" * 200], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(long) == 77 and max(long) < 49408


@pytest.mark.slow
def test_sd15_folder_is_fp16_on_disk_and_finite_in_fp32_and_bf16(sd15_build):
    path, stdout = sd15_build
    with safe_open(str(path / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    config = json.loads((path / "unet" / "config.json").read_text())
    assert config["cross_attention_dim"] == 768 and config["block_out_channels"] == [320, 640, 1280, 1280]
    # --check: text encoder, a CFG UNet call and a VAE decode loaded back in each dtype, all finite
    assert "float32 at 64 px: finite" in stdout and "bfloat16 at 64 px: finite" in stdout, stdout


@pytest.mark.slow  # a process that imports diffusers: ~9 s
def test_sd_arch_bad_input_is_one_line_exit_2(tmp_path):
    result = run("benchmarks/sd_arch.py", "--arch", "nope", "--out", str(tmp_path / "x"), timeout=120)
    assert result.returncode == 2 and "--arch" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Every script, one iteration, on the full-size SD 1.5 architecture (fp16 on disk, fp32 on the CPU, 64 px)
# (the evaluations before and after at T = 2: the SD protocol's T = 50 would be most of the time)
# ---------------------------------------------------------------------------------------------

# Rewards that need no CLIP download; sizes at the scripts' minimum that their defaults allow.
SD15_RUNS = {
    "ddpo.py": {"--estimator": "is", "--reward": "jpeg_compressibility", "--samples-per-prompt": "1"},
    "rwr.py": {"--reward": "jpeg_compressibility", "--batch-size": "2"},  # 1 x 4 batches cannot form groups of 8
    "d3po.py": {"--reward": "jpeg_compressibility"},
    "draft.py": {"--reward": "brightness", "--K": "1", "--lv": "1"},
    "refl.py": {"--reward": "brightness", "--num-steps": "5"},  # its default stop range [1, 5] needs T >= 5
    "alignprop.py": {"--reward": "brightness"},
    "drtune.py": {"--reward": "symmetry", "--clip-weight": "0", "--num-steps": "4", "--K": "2"},  # m = 3 < T
}


@pytest.mark.slow  # the 2.1 GB SD 1.5 build and a full-size UNet on the CPU: minutes
@pytest.mark.parametrize("script", list(SD15_RUNS))
def test_every_script_runs_one_iteration_on_sd15(script, sd15_dir, tmp_path):
    flags = {"--model": str(sd15_dir), "--iters": "1", "--batch-size": "1", "--num-steps": "2", "--resolution": "64",
             "--eval-size": "2", "--eval-every": "0", "--eval-num-steps": "2", "--run-dir": str(tmp_path / "run"),
             "--device": "cpu", "--dtype": "fp32", "--threads": "1", "--prompts": "simple_animals"} | SD15_RUNS[script]
    result = run(script, *[x for pair in flags.items() for x in pair], timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r.get("final")]
    assert len(trained) == 1
    assert math.isfinite(trained[0]["reward_mean"]) and math.isfinite(trained[0]["loss"])


# ---------------------------------------------------------------------------------------------
# FLOPs: the analytic UNet count used for MFU vs FlopCounterMode (meta device: no weights, no memory)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,height,width,rank,targets", [
    ("sd15", 64, 64, 4, common.LORA_TARGETS),  # 512 px
    ("sd15", 64, 48, 8, "to_q,to_k,to_v,to_out.0"),  # 512 x 384, attention-only LoRA
    ("tiny", 16, 16, 8, common.LORA_TARGETS),
])
def test_analytic_unet_flops_match_flop_counter(arch, height, width, rank, targets, embedded_dir):
    config = (dict(sd_arch.SD15_UNET) if arch == "sd15"
              else dict(UNet2DConditionModel.load_config(embedded_dir / "unet")))
    checks = gpu.check_unet_count(config, height, width, rank, targets)
    for what, (analytic, counted) in checks.items():
        assert abs(analytic / counted - 1) < FLOP_TOLERANCE, (what, analytic, counted)
    if (arch, height, width) == ("sd15", 64, 64):  # the reference's 803.3 GFLOP per 512 px forward
        assert abs(checks["forward"][1] / 803.3e9 - 1) < 1e-3


def test_lightweight_counter_equals_flop_counter_mode(pipe):
    """gpu.FlopCount (used around whole script runs) reports what FlopCounterMode reports."""
    common.add_lora(pipe.unet, 4)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    cond = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)

    def step():
        out = common.unet_output(pipe.unet, x, torch.tensor(500), cond, torch.zeros_like(cond), 7.5)
        common.decode(pipe.vae, out).mean().backward()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as reference:
        step()
    with sdpa_kernel(SDPBackend.MATH), gpu.FlopCount() as light:
        step()
    assert light.total == reference.get_total_flops() > 0


# ---------------------------------------------------------------------------------------------
# gpu.py --small: the benchmark's code on the tiny model on the CPU
# ---------------------------------------------------------------------------------------------

TABLE_FIELDS = {"method", "status", "rollout_images_per_s_b1", "rollout_images_per_s_best", "rollout_best_batch",
                "train_batch_first", "train_s_per_iter_first", "train_samples_per_iter_first", "train_best_batch",
                "train_s_per_iter_best", "train_samples_per_s_best", "peak_mem_gib_first", "max_batch",
                "mfu_first", "mfu_best", "model_flops_per_iter_first", "flop_check_rel_error"}


@pytest.mark.slow  # every method and variant at growing batches: minutes
def test_gpu_benchmark_small_runs_every_method_on_the_cpu(tmp_path):
    result = run("benchmarks/gpu.py", "--small", "--out-dir", str(tmp_path / "out"), "--work-dir",
                 str(tmp_path / "work"), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-cpu-small.json").read_text())
    table = (tmp_path / "out" / "gpu-cpu-small.md").read_text()
    assert [row["method"] for row in report["table"]] == list(gpu.VARIANTS)
    for row in report["table"]:
        assert set(row) == TABLE_FIELDS and row["status"] == "ok", row
        assert row["train_s_per_iter_first"] > 0 and row["train_samples_per_iter_first"] >= 1
        assert row["rollout_images_per_s_b1"] > 0 and row["model_flops_per_iter_first"] > 0
        assert row["mfu_first"] is None and row["peak_mem_gib_first"] is None  # n/a on the CPU
        # One iteration's FLOPs from the scripts' pass counters x the analytic / meta counts, against a count of
        # that iteration in the running script (recomputation included on both sides).
        assert abs(row["flop_check_rel_error"]) < 0.01, row
        assert f"| {row['method']} |" in table
    assert report["table"][2]["train_batch_first"] == 2  # RWR refuses a batch of 1: the harness moved on
    assert report["table"][0]["train_batch_first"] == 1  # DDPO, at one sample per prompt, takes a batch of 1
    assert report["device"]["name"] == "cpu" and report["device"]["torch"] == torch.__version__
    assert not list((tmp_path / "work").iterdir())  # the model and the runs are cleaned up


@pytest.mark.slow  # a process each: ~10 s
@pytest.mark.parametrize("flags,needle", [(["--methods", "nope"], "--methods"), (["--batches", "0,2"], "--batches")])
def test_gpu_benchmark_bad_input_is_one_line_exit_2(flags, needle):
    result = run("benchmarks/gpu.py", "--small", *flags, timeout=120)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_gradnorm_reads_fig7_curves_into_a_table_and_plot(tmp_path):
    """benchmarks/gradnorm.py: per K and stop-gradient, mean +- std over seeds of each run's mean grad norm."""
    def method(*per_seed):
        return {"runs": {str(i): {"train": {"grad_norm": g}} for i, g in enumerate(per_seed)}}
    curves = {"methods": {"DRaFT-1": method([1.0, 3.0], [4.0]), "DRaFT-1-sg": method([1.0], [1.0]),
                          "DRaFT-5": method([10.0], [20.0]), "DRaFT-5-sg": method([5.0], [5.0]), "other": method([9.0])}}
    (tmp_path / "curves.json").write_text(json.dumps(curves))
    result = run("benchmarks/gradnorm.py", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = (tmp_path / "gradnorm.md").read_text().splitlines()[2:]
    assert rows == ["| 1 | 3 ± 1.4 | 1 ± 0 |", "| 5 | 15 ± 7.1 | 5 ± 0 |"]  # means 2 and 4 -> 3; 10 and 20 -> 15
    assert (tmp_path / "gradnorm.png").stat().st_size > 0
    bad = run("benchmarks/gradnorm.py", str(tmp_path / "nowhere"), timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_drift_finds_the_iteration_and_growth_of_two_float_paths_apart(tmp_path):
    from benchmarks import drift

    # seed 0: the two paths differ by 1e-7 * 2^i (growth x2, > 1e-5 from i = 7, > 1e-3 from 14, > 1e-1 from 20);
    # seed 1: bitwise the same (no drift at all); a run on one path only is left out
    base = [0.5 + 0.01 * i for i in range(25)]
    apart = [b + 1e-7 * 2 ** i for i, b in enumerate(base)]
    runs = {"0-t1": {"seed": 0, "threads": 1, "train": {"reward_mean": base}},
            "0-t2": {"seed": 0, "threads": 2, "train": {"reward_mean": apart}},
            "1-t1": {"seed": 1, "threads": 1, "train": {"reward_mean": base}},
            "1-t2": {"seed": 1, "threads": 2, "train": {"reward_mean": base}},
            "2-t1": {"seed": 2, "threads": 1, "train": {"reward_mean": base}}}
    (tmp_path / "curves.json").write_text(json.dumps({"methods": {"DRTune": {"runs": runs}}}))
    rows = drift.drift(json.loads((tmp_path / "curves.json").read_text()))
    assert [r["seed"] for r in rows] == [0, 1]
    assert (rows[0]["first_above_1e-05"], rows[0]["first_above_0.001"], rows[0]["first_above_0.1"]) == (7, 14, 20)
    assert rows[0]["growth"] == pytest.approx(2.0, rel=1e-3)
    assert rows[1]["growth"] is None and rows[1]["first_above_1e-05"] is None and max(rows[1]["diffs"]) == 0
    result = run("benchmarks/drift.py", str(tmp_path), timeout=60)
    assert result.returncode == 0 and "×2.00" in result.stdout and (tmp_path / "drift.md").is_file()
    assert run("benchmarks/drift.py", str(tmp_path / "nope"), timeout=60).returncode == 2
