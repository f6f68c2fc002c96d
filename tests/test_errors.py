"""The promise to a user: a bad file or value ends the command with one `error: ...` line that names it, what is wrong
and what to do (exit status 2 for usage, else 1), no traceback, no torch advice, and nothing lost or left in the way; a
run folder is never overwritten unasked nor shared; Ctrl-C and SIGTERM save and say how to go on; a disk full or a
nan loss leaves the last good files and says a command that works.

Each row of BAD_INPUTS is a command line, the exit status, the last line it must print, the files that must come out
unchanged and those that must be absent afterwards (a failed command leaves no folder the next one trips over)."""
import argparse
import errno
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
import train
from support import run_folder, runtime
from helpers import REPO, make_world

pytestmark = pytest.mark.usefixtures("exact_cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a micro CLIP, a one-epoch run and a zero-shot run on them, and damaged files of every kind."""
    root = tmp_path_factory.mktemp("errors")
    world = make_world(root)
    with pytest.MonkeyPatch.context() as patch:  # as exact_cpu, for a module-scoped fixture
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        train.main(train_args(world, root / "run", "--epochs", "1"))
        train.main(train_args(world, root / "zeroshot", "--method", "zeroshot"))  # metrics.jsonl, test.json: no last.pt
        write_index(world, root)
    clip = open(world.clip, "rb").read()
    (root / "truncated.pt").write_bytes(clip[:len(clip) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "text.pt").write_text("these are not weights\n")
    (root / "a-file").write_text("not a folder\n")
    torch.save({"epoch": 12, "model": {"w": torch.zeros(2)}, "options": argparse.Namespace(batch_size=16)},
               root / "model_best.pth.tar")  # the layout of the authors' released checkpoints
    shutil.copytree(root / "run", root / "damaged")
    (root / "damaged" / "last.pt").write_bytes(clip[:1000])
    best = torch.load(root / "run" / "best.pt", weights_only=True)
    for name, record in (("moved.pt", {**best["backbone"], "file": str(root / "gone.pt")}),
                         ("changed.pt", {**best["backbone"], "sha256": "0" * 64})):
        torch.save({**best, "backbone": record}, root / name)  # trained on a file since moved, or rewritten
    write_archives(root)
    busy = socket.create_server(("127.0.0.1", 0))  # a port in use while the module's tests run
    return SimpleNamespace(**vars(world), run=root / "run", tmp=root, busy=busy, busy_port=busy.getsockname()[1])


def write_index(world, root):
    """photos/: two images; idx/: their index, made with the micro CLIP."""
    os.makedirs(root / "photos")
    for k in range(2):
        Image.fromarray(np.full((24, 30, 3), 100 * k, np.uint8)).save(root / "photos" / f"{k}.png")
    retrieve.main(index_args(SimpleNamespace(**vars(world), tmp=root), "idx"))
    shutil.copytree(root / "idx", root / "damaged-idx")
    (root / "damaged-idx" / "manifest.json").write_text('{"format": 1, "generation"')  # cut short
    shutil.copytree(root / "idx", root / "emptied-idx")
    os.remove(root / "emptied-idx" / "embeddings-1.npy")


def index_args(world, folder, source="photos", *extra):
    return ["index", str(world.tmp / folder), str(world.tmp / source), "--clip", world.clip, "--clip-activation",
            "quick_gelu", "--workers", "1", *extra]


def write_archives(root):
    """one.csv: a single image; truncated.csv: five JPEG images, the third (line 4) cut short."""
    for k in range(5):
        Image.fromarray(np.full((24, 30, 3), 40 * k, np.uint8)).save(root / f"{k}.jpg")
    (root / "2.jpg").write_bytes((root / "2.jpg").read_bytes()[:200])
    (root / "one.csv").write_text("filepath,title\n0.jpg,a dark image\n0.jpg,the darkest\n")
    (root / "truncated.csv").write_text("filepath,title\n" + "".join(f"{k}.jpg,image {k}\n" for k in range(5)))


def train_args(world, out, *extra):
    return ["--dataset", world.name, "--data-root", world.root, "--clip", world.clip, "--workers", "1",
            "--batch-size", "8", "--amp", "off", "--out", str(out), *extra]


def environment(world):
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PE_RSITR_CACHE": str(world.tmp / "cache")}


def row(script, argv, status, line, unchanged=(), absent=()):
    """A command (argv given the world), its exit status, its last line (regex), the files under the world that
    must come out unchanged and those that must not be there afterwards."""
    return SimpleNamespace(script=script, argv=argv, status=status, line=line, unchanged=unchanged, absent=absent)


def trained(w, *extra):
    return ["--checkpoint", str(w.run / "best.pt"), *extra]


def bad_value(flag, value, said, new="new"):
    """train.py with one impossible value: refused before anything is made."""
    return row("train.py", lambda w: train_args(w, w.tmp / new, flag, value), 2, said, absent=[new])


INDEX_FILES = ["idx/manifest.json", "idx/embeddings-1.npy"]
RUN_FILES = ["run/last.pt", "run/best.pt", "run/metrics.jsonl", "run/test.json"]
ZEROSHOT_FILES = ["zeroshot/metrics.jsonl", "zeroshot/test.json", "zeroshot/splits.json"]
BAD_INPUTS = {
    # ---------------------------------------------------------------- train.py: folders that hold a run
    "run-again-without-resume": row("train.py", lambda w: train_args(w, w.run, "--epochs", "1"), 2,
                                    r"^error: .*run holds a run \(last.pt, best.pt, metrics.jsonl, test.json\): "
                                    r"continue it with --resume, .*another --out, or .*--overwrite$", RUN_FILES),
    "zeroshot-run-again": row("train.py", lambda w: train_args(w, w.tmp / "zeroshot", "--method", "zeroshot"), 2,
                              r"^error: .*zeroshot holds a run \(metrics.jsonl, test.json\): start another with "
                              r"another --out, or replace this one with --overwrite$", ZEROSHOT_FILES),
    "zeroshot-run-resume": row("train.py", lambda w: train_args(w, w.tmp / "zeroshot", "--method", "zeroshot",
                                                                "--resume"), 2,
                               r"^error: --resume: no checkpoint at .*zeroshot/last.pt \(the run saved nothing to "
                               r"resume\): start it without --resume and with --overwrite$", ZEROSHOT_FILES),
    "resume-a-damaged-last-pt": row("train.py", lambda w: train_args(w, w.tmp / "damaged", "--resume"), 1,
                                    r"^error: .*last.pt is cut short or damaged .*--overwrite", ["damaged/last.pt"]),
    "resume-nothing": row("train.py", lambda w: train_args(w, w.tmp / "empty", "--resume"), 2,
                          r"^error: --resume: no checkpoint at .*last.pt .*without --resume$", absent=["empty"]),
    "out-is-a-file": row("train.py", lambda w: train_args(w, w.tmp / "a-file"), 2,
                         r"^error: --out .*a-file is a file, not a folder: choose another --out$", ["a-file"]),
    # ---------------------------------------------------------------- train.py: every option's impossible value
    "lr-inf": bad_value("--lr", "inf", r"error: --lr must be a positive number, got inf$"),
    "lr-nan": bad_value("--lr", "nan", r"error: --lr must be a positive number, got nan$"),
    "lr-negative": bad_value("--lr", "-1", r"error: --lr must be a positive number, got -1.0$"),
    "epochs-zero": bad_value("--epochs", "0", r"error: --epochs must be at least 1, got 0$"),
    "batch-size-one": bad_value("--batch-size", "1", r"error: --batch-size must be at least 2 \(a pair's negatives "
                                                     r"are the batch's other pairs\), got 1$"),
    "log-every-zero": bad_value("--log-every", "0", r"error: --log-every must be at least 1, got 0$"),
    "lr-decay-epoch-zero": bad_value("--lr-decay-epoch", "0", r"error: --lr-decay-epoch must be at least 1, got 0$"),
    "workers-zero": bad_value("--workers", "0", r"error: --workers must be at least 1, got 0$"),
    "save-minutes-nan": bad_value("--save-minutes", "nan", r"error: --save-minutes must be a number >= 0, got nan$"),
    "margin-inf": bad_value("--margin", "inf", r"error: --margin must be a number >= 0, got inf$"),
    "margin-negative": bad_value("--margin", "-0.2", r"error: --margin must be a number >= 0, got -0.2$"),
    "grad-clip-negative": bad_value("--grad-clip", "-1", r"error: --grad-clip must be a number >= 0 \(0: off\), "
                                                         r"got -1.0$"),
    "seed-negative": bad_value("--seed", "-1", r"error: --seed must be between 0 and 2\^32 - 1, got -1$"),
    "compile-mode": bad_value("--compile", "fast", r"error: --compile fast: MODE is one of default, .*reduce-overhead"),
    "method-unknown": bad_value("--method", "nope", r"error: argument --method: invalid choice: 'nope'"),
    "amp-unknown": bad_value("--amp", "fp8", r"error: argument --amp: invalid choice: 'fp8'"),
    "csv-separator-two-characters": bad_value("--csv-separator", ";;", r"error: argument --csv-separator: one "
                                                                       r"character \(\\t: a tab\), got ';;'$"),
    "resume-and-overwrite": bad_value("--resume", "--overwrite", r"error: --resume continues the run in --out, "
                                                                r"--overwrite replaces it: choose one$"),
    # ---------------------------------------------------------------- train.py: data or backbone refused: no folder
    # A --clip that does not exist: the batch is refused before the backbone is looked for.
    "batch-larger-than-the-data": row("train.py", lambda w: train_args(w, w.tmp / "big", "--batch-size", "1000",
                                                                       "--clip", "nowhere.pt"), 2,
                                      r"^error: --batch-size 1000 exceeds the 160 training pairs of demo_natural",
                                      absent=["big"]),
    "dataset-is-a-folder": row("train.py", lambda w: train_args(w, w.tmp / "f", "--dataset", w.root), 1,
                               r"^error: --dataset .* is a folder: a dataset is named and looked up under "
                               r"--data-root; pass --dataset demo_natural --data-root ", absent=["f"]),
    "one-image-archive": row("train.py", lambda w: train_args(w, w.tmp / "g", "--dataset", str(w.tmp / "one.csv")),
                             1, r"^error: .*one.csv has no train images: its 1 image\(s\) \(1 without a split label\) "
                                r"cannot make a training, a validation and a test split", absent=["g"]),
    "archive-truncated-image": row("train.py", lambda w: train_args(w, w.tmp / "h", "--dataset",
                                                                    str(w.tmp / "truncated.csv"), "--batch-size", "2"),
                                   1,
                                   r"^error: .*truncated.csv line 4: cannot decode image .*2.jpg", absent=["h"]),
    "clip-missing": row("train.py", lambda w: train_args(w, w.tmp / "e", "--clip", "nowhere.pt"), 1,
                        r"^error: model 'nowhere.pt' is neither a known name nor a file", absent=["e"]),
    "clip-truncated": row("train.py", lambda w: train_args(w, w.tmp / "a", "--clip", str(w.tmp / "truncated.pt")), 1,
                          r"^error: .*truncated.pt .*: it is cut short or damaged", ["truncated.pt"], ["a"]),
    "clip-random": row("train.py", lambda w: train_args(w, w.tmp / "b", "--clip", str(w.tmp / "random.pt")), 1,
                       r"^error: .*random.pt .*: it is in none of the formats read here", absent=["b"]),
    "clip-text": row("train.py", lambda w: train_args(w, w.tmp / "c", "--clip", str(w.tmp / "text.pt")), 1,
                     r"^error: .*text.pt .*: it is a text file", absent=["c"]),
    "clip-is-a-run-checkpoint": row("train.py", lambda w: train_args(w, w.tmp / "d", "--clip", str(w.run / "best.pt")),
                                    1, r"^error: .*best.pt is a checkpoint written by train.py .*evaluate.py "
                                       r"--checkpoint", ["run/best.pt"], ["d"]),
    # ---------------------------------------------------------------- evaluate.py
    "checkpoint-random": row("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "random.pt")], 1,
                             r"^error: .*random.pt is in none of the formats read here"),
    "checkpoint-text": row("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "text.pt")], 1,
                           r"^error: .*text.pt is a text file"),
    "checkpoint-is-a-clip": row("evaluate.py", lambda w: ["--checkpoint", w.clip], 1,
                                r"^error: .*clip.pt holds a model's weights, not a checkpoint written by train.py: "
                                r"pass it as --clip"),
    "checkpoint-is-openais-format": row("evaluate.py", lambda w: ["--checkpoint", runtime.DEMO_CLIP], 1,
                                        r"^error: .*mini-clip.pt holds CLIP weights \(a model file such as OpenAI's\), "
                                        r"not a checkpoint written by train.py: pass it as --clip"),
    "checkpoint-is-a-run-folder": row("evaluate.py", lambda w: ["--checkpoint", str(w.run)], 1,
                                      r"^error: .*run is a run folder: pass its checkpoint, .*run/best.pt$"),
    "checkpoint-is-released": row("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "model_best.pth.tar")], 1,
                                  r"^error: .*released code: score it with evaluate.py --official-checkpoint"),
    "method-not-the-checkpoints": row("evaluate.py", lambda w: trained(w, "--method", "lora"), 1,
                                      r"^error: this checkpoint was trained with method mrs, not lora: leave --method "
                                      r"out \(or pass --method mrs\)$", RUN_FILES),
    "backbone-moved": row("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "moved.pt")], 1,
                          r"^error: this checkpoint's backbone, .*gone.pt \(sha256 \w{12}...\), is not there any more "
                          r"\(moved or deleted\): pass that file with --clip$"),
    "backbone-changed": row("evaluate.py", lambda w: ["--checkpoint", str(w.tmp / "changed.pt")], 1,
                            r"^error: this checkpoint's backbone, .*clip.pt, has changed since it was trained on it "
                            r"\(sha256 000000000000... then, \w{12}... now\): pass the original weights with --clip$"),
    "out-is-a-json-file": row("evaluate.py", lambda w: trained(w, "--out", str(w.tmp / "eval.json")), 2,
                              r"error: --out .*eval.json: a folder now, as in train.py and table.py \(evaluate.py "
                              r"writes test_eval.json into it\): pass --out .*errors\d*$", RUN_FILES, ["eval.json"]),
    "evaluate-workers-zero": row("evaluate.py", lambda w: trained(w, "--workers", "0"), 2,
                                 r"error: --workers must be at least 1, got 0$"),
    "evaluate-visualize-negative": row("evaluate.py", lambda w: trained(w, "--visualize", "-1"), 2,
                                       r"error: --visualize K must be positive \(or 0: no gallery\), got -1$"),
    "evaluate-dataset-is-a-folder": row("evaluate.py", lambda w: ["--method", "zeroshot", "--dataset", w.root], 1,
                                        r"^error: --dataset .* is a folder: .*pass --dataset demo_natural --data-root"),
    "official-is-a-run-checkpoint": row("evaluate.py", lambda w: ["--official-checkpoint", str(w.run / "best.pt"),
                                                                  "--dataset", w.name, "--data-root", w.root], 1,
                                        r"^error: .*best.pt is a checkpoint written by this project's train.py.*"
                                        r"evaluate.py --checkpoint"),
    "official-truncated": row("evaluate.py", lambda w: ["--official-checkpoint", str(w.tmp / "truncated.pt"),
                                                        "--dataset", w.name, "--data-root", w.root], 1,
                              r"^error: .*truncated.pt is not a zip file .*cut short"),
    # ---------------------------------------------------------------- table.py
    "table-lr-inf": row("table.py", lambda w: table_args(w, "--lr", "inf"), 2,
                        r"error: --lr must be a positive number, got inf$", absent=["table"]),
    "table-lr-zero": row("table.py", lambda w: table_args(w, "--lr", "0"), 2,
                         r"error: --lr must be a positive number, got 0.0$", absent=["table"]),
    "table-epochs-zero": row("table.py", lambda w: table_args(w, "--epochs", "0"), 2,
                             r"error: --epochs must be at least 1, got 0$", absent=["table"]),
    "table-seeds-negative": row("table.py", lambda w: table_args(w, "--seeds", "1", "-3"), 2,
                                r"error: --seeds must be between 0 and 2\^32 - 1, got 1 -3$", absent=["table"]),
    "table-unknown-method": row("table.py", lambda w: table_args(w, "--methods", "nope"), 2,
                                r"error: unknown method or loss: nope:hmmc$", absent=["table"]),
    "table-out-is-a-file": row("table.py", lambda w: table_args(w, "--out", str(w.tmp / "a-file")), 2,
                               r"error: --out .*a-file is a file, not a folder: choose another --out$", ["a-file"]),
    "table-dataset-is-a-folder": row("table.py", lambda w: table_args(w, "--datasets", w.root), 1,
                                     r"^error: no dataset found: see the lines above", absent=["table"]),
    # ---------------------------------------------------------------- miniature.py
    "miniature-steps-zero": row("miniature.py", lambda w: ["pretrain", "--steps", "0"], 2,
                                r"error: --steps must be at least 1, got 0$"),
    "miniature-seed-negative": row("miniature.py", lambda w: ["pretrain", "--seed", "-1"], 2,
                                   r"error: --seed must be between 0 and 2\^32 - 1, got -1$"),
    "miniature-out-is-a-folder": row("miniature.py", lambda w: ["pretrain", "--out", str(w.tmp)], 2,
                                     r"error: --out .* is a folder: name the file to write$"),
    "miniature-epochs-zero": row("miniature.py", lambda w: ["table", "--epochs", "0"], 2,
                                 r"error: --epochs must be at least 1, got 0$", absent=["runs"]),
    "miniature-lr-negative": row("miniature.py", lambda w: ["table", "--lr", "-1"], 2,
                                 r"error: --lr must be a positive number, got -1.0$", absent=["runs"]),
    # ---------------------------------------------------------------- data.py (the report)
    "report-archive-truncated-image": row("data.py", lambda w: [str(w.tmp / "truncated.csv")], 1,
                                          r"^error: .*truncated.csv line 4: cannot decode image .*2.jpg"),
    "report-one-image-archive": row("data.py", lambda w: [str(w.tmp / "one.csv")], 1,
                                    r"^error: .*one.csv has no train images: its 1 image\(s\)"),
    "report-dataset-is-a-folder": row("data.py", lambda w: [w.root], 1,
                                      r"^error: --dataset .* is a folder: .*pass --dataset demo_natural --data-root"),
    "report-workers-zero": row("data.py", lambda w: [w.name, "--data-root", w.root, "--workers", "0"], 2,
                               r"error: --workers must be at least 1, got 0$"),
    "report-csv-separator-two-characters": row("data.py", lambda w: [str(w.tmp / "one.csv"), "--csv-separator", "ab"],
                                               2, r"error: argument --csv-separator: one character"),
    # ---------------------------------------------------------------- retrieve.py
    "index-source-is-a-csv": row("retrieve.py", lambda w: index_args(w, "new-idx", "one.csv"), 1,
                                 r"^error: .*one.csv is a CSV/TSV archive: index takes a folder of images or a "
                                 r"dataset name .*pass the folder its images lie in, e.g. ", ["one.csv"], ["new-idx"]),
    "index-source-is-a-file": row("retrieve.py", lambda w: index_args(w, "new-idx", "0.jpg"), 1,
                                  r"^error: .*0.jpg is a file: index takes a folder of images or a dataset name",
                                  absent=["new-idx"]),
    "index-source-missing": row("retrieve.py", lambda w: index_args(w, "new-idx", "nowhere"), 1,
                                r"^error: no folder .*nowhere$", absent=["new-idx"]),
    "index-source-without-images": row("retrieve.py", lambda w: index_args(w, "new-idx", "run"), 1,
                                       r"^error: no images \(.tif, .tiff, .png, .jpg, .jpeg\) under .*run$",
                                       RUN_FILES, ["new-idx"]),
    "index-dir-is-a-file": row("retrieve.py", lambda w: index_args(w, "a-file"), 1,
                               r"^error: .*a-file is a file: the index DIR is a folder", ["a-file"]),
    "index-clip-missing": row("retrieve.py", lambda w: [*index_args(w, "new-idx"), "--clip", "nowhere.pt"], 1,
                              r"^error: model 'nowhere.pt' is neither a known name nor a file", absent=["new-idx"]),
    "index-processes-clip-missing": row("retrieve.py", lambda w: [*index_args(w, "new-idx", "photos", "--processes",
                                                                         "2"), "--clip", "nowhere.pt"], 1,
                                        r"^error: model 'nowhere.pt' is neither a known name nor a file",
                                        absent=["new-idx"]),
    "index-another-model": row("retrieve.py", lambda w: [*index_args(w, "idx"), "--clip", runtime.DEMO_CLIP], 1,
                               r"^error: .*idx was made with CLIP, .*this run uses .*--rebuild to start over$",
                               INDEX_FILES),
    "index-shard-out-of-range": row("retrieve.py", lambda w: index_args(w, "new-idx", "photos", "--shard", "3/3"),
                                    2, r"error: argument --shard: I/N with 0 <= I < N .*got '3/3'$",
                                    absent=["new-idx"]),
    "index-checkpoint-is-a-folder": row("retrieve.py", lambda w: [*index_args(w, "new-idx"), "--checkpoint",
                                                                  str(w.tmp / "photos")], 1,
                                        r"^error: .*photos is a folder, not a checkpoint: pass a best.pt/last.pt "
                                        r"written by train.py$", absent=["new-idx"]),
    "index-damaged-manifest": row("retrieve.py", lambda w: index_args(w, "damaged-idx"), 1,
                                  r"^error: .*damaged-idx/manifest.json is damaged \(.*\): index again with "
                                  r"--rebuild$", ["damaged-idx/manifest.json", "damaged-idx/embeddings-1.npy"]),
    "search-damaged-manifest": row("retrieve.py", lambda w: ["search", str(w.tmp / "damaged-idx"), "a lake"], 1,
                                   r"^error: .*damaged-idx/manifest.json is damaged \(.*\): index again with "
                                   r"--rebuild$", ["damaged-idx/manifest.json"]),
    "search-embeddings-missing": row("retrieve.py", lambda w: ["search", str(w.tmp / "emptied-idx"), "a lake"], 1,
                                     r"^error: .*emptied-idx/embeddings-1.npy, named by .*emptied-idx/manifest.json, "
                                     r"is missing: index again with --rebuild$", ["emptied-idx/manifest.json"]),
    "index-processes-zero": row("retrieve.py", lambda w: index_args(w, "new-idx", "photos", "--processes", "0"), 2,
                                r"error: --processes must be at least 1, got 0$", absent=["new-idx"]),
    "index-workers-zero": row("retrieve.py", lambda w: index_args(w, "new-idx", "photos", "--workers", "0"), 2,
                              r"error: --workers must be at least 1, got 0$", absent=["new-idx"]),
    "index-memory-zero": row("retrieve.py", lambda w: index_args(w, "new-idx", "photos", "--ann", "--memory", "0"), 2,
                             r"error: --memory must be positive, got 0.0$", absent=["new-idx"]),
    "index-tile-too-small": row("retrieve.py", lambda w: index_args(w, "new-idx", "photos", "--tile", "3"), 2,
                                r"error: --tile SIZE must be at least 16 pixels, got 3$", absent=["new-idx"]),
    "search-blank-query": row("retrieve.py", lambda w: ["search", str(w.tmp / "idx"), "  "], 2,
                              r"error: the query is blank: describe what to find, e.g. 'a bridge over a river', or "
                              r"pass --image$", INDEX_FILES),
    "search-image-is-a-folder": row("retrieve.py", lambda w: ["search", str(w.tmp / "idx"), "--image",
                                                              str(w.tmp / "photos")], 2,
                                    r"error: --image .*photos is a folder: give one image file$", INDEX_FILES),
    "search-gallery-not-an-image": row("retrieve.py", lambda w: ["search", str(w.tmp / "idx"), "a lake", "--gallery",
                                                                 str(w.tmp / "out.txt")], 2,
                                       r"error: --gallery .*out.txt: name an image file to write, e.g. results.png$",
                                       absent=["out.txt"]),
    "search-gallery-no-folder": row("retrieve.py", lambda w: ["search", str(w.tmp / "idx"), "a lake", "--gallery",
                                                              str(w.tmp / "nowhere" / "g.png")], 2,
                                    r"error: --gallery .*g.png: there is no folder .*nowhere to write it in$",
                                    absent=["nowhere"]),
    "search-top-zero": row("retrieve.py", lambda w: ["search", str(w.tmp / "idx"), "a lake", "--top", "0"], 2,
                           r"error: --top must be positive, got 0$"),
    "search-no-index": row("retrieve.py", lambda w: ["search", str(w.tmp / "photos"), "a lake"], 1,
                           r"^error: no index in .*photos \(make one: python retrieve.py index .*photos SOURCE\)$"),
    "serve-port-in-use": row("retrieve.py", lambda w: ["serve", str(w.tmp / "idx"), "--port", str(w.busy_port)], 1,
                             r"^error: cannot serve at 127.0.0.1:\d+: .*in use; another server holds it: pass "
                             r"another --port, or --port 0 for any free one$", INDEX_FILES),
    "serve-port-out-of-range": row("retrieve.py", lambda w: ["serve", str(w.tmp / "idx"), "--port", "70000"], 2,
                                   r"error: --port must be from 0 to 65535 \(0: any free port\), got 70000$"),
    "serve-host-not-here": row("retrieve.py", lambda w: ["serve", str(w.tmp / "idx"), "--host", "192.0.2.1"], 1,
                               r"^error: cannot serve at 192.0.2.1:8000: .*; pass a --host of this machine"),
}


def table_args(world, *extra):
    return ["--datasets", world.name, "--data-root", world.root, "--clip", world.clip, "--out",
            str(world.tmp / "table"), *extra]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None


# Rows run as subprocesses: one per command, so that each __main__ block is seen to take the path. The others run
# in-process through the same runtime.run_command the __main__ blocks call (a subprocess costs seconds of imports).
SUBPROCESS = ("run-again-without-resume", "checkpoint-is-openais-format", "table-lr-inf", "miniature-lr-negative",
              "report-archive-truncated-image", "search-blank-query")


@pytest.fixture(scope="module")
def outcomes(world):
    """The SUBPROCESS rows run at once, with the digests of their files before and after."""
    def launch(name):
        case = BAD_INPUTS[name]
        before = {f: digest(world.tmp / f) for f in case.unchanged}
        proc = subprocess.run([sys.executable, os.path.join(REPO, case.script), *case.argv(world)], cwd=world.tmp,
                              env=environment(world), capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr, before, {f: digest(world.tmp / f) for f in case.unchanged}
    def with_traceback():  # the text.pt row again, asking for the traceback
        return subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--checkpoint",
                               str(world.tmp / "text.pt")], cwd=world.tmp, capture_output=True, text=True,
                              env={**environment(world), "PE_RSITR_TRACEBACK": "1"}, timeout=300)
    with ThreadPoolExecutor(len(SUBPROCESS) + 1) as pool:
        traceback = pool.submit(with_traceback)
        return {**dict(zip(SUBPROCESS, pool.map(launch, SUBPROCESS))), "traceback": traceback.result()}


def in_process(world, name, capsys, monkeypatch):
    """A row run as its __main__ block runs it: (exit status, stderr, digests before, after)."""
    import data
    import evaluate
    import miniature
    import table
    case = BAD_INPUTS[name]
    monkeypatch.chdir(world.tmp)
    before = {f: digest(world.tmp / f) for f in case.unchanged}
    main = {"train.py": train, "evaluate.py": evaluate, "table.py": table, "miniature.py": miniature,
            "data.py": data, "retrieve.py": retrieve}[case.script].main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runtime.run_command(lambda: main(case.argv(world)))
    return e.value.code, capsys.readouterr().err, before, {f: digest(world.tmp / f) for f in case.unchanged}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] * (name in SUBPROCESS))
                                  for name in BAD_INPUTS])  # the subprocess rows: seconds of imports each
def test_a_bad_input_ends_in_one_line(world, name, capsys, monkeypatch, request):
    case = BAD_INPUTS[name]
    code, stderr, before, after = request.getfixturevalue("outcomes")[name] if name in SUBPROCESS else \
        in_process(world, name, capsys, monkeypatch)
    said = stderr.strip().splitlines()
    assert code == case.status, stderr[-3000:]
    assert said and re.search(case.line, said[-1]), said[-3:]
    assert not [text for text in ("Traceback", "Warning:", "weights_only", "file an issue") if text in stderr]
    assert sum("error: " in s for s in said) == 1, said
    assert after == before and all(before.values())
    assert not [f for f in case.absent if os.path.exists(world.tmp / f)]


def test_a_damaged_index_is_rebuilt(world, tmp_path):
    """The command the refusal names works: --rebuild replaces a manifest that cannot be read."""
    shutil.copytree(world.tmp / "damaged-idx", tmp_path / "idx")
    retrieve.main(index_args(SimpleNamespace(**vars(world)), tmp_path / "idx", "photos", "--rebuild"))
    manifest, embeddings = retrieve.store.load_index(tmp_path / "idx")
    assert len(manifest["files"]) == len(embeddings) == 2


@pytest.mark.slow
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


@pytest.mark.parametrize("first_bad, saved", [(1, False), (8, True)], ids=["first-step", "after-a-save"])
def test_a_nan_loss_says_a_command_that_works(world, tmp_path, monkeypatch, capsys, first_bad, saved):
    """The loss turns nan at the very first step, or at step 8 after the save of step 5: the run stops there, like
    any other, naming the step, and says the command that tries a tenth of the lr, from the last save if there is
    one. Nothing the failed run wrote is in that command's way (a run that saved nothing leaves no folder): it
    runs to its end."""
    import losses
    real, calls = losses.compute, []

    def compute(*a, **k):
        calls.append(1)
        loss, terms = real(*a, **k)
        return (loss * float("nan"), terms) if len(calls) >= first_bad else (loss, terms)

    monkeypatch.setattr(losses, "compute", compute)
    out = tmp_path / "run"
    status, said = one_line_failure(capsys, lambda: train.main(train_args(world, out, "--epochs", "1", "--log-every",
                                                                          "5", "--save-minutes", "0")))
    found = re.fullmatch(rf"error: the loss is not finite at epoch 1, step {first_bad}: training stopped there, "
                         r"nothing of it saved\. Try a smaller --lr \(this epoch's: 0.0002\) or --grad-clip: python "
                         r"train.py (.*)", said[-1])
    assert status == 1 and found, said[-1]
    assert (out / "last.pt").exists() == saved and out.exists() == saved  # no folder at all when nothing was saved
    monkeypatch.setattr(losses, "compute", real)
    argv = shlex.split(found[1])
    assert argv[-2:] == ["--lr", "2e-05"] and ("--resume" in argv) == saved
    train.main(argv)
    assert torch.load(out / "last.pt", weights_only=True)["args"]["lr"] == 2e-5 and (out / "test.json").exists()


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


@pytest.mark.slow
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


@pytest.mark.slow
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
