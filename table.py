"""The paper's results table in one command: every dataset found x method x seed through train.py, each run in its
own folder, then table.md, table.json and table.png: our numbers beside the paper's.

    python table.py --data-root data                     # zero-shot CLIP, full fine-tuning, PE-RSITR; the paper's seed
    python table.py --methods all --seeds 0 1 2          # + every PETL baseline; mean ± std over the seeds
    python table.py --epochs 1 --amp off                 # any other option goes to every train.py run

Hyperparameters: every method trains with PE-RSITR's recipe (recipe.py, train.py's defaults: Adam, the paper's lr,
batch size, epochs and decay, HMMC, the checkpoint chosen on validation) and with its own options at their defaults
(adapter.METHOD_OPTIONS): the paper states no other values. A stated choice: full fine-tuning takes a fraction of the lr
(recipe.FULL_FINE_TUNING_LR_SCALE), as it moves all of CLIP's weights rather than a new small module. Nothing is
chosen on the test split.
Stopped, the same command continues: finished runs are read from their folders (test.json), an interrupted one
resumes from its last.pt (train.py --resume); a folder recorded with other settings is refused, not mixed in.
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

import adapter
import clip_min
import data
import evaluate
import losses
import recipe
import train
from support import runtime

# Yuan et al. 2023, ViT-B/32: every CLIP-based row of Tables I-III (RSICD, RSITMD, UCM) as printed, i2t R@1/5/10,
# t2i R@1/5/10, mR. The paper trains every method with HMMC. Two printed mR values are not the mean of their row's
# recalls (RSITMD AdaptFormer, UCM Cross-Modal Adapter): kept as printed, marked where shown (misprinted_mr).
PAPER = {
    "rsicd": {"zeroshot": (6.77, 15.37, 23.15, 5.01, 15.75, 24.21, 15.04),
              "linear": (8.46, 24.41, 37.72, 7.81, 25.89, 42.47, 24.46),
              "full": (13.54, 30.83, 43.46, 11.55, 33.14, 49.83, 30.39),
              "coop": (6.32, 15.89, 27.60, 4.31, 17.89, 31.73, 17.29),
              "vpt": (7.23, 19.40, 30.77, 6.94, 25.26, 40.73, 21.72),
              "vl_prompt": (6.47, 17.05, 28.68, 6.69, 22.62, 36.16, 19.61),
              "adapter": (8.73, 24.73, 37.81, 8.43, 26.02, 43.33, 24.84),
              "clip_adapter": (7.11, 19.48, 31.01, 7.67, 24.87, 39.73, 21.65),
              "convpass": (6.54, 19.67, 32.78, 7.03, 23.08, 39.15, 21.38),
              "adaptformer": (12.46, 28.49, 41.86, 9.09, 29.89, 46.81, 28.10),
              "cross_modal_adapter": (11.18, 27.31, 40.62, 9.57, 30.74, 48.36, 27.96),
              "uniadapter": (12.65, 30.81, 42.74, 9.61, 30.06, 47.16, 28.84),
              "mrs": (14.13, 31.51, 44.78, 11.63, 33.92, 50.73, 31.12)},
    "rsitmd": {"zeroshot": (9.29, 26.33, 37.39, 7.79, 23.67, 38.89, 23.89),
               "linear": (17.02, 33.12, 48.35, 13.33, 41.80, 63.89, 36.25),
               "full": (24.16, 47.12, 61.28, 20.40, 50.53, 68.54, 45.33),
               "coop": (12.19, 30.69, 42.82, 9.16, 33.85, 54.35, 30.51),
               "vpt": (14.98, 32.05, 40.15, 15.97, 41.35, 60.35, 34.14),
               "vl_prompt": (12.81, 31.28, 42.64, 12.61, 36.20, 58.84, 32.40),
               "adapter": (13.75, 27.64, 39.96, 12.89, 40.09, 59.91, 32.37),
               "clip_adapter": (12.83, 28.84, 39.05, 13.30, 40.20, 60.06, 32.38),
               "convpass": (16.03, 30.16, 40.26, 12.05, 38.66, 58.11, 32.55),
               "adaptformer": (16.71, 30.16, 42.91, 14.27, 41.53, 61.46, 34.81),
               "cross_modal_adapter": (18.16, 36.08, 48.72, 16.31, 44.33, 64.75, 38.06),
               "uniadapter": (19.86, 36.32, 51.28, 17.54, 44.89, 65.46, 39.23),
               "mrs": (23.67, 44.07, 60.36, 20.10, 50.63, 67.97, 44.47)},
    "ucm": {"zeroshot": (10.95, 34.76, 55.71, 7.33, 35.14, 54.57, 33.08),
            "linear": (13.33, 52.71, 77.62, 14.43, 59.42, 90.28, 51.30),
            "full": (17.14, 55.24, 79.52, 13.90, 56.95, 91.81, 52.43),
            "coop": (7.19, 42.76, 74.19, 9.78, 48.34, 87.41, 44.95),
            "vpt": (8.86, 47.81, 78.62, 13.64, 55.61, 94.05, 49.77),
            "vl_prompt": (7.97, 45.48, 75.96, 12.51, 51.57, 91.52, 47.50),
            "adapter": (10.17, 49.73, 80.08, 18.20, 62.47, 95.77, 52.74),
            "clip_adapter": (9.83, 42.52, 66.79, 14.61, 51.03, 84.14, 44.82),
            "convpass": (16.46, 54.79, 78.78, 14.24, 58.67, 94.51, 52.91),
            "adaptformer": (16.92, 54.39, 77.46, 18.74, 63.49, 91.16, 53.69),
            "cross_modal_adapter": (13.77, 50.57, 81.41, 17.43, 61.45, 95.48, 53.62),
            "uniadapter": (14.46, 55.19, 83.95, 16.74, 61.43, 95.76, 54.59),
            "mrs": (22.71, 55.81, 80.33, 18.82, 62.84, 93.72, 55.71)},
}
# The trainable parameter counts the paper prints for each method (the same in the three tables).
PAPER_PARAMS = {"zeroshot": "0.00M", "linear": "1.05M", "full": "151M", "coop": "0.10M", "vpt": "0.46M",
                "vl_prompt": "0.47M", "adapter": "0.17M", "clip_adapter": "0.52M", "convpass": "0.14M",
                "adaptformer": "0.17M", "cross_modal_adapter": "0.16M", "uniadapter": "0.55M", "mrs": "0.16M"}
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"]
# Row names in the paper's order: references, PETL baselines, PE-RSITR last.
NAMES = {"zeroshot": "Zero-shot CLIP", "linear": "Linear probe", "full": "Full fine-tuning", "coop": "CoOp",
         "vpt": "VPT", "vl_prompt": "VL-Prompt", "adapter": "Adapter", "clip_adapter": "CLIP-Adapter",
         "convpass": "Convpass", "adaptformer": "AdaptFormer", "cross_modal_adapter": "Cross-Modal Adapter",
         "uniadapter": "UniAdapter", "lora": "LoRA", "mrs": "MRS-Adapter"}
PE_RSITR = "PE-RSITR (MRS-Adapter + HMMC)"  # the name of the row ("mrs", "hmmc")
MAIN = ["zeroshot", "full", "mrs"]
# train.py options that change how a run is done or logged, not its result: never a reason to refuse a folder.
NOT_SETTINGS = ("out", "resume", "overwrite", "data_root", "workers", "log_every", "save_minutes", "compile",
                "decode_cache", "no_decode_cache")
# train.py options that only shape training: never a reason to refuse a zero-shot cell, which trains nothing.
TRAINING_ONLY = ("epochs", "lr", "lr_decay_epoch", "batch_size", "margin", "mask_same_image", "grad_clip")
PROGRESS_SECONDS = 60


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False, epilog="Other options (--epochs, --batch-size, --clip, --amp, "
                                "...) are passed to every train.py run.")
    p.add_argument("--datasets", nargs="+", default=["rsicd", "rsitmd", "ucm"],
                   help="[rsicd rsitmd ucm]: those found are run, the others said and skipped; a .csv/.tsv of "
                        "image-caption pairs too")
    p.add_argument("--data-root", help="as train.py's [data; demo: its cache]")
    p.add_argument("--methods", nargs="+", default=["main"], metavar="METHOD[:LOSS]",
                   help=f"[main] main ({', '.join(MAIN)}), all (every method of adapter.py), or methods of "
                        f"{', '.join(adapter.METHODS)}, with the loss after a colon [hmmc]")
    p.add_argument("--seeds", type=int, nargs="+", default=[recipe.SEED], help=f"[{recipe.SEED}, the paper's]")
    p.add_argument("--lr", type=float, help=f"[train.py's: {recipe.LR:g}, demo {recipe.DEMO['lr']:g}]; full "
                   f"fine-tuning: x{recipe.FULL_FINE_TUNING_LR_SCALE:g}")
    p.add_argument("--out", default=os.path.join("runs", "table"),
                   help="[runs/table]: the runs go to <out>/<dataset>/<method>-<loss>-s<seed>")
    data.add_arguments(p, decode=False)  # the decode-cache options go on to train.py with the other options
    args, forwarded = p.parse_known_args(argv)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if not all(0 <= seed < 2 ** 32 for seed in args.seeds):
        p.error(f"--seeds must be between 0 and 2^32 - 1, got {' '.join(map(str, args.seeds))}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder: choose another --out")
    owned = [a for a in forwarded if a.split("=")[0] in ("--dataset", "--method", "--loss", "--seed", "--resume",
                                                             "--overwrite")]
    if owned:
        p.error(f"{' '.join(owned)}: table.py sets these for each run (see --datasets, --methods, --seeds)")
    every = [m for m in NAMES if m in adapter.METHODS] + [m for m in adapter.METHODS if m not in NAMES]
    rows = []
    for name in args.methods:
        if name in ("main", "all"):
            rows += [(m, "hmmc") for m in (MAIN if name == "main" else every)]
        else:
            method, _, loss = name.partition(":")
            rows.append((method, loss or "hmmc"))
    bad = [f"{m}:{loss}" for m, loss in rows if m not in adapter.METHODS or loss not in losses.LOSSES]
    if bad:
        p.error(f"unknown method or loss: {', '.join(bad)}")
    args.rows = list(dict.fromkeys(rows))
    return args, forwarded


def find_datasets(names, root, csv=None):
    """(name, root, training pairs) of each dataset data.load_split reads (an archive with CsvOptions `csv`); the
    others are said and skipped."""
    found, skipped = [], {}
    for name in names:
        try:
            name, where = data.prepare_dataset(name, root)
            data.load_split(name, where, "test", csv=csv)
            found.append((name, where, len(data.load_split(name, where, "train", csv=csv).captions)))
        except (FileNotFoundError, ValueError) as e:
            skipped[name] = str(e)
            print(f"skipped {name}: {e}")
    return found, skipped


def plan(args, forwarded, datasets):
    """One cell per dataset x row x seed: its folder, train.py arguments, settings and training pairs."""
    cells, digests = [], {}
    for name, root, train_pairs in datasets:
        for method, loss in args.rows:
            for seed in args.seeds:
                out = os.path.join(args.out, data.dataset_label(name), f"{method}-{loss}-s{seed}")
                argv = ["--dataset", name, "--data-root", root, "--method", method, "--loss", loss,
                        "--seed", str(seed), "--out", out, *data.archive_argv(args), *forwarded]
                base_lr = args.lr or train.parse_args(argv).lr
                argv += ["--lr", str(base_lr * recipe.FULL_FINE_TUNING_LR_SCALE if method == "full" else base_lr)]
                settings = {k: v for k, v in vars(train.parse_args(argv)).items() if k not in NOT_SETTINGS}
                clip = settings["clip"]
                if clip and os.path.isfile(clip):  # the same path may come to hold other weights
                    if clip not in digests:
                        digests[clip] = clip_min.download.sha256_of(clip)
                    settings["clip_sha256"] = digests[clip]
                steps = 0 if method == "zeroshot" else train_pairs // settings["batch_size"]
                cells.append(SimpleNamespace(dataset=name, method=method, loss=loss, seed=seed, out=out, argv=argv,
                                             settings=settings, base_lr=base_lr, steps=steps, state=None,
                                             pairs=settings["epochs"] * steps * settings["batch_size"]))
    return cells


def check(cell):
    """The cell's state ("done", "resume" or "start"); refuses a folder holding a run with other settings."""
    record, files = os.path.join(cell.out, "cell.json"), os.listdir(cell.out) if os.path.isdir(cell.out) else []
    if os.path.isfile(record):
        with open(record) as f:
            recorded = json.load(f)
        ignored = TRAINING_ONLY if cell.method == "zeroshot" else ()
        changed = [f"{k} {recorded.get(k)!r} -> {cell.settings.get(k)!r}" for k in sorted({*recorded, *cell.settings})
                   if recorded.get(k) != cell.settings.get(k) and k not in ignored]
        if changed:
            raise SystemExit(f"{cell.out} holds a run with other settings ({'; '.join(changed)}): delete the folder "
                             "to redo it, or choose another --out")
    elif files:
        raise SystemExit(f"{cell.out} holds files this table did not record (no cell.json): move them away")
    return "done" if "test.json" in files else "resume" if "last.pt" in files else "start"


def progress(cell):
    """(pairs trained, pairs/s) from the newest progress line of the cell's metrics.jsonl, (0, None) before one; a
    cell yet to resume: the pairs its last.pt holds (a stop saves it between progress lines)."""
    path = os.path.join(cell.out, "metrics.jsonl")
    if cell.state == "start" or not os.path.isfile(path):  # not started: an old log would be overwritten
        return 0, None
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.endswith("\n")]  # a line cut short by a kill is dropped
    last = next((e for e in reversed(lines) if "pairs_per_s" in e), {})
    steps = (last["epoch"] - 1) * cell.steps + last["step"] if last else 0
    steps = saved_steps(cell) if cell.state == "resume" else steps
    return steps * cell.settings["batch_size"], last.get("pairs_per_s")


def saved_steps(cell):
    """The training steps the cell's last.pt holds (its tensors memory-mapped, not read), 0 if it cannot be read:
    train.py --resume will say why."""
    try:
        state = torch.load(os.path.join(cell.out, "last.pt"), map_location="cpu", weights_only=True, mmap=True)
        return state["epoch"] * cell.steps + state["step"]
    except Exception:  # whatever torch raises for a damaged file
        return 0


def eta(cells, rates):
    """Seconds of training left (evaluation not counted), each cell at its row's measured pairs/s, a row not yet
    measured at the mean of those that are; None before any speed is known."""
    if not rates:
        return None
    mean = sum(rates.values()) / len(rates)
    return sum((c.pairs - progress(c)[0]) / rates.get((c.method, c.loss), mean) for c in cells if c.state != "done")


def clock(s):
    if s is None:
        return "unknown yet"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def left(cell, cells, rates):
    return f"left: this run {clock(eta([cell], rates))}, the table {clock(eta(cells, rates))}"


def measure(cell, rates):
    """The cell's (pairs trained, pairs/s), its speed kept in rates."""
    done, rate = progress(cell)
    if rate:
        rates[(cell.method, cell.loss)] = rate
    return done, rate


def watch(cell, cells, rates, label, say, stop):
    """Every PROGRESS_SECONDS while a cell trains, if its log moved on: its speed, its ETA and the whole table's."""
    said = None
    while not stop.wait(PROGRESS_SECONDS):
        done, rate = measure(cell, rates)
        if rate and (done, rate) != said:  # nothing new logged (validation, a slow step): no repeated line
            say(f"{label}: {done:,}/{cell.pairs:,} pairs at {rate:.1f} pairs/s; {left(cell, cells, rates)}")
            said = done, rate


def begin(cell):
    """What a cell's start says: how much of it is done and how much is left."""
    if cell.state != "resume":
        return f"starting, {cell.pairs:,} pairs to train"
    done = min(progress(cell)[0], cell.pairs)
    return f"resuming: {done:,} of {cell.pairs:,} pairs trained, {cell.pairs - done:,} to go"


def run_cells(cells):
    """train.main for each unfinished cell (its output in <cell>/log.txt), saying the cell's and the table's ETA."""
    terminal, rates = sys.stdout, {}  # train.py's output goes to the cell's log, these lines to the terminal

    def say(line):
        print(line, file=terminal, flush=True)
    for cell in cells:
        measure(cell, rates)
    for i, cell in enumerate(cells, 1):
        if cell.state == "done":
            continue
        label, measured = f"cell {i}/{len(cells)} {cell.dataset} {cell.method}-{cell.loss} s{cell.seed}", bool(rates)
        log = os.path.join(cell.out, "log.txt")
        say(f"{label}: {begin(cell)}; {left(cell, cells, rates)}; log in {log}")
        os.makedirs(cell.out, exist_ok=True)
        with open(os.path.join(cell.out, "cell.json"), "w") as f:
            json.dump(cell.settings, f, indent=1)
        resume, cell.state, stop = cell.state == "resume", "running", threading.Event()
        watcher = threading.Thread(target=watch, args=(cell, cells, rates, label, say, stop), daemon=True)
        watcher.start()
        try:
            with open(log, "a") as f, contextlib.redirect_stdout(f):
                train.main(cell.argv + (["--resume"] if resume else ["--overwrite"]))  # checked by check()
        except runtime.CommandError as e:  # its train.py advice would retrain this cell alone with other settings
            reason, _, advice = str(e.code).partition(" Try ")
            raise runtime.CommandError(f"{label} failed: {reason} Its log: {log}. Finished cells are kept" + (
                f"; a smaller --lr (now {cell.base_lr:g}) or a --grad-clip changes every cell's settings: pass it "
                "with another --out" if advice else ""), e.status) from None
        except KeyboardInterrupt as e:  # said with the table's command by main, not the cell's train.py command
            cell.state = "resume" if os.path.isfile(os.path.join(cell.out, "last.pt")) else "start"
            saved = f"{progress(cell)[0]:,} of {cell.pairs:,} pairs saved" if cell.state == "resume" else \
                "nothing saved"
            raise runtime.Interrupted(f"{label} stopped ({saved})", getattr(e, "signum", signal.SIGINT)) from None
        finally:
            stop.set()
            watcher.join()
        measure(cell, rates)
        cell.state = "done"
        if rates and not measured:  # the first speed known: the first estimate of the total
            say(f"first speed measured: the rest of the table should take {clock(eta(cells, rates))} of training")
        with contextlib.suppress(FileNotFoundError):  # only resuming needs it (ViT-B/32 + Adam, full: 1.8 GB)
            os.remove(os.path.join(cell.out, "last.pt"))


def summarise(results):
    """Per-seed results [{dataset, method, loss, seed, params, metrics}] -> one row per (dataset, method, loss), in
    first-seen order: mean and sample standard deviation (ddof=1) over seeds, the paper's numbers, ours minus them."""
    groups = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"], r["loss"]), []).append(r)
    rows = []
    for (dataset, method, loss), runs in groups.items():
        values = {k: np.array([r["metrics"][k] for r in runs], dtype=float) for k in METRICS}
        paper = dict(zip(METRICS, PAPER.get(dataset, {}).get(method, ()) if loss == "hmmc" else ()))
        mean = {k: float(v.mean()) for k, v in values.items()}
        name = PE_RSITR if (method, loss) == ("mrs", "hmmc") else NAMES.get(method, method)
        rows.append(dict(dataset=dataset, method=method, loss=loss, name=name, params=runs[0]["params"],
                         seeds=[r["seed"] for r in runs], mean=mean, paper=paper,
                         std={k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
                         diff={k: mean[k] - v for k, v in paper.items()}))
    return rows


def misprinted_mr(paper):
    """The mean of a paper row's six recalls where its printed mR differs from it by more than rounding, else None."""
    if not set(METRICS) <= set(paper):
        return None
    mean = sum(paper[k] for k in METRICS[:6]) / 6
    return mean if abs(mean - paper["mR"]) > 0.05 else None


def markdown(rows, total_params):
    """One line per row; each number: ours [± std over seeds] (the paper's, ours minus the paper's); the paper's
    parameter count beside ours; a note under the table for a printed mR that is not the mean of its recalls."""
    lines, notes = ["| Dataset | Method | Loss | Trainable params | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 "
                    "| t2i R@10 | mR |", "|" + "---|" * 11], []
    for row in rows:
        paper, off = row["paper"], misprinted_mr(row["paper"])

        def number(k):
            text = f"{row['mean'][k]:.2f}" + (f" ± {row['std'][k]:.2f}" if len(row["seeds"]) > 1 else "")
            mark = "*" if k == "mR" and off is not None else ""
            return text + (f" ({paper[k]:.2f}{mark}, {row['diff'][k]:+.2f})" if k in paper else "")
        if off is not None:
            notes.append(f"* {row['dataset']} {row['name']}: the paper prints mR {paper['mR']:.2f}; the mean of its "
                         f"six recalls is {off:.2f}.")
        share = (f"{row['params']:,} ({100 * row['params'] / total_params:.2f}%"
                 + (f"; paper {PAPER_PARAMS[row['method']]})" if paper else ")"))
        loss = row["loss"] if row["method"] != "zeroshot" else "-"
        lines.append(f"| {row['dataset']} | {row['name']} | {loss} | {share} | "
                     + " | ".join(number(k) for k in METRICS) + " |")
    return "\n".join(lines) + "\n" + "".join(f"\n{note}" for note in notes) + ("\n" if notes else "")


OURS, THEIRS, INK = (31, 119, 180), (255, 127, 14), (20, 20, 20)  # the figure's bars and text


def figure(rows, path, height=300):
    """A PNG: test mR per method, one panel per dataset, the paper's method names; ours (a whisker: ± std over
    seeds) beside the paper's bar where the paper reports a number."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["loss"]) for r in rows))
    left, top, panel, title = 70, 96, height + 130, "Test mR (mean of the six recalls, %) per method"
    label = evaluate.font(15)
    # As wide as the title and legend need, or 150 px per method; the methods share the width evenly.
    width = max(left + round(evaluate.font(24).getlength(title)) + 40, left + 560, left + 150 * len(keys) + 20)
    group = (width - left - 20) // len(keys)
    image = Image.new("RGB", (width, top + panel * len(datasets)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill=INK, font=evaluate.font(24))
    legend = [("ours", OURS)] + [("the paper (Yuan et al. 2023)", THEIRS)] * any(r["paper"].get("mR") for r in rows)
    x = left
    for text, colour in legend:
        draw.rectangle([x, 56, x + 16, 72], fill=colour)
        draw.text((x + 22, 55), text, fill=INK, font=label)
        x += 40 + round(label.getlength(text))
    notes = (["whisker: ± std over seeds"] * any(r["std"]["mR"] for r in rows)
             + ["*: the paper's printed mR, not the mean of its six recalls"] * any(
                 misprinted_mr(r["paper"]) is not None for r in rows))
    draw.text((x, 55), "; ".join(notes), fill=INK, font=label)
    for d, dataset in enumerate(datasets):
        base = top + d * panel + 40 + height  # the panel's mR = 0 line
        draw.text((left, base - height - 36), dataset.upper(), fill=INK, font=evaluate.font(20))
        for tick in range(0, 101, 20):
            draw.line([left, base - tick * height // 100, width - 20, base - tick * height // 100], fill=(220,) * 3)
            draw.text((left - 10, base - tick * height // 100), str(tick), fill=INK, font=evaluate.font(14), anchor="rm")
        for row in (r for r in rows if r["dataset"] == dataset):
            centre = left + group * keys.index((row["method"], row["loss"])) + group // 2
            method_bars(draw, row, centre, base, height, group)
    image.save(path)


def method_bars(draw, row, centre, base, height, group, bar=36):
    """One method's bars, centred on x = centre above the mR = 0 line `base`: ours (its whisker: ± std), the paper's
    beside it if reported; the numbers above them and the method's name below."""
    def y(value):
        return round(base - value * height / 100)
    mean, std = row["mean"]["mR"], row["std"]["mR"]
    bars = [(mean, OURS, std)] + ([(row["paper"]["mR"], THEIRS, 0)] if "mR" in row["paper"] else [])
    x = centre - len(bars) * bar // 2
    if std:
        draw.line([x + bar // 2, y(mean - std), x + bar // 2, y(mean + std)], fill=INK, width=2)
    for k, (value, colour, whisker) in enumerate(bars):
        draw.rectangle([x + k * bar, y(value), x + (k + 1) * bar - 1, base], fill=colour)
        mark = "*" if k and misprinted_mr(row["paper"]) is not None else ""
        draw.text((x + k * bar + bar // 2, y(value + whisker) - 3), f"{value:.1f}{mark}", fill=INK,  # above the whisker
                  font=evaluate.font(14), anchor="md")
    name = row.get("name") or NAMES.get(row["method"], row["method"])
    name += "" if row["loss"] == "hmmc" or row["method"] == "zeroshot" else f" ({row['loss']})"
    lines = evaluate.wrap(name, evaluate.font(15), group - 12, lines=3)
    draw.multiline_text((centre, base + 6), "\n".join(lines), fill=INK, font=evaluate.font(15), spacing=3,
                        anchor="ma", align="center")


def write(args, cells, params, total_params, skipped):
    """table.md, table.json and table.png under --out, from the cells' test.json files; returns the rows."""
    results = []
    for c in cells:
        with open(os.path.join(c.out, "test.json")) as f:
            results.append(dict(dataset=c.dataset, method=c.method, loss=c.loss, seed=c.seed, params=params[c.method],
                                metrics={k: v for k, v in json.load(f).items() if k in METRICS}))
    rows, s = summarise(results), cells[0].settings
    spread = f" (mean ± std over seeds {', '.join(map(str, args.seeds))})" if len(args.seeds) > 1 else ""
    text = (f"Test split. Each number: ours{spread} (the paper's, ours minus the paper's) where the paper reports it. "
            f"train.py settings: epochs {s['epochs']}, batch {s['batch_size']}, lr {cells[0].base_lr:g} (full "
            f"fine-tuning {cells[0].base_lr * recipe.FULL_FINE_TUNING_LR_SCALE:g}), backbone {s['clip'] or 'train.py default'}. Datasets skipped: "
            f"{', '.join(skipped) or 'none'}.\n\n" + markdown(rows, total_params))
    with open(os.path.join(args.out, "table.md"), "w") as md, open(os.path.join(args.out, "table.json"), "w") as js:
        md.write(text)
        json.dump(dict(rows=rows, runs=results, skipped=skipped), js, indent=1)
    figure(rows, os.path.join(args.out, "table.png"))
    print("\n" + text, flush=True)
    return rows


def main(argv=None, again=None):
    """The table; stopped, it says the command that continues: `again` [python table.py <argv>]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return make_table(*parse_args(argv))
    except KeyboardInterrupt as e:
        again = again or shlex.join(["python", "table.py", *argv])
        raise runtime.Interrupted(f"{e.args[0] if e.args else 'stopped'}: finished cells are kept, an interrupted one "
                                  f"resumes from its last save. Continue with: {again}",
                                  getattr(e, "signum", signal.SIGINT)) from None


def make_table(args, forwarded):
    """Every cell trained (or read, or resumed), then table.md, table.json and table.png; returns the rows."""
    datasets, skipped = find_datasets(args.datasets, args.data_root, data.csv_options(args))
    if not datasets:
        raise SystemExit("no dataset found: see the lines above, and the README's Datasets section")
    cells, started = plan(args, forwarded, datasets), time.time()
    for cell in cells:  # every folder is checked before anything trains
        cell.state = check(cell)
    states = [c.state for c in cells]
    print(f"{len(cells)} runs ({len(datasets)} datasets x {len(args.rows)} methods x {len(args.seeds)} seeds): "
          f"{states.count('done')} finished, {states.count('resume')} to resume, {states.count('start')} to start; "
          f"{sum(c.pairs for c in cells):,} training pairs in all", flush=True)
    config = runtime.load_backbone(cells[0].settings["clip"], cells[0].dataset, 0, torch.device("cpu")).config
    with torch.device("meta"):  # counts only: shapes without memory
        params = {m: adapter.count_trainable(adapter.apply(clip_min.CLIP(config), m)) for m, _ in args.rows}
        total_params = sum(p.numel() for p in clip_min.CLIP(config).parameters())
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {args.out}: cannot write there ({e.strerror})") from e
    run_cells(cells)
    rows = write(args, cells, params, total_params, skipped)
    print(f"{time.time() - started:.0f}s; written to {args.out}: table.md, table.json, table.png")
    return rows


if __name__ == "__main__":
    runtime.run_command(main)
