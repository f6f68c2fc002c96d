"""The tests' fixtures (what they share otherwise is in helpers.py)."""
import os

import pytest
import torch

import clip_min
import data
from support import runtime
from helpers import MICRO, make_world


@pytest.fixture
def exact_cpu(monkeypatch, tmp_path):
    """One CPU thread (the same reduction order in every run, so bit-exact comparisons hold), the CPU also on a GPU
    machine, fp32 by default whatever the CPU's bf16 units, and the demo cache in tmp_path (nothing may land in
    ~/.cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "DEMO_ROOT", str(tmp_path / "demo-cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def decode_cache_of_the_session(tmp_path_factory):
    """Decoded splits go to a folder of this test session, never to ~/.cache (subprocesses inherit the variable)."""
    before = os.environ.get(data.DECODE_CACHE_ENV)
    os.environ[data.DECODE_CACHE_ENV] = str(tmp_path_factory.mktemp("decoded"))
    yield
    if before is None:
        os.environ.pop(data.DECODE_CACHE_ENV)
    else:
        os.environ[data.DECODE_CACHE_ENV] = before


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A random micro CLIP saved as a state_dict, and the same model in memory (the tests' own encoder)."""
    torch.manual_seed(0)
    model = clip_min.CLIP(MICRO).eval()
    path = str(tmp_path_factory.mktemp("clip") / "clip.pt")
    torch.save(model.state_dict(), path)
    return path, model
