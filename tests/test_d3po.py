"""D3PO: the eq. 14 loss, the reference policy, shared initial noise, the human round trip, bad input, and the
labelling page in a real (headless) Chromium."""

import copy
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import d3po
import d3po_label
import runner

ROOT = Path(__file__).resolve().parents[1]  # tests/conftest.py puts it on sys.path and loads `pipe`

TINY = ["--num-steps", "2", "--eval-size", "2", "--eval-num-steps", "2", "--threads", "2"]


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["d3po.py", *argv])
    d3po.main()


def snapshot(folder: Path):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


# --- eq. 14 on given log-probs --------------------------------------------------------------------------


def test_loss_equals_closed_form():
    log_ratio = torch.tensor([[0.03, -0.05, 0.2], [0.0, 0.01, -0.3]])
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 4.0]])
    prefs = d3po.preferences(scores)  # pairs (0,1), (0,2), (1,2)
    assert prefs.tolist() == [[-1, -1, 1], [0, 1, 1]]
    beta = 0.1
    for eps in (0.0, 0.1):
        clamp = (lambda v: min(max(v, math.log(1 - eps)), math.log(1 + eps))) if eps else (lambda v: v)
        expected = [[-math.log(1 / (1 + math.exp(-beta * s * (clamp(r[i]) - clamp(r[j])))))
                     for s, (i, j) in zip(p, [(0, 1), (0, 2), (1, 2)])]
                    for r, p in zip(log_ratio.tolist(), prefs.tolist())]
        got = d3po.d3po_loss(log_ratio, prefs, beta, eps)
        assert torch.allclose(got, torch.tensor(expected), atol=1e-7)
    # the clamp changed something: 0.2 and -0.3 lie outside [log 0.9, log 1.1]
    assert not torch.allclose(d3po.d3po_loss(log_ratio, prefs, beta, 0.0), d3po.d3po_loss(log_ratio, prefs, beta, 0.1))


def grad_of(log_ratio, prefs, eps=0.1):
    x = log_ratio.clone().requires_grad_(True)
    d3po.d3po_loss(x, prefs, 0.1, eps).sum().backward()
    return x.grad


def test_tie_has_zero_gradient_and_unranked_pairs_are_ties():
    log_ratio = torch.tensor([[0.05, -0.02]])
    assert torch.equal(grad_of(log_ratio, d3po.preferences(torch.tensor([[2.0, 2.0]]))), torch.zeros(1, 2))
    assert d3po.preferences(torch.tensor([[float("nan"), 1.0]])).tolist() == [[0.0]]
    assert torch.allclose(d3po.d3po_loss(log_ratio, torch.zeros(1, 1), 0.1, 0.1), torch.tensor(math.log(2)))


def test_swapping_winner_and_loser_flips_the_gradient():
    win0, win1 = torch.tensor([[1.0]]), torch.tensor([[-1.0]])
    at_reference = torch.zeros(1, 2)  # ratio 1: the two gradients are exact opposites
    g0, g1 = grad_of(at_reference, win0), grad_of(at_reference, win1)
    assert torch.equal(g0, -g1) and g0[0, 0] < 0 < g0[0, 1]  # descent raises the winner's log-ratio
    off = torch.tensor([[0.04, -0.03]])
    assert torch.equal(torch.sign(grad_of(off, win0)), -torch.sign(grad_of(off, win1)))
    outside = torch.tensor([[0.5, -0.5]])  # both ratios beyond the clamp band: no gradient (official code)
    assert torch.equal(grad_of(outside, win0), torch.zeros(1, 2))


# --- the model: shared x_T, reference policy --------------------------------------------------------------


def test_pairs_share_x_T_and_diverge(pipe):
    args = d3po.Args(num_steps=3)
    torch.manual_seed(0)
    cond = common.encode_prompts(pipe, ["a cat", "a dog"])
    uncond = common.encode_prompts(pipe, [""]).expand(2, -1, -1)
    latents, timesteps = d3po.sample_groups(pipe, cond, uncond, 3, 32, args)
    assert latents.shape[:3] == (2, 3, 4) and len(timesteps) == 3
    assert torch.equal(latents[:, 0, 0], latents[:, 1, 0]) and torch.equal(latents[:, 0, 0], latents[:, 2, 0])
    assert not torch.equal(latents[0, 0, 0], latents[1, 0, 0])  # each prompt has its own x_T
    for step in (1, 3):  # diverged after the first stochastic step, and in the final latents
        assert (latents[:, 0, step] - latents[:, 1, step]).abs().mean() > 1e-3


def test_reference_is_the_pretrained_unet_and_adapters_come_back(pipe):
    args = d3po.Args(num_steps=3)
    pretrained = copy.deepcopy(pipe.unet)  # what the official code keeps as pi_ref
    common.add_lora(pipe.unet, 4)
    torch.manual_seed(1)
    cond = common.encode_prompts(pipe, ["a cat"])
    uncond = common.encode_prompts(pipe, [""])
    latents, timesteps = d3po.sample_groups(pipe, cond, uncond, 2, 32, args)
    x_t, x_prev, t = latents[:, :, 1].flatten(0, 1), latents[:, :, 2].flatten(0, 1), timesteps[1]
    cond2, uncond2 = cond.expand(2, -1, -1), uncond.expand(2, -1, -1)
    # LoRA starts as the identity (B = 0): ratio exactly 1
    assert torch.equal(d3po.step_log_ratio(pipe, x_t, x_prev, t, cond2, uncond2, None, args), torch.zeros(2))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    log_ratio = d3po.step_log_ratio(pipe, x_t, x_prev, t, cond2, uncond2, None, args)
    assert log_ratio.abs().min() > 0 and log_ratio.requires_grad
    # the reference term equals the full pretrained copy's log-prob
    def log_prob(unet):
        out = common.unet_output(unet, x_t, t, cond2, uncond2, args.guidance_scale)
        return common.ddim_step_with_logprob(pipe.scheduler, out, t, x_t, args.eta, prev_sample=x_prev)[1]
    with torch.no_grad():
        assert torch.allclose(log_prob(pipe.unet) - log_ratio.detach(), log_prob(pretrained), atol=1e-6)
        pipe.unet.disable_adapters()  # the policy with its adapters off is the reference: ratio 1
        try:
            assert torch.allclose(log_prob(pipe.unet), log_prob(pretrained), atol=1e-6)
        finally:
            pipe.unet.enable_adapters()
        assert not torch.allclose(log_prob(pipe.unet), log_prob(pretrained), atol=1e-4)  # adapters back on


# --- runs: reward feedback, the human round trip, bad input ----------------------------------------------


def test_reward_feedback_run(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "d3po.py"), *TINY, "--iters", "2", "--batch-size", "2",
                           "--samples-per-prompt", "3", "--eval-every", "1", "--run-dir", str(run)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    assert "eval_reward_mean" in rows[0] and "eval_reward_mean" in rows[-1]
    rows = rows[:-1]
    assert rows[-1]["samples_seen"] == 12
    for key in ("reward_mean", "reward_std", "loss", "wall_time_s", "tie_frac", "clip_frac"):
        assert all(key in r for r in rows)
    # first update: LoRA is the identity, so every ratio is 1 and the loss is exactly log 2
    assert rows[0]["abs_log_ratio"] == 0 and rows[0]["loss"] == pytest.approx(math.log(2))
    assert rows[1]["abs_log_ratio"] > 0  # the update moved the policy away from the reference
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "eval_00000.png").is_file() and (run / "eval_00002.png").is_file()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A --phase sample run dir: 3 prompts x 3 images, T = 2."""
    run = tmp_path_factory.mktemp("human") / "samples"
    proc = subprocess.run([sys.executable, str(ROOT / "d3po.py"), "--feedback", "human", "--phase", "sample",
                           *TINY, "--num-prompts", "3", "--samples-per-prompt", "3", "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run


def page_export(meta, choices, annotator="a"):
    """A labels file exactly as label.html's exportLabels writes it."""
    n = meta["samples_per_prompt"]
    return {"format": d3po_label.LABELS_FORMAT, "samples_id": meta["samples_id"], "annotator": annotator,
            "labels": [{"prompt": p, "choice": c,
                        "scores": None if c is None else [int(c == i) for i in range(n)]}
                       for p, c in zip(meta["prompts"], choices)]}


def test_sample_phase_writes_everything(samples):
    meta = json.loads((samples / "samples.json").read_text())
    assert len(meta["prompts"]) == 3 and meta["samples_per_prompt"] == 3 and meta["num_steps"] == 2
    for group in meta["images"]:
        assert len(group) == 3 and all((samples / name).is_file() for name in group)
    stored = load_file(samples / "trajectories.safetensors")
    assert stored["latents"].shape[:3] == (3, 3, 3) and stored["timesteps"].shape == (2,)
    assert torch.equal(stored["latents"][:, 0, 0], stored["latents"][:, 2, 0])  # shared x_T per prompt
    page = (samples / "label.html").read_text()
    assert meta["samples_id"] in page and "/*D3PO_DATA*/" not in page and "data:image/png;base64," in page
    assert not list(samples.glob("*.pkl")) and not list(samples.rglob("*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    # others may read them, as any file a plain open() writes
    modes = {p.name: p.stat().st_mode & 0o777 for p in samples.rglob("*") if p.is_file()}
    assert {"label.html", "samples.json", "0000_0.png", "trajectories.safetensors"} <= set(modes) and set(modes.values()) == {0o666 & ~umask}, modes


def test_human_round_trip_averages_annotators(samples, tmp_path, monkeypatch):
    meta = json.loads((samples / "samples.json").read_text())
    alice, bob = tmp_path / "alice.json", tmp_path / "bob.json"
    alice.write_text(json.dumps(page_export(meta, [0, "tie", None])))
    bob.write_text(json.dumps(page_export(meta, [1, 2, None], "b")))
    scores = d3po_label.load_labels([str(alice), str(bob)], meta)
    assert torch.allclose(scores[0], torch.tensor([0.5, 0.5, 0.0]))  # averaged: 0 and 1 tie, both beat 2
    assert torch.allclose(scores[1], torch.tensor([0.0, 0.0, 0.5])) and scores[2].isnan().all()
    before = snapshot(samples)
    run = tmp_path / "trained"
    run_main(monkeypatch, "--feedback", "human", "--phase", "train", "--samples", str(samples), "--labels",
             str(alice), str(bob), *TINY, "--samples-per-prompt", "3", "--iters", "2", "--batch-size", "1",
             "--run-dir", str(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["samples_seen"] == 6 and "eval_reward_mean" in rows[-1]
    assert rows[0]["loss"] == pytest.approx(math.log(2)) and rows[1]["abs_log_ratio"] > 0
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert snapshot(samples) == before  # the samples are read, never rewritten


def bad_label_files(meta, tmp_path):
    good = page_export(meta, [0, 1, "tie"])
    cases = {
        "not json": "{not json",
        "other samples": json.dumps(good | {"samples_id": "0123456789abcdef"}),
        "other prompts": json.dumps(good | {"labels": [dict(good["labels"][0], prompt="a zebra")] + good["labels"][1:]}),
        "fewer prompts": json.dumps(good | {"labels": good["labels"][:2]}),
        "wrong pair count": json.dumps(good | {"labels": [dict(x, scores=[1, 0]) for x in good["labels"]]}),
        "only ties": json.dumps(page_export(meta, ["tie", None, "tie"])),
    }
    paths = {}
    for name, text in cases.items():
        paths[name] = tmp_path / (name.replace(" ", "_") + ".json")
        paths[name].write_text(text)
    return paths


def expect_usage_error(monkeypatch, capsys, argv, run_dir: Path, message: str):
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, *argv, "--run-dir", str(run_dir))
    err = capsys.readouterr().err
    assert stop.value.code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not run_dir.exists()


def test_bad_input_fails_before_any_work(samples, tmp_path, monkeypatch, capsys):
    meta = json.loads((samples / "samples.json").read_text())
    before = snapshot(samples)
    train = ["--feedback", "human", "--phase", "train", "--samples", str(samples), *TINY, "--samples-per-prompt", "3"]
    expect_usage_error(monkeypatch, capsys, train, tmp_path / "r0", "needs --labels")
    for i, (name, path) in enumerate(bad_label_files(meta, tmp_path).items()):
        expect_usage_error(monkeypatch, capsys, [*train, "--labels", str(path)], tmp_path / f"r{i + 1}", "--labels")
    expect_usage_error(monkeypatch, capsys, [*train[:-1], "2", "--labels", str(tmp_path / "x.json")],
                       tmp_path / "r9", "--samples-per-prompt 2 differs")
    expect_usage_error(monkeypatch, capsys, ["--samples-per-prompt", "1"], tmp_path / "r10", "--samples-per-prompt must be at least 2")
    expect_usage_error(monkeypatch, capsys, ["--eta", "0"], tmp_path / "r11", "--eta must be > 0")
    expect_usage_error(monkeypatch, capsys, ["--feedback", "human"], tmp_path / "r12", "--phase sample or --phase train")
    tampered = tmp_path / "tampered"
    shutil.copytree(samples, tampered)
    stored = load_file(tampered / "trajectories.safetensors")
    save_file({k: v + (k == "latents") for k, v in stored.items()}, tampered / "trajectories.safetensors")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(page_export(meta, [0, 1, "tie"])))
    expect_usage_error(monkeypatch, capsys, [*train[:5], str(tampered), *train[6:], "--labels", str(good)],
                       tmp_path / "r13", "changed since sampling")
    # sampling into a run dir that already holds samples must not overwrite them
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--feedback", "human", "--phase", "sample", "--run-dir", str(samples))
    assert "already holds samples" in capsys.readouterr().err
    assert snapshot(samples) == before


def test_bad_input_exit_status_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "d3po.py"), "--eta", "0", "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "--eta" in proc.stderr
    assert not (tmp_path / "r").exists()


# --- the labelling page in headless Chromium ------------------------------------------------------------


class Chromium:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4), no extra package."""

    def __init__(self, binary, profile: Path):
        import fcntl

        read_cmd, write_cmd = os.pipe()  # our commands -> chromium's fd 3
        read_evt, write_evt = os.pipe()  # chromium's fd 4 -> replies and events
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (read_cmd, write_evt)]

        def child_fds():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (read_cmd, write_evt, *high):
            os.close(fd)
        self.out, self.inp = os.fdopen(write_cmd, "wb"), os.fdopen(read_evt, "rb")
        self.next_id, self.buffer, self.session = 0, b"", None

    def send(self, method, session=True, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        self.out.write(json.dumps(message).encode() + b"\0")
        self.out.flush()
        while True:  # skip events until our reply
            while b"\0" not in self.buffer:
                chunk = os.read(self.inp.fileno(), 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def click(self, selector):
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def key(self, key):
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def test_labelling_page_in_headless_chromium(samples, tmp_path, monkeypatch):
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    meta = json.loads((samples / "samples.json").read_text())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = Chromium(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Browser.setDownloadBehavior", session=False, behavior="allow", downloadPath=str(downloads))
        browser.send("Page.navigate", url=(samples / "label.html").as_uri())
        for _ in range(100):
            if browser.js("document.readyState") == "complete" and browser.js("!!document.querySelector('figure')"):
                break
            time.sleep(0.1)
        assert browser.js("document.querySelectorAll('#images img').length") == 3
        assert browser.js("document.getElementById('prompt').textContent") == meta["prompts"][0]
        assert "0 / 3 labelled" in browser.js("document.getElementById('progress').textContent")
        browser.click("#images figure:nth-child(2)")  # prompt 1: click the second image
        assert "1 / 3 labelled" in browser.js("document.getElementById('progress').textContent")
        assert browser.js("document.getElementById('prompt').textContent") == meta["prompts"][1]  # advanced
        browser.key("3")  # prompt 2: the third image by key
        browser.key("0")  # prompt 3: a tie
        assert "3 / 3 labelled" in browser.js("document.getElementById('progress').textContent")
        browser.click("#annotator")
        browser.send("Input.insertText", text="carol")
        browser.click("#export")
        exported = downloads / f"d3po-labels-{meta['samples_id']}-carol.json"
        for _ in range(100):
            if exported.is_file():
                break
            time.sleep(0.1)
    finally:
        browser.close()
    labels = json.loads(exported.read_text())
    assert labels["annotator"] == "carol"
    assert [x["scores"] for x in labels["labels"]] == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    scores = d3po_label.load_labels([str(exported)], meta)  # the train phase accepts the export
    assert torch.equal(d3po.preferences(scores[:2]), torch.tensor([[-1.0, 0.0, 1.0], [0.0, -1.0, -1.0]]))


def test_two_human_rounds_sample_from_and_reference_the_previous_round(samples, tmp_path, monkeypatch, capsys):
    """The paper's §5.2 loop: round 2 samples from round 1's model, starts from it and is referenced to it."""
    meta = json.loads((samples / "samples.json").read_text())
    labels = tmp_path / "round1.json"
    labels.write_text(json.dumps(page_export(meta, [0, 1, 2])))
    round1 = tmp_path / "round1_trained"
    train = ["--feedback", "human", "--phase", "train", *TINY, "--samples-per-prompt", "3", "--iters", "2",
             "--batch-size", "1", "--lr", "0.05"]
    run_main(monkeypatch, *train, "--samples", str(samples), "--labels", str(labels), "--run-dir", str(round1))
    assert meta["init_lora_id"] == ""  # round 1 sampled the pretrained model
    round2 = tmp_path / "round2"
    run_main(monkeypatch, "--feedback", "human", "--phase", "sample", *TINY, "--num-prompts", "3",
             "--samples-per-prompt", "3", "--init-lora", str(round1), "--run-dir", str(round2))
    meta2 = json.loads((round2 / "samples.json").read_text())
    assert meta2["init_lora"] == str(round1) and meta2["init_lora_id"] == d3po_label.lora_id(str(round1)) != ""
    labels2 = tmp_path / "round2.json"
    labels2.write_text(json.dumps(page_export(meta2, [2, 0, 1])))
    # the next command it prints is one that accepts these samples: drawn from round 1's LoRA, with T 2 and n 3
    printed = next(line for line in capsys.readouterr().out.splitlines() if "--phase train" in line)
    assert f"--init-lora {round1}" in printed
    command = shlex.split(printed.split(" --labels ")[0])
    assert command[:2] == ["python", "d3po.py"]
    monkeypatch.setattr(sys, "argv", [*command[1:], "--labels", str(labels2), "--run-dir", str(tmp_path / "next")])
    d3po.check_args(runner.parse_args(d3po.Args, "d3po.py"))
    second = [*train, "--samples", str(round2), "--labels", str(labels2)]
    # the samples were drawn from round 1's model: training must start there
    capsys.readouterr()
    expect_usage_error(monkeypatch, capsys, second, tmp_path / "wrong_start", "not the model the samples")
    run_main(monkeypatch, *second, "--init-lora", str(round1), "--run-dir", str(tmp_path / "round2_trained"))
    rows = [json.loads(line) for line in (tmp_path / "round2_trained" / "metrics.jsonl").read_text().splitlines()]
    # pi_theta starts at round 1's LoRA and pi_ref is round 1's LoRA: every ratio is 1 before the first update
    assert rows[0]["abs_log_ratio"] == 0 and rows[0]["loss"] == pytest.approx(math.log(2)) and rows[1]["abs_log_ratio"] > 0
    # the same start referenced to the pretrained model instead: the ratio is not 1 from the first step
    run_main(monkeypatch, *second, "--init-lora", str(round1), "--ref-lora", "pretrained",
             "--run-dir", str(tmp_path / "to_pretrained"))
    rows = [json.loads(line) for line in (tmp_path / "to_pretrained" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["abs_log_ratio"] > 0
    # a reference LoRA is a policy only at the scale it was trained with: round 1's alpha is its rank (8)
    capsys.readouterr()
    expect_usage_error(monkeypatch, capsys, [*second, "--ref-lora", str(round1), "--lora-alpha", "16"],
                       tmp_path / "ref_alpha", "--ref-lora")
