import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
torch.set_num_threads(min(2, os.cpu_count() or 1))

import common  # noqa: E402
import hub  # noqa: E402


@pytest.fixture
def pipe():
    """The embedded tiny Stable Diffusion, loaded through the same code path as any model."""
    torch.manual_seed(0)
    return common.load_pipeline(hub.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded model written to disk in diffusers format (for loading it like a user's folder)."""
    path = tmp_path_factory.mktemp("embedded")
    hub.build_embedded_pipeline(str(path))
    return path
