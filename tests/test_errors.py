"""The promise to a user: a bad file or value ends the command with one `error: ...` line that names it, what is wrong
and what to do (exit status 2 for usage, else 1), no traceback, no torch advice, and nothing lost; a run folder is never
overwritten unasked nor shared; Ctrl-C and SIGTERM save and say how to go on; a disk full or a nan loss leaves the
last good files.

Each row of BAD_INPUTS is a command line, the exit status, the last line it must print and the files that must come
out unchanged."""
import argparse
import errno
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import train
from support import run_folder, runtime
from helpers import REPO, make_world

pytestmark = pytest.mark.usefixtures("exact_cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a micro CLIP, a one-epoch run on them, and damaged files of every kind."""
    root = tmp_path_factory.mktemp("errors")
    world = make_world(root)
    with pytest.MonkeyPatch.context() as patch:  # as exact_cpu, for a module-scoped fixture
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        train.main(train_args(world, root / "run", "--epochs", "1"))
    clip = open(world.clip, "rb").read()
    (root / "truncated.pt").write_bytes(clip[:len(clip) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "text.pt").write_text("these are not weights\n")
    torch.save({"epoch": 12, "model": {"w": torch.zeros(2)}, "options": argparse.Namespace(batch_size=16)},
               root / "model_best.pth.tar")  # the layout of the authors' released checkpoints
    shutil.copytree(root / "run", root / "damaged")
    (root / "damaged" / "last.pt").write_bytes(clip[:1000])
    return SimpleNamespace(**vars(world), run=root / "run", tmp=root)


def train_args(world, out, *extra):
    return ["--dataset", world.name, "--data-root", world.root, "--clip", world.clip, "--workers", "1",
            "--batch-size", "8", "--amp", "off", "--out", str(out), *extra]


def environment(world):
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PE_RSITR_CACHE": str(world.tmp / "cache")}


# name: (script, arguments given the world, exit status, the last line (regex), files under the world unchanged)
BAD_INPUTS = {
    "run-again-without-resume": ("train.py", lambda w: train_args(w, w.run, "--epochs", "1"), 2,
                                 r"^error: .*run holds a run \(last.pt, best.pt, metrics.jsonl\): continue it with "
                                 r"--resume, .*another --out, or .*--overwrite$",
                                 ["run/last.pt", "run/best.pt", "run/metrics.jsonl", "run/test.json"]),
    "lr-inf": ("train.py", lambda w: train_args(w, w.tmp / "new", "--lr", "inf"), 2,
               r"error: --lr must be a positive number, got inf$", []),
    "lr-nan": ("train.py", lambda w: train_args(w, w.tmp / "new", "--lr", "nan"), 2,
               r"error: --lr must be a positive number, got nan$", []),
    "lr-negative": ("train.py", lambda w: train_args(w, w.tmp / "new", "--lr", "-1"), 2,
                    r"error: --lr must be a positive number, got -1.0$", []),
    # A --clip that does not exist: the batch is refused before the backbone is looked for.
    "batch-larger-than-the-data": ("train.py", lambda w: train_args(w, w.tmp / "big", "--batch-size", "1000",
                                                                    "--clip", "nowhere.pt"), 2,
                                   r"^error: --batch-size 1000 exceeds the 160 training pairs of demo_natural", []),
    "clip-truncated": ("train.py", lambda w: train_args(w, w.tmp / "a", "--clip", str(w.tmp / "truncated.pt")), 1,
                       r"^error: .*truncated.pt .*: it is cut short or damaged", ["truncated.pt"]),
    "clip-random": ("train.py", lambda w: train_args(w, w.tmp / "b", "--clip", str(w.tmp / "random.pt")), 1,
                    r"^error: .*random.pt .*: it is in none of the formats read here", []),
    "clip-text": ("train.py", lambda w: train_args(w, w.tmp / "c", "--clip", str(w.tmp / "text.pt")), 1,
                  r"^error: .*text.pt .*: it is a text file", []),
    "clip-is-a-run-checkpoint": ("train.py", lambda w: train_args(w, w.tmp / "d", "--clip", str(w.run / "best.pt")),
                                 1, r"^error: .*best.pt is a checkpoint written by train.py .*evaluate.py --checkpoint",
                                 ["run/best.pt"]),
    "resume-a-damaged-last-pt": ("train.py", lambda w: train_args(w, w.tmp / "damaged", "--resume"), 1,
                                 r"^error: .*last.pt is cut short or damaged .*--overwrite", ["damaged/last.pt"]),
    "resume-nothing": ("train.py", lambda w: train_args(w, w.tmp / "empty", "--resume"), 2,
                       r"^error: --resume: no checkpoint at .*last.pt .*without --resume$", []),
    "checkpoint-random": ("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "random.pt")], 1,
                          r"^error: .*random.pt is in none of the formats read here", []),
    "checkpoint-text": ("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "text.pt")], 1,
                        r"^error: .*text.pt is a text file", []),
    "checkpoint-is-a-clip": ("evaluate.py", lambda w: ["--checkpoint", w.clip], 1,
                             r"^error: .*clip.pt holds a model's weights, not a checkpoint written by train.py: pass "
                             r"it as --clip", []),
    "checkpoint-is-released": ("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "model_best.pth.tar")], 1,
                               r"^error: .*released code: score it with evaluate.py --official-checkpoint", []),
    "official-is-a-run-checkpoint": ("evaluate.py", lambda w: ["--official-checkpoint", str(w.run / "best.pt"),
                                                               "--dataset", w.name, "--data-root", w.root], 1,
                                     r"^error: .*best.pt is a checkpoint written by this project's train.py.*"
                                     r"evaluate.py --checkpoint", []),
    "official-truncated": ("evaluate.py", lambda w: ["--official-checkpoint", str(w.tmp / "truncated.pt"),
                                                     "--dataset", w.name, "--data-root", w.root], 1,
                           r"^error: .*truncated.pt is not a zip file .*cut short", []),
    "table-lr-inf": ("table.py", lambda w: ["--datasets", w.name, "--data-root", w.root, "--clip", w.clip, "--out",
                                            str(w.tmp / "table"), "--lr", "inf"], 2,
                     r"error: --lr must be a positive number, got inf$", []),
}


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


# Rows run as subprocesses: one per command, so that each __main__ block is seen to take the path. The others run
# in-process through the same runtime.run_command the __main__ blocks call (a subprocess costs seconds of imports).
SUBPROCESS = ("run-again-without-resume", "checkpoint-text", "table-lr-inf")


@pytest.fixture(scope="module")
def outcomes(world):
    """The SUBPROCESS rows run at once, with the digests of their files before and after."""
    def launch(name):
        script, argv, *_, files = BAD_INPUTS[name]
        before = {f: digest(world.tmp / f) for f in files}
        proc = subprocess.run([sys.executable, os.path.join(REPO, script), *argv(world)], cwd=world.tmp,
                              env=environment(world), capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr, before, {f: digest(world.tmp / f) for f in files}
    def with_traceback():  # the text.pt row again, asking for the traceback
        return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--checkpoint",
                               str(world.tmp / "text.pt")], cwd=world.tmp, capture_output=True, text=True,
                              env={**environment(world), "PE_RSITR_TRACEBACK": "1"}, timeout=300)
    with ThreadPoolExecutor(len(SUBPROCESS) + 1) as pool:
        traceback = pool.submit(with_traceback)
        return {**dict(zip(SUBPROCESS, pool.map(launch, SUBPROCESS))), "traceback": traceback.result()}


def in_process(world, name, capsys, monkeypatch):
    """A row run as its __main__ block runs it: (exit status, stderr, digests before, after)."""
    import evaluate
    import table
    script, argv, *_, files = BAD_INPUTS[name]
    monkeypatch.chdir(world.tmp)
    before = {f: digest(world.tmp / f) for f in files}
    main = {"train.py": train, "evaluate.py": evaluate, "table.py": table}[script].main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runtime.run_command(lambda: main(argv(world)))
    return e.value.code, capsys.readouterr().err, before, {f: digest(world.tmp / f) for f in files}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_a_bad_input_ends_in_one_line(world, name, capsys, monkeypatch, request):
    _, _, status, line, files = BAD_INPUTS[name]
    code, stderr, before, after = request.getfixturevalue("outcomes")[name] if name in SUBPROCESS else \
        in_process(world, name, capsys, monkeypatch)
    said = stderr.strip().splitlines()
    assert code == status, stderr[-3000:]
    assert said and re.search(line, said[-1]), said[-3:]
    assert "Traceback" not in stderr and "weights_only" not in stderr and "file an issue" not in stderr
    assert sum("error: " in s for s in said) == 1, said
    assert not files or (after == before and all(before.values()))


def test_a_traceback_on_request(outcomes):
    """PE_RSITR_TRACEBACK=1: the same failure with its traceback, for whoever debugs it."""
    proc = outcomes["traceback"]
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UnreadableFile" in proc.stderr


def one_line_failure(capsys, command):
    """(exit status, stderr lines) of command() run as the __main__ blocks run it."""
    with pytest.raises(SystemExit) as e:
        runtime.run_command(command)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def snapshot(folder):
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 84800 vs "
                                                  "84752")], ids=["OSError", "torch's RuntimeError"])
def test_a_full_disk_leaves_the_previous_files(world, tmp_path, monkeypatch, capsys, failure):
    """The disk fills while last.pt (or best.pt) is written: half the file is on disk when the writer fails, with
    an OSError(ENOSPC) or as torch's zip writer says it. One line, the files as they were, no .tmp left."""
    out = tmp_path / "run"
    shutil.copytree(world.run, out)
    before = snapshot(out)
    real_save = torch.save

    def full(obj, path, *a, **k):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise failure

    monkeypatch.setattr(torch, "save", full)
    status, said = one_line_failure(capsys, lambda: train.main(train_args(world, out, "--epochs", "2", "--resume")))
    assert status == 1 and sum("error: " in s for s in said) == 1, said
    why = "No space left on device" if isinstance(failure, OSError) else "the file could not be written in full"
    assert re.match(rf"error: could not write .*(last|best)\.pt \({why}; .* MiB free there\): the previous .* is "
                    r"intact", said[-1]), said[-1]
    after = snapshot(out)
    assert not [name for name in after if name.endswith(".tmp")]
    assert {k: after[k] for k in ("last.pt", "best.pt")} == {k: before[k] for k in ("last.pt", "best.pt")}


def test_a_nan_loss_stops_at_its_step_and_saves_nothing(world, tmp_path, monkeypatch, capsys):
    """The loss turns nan at step 3: training stops, naming step 3, before its first save (at the progress line of
    step 5, with --save-minutes 0), so no last.pt or best.pt holds the broken weights."""
    import losses
    real, calls = losses.compute, []

    def compute(*a, **k):
        calls.append(1)
        loss, terms = real(*a, **k)
        return (loss * float("nan"), terms) if len(calls) >= 3 else (loss, terms)

    monkeypatch.setattr(losses, "compute", compute)
    out = tmp_path / "run"
    status, said = one_line_failure(capsys, lambda: train.main(train_args(world, out, "--epochs", "1", "--log-every",
                                                                          "5", "--save-minutes", "0")))
    assert status == 1 and said[-1].startswith("error: the loss is not finite at epoch 1, step 3: training stopped")
    assert len(calls) == 5 and not (out / "last.pt").exists() and not (out / "best.pt").exists()


def start(world, out, *extra):
    """train.py as a user starts it in a terminal (SIGINT's default disposition, even under a background test run)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *train_args(world, out, *extra)],
                            cwd=world.tmp, env=environment(world), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step(proc, out):
    """Until the run logged its first step (it trains), then the step it logged last."""
    deadline, path = time.time() + 120, out / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and '"step"' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step logged: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_says_the_resume_command(world, tmp_path, signum):
    """SIGTERM (a scheduler) or Ctrl-C before any save: the step ends, last.pt is saved there, the exit status is
    128 + the signal, and the line says the command that continues; that command resumes from the saved step."""
    out = tmp_path / "run"
    proc = start(world, out, "--epochs", "50", "--log-every", "1", "--save-minutes", "1000")
    wait_for_step(proc, out)
    assert not (out / "last.pt").exists()  # no save yet: the signal's save is the first
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    said = stderr.strip().splitlines()
    assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr[-2000:]
    name = signal.Signals(signum).name
    found = re.fullmatch(rf"stopped by {name} at epoch 1, step (\d+): .*last.pt saved. Continue with: python "
                         r"train.py (.*) --resume", said[-1])
    assert found, said[-3:]
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, int(found[1])) and int(found[1]) >= 1
    assert not (out / ".lock").exists()
    argv = found[2].split()
    assert argv == train_args(world, out, "--epochs", "50", "--log-every", "1", "--save-minutes", "1000")
    argv[argv.index("--epochs") + 1] = "1"  # the command said, shortened to the end of the first epoch
    train.main([*argv, "--resume"])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 20


def test_a_second_signal_stops_at_once():
    """While a run can save, the first Ctrl-C only asks; the second raises at once."""
    session = run_folder.Session([], rank=1, deferred=True)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever pytest inherited
    try:
        with run_folder.stop_on_signals(session):
            os.kill(os.getpid(), signal.SIGINT)
            assert session.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes of this thread
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_folder_in_use_is_refused_and_a_dead_holder_taken_over(world, tmp_path, capsys):
    """One process at a time in a run folder: a second one is refused with the holder's pid; a lock left by a
    killed process (its flock gone with it) is taken over."""
    out = tmp_path / "run"
    held = run_folder.claim_folder(train.parse_args(train_args(world, out)))
    try:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *train_args(world, out)],
                              cwd=world.tmp, env=environment(world), capture_output=True, text=True, timeout=300)
    finally:
        run_folder.release_folder(held)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(rf"^error: .*run is in use by train.py process {os.getpid()} on .*: wait for it", proc.stderr,
                     re.M)
    assert not (out / ".lock").exists() and not (out / "metrics.jsonl").exists()

    (out / ".lock").write_text("999999 some-host\n")  # what a killed process leaves
    train.main(train_args(world, out, "--method", "zeroshot"))
    printed = capsys.readouterr().out
    assert "the process that held it is gone; taken over" in printed
    assert printed.strip().splitlines()[-1] == f"run written to {out}: metrics.jsonl, test.json"
    assert not (out / ".lock").exists()
