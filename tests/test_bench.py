"""bench.py's baseline is a faithful re-implementation of the released code path, and bench.main reports JSON."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adapter
import clip_min
import train
from benchmarks import bench, released_path
from support import demo, released, runtime
from helpers import REPO


def test_released_path_matches_ours():
    """Same weights, dropout off: same clean embeddings, same HMMC loss, same adapter gradients after one step."""
    ours = bench.build_ours(demo.MINI_CLIP, "mrs").eval()
    baseline = released_path.ReleasedPath(ours).eval()
    assert not any(p.requires_grad for p in baseline.clip.parameters())  # the backbone is frozen
    images, tokens = bench.inputs(demo.MINI_CLIP, 4, "cpu", seed=3)
    assert clip_min.trim(tokens).shape[1] < tokens.shape[1]  # ours runs on cut text, the baseline path on all 77 tokens

    diffs = bench.max_differences(ours, baseline, images, tokens)
    assert diffs["image"] < 1e-5 and diffs["text"] < 1e-5
    with torch.no_grad():  # the adapter matters, so the comparison above is not vacuous
        without = bench.build_ours(demo.MINI_CLIP, "mrs").eval()
        without.mrs_adapter.requires_grad_(False).image_up.weight.zero_()
        without.mrs_adapter.text_up.weight.zero_()
        assert (without.encode_image(images) - baseline.encode_image(images, 0.0)).abs().max() > 1e-3

    args = argparse.Namespace(amp="off", loss="hmmc", mask_same_image=False, margin=0.2, grad_clip=0.0)
    our_params = [p for p in ours.parameters() if p.requires_grad]
    terms = train.train_step(adapter.ViewsEncoder(ours), torch.optim.Adam(our_params),
                             torch.amp.GradScaler("cpu", enabled=False), images, tokens, torch.arange(4), args)
    loss = baseline.step(torch.optim.Adam(baseline.adapter.parameters()), images, tokens)
    assert terms["loss"] > 0.1  # hinges are active, so gradients flow
    assert abs(terms["loss"] - loss) <= 1e-5 * loss
    for official, mine in released.OFFICIAL_MRS_NAMES.items():
        for kind in ("weight", "bias"):
            theirs = getattr(getattr(baseline.adapter, official), kind).grad
            our = getattr(getattr(ours.mrs_adapter, mine), kind).grad
            assert theirs.abs().max() > 0
            torch.testing.assert_close(our, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max().item())


def test_useful_flops_match_a_flop_counter():
    """The analytic forward count equals torch's FlopCounterMode on a plain CLIP's encoders."""
    model = clip_min.CLIP(demo.MINI_CLIP).eval()
    images, tokens = bench.inputs(demo.MINI_CLIP, 3, "cpu")
    tokens = clip_min.trim(tokens)
    # The math backend computes attention with matmuls the counter sees (it skips the fused CPU kernel).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_image(images), model.encode_text(tokens)
    assert bench.useful_flops(demo.MINI_CLIP, 3, 3, tokens.shape[1], backward=False) == counter.get_total_flops()


@pytest.mark.slow
def test_main_prints_json(capsys):
    report = bench.main(["--json", "--tiny", "--device", "cpu", "--batch-sizes", "4", "--warmup", "0", "--iters", "1",
                         "--test-images", "2", "--rounds", "3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    expected = {"model", "method", "device", "amp", "flops", "max_abs_diff", "input", "results"}
    assert expected <= set(printed)
    assert printed["amp"] == runtime.default_amp(torch.device("cpu"), say=lambda line: None)  # the CPU's best
    assert printed["matmul_gflops"]["fp32"] > 0 and printed["matmul_gflops"]["bf16"] > 0
    assert max(printed["max_abs_diff"].values()) < 1e-5
    row = printed["results"]["4"]
    for path in ("ours", "released"):
        assert row[path]["train"]["pairs_per_s"] > 0 and row[path]["train"]["peak_mb"] > 0
        assert row[path]["encode"]["images_per_s"] > 0 and row[path]["train"]["useful_gflops"] > 0
        assert row[path]["train"]["matmul_gflops"] > 0 and 0 < row[path]["train"]["efficiency"]
    assert row["train_memory_ratio"] > 0
    for part in ("train", "encode"):  # the paths took turns: three timings each, paired round by round
        released, ours = row["released"][part]["times"], row["ours"][part]["times"]
        assert len(released) == len(ours) == 3
        ratios = [r / o for r, o in zip(released, ours)]
        assert row["speedup_rounds"][part] == ratios and row["speedup"][part] == sorted(ratios)[1]
        assert row["ours"][part]["seconds"] == sorted(ours)[1]
    assert printed["input"]["decode_images_per_s"] > 0 and printed["input"]["batch_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("failure", [dict(method="no-such-method"), dict(compile="no-such-mode")])
def test_a_dying_worker_stops_the_run_with_a_message(failure):
    """Both workers die (an unknown method), or only the last one (an unknown compile mode): no hang either way."""
    opts = bench.parse_args(["--tiny", "--device", "cpu", "--batch-sizes", "4", "--iters", "1", "--test-images", "2"])
    vars(opts).update(failure)
    with pytest.raises(SystemExit, match="worker process died"):
        bench.run(("released", "ours"), opts, 4)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """DRY_RUN=1 runs the GPU check's commands on the CPU with a tiny CLIP: every section exits 0 and prints its
    numbers, and its log lands in $OUT."""
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable,
               PE_RSITR_CACHE=str(tmp_path / "demo-data"))
    done = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "all sections passed" in done.stdout
    number = r"\d+(\.\d+)?"
    for section in ("bench-eager", "bench-compiled", "train-demo-bf16", "train-demo-fp16"):
        assert f"== {section}: exit 0" in done.stdout, section
        log = (tmp_path / f"{section}.log").read_text()
        if section.startswith("bench"):
            assert re.search(rf"ours +train \| +{number} +{number} +{number} +{number}%", log), log
            assert re.search(rf"ours / released: speed: encode {number}x .*train {number}x", log), log
        else:
            assert re.search(rf"^test i2t R@1/5/10 {number}/{number}/{number} .* mR {number}$", log, re.M), log
            assert os.path.isfile(tmp_path / f"run-{section[-4:]}" / "last.pt")


@pytest.mark.slow
def test_profile_shares_add_up():
    report = bench.main(["--profile", "--tiny", "--device", "cpu", "--amp", "bf16", "--batch-sizes", "4",
                         "--test-images", "2", "--json"])
    for part in ("train", "encode"):
        shares = report["profile"]["4"][part]
        assert abs(sum(shares.values()) - 1) < 1e-6 and shares["matrix products"] > 0.05, shares
    assert "softmax" in report["profile"]["4"]["train"]  # the spelled-out attention's own softmax, not a fused kernel
    assert not report["results"]
