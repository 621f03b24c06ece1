"""Data parallel: the same script under torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK); and the
compute count over the ranks (the --budget unit; common counts UNet passes and decodes into it).

Every rank draws the same random numbers, and every draw for a batch is made for the global batch, of which
a rank keeps its share (shard): N ranks with --batch-size B compute what one process with N * B would, every
scalar choice (DRTune's steps, a truncation point) is the same on all ranks, and rank 0's random state is
every rank's (one checkpoint resumes them all). Gradients are averaged before clipping; rank 0 evaluates,
logs and saves, with no collective inside what only it runs.

RANK and WORLD are set by init_distributed (runner.setup_device): read them as `distributed.WORLD`, never copy them
at import time.
"""

import os
import random

import torch

RANK, WORLD = 0, 1


def init_distributed(device: str) -> str:
    """Read torchrun's rank and world size; returns this rank's device (under torchrun on GPUs, its own)."""
    global RANK, WORLD
    RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if WORLD > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def join_process_group(device):
    """NCCL on GPUs, gloo on CPUs. After the models are loaded: transformers' save_pretrained writes only on rank 0
    of an initialised group, and the embedded model is built by saving it."""
    if WORLD > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))


def shard(batch):
    """This rank's share of a global batch (a tensor or a list, its length a multiple of WORLD)."""
    n = len(batch) // WORLD
    return batch[RANK * n:(RANK + 1) * n]


def choices(population, k: int) -> list:
    """k draws with replacement for this rank: its share of the global batch's k * WORLD."""
    return shard(random.choices(population, k=k * WORLD))


def randn(shape, device, dtype=torch.float32, generator=None):
    """Gaussian noise for this rank's share of a global batch (shape[0] per rank); with a generator (the
    evaluation's, on rank 0 alone) exactly what it asks for."""
    if generator is not None:  # drawn where the generator lives (the evaluation's: the CPU), then moved (as diffusers)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    return shard(torch.randn((shape[0] * WORLD, *shape[1:]), dtype=dtype)).to(device)


def randint(high: int, n: int, device):
    """n random integers in [0, high) for this rank's share of a global batch of n per rank."""
    return shard(torch.randint(0, high, (n * WORLD,))).to(device)


def gather(tensor):
    """All ranks' tensors concatenated along dim 0, in rank order, on every rank (the global batch)."""
    if WORLD == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_gradients(params):
    """Average the LoRA gradients over the ranks (one flat all-reduce), before clipping: every rank then
    takes the same step and holds the same weights (ddpo-pytorch #10: LoRA gradients never synchronised)."""
    if WORLD == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= WORLD
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def mean_over_ranks(value: float) -> float:
    """The mean of a logged number over the ranks (each has its own share of the batch)."""
    if WORLD == 1:
        return float(value)
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / WORLD


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one (a decision all ranks must take together)."""
    if WORLD == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if WORLD == 1:
        return [obj]
    import torch.distributed as dist

    objects = [None] * WORLD
    dist.all_gather_object(objects, obj)
    return objects


def lora_digest(lora: dict) -> str:
    """A hash of LoRA weights {name: tensor}: equal on every rank when the ranks hold the same weights."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(lora):
        digest.update(name.encode() + lora[name].float().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The compute count: a machine-independent count of the work a run has done (its --budget unit)
# ---------------------------------------------------------------------------------------------

# Cumulative over a run (and restored on resume): UNet image-steps forward and backward (a CFG call counts
# both halves; a checkpointed call's recomputation counts as another forward), VAE decodes and images scored.
# Evaluation is not counted: it measures a run and is the same for every method.
COMPUTE = {"unet_forwards": 0, "unet_backwards": 0, "vae_decodes": 0, "reward_evals": 0}
_counting = [True]


def counting() -> bool:
    return _counting[0]


def count(kind: str, n: int):
    if _counting[0]:
        COMPUTE[kind] += n


def compute_units() -> float:
    """The budget unit: UNet passes, a backward counted as two forwards (about its FLOPs), of all ranks (each
    does the same work on its share of the batch)."""
    return (COMPUTE["unet_forwards"] + 2 * COMPUTE["unet_backwards"]) * WORLD


class uncounted:
    """Leave evaluation out of the compute count."""

    def __enter__(self):
        self.previous, _counting[0] = _counting[0], False

    def __exit__(self, *exc):
        _counting[0] = self.previous
