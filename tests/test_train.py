"""End-to-end tests of train.py's command line on a micro CLIP and a small generated dataset (CPU)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import adapter
import clip_min
import data
import losses
import metrics
import train
from support import runtime
from helpers import (MICRO, REPO, args_for, initial_trainable, interrupted, max_change, read_metrics,
                     released_generate_random_samples, run, trainable)

STEPS_PER_EPOCH = 20  # 40 images -> 32 train images (80/20 split) -> 160 pairs -> 20 batches of 8
pytestmark = pytest.mark.usefixtures("exact_cpu")


def torchrun(cwd, script, *args, **env):
    """`script` under torchrun as two CPU processes (gloo), with extra environment variables."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def short_run(world, tmp_path_factory):
    """A two-epoch run on the world (lr decayed from the 2nd epoch), its result and its metrics.jsonl entries."""
    out = tmp_path_factory.mktemp("short") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # as exact_cpu does for each test
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        result = run(world, out, "--epochs", "2", "--log-every", "5", "--lr-decay-epoch", "2")
    torch.set_num_threads(threads)
    return out, result, read_metrics(out)


def test_a_run_folder_holds_the_released_validation_split(world, short_run):
    out, _, _ = short_run
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.jsonl", "splits.json", "test.json",
                                       "val_images.txt"]
    val_split = data.load_split(world.name, world.root, "val")
    with open(out / "splits.json") as f:
        assert json.load(f)["val"] == {"images": val_split.image_paths, "captions": len(val_split.captions)}
    assert (out / "val_images.txt").read_text().split() == [os.path.basename(p) for p in val_split.image_paths]
    folder = os.path.join(world.root, f"{world.name}_precomp")  # the released code's draw on the same files
    with open(os.path.join(folder, "train_caps.txt")) as caps, open(os.path.join(folder, "train_filename.txt")) as names:
        _, released_val = released_generate_random_samples(caps.readlines(), names.read().split(), seed=2)
    assert (out / "val_images.txt").read_text().split() == sorted(released_val)


def test_metrics_log_steps_validation_and_one_final_test(short_run):
    out, result, entries = short_run
    # The starting point on both evaluation splits, then step lines, then one val line per epoch.
    assert {(e["epoch"], e["split"]) for e in entries if e.get("epoch") == 0} == {(0, "val"), (0, "test")}
    steps = [e for e in entries if "step" in e]
    assert [(e["epoch"], e["step"]) for e in steps] == [(ep, s) for ep in (1, 2) for s in (5, 10, 15, 20)]
    for e in steps:
        assert {"loss", "it", "ii", "tt", "lr", "pairs_per_s"} <= set(e)
        assert e["loss"] == pytest.approx(e["it"] + e["ii"] + e["tt"], rel=1e-5)
        assert e["pairs_per_s"] > 0
    assert {e["lr"] for e in steps if e["epoch"] == 1} == {2e-4}
    assert [e["lr"] for e in steps if e["epoch"] == 2] == pytest.approx([2e-4 * 0.7] * 4)  # the 2nd epoch is the first decayed
    val = [e for e in entries if e.get("split") == "val" and e["epoch"] > 0]
    assert [e["epoch"] for e in val] == [1, 2]
    for e in val:
        assert set(e) == {"epoch", "split", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR",
                          "tied_queries"}
        assert e["mR"] == pytest.approx(sum(e[k] for k in e if "R@" in k) / 6)
    # The test split is scored only before training and once at the end: it can never choose anything.
    tests = [e for e in entries if e.get("split") == "test"]
    assert len(tests) == 2 and tests[0]["epoch"] == 0
    with open(out / "test.json") as f:
        written = json.load(f)
    assert written == result == {k: v for k, v in tests[1].items() if k not in ("split", "epoch")}


def test_checkpoints_hold_the_trainable_tensors_and_best_is_the_best_validation(world, short_run):
    out, _, entries = short_run
    # Checkpoints hold the trainable tensors only: small, with exactly the method's names and shapes.
    model, start = initial_trainable(world, "mrs")
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for state in (best, last):
        assert set(state["trainable"]) == set(start)
        assert all(state["trainable"][k].shape == start[k].shape for k in start)
        assert state["method"] == "mrs"
    n_bytes = 4 * adapter.count_trainable(model)
    assert os.path.getsize(out / "best.pt") < 1.25 * n_bytes + 32_000
    assert os.path.getsize(out / "last.pt") < 3.5 * n_bytes + 64_000  # + Adam's two moments
    assert os.path.getsize(out / "best.pt") < os.path.getsize(world.clip) / 20
    assert last["epoch"] == 1 and max_change(last["trainable"], start) > 1e-4
    # best.pt is the first epoch with the highest validation mR, and its weights score exactly that on val.
    val = [e for e in entries if e.get("split") == "val" and e["epoch"] > 0]
    best_mr = max(e["mR"] for e in val)
    assert best["epoch"] + 1 == next(e["epoch"] for e in val if e["mR"] == best_mr)
    assert best["best_mR"] == last["best_mR"] == best_mr
    adapter.load_trainable(model, best["trainable"])
    val_split = data.load_split(world.name, world.root, "val")
    images = data.cache_images(val_split.image_paths, MICRO.image_resolution, workers=1)
    tokens = clip_min.tokenize(val_split.captions, truncate=True)
    sim = metrics.similarity(model.eval(), images, tokens, torch.device("cpu"))
    assert metrics.retrieval_metrics(sim)["mR"] == best_mr


def test_best_checkpoint_follows_validation_and_is_tested(world, tmp_path, monkeypatch):
    """Validation scripted to peak at epoch 1 of 2: best.pt is epoch 1, and test.json scores best.pt, not last.pt."""
    real_recalls, val_mr = metrics.recalls, iter([0.0, 90.0, 10.0])  # before training, epoch 1, epoch 2

    def scripted(counts, *a, **k):
        m = real_recalls(counts, *a, **k)
        if len(counts["i2t"][0]) == 8:  # the validation split's 8 image queries (the test split has 20)
            m["mR"] = next(val_mr)
        return m

    monkeypatch.setattr(metrics, "recalls", scripted)
    out = tmp_path / "run"
    result = run(world, out, "--epochs", "2", "--lr", "1e-3")
    monkeypatch.setattr(metrics, "recalls", real_recalls)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0 and best["best_mR"] == 90.0
    assert max_change(best["trainable"], trainable(out / "last.pt")) > 1e-4

    model, _ = initial_trainable(world, "mrs")
    adapter.load_trainable(model, best["trainable"])
    test = data.load_split(world.name, world.root, "test")
    images = data.cache_images(test.image_paths, MICRO.image_resolution, workers=1)
    tokens = clip_min.tokenize(test.captions, truncate=True)
    sim = metrics.similarity(model.eval(), images, tokens, torch.device("cpu"))
    assert result == metrics.retrieval_metrics(sim)


@pytest.mark.parametrize("save_minutes, interrupt_at, saved_at", [(1e3, 3, (0, 20)), (0, 13, (1, 13))],
                         ids=["epoch-end", "mid-epoch"])
def test_resume_is_exact(world, tmp_path, monkeypatch, save_minutes, interrupt_at, saved_at):
    """A run interrupted in its second epoch and resumed from last.pt ends exactly as an uninterrupted run."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    options = ("--epochs", "3", "--log-every", "1", "--save-minutes", str(save_minutes))
    run(world, straight, *options)

    interrupted(monkeypatch, STEPS_PER_EPOCH + interrupt_at, lambda: run(world, broken, *options))
    saved = torch.load(broken / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == saved_at  # (0, 20): the first epoch; (1, 13): 13 steps of the second
    run(world, broken, *options, "--resume")

    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k, v in trainable(straight / "best.pt").items():
        assert torch.equal(v, trainable(broken / "best.pt")[k])
    assert json.loads((straight / "test.json").read_text()) == json.loads((broken / "test.json").read_text())
    # The resumed log reads as the uninterrupted one: the lines of the steps cut short are gone, none repeats.
    def without_speed(run_dir):
        return [{k: v for k, v in e.items() if k != "pairs_per_s"} for e in read_metrics(run_dir)]
    assert without_speed(broken) == without_speed(straight)
    assert [e["epoch"] for e in read_metrics(broken) if e.get("split") == "val"] == [0, 1, 2, 3]


def test_grad_clip_and_amp(world, tmp_path):
    _, start = initial_trainable(world, "mrs")
    run(world, tmp_path / "plain", "--epochs", "1", "--amp", "off")
    run(world, tmp_path / "loose", "--epochs", "1", "--grad-clip", "1e9")
    run(world, tmp_path / "tight", "--epochs", "1", "--grad-clip", "1e-9")
    plain, loose, tight = (trainable(tmp_path / r / "last.pt") for r in ("plain", "loose", "tight"))
    assert all(torch.equal(plain[k], loose[k]) for k in plain)  # a clip that never bites changes nothing
    # Clipped to a 1e-9 norm, Adam's eps dominates the update: the weights barely move.
    assert max_change(tight, start) < 0.01 * max_change(plain, start)

    result = run(world, tmp_path / "bf16", "--epochs", "1", "--amp", "bf16")
    bf16 = trainable(tmp_path / "bf16" / "last.pt")
    assert all(torch.isfinite(v).all() for v in bf16.values()) and all(0 <= v <= 100 for v in result.values())
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # autocast did run in bfloat16
    assert max_change(bf16, start) > 1e-4


@pytest.mark.parametrize("method", adapter.METHODS)
def test_every_method_trains(world, tmp_path, method):
    out = tmp_path / method
    result = run(world, out, "--method", method, "--epochs", "1", "--batch-size", "16")
    with open(out / "test.json") as f:
        assert json.load(f) == result
    entries = read_metrics(out)
    if method == "zeroshot":  # nothing to train: the frozen model's test numbers, no checkpoints
        assert sorted(os.listdir(out)) == ["metrics.jsonl", "splits.json", "test.json", "val_images.txt"]
        assert {k: v for k, v in entries[1].items() if k not in ("split", "epoch")} == result
        return
    _, start = initial_trainable(world, method)
    state = trainable(out / "last.pt")
    assert set(state) == set(start)
    assert max_change(state, start) > 1e-5, "one epoch left the trainable weights unchanged"
    assert [e["epoch"] for e in entries if e.get("split") == "val"] == [0, 1]


@pytest.mark.parametrize("loss", ["vse_sum", "infonce"])
def test_other_losses(world, tmp_path, loss):
    out = tmp_path / loss
    run(world, out, "--loss", loss, "--epochs", "1", "--batch-size", "16", "--log-every", "5")
    steps = [e for e in read_metrics(out) if "step" in e]
    assert len(steps) == 2 and all(e["loss"] == e["it"] and "ii" not in e for e in steps)


def test_mask_same_image_changes_training(world, tmp_path):
    run(world, tmp_path / "plain", "--epochs", "1", "--loss", "vse_sum")
    run(world, tmp_path / "masked", "--epochs", "1", "--loss", "vse_sum", "--mask-same-image")
    plain, masked = trainable(tmp_path / "plain" / "last.pt"), trainable(tmp_path / "masked" / "last.pt")
    # Batches of 8 pairs from 32 images almost always hold two captions of one image: the flag must matter.
    assert any(not torch.equal(plain[k], masked[k]) for k in plain)


@pytest.mark.parametrize("extra", [
    ("--method", "linear", "--loss", "infonce", "--mask-same-image", "--batch-size", "8", "--lr", "0.1"),
    # Full fine-tuning with a hinge loss: CLIP's temperature trains but gets no gradient, which DDP must allow.
    ("--method", "full", "--loss", "vse_sum", "--batch-size", "16", "--lr", "1e-3"),
], ids=["linear-infonce", "full-vse_sum"])
@pytest.mark.slow
def test_two_processes_equal_one(world, tmp_path, monkeypatch, extra):
    """DDP on CPU (gloo): two processes with half the batch each take the steps one process takes.

    Both runs swap Adam for plain SGD, whose update is linear in the gradient: Adam normalises the gradient's scale
    away, so a DDP gradient off by a constant factor (a missing or doubled reduction) would pass unnoticed. Neither
    loss reads the augmented views, whose dropout masks differ between one and two processes."""
    extra = (*extra, "--epochs", "1")
    driver = tmp_path / "sgd_train.py"  # runs train.py as __main__, as torchrun would, with SGD in Adam's place
    driver.write_text("import runpy, sys, torch\n"
                      "torch.optim.Adam = torch.optim.SGD\n"
                      f"sys.argv[0] = {os.path.join(REPO, 'train.py')!r}\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    ddp = tmp_path / "ddp"
    proc = torchrun(tmp_path, driver, *args_for(world, ddp, *extra), PE_RSITR_CACHE=str(tmp_path / "demo-cache"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("before training: val") == 1  # only rank 0 logs
    assert sorted(os.listdir(ddp)) == ["best.pt", "last.pt", "metrics.jsonl", "splits.json", "test.json",
                                 "val_images.txt"]
    assert [e["epoch"] for e in read_metrics(ddp) if e.get("split") == "val"] == [0, 1]  # only rank 0 records
    rng = torch.load(ddp / "last.pt", weights_only=True)["rng"]  # each process's own dropout stream, to resume it
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    monkeypatch.setattr(torch.optim, "Adam", torch.optim.SGD)
    run(world, tmp_path / "single", *extra)
    _, start = initial_trainable(world, extra[1])
    one, two = trainable(tmp_path / "single" / "last.pt"), trainable(ddp / "last.pt")
    assert max_change(one, start) > 1e-2
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_a_run_is_replaced_only_when_asked(world, tmp_path, capsys):
    """Started again without --resume, a run folder is refused (nothing touched); --overwrite replaces the run and
    its log starts afresh. The last line says where the run was written."""
    out = tmp_path / "run"
    run(world, out, "--epochs", "1", "--batch-size", "16")
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"run written to {out}: last.pt, best.pt, metrics.jsonl, test.json"
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(SystemExit, match="holds a run .*--resume.*--overwrite") as refused:
        run(world, out, "--epochs", "1", "--batch-size", "16")
    assert refused.value.status == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    run(world, out, "--epochs", "1", "--batch-size", "16", "--overwrite")
    assert [e["epoch"] for e in read_metrics(out) if e.get("split") == "val"] == [0, 1]


def test_learning_rate_defaults(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--dataset", "demo", "--lr", "2e-4"])
    assert train.parse_args().lr == 2e-4  # an explicit --lr is kept, also when read from the command line
    assert train.parse_args(["--dataset", "demo", "--lr=2e-4"]).lr == 2e-4
    assert train.parse_args(["--dataset", "demo"]).lr == 1e-3
    assert train.parse_args(["--dataset", "rsitmd"]).lr == 2e-4


def test_bad_arguments(world, tmp_path, monkeypatch):
    for bad in (["--batch-size", "1"], ["--epochs", "0"], ["--log-every", "0"], ["--save-minutes", "-1"],
                ["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--grad-clip", "-1"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit):
            run(world, tmp_path / "bad", *bad)
    with pytest.raises(SystemExit, match="--resume: no checkpoint at .*last.pt"):
        run(world, tmp_path / "fresh", "--resume", "--epochs", "1")
    with monkeypatch.context() as m, pytest.raises(FileNotFoundError) as e:
        # A missing dataset is reported before the backbone is loaded (for ViT-B/32: a 338 MB download).
        m.setattr(runtime, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded before the data was found"))
        train.main(args_for(world, tmp_path / "nope", "--dataset", "nope"))
    assert os.path.join(world.root, "nope_precomp") in str(e.value)
    assert os.path.join(world.root, "dataset_nope.json") in str(e.value)
    # A batch larger than the training set would run no step at all and pass the untrained model off as trained.
    with monkeypatch.context() as m, pytest.raises(SystemExit, match="--batch-size 256"):
        # Refused before the backbone is loaded and any image decoded.
        m.setattr(runtime, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded before the batch was checked"))
        run(world, tmp_path / "huge", "--batch-size", "256", "--epochs", "1")
    assert not os.path.exists(tmp_path / "huge" / "best.pt")
    # Each process resumes its own dropout stream, so a run resumes only with the number of processes it had.
    run(world, tmp_path / "one", "--epochs", "1")
    state = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    torch.save({**state, "rng": state["rng"] * 2}, tmp_path / "one" / "last.pt")
    with pytest.raises(SystemExit, match="written by 2 processes"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume")
    torch.save(state, tmp_path / "one" / "last.pt")
    with pytest.raises(SystemExit, match="other settings .* --batch-size 8 -> 4, --seed 2 -> 3, --margin 0.2 -> 0.3"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume", "--batch-size", "4", "--seed", "3", "--margin", "0.3")
    with pytest.raises(SystemExit, match="other settings .* --amp off -> bf16"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume", "--amp", "bf16")
    # A GPU's dropout stream cannot be resumed on a CPU.
    torch.save({**state, "rng": [{**state["rng"][0], "cuda": torch.zeros(16, dtype=torch.uint8)}]},
               tmp_path / "one" / "last.pt")
    with pytest.raises(SystemExit, match="written on a GPU"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume")
    # The backbone is its weights, wherever they lie: other weights at the same path are another backbone.
    torch.save(state, tmp_path / "one" / "last.pt")
    torch.save({k: v + 1 for k, v in torch.load(world.clip, weights_only=True).items()}, tmp_path / "clip.pt")
    with pytest.raises(SystemExit, match=rf"other settings .* --clip {world.clip} -> {tmp_path / 'clip.pt'}$"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume", "--clip", str(tmp_path / "clip.pt"))
    torch.save({**state, "backbone": {**state["backbone"], "sha256": "0" * 64}}, tmp_path / "one" / "last.pt")
    with pytest.raises(SystemExit, match=rf"other settings .* --clip {world.clip}: other weights now$"):
        run(world, tmp_path / "one", "--epochs", "2", "--resume")


def test_a_run_stopped_before_its_first_save_leaves_nothing(world, tmp_path, monkeypatch):
    """Stopped at once (a second Ctrl-C, or before training began) before anything was saved: no folder is left to
    refuse the command said, which is the same command, and which then runs to its end."""
    out, real_step = tmp_path / "run", train.train_step

    def stop(*a, **k):  # Ctrl-C pressed twice: at once, as the first step begins
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", stop)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(world, out, "--epochs", "1")
    assert stopped.value.args[0] == ("stopped at once (nothing saved). Go on with: python train.py "
                                     + " ".join(args_for(world, out, "--epochs", "1")))
    assert not out.exists()
    monkeypatch.setattr(train, "train_step", real_step)
    run(world, out, "--epochs", "1")
    assert (out / "test.json").exists()


@pytest.mark.slow
def test_compiled_encoder_matches_eager():
    """--compile is output-preserving: the same four embeddings and the same adapter gradients as eager PyTorch
    (eval mode, so that no dropout draws random numbers, which compiled code draws differently)."""
    torch.manual_seed(0)
    model = adapter.apply(clip_min.CLIP(MICRO), "mrs").eval()
    for p in model.mrs_adapter.parameters():  # a non-zero adapter, so its gradients and outputs are not trivial
        torch.nn.init.normal_(p, std=0.02)
    images = torch.randn(4, 3, MICRO.image_resolution, MICRO.image_resolution)
    tokens = clip_min.tokenize(["a red roof", "two ships in a harbour", "a road", "green fields near a river"])
    tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
    results = []
    for encoder in (adapter.ViewsEncoder(model), torch.compile(adapter.ViewsEncoder(model))):
        model.zero_grad(set_to_none=True)
        *views, _ = encoder(images, tokens)
        losses.hmmc(*views)[0].backward()
        results.append(([v.detach() for v in views], [p.grad.clone() for p in model.mrs_adapter.parameters()]))
    (eager_views, eager_grads), (compiled_views, compiled_grads) = results
    for a, b in zip(eager_views + eager_grads, compiled_views + compiled_grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(world, tmp_path):
    """Ctrl-C (SIGINT) during training, after mid-epoch saves: exit status 130, the command that continues, and last.pt
    saved at the step the run stopped (tests/test_errors.py: the same before any save, and SIGTERM)."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = args_for(world, out, "--epochs", "50", "--save-minutes", "0", "--log-every", "1")
    # SIGINT's default disposition, as in a terminal: a test run started in the background inherits it ignored.
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *command], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "last.pt saved. Continue with: python train.py" in stderr and "Traceback" not in stderr
    step = int(stderr.split("step ")[-1].split(":")[0])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step >= 1


@pytest.mark.slow
def test_two_processes_resume_exactly(world, tmp_path):
    """DDP (gloo), MRS-Adapter + HMMC (dropout matters): interrupted mid-epoch and resumed with torchrun, each process
    continues its own dropout stream, so the run ends with the weights of an uninterrupted two-process run."""
    driver = tmp_path / "interruptible_train.py"  # train.py as __main__; with STOP_AT, every process stops there
    driver.write_text("import os, runpy, sys, losses\n"
                      "real, calls = losses.compute, []\n"
                      "def compute(*a, **k):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) == int(os.environ.get('STOP_AT', 0)):\n"
                      "        raise KeyboardInterrupt\n"
                      "    return real(*a, **k)\n"
                      "losses.compute = compute\n"
                      f"sys.argv[0] = {os.path.join(REPO, 'train.py')!r}\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")

    def interruptible(out, *extra, stop_at=0):
        command = args_for(world, out, "--epochs", "2", "--log-every", "1", "--save-minutes", "0", *extra)
        return torchrun(tmp_path, driver, *command, STOP_AT=str(stop_at))

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert interruptible(straight).returncode == 0
    assert interruptible(broken, stop_at=STEPS_PER_EPOCH + 8).returncode != 0  # both processes stop in epoch two
    saved = torch.load(broken / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 7)
    proc = interruptible(broken, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = trainable(straight / "last.pt"), trainable(broken / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_zeroshot(world, tmp_path):
    """Zero-shot trains nothing, so nothing is wrapped in DDP (which refuses such a module); the result is the
    single process's, and only one process prints (here: the repair of an empty caption, once)."""
    shutil.copytree(world.root, tmp_path / "data")
    caps = tmp_path / "data" / f"{world.name}_precomp" / "test_caps.txt"
    caps.write_text("\n" + caps.read_text().split("\n", 1)[1])  # the first caption is empty: repaired by a sibling
    command = [*args_for(world, tmp_path / "ddp", "--method", "zeroshot"), "--data-root", str(tmp_path / "data")]
    proc = torchrun(tmp_path, os.path.join(REPO, "train.py"), *command)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(set(lines)) and sum("repaired while reading" in line for line in lines) == 1, lines
    single = train.main([*command, "--out", str(tmp_path / "single")])  # the last --out counts
    with open(tmp_path / "ddp" / "test.json") as f:
        assert json.load(f) == single


@pytest.mark.parametrize("script, argv", [("train.py", ["--dataset", "nowhere"]),
                                          ("evaluate.py", ["--method", "zeroshot", "--dataset", "nowhere"]),
                                          ("table.py", ["--datasets", "demo", "--methods", "zeroshot", "--clip",
                                                        "nowhere.pt"])])
@pytest.mark.slow
def test_a_missing_file_ends_the_command_with_one_line(script, argv, tmp_path):
    """The command lines say what is missing in one line (exit status 1), without a traceback."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *argv, "--data-root", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "nowhere" in result.stderr
