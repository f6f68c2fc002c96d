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


@pytest.mark.slow
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


def test_the_demos_backbone_is_named_as_the_bundled_mini_clip(tmp_path, monkeypatch, capsys):
    """A demo run's checkpoints name the bundled mini CLIP as such (by default or by its path), so that evaluating
    it on another dataset (a CSV) from any folder rebuilds it, not ViT-B/32; a checkpoint of an earlier version (no
    record) gets its run's dataset's backbone, not the evaluated one's. Without the bundled file: the random tiny
    CLIP, by its seed."""
    record = runtime.backbone_record(None, "demo", 2)
    assert record == {"bundled": "assets/mini-clip.pt", "sha256": clip_min.download.sha256_of(runtime.DEMO_CLIP)}
    monkeypatch.chdir(tmp_path)
    assert runtime.backbone_record(os.path.relpath(runtime.DEMO_CLIP), "pairs.csv", 2) == record
    model = adapter.apply(clip_min.load(runtime.DEMO_CLIP)[0], "mrs")
    state = {"trainable": adapter.trainable_state_dict(model), "method": "mrs", "options": model.petl_options,
             "clip": None, "backbone": record, "activation": "quick_gelu", "args": {"dataset": "demo", "seed": 2}}
    loaded, real = [], runtime.load_backbone
    monkeypatch.setattr(runtime, "load_backbone", lambda clip, dataset, *a, **k: loaded.append((clip, dataset))
                        or real(clip, dataset, *a, **k))
    for checkpoint in (state, {k: v for k, v in state.items() if k != "backbone"}):
        rebuilt = runtime.trained_model(checkpoint, torch.device("cpu"), dataset="pairs.csv")
        assert rebuilt.config == demo.MINI_CLIP
    assert loaded == [(runtime.DEMO_CLIP, None), (None, "demo")]
    monkeypatch.setattr(runtime, "DEMO_CLIP", "/nonexistent/mini-clip.pt")
    assert runtime.backbone_record(None, "demo", 3) == {"random_tiny_clip_seed": 3}
    assert runtime.recorded_backbone({"backbone": {"random_tiny_clip_seed": 3}}) == (None, "demo", 3)
