import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import common
import draft
import rewards
from gradient_family import TINY, RewardCall, check_run_dir, expect_bad_input, run_main, run_scripts


def test_draft_steps_are_all_steps_or_the_last_k():
    assert draft.draft_steps(6, -1) == [0, 1, 2, 3, 4, 5]
    assert draft.draft_steps(6, 6) == draft.draft_steps(6, 9) == [0, 1, 2, 3, 4, 5]
    assert draft.draft_steps(6, 2) == [4, 5]
    assert draft.draft_steps(6, 1) == [5]


@pytest.mark.parametrize("K", [-1, 2])
def test_gradient_reaches_exactly_the_last_k_steps_of_the_real_rollout(K, monkeypatch, tmp_path):
    T = 5
    trace, rows = run_main(draft, [*TINY, "--num-steps", str(T), "--K", str(K)], monkeypatch, tmp_path / "run")
    segments = trace.training_segments()
    assert len(segments) == 2  # one rollout per update
    timesteps = [int(t) for t in trace.pipe.scheduler.timesteps]
    for calls, score in segments:
        assert [c.t for c in calls] == timesteps  # one UNet call per sampling step, in order
        trained = [i for i, c in enumerate(calls) if c.requires_grad and c.grad]
        untrained = [i for i, c in enumerate(calls) if not c.requires_grad]
        assert trained == draft.draft_steps(T, K)
        assert untrained == [i for i in range(T) if i not in trained]  # the rest ran under no_grad
        assert score.requires_grad and len(score.images) == 2
    assert rows[0]["trained_steps"] == draft.draft_steps(T, K)


@pytest.mark.parametrize("stop_grad_input", [False, True])
def test_stop_grad_input_detaches_exactly_the_unet_input(stop_grad_input, monkeypatch, tmp_path):
    """DRTune eq. 3 on DRaFT (DRTune sec. 4.2): every trained step still gets gradient, but no UNet input carries
    gradient to an earlier step; without it, every input after the first trained step does."""
    T = 4
    flags = [*TINY, "--num-steps", str(T), "--K", "-1"] + (["--stop-grad-input"] if stop_grad_input else [])
    trace, rows = run_main(draft, flags, monkeypatch, tmp_path / "run")
    for calls, _ in trace.training_segments():
        assert all(c.requires_grad and c.grad > 0 for c in calls)  # the outputs of all T steps are trained
        assert [c.input_requires_grad for c in calls] == [False] + [not stop_grad_input] * (T - 1)
    assert all(r["grad_norm"] > 0 for r in rows)


def reward_groups(trace):
    """[(the UNet calls since the previous reward call, the reward call)] for every reward call, in order."""
    groups, calls = [], []
    for event in trace.events:
        if isinstance(event, RewardCall):
            groups.append((calls, event))
            calls = []
        else:
            calls.append(event)
    return groups


@pytest.mark.parametrize("with_rollout", [False, True])
def test_lv_trains_on_n_renoised_copies_of_the_detached_final_sample(with_rollout, monkeypatch, tmp_path):
    """The paper's DRaFT-LV: a rollout without gradient, then n copies of its final x0 re-noised to the last step's
    level, x_{t_1} = sqrt(a_1) sg(x0) + sqrt(1 - a_1) eps_i with fresh eps_i, each through one differentiable last
    step; loss = -mean of the n * B copies' rewards, so d loss / d r = -1/(n B) per copy and the rollout's own last
    step gets nothing. --lv-with-rollout (FlowBP's port) makes the rollout's last step a (1 + n)-th term."""
    T, n, B, w = 4, 2, 2, 5.0  # w: draft.py's default guidance scale
    flags = [*TINY, "--num-steps", str(T), "--K", "1", "--lv", str(n)] + ["--lv-with-rollout"] * with_rollout
    trace, rows = run_main(draft, flags, monkeypatch, tmp_path / "run")
    scheduler = trace.pipe.scheduler
    timesteps = [int(t) for t in scheduler.timesteps]
    groups = reward_groups(trace)
    lv = [i for i, (_, score) in enumerate(groups) if score.requires_grad and len(score.images) == n * B]
    assert len(lv) == len(rows) == 2  # one set of copies per update
    terms = n + with_rollout
    for i, row in zip(lv, rows):
        (rollout_calls, base), (lv_calls, copies) = groups[i - 1], groups[i]
        assert [c.t for c in rollout_calls] == timesteps  # the rollout is the training chain
        assert [c.requires_grad for c in rollout_calls] == [False] * (T - 1) + [with_rollout]
        assert base.requires_grad == with_rollout and len(base.images) == B
        if with_rollout:
            assert rollout_calls[-1].grad > 0
            torch.testing.assert_close(base.grad, torch.full_like(base.grad, -1 / (terms * B)))
        # the logged reward is the rollout's (brightness: the mean pixel)
        assert row["reward_mean"] == pytest.approx(base.images.mean().item(), rel=1e-5)
        assert len(lv_calls) == 1  # the n copies share one batched, differentiable last-step call
        call = lv_calls[0]
        assert call.t == timesteps[-1] and call.batch == 2 * n * B and call.grad > 0  # x2: CFG's uncond + cond
        torch.testing.assert_close(copies.grad, torch.full_like(copies.grad, -1 / (terms * B)))
        # the copies' input: the rollout's final x0 (its last DDIM step, eta 0), re-noised with fresh noise each
        last = rollout_calls[-1]
        guided = last.out[:B] + w * (last.out[B:] - last.out[:B])
        x0 = common.ddim_step_with_logprob(scheduler, guided, timesteps[-1], last.x[:B], 0.0)[0]
        alpha_bar = scheduler.alphas_cumprod[timesteps[-1]]
        eps = (call.x[:n * B] - alpha_bar.sqrt() * x0.repeat(n, 1, 1, 1)) / (1 - alpha_bar).sqrt()
        assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1  # N(0, I) noise
        correlation = torch.corrcoef(torch.stack([eps[:B].flatten(), eps[B:2 * B].flatten()]))[0, 1]
        assert abs(correlation) < 0.2  # a fresh draw per copy


def test_drafts_plus_kl_is_zero_before_the_first_update_then_positive(monkeypatch, tmp_path):
    _, rows = run_main(draft, [*TINY, "--num-steps", "3", "--K", "1", "--kl-coeff", "1.0"], monkeypatch,
                       tmp_path / "run")
    assert rows[0]["kl"] == 0.0  # LoRA starts as the identity (B = 0): eps_theta == eps_pretrained
    assert rows[1]["kl"] > 0


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once while active (the CPU has no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def peak_training_bytes(pipe, T: int, checkpoint: bool):
    """Peak activation memory of one full-DRaFT rollout + reward + backward (weights excluded)."""
    cond = common.encode_prompts(pipe, ["a cat"])
    x_T = common.initial_latents(pipe, 1, 16, generator=torch.Generator().manual_seed(0))
    with LiveBytes() as memory:
        out = common.rollout(pipe, cond, None, x_T, num_steps=T, guidance_scale=1.0, eta=0.0,
                             grad_steps=draft.draft_steps(T, -1), checkpoint=checkpoint)
        reward = rewards.brightness(common.decode(pipe.vae, out.output), ["a cat"])
        (-reward.mean()).backward()
    return memory.peak


def test_full_draft_memory_does_not_grow_with_the_number_of_steps(pipe):
    torch.set_num_threads(1)  # tiny ops: extra threads only wait on each other on a shared CPU
    common.add_lora(pipe.unet, 4)
    assert peak_training_bytes(pipe, 50, True) <= 1.5 * peak_training_bytes(pipe, 5, True)
    # the measurement can tell: without checkpointing every step's activations are kept
    assert peak_training_bytes(pipe, 15, False) > 1.5 * peak_training_bytes(pipe, 5, False)


@pytest.mark.parametrize("argv, needle", [
    (["--K", "2", "--lv", "2"], "--lv"),
    (["--K", "0"], "--K"),
    (["--lv", "-1"], "--lv"),
    (["--K", "1", "--lv-with-rollout"], "--lv-with-rollout"),
    (["--reward", "jpeg_compressibility"], "not differentiable"),
    (["--kl-coeff", "-1"], "--kl-coeff"),
])
def test_bad_input_stops_before_any_work(argv, needle, monkeypatch, capsys, tmp_path):
    expect_bad_input(draft, argv, monkeypatch, capsys, tmp_path, needle)


def test_script_runs_as_a_user_runs_it(tmp_path):
    result, bad = run_scripts(
        "draft.py",
        [*TINY, "--num-steps", "3", "--K", "1", "--lv", "1", "--run-dir", str(tmp_path / "run")],
        ["--K", "3", "--lv", "2", "--run-dir", str(tmp_path / "bad")])
    assert result.returncode == 0, result.stderr
    check_run_dir(tmp_path / "run", iters=2)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
