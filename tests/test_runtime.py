"""runtime.py: the demo's backbone, the CPU allocator setting, and the model a train.py checkpoint holds."""
import os
import subprocess
import sys

import pytest
import torch

import adapter
import clip_min
from support import demo, runtime
from helpers import MICRO


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="glibc's allocator, Linux only")
def test_freed_memory_is_reused_without_page_faults():
    """After keep_freed_memory, a large tensor freed and allocated again costs no page faults (before: one per page)."""
    code = """if True:
        import resource, torch
        from support import runtime
        def faults():
            x = torch.ones(2 ** 25); del x  # 128 MB: above glibc's largest mmap threshold
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.ones(2 ** 25); del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        plain = faults()
        runtime.keep_freed_memory()
        faults()
        print(plain, faults())"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plain, tuned = map(int, subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                           check=True).stdout.split())
    assert tuned * 10 < plain  # plain: one fault per page touched (4 KB, or 2 MB with transparent huge pages)


def test_demo_backbone_without_the_bundled_checkpoint(monkeypatch, capsys):
    """Without assets/mini-clip.pt the demo falls back to a random tiny CLIP, the same one for the same seed (so that
    evaluate.py finds the backbone a demo run trained its adapter on), and says so."""
    monkeypatch.setattr(runtime, "DEMO_CLIP", "/nonexistent/mini-clip.pt")
    cpu = torch.device("cpu")
    a, b, c = (runtime.load_backbone(None, "demo", seed, cpu) for seed in (2, 2, 3))
    assert a.config == demo.MINI_CLIP and "randomly initialised tiny CLIP" in capsys.readouterr().out
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.proj, c.visual.proj)


def test_trained_model_rebuilds_the_checkpoints_method_and_weights(tmp_path):
    """A checkpoint's method comes back with its own options and trained tensors; without a checkpoint, the method
    asked for on the frozen backbone; a file without 'trainable' is named as not being train.py's."""
    torch.manual_seed(0)
    clip = tmp_path / "clip.pt"
    torch.save(clip_min.CLIP(MICRO).state_dict(), clip)
    trained = adapter.apply(clip_min.load(str(clip))[0], "mrs", bottleneck=16)
    for p in adapter.trainable_state_dict(trained).values():
        torch.nn.init.normal_(p, std=0.02)
    torch.save({"trainable": adapter.trainable_state_dict(trained), "method": "mrs", "options": trained.petl_options,
                "clip": str(clip), "activation": "quick_gelu", "args": {"dataset": "x", "seed": 2}}, tmp_path / "best.pt")
    state = runtime.read_run_checkpoint(str(tmp_path / "best.pt"))
    model = runtime.trained_model(state, torch.device("cpu"))
    assert not model.training and model.mrs_adapter.image_down.out_features == 16
    for name, value in adapter.trainable_state_dict(model).items():
        assert torch.equal(value, adapter.trainable_state_dict(trained)[name])
    frozen = runtime.trained_model({}, torch.device("cpu"), clip=str(clip), method="zeroshot")
    assert frozen.petl_method == "zeroshot" and adapter.count_trainable(frozen) == 0
    torch.save(clip_min.CLIP(MICRO).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        runtime.read_run_checkpoint(str(tmp_path / "weights.pt"))
