"""The toy world: coloured shapes on plain backgrounds, one caption grammar.

    a {colour} {shape} on a {background} background

Position and size are drawn at random and are not in the caption, so a model trained on the world
has a distribution over layouts; that is what a reward such as symmetry can move.
"""

import numpy as np
import torch

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.15, 0.25, 0.95),
           "yellow": (0.95, 0.85, 0.1)}
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
SIZE = 32  # pixels
# Combinations kept out of the fine-tuning prompt set `toy` and used as `toy_eval` (the pretrained
# models see every combination; fine-tuning is then evaluated on prompts it never trained on).
HELD_OUT = [("red", "triangle", "black"), ("green", "circle", "white"), ("blue", "square", "black"),
            ("yellow", "circle", "black")]


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_combinations():
    return [(c, s, b) for b in BACKGROUNDS for c in COLOURS for s in SHAPES]


def prompt_sets():
    """(training prompts, held-out evaluation prompts) for fine-tuning."""
    train = [caption(*k) for k in all_combinations() if k not in HELD_OUT]
    return train, [caption(*k) for k in HELD_OUT]


def draw(colour: str, shape: str, background: str, rng: np.random.Generator, supersample: int = 4):
    """One image (3, SIZE, SIZE) float32 in [0,1], anti-aliased by supersampling the shape's mask."""
    radius = rng.uniform(5.0, 9.0)
    cx, cy = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    n = SIZE * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / supersample
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        half = 0.85 * radius
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":  # upright isosceles: apex on top, base below the centre
        top, bottom = cy - radius, cy + 0.8 * radius
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= radius * (y - top) / (bottom - top))
    else:
        raise ValueError(shape)
    alpha = mask.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3))[None]
    image = (1 - alpha) * np.array(BACKGROUNDS[background])[:, None, None] + alpha * np.array(COLOURS[colour])[:, None, None]
    return image.astype(np.float32)


def sample_batch(n: int, rng: np.random.Generator, combinations=None):
    """n random drawings and their captions (combinations drawn uniformly)."""
    combinations = combinations or all_combinations()
    picks = [combinations[i] for i in rng.integers(len(combinations), size=n)]
    images = torch.from_numpy(np.stack([draw(*k, rng) for k in picks]))
    return images, [caption(*k) for k in picks]


def classify(image):
    """(colour, shape, background) of one image (3,H,W) in [0,1], read from its pixels alone (no model).

    Background from the corners; the shape is the set of pixels far from the background colour; its colour
    the nearest of COLOURS to their mean; square if it fills its bounding box, triangle if its row a quarter
    from the top is much narrower than the row a quarter from the bottom, else circle.
    """
    corners = torch.cat([image[:, :2, :2], image[:, :2, -2:], image[:, -2:, :2], image[:, -2:, -2:]], dim=1)
    background = "white" if corners.mean() > 0.5 else "black"
    mask = (image - torch.tensor(BACKGROUNDS[background]).view(3, 1, 1)).abs().amax(dim=0) > 0.35
    if mask.sum() < 4:
        return None, None, background
    mean = image[:, mask].mean(dim=1)
    colour = min(COLOURS, key=lambda c: ((torch.tensor(COLOURS[c]) - mean) ** 2).sum().item())
    ys, xs = torch.nonzero(mask, as_tuple=True)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    height = ys.max() - ys.min()
    upper, lower = mask[ys.min() + height // 4].sum(), mask[ys.max() - height // 4].sum()  # row widths
    shape = "square" if fill > 0.88 else "triangle" if upper < 0.6 * lower else "circle"
    return colour, shape, background


def parse(caption_text: str):
    """The (colour, shape, background) a caption of the grammar asks for."""
    words = caption_text.split()
    return words[1], words[2], words[5]


def build_tokenizer():
    """A CLIPTokenizer whose BPE merges spell out exactly the grammar's words (plus single letters)."""
    from transformers import CLIPTokenizer

    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    words = {"a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS}
    for word in sorted(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            vocab.setdefault(merged, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 16  # captions are at most 9 words
    return tokenizer
