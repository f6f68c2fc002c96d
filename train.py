"""Train a parameter-efficient method on a frozen CLIP for remote sensing image-text retrieval.

    python train.py --dataset rsitmd --data-root data          # the paper's recipe: MRS-Adapter + HMMC
    python train.py --dataset demo                             # a small synthetic run on the CPU
    torchrun --nproc_per_node=4 train.py --dataset rsicd       # several GPUs (DDP)

Every run writes to its folder (--out): metrics.jsonl (one JSON object per log line), last.pt (resumable; written at
each epoch's end and every --save-minutes), best.pt (the epoch with the best validation mR; the test set never
chooses anything), test.json, val_images.txt (the validation split: the one the released code draws) and
splits.json (the images of every split). A folder holding a run is never overwritten unless asked (--resume
continues it, --overwrite replaces it), and one process at a time trains in it (<out>/.lock). Ctrl-C or SIGTERM: the
current step ends, last.pt is saved, the resume command is said.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch
import torch._dynamo  # noqa: F401  (before any process group: imported later, by DDP, it leaves gloo threads behind)
import torch.distributed as dist
import torch.nn as nn

import adapter
import clip_min
import data
import losses
import metrics
import recipe
from support import run_folder, runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(usage="%(prog)s [options] (see --help)", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="rsitmd", help="rsitmd, rsicd, ucm, demo, any <name> found in --data-root, "
                   "or a .csv/.tsv of image-caption pairs (open_clip's format) [%(default)s]")
    p.add_argument("--data-root", help="folder holding <name>_precomp/ or dataset_<name>.json [data; demo: "
                                        "$PE_RSITR_CACHE or ~/.cache/pe-rsitr, where it is generated]")
    p.add_argument("--method", default="mrs", choices=adapter.METHODS, help="[%(default)s]")
    p.add_argument("--loss", default="hmmc", choices=losses.LOSSES, help="[%(default)s]")
    p.add_argument("--clip", default=None, help="model name (ViT-B/32, ...), checkpoint path or Hugging Face folder "
                                                "[ViT-B/32; demo: assets/mini-clip.pt, else a random tiny CLIP]")
    p.add_argument("--clip-activation", choices=sorted(clip_min.model.ACTIVATIONS), help="the backbone's MLP activation [what "
                   "the file records, else QuickGELU; open_clip's plain ViT-B-32 and ViT-L-14 are gelu]")
    p.add_argument("--lr", type=float, default=None, help=f"[{recipe.LR:g}; demo: {recipe.DEMO['lr']:g}]")
    p.add_argument("--lr-decay-epoch", type=int, default=recipe.LR_DECAY_EPOCH, help="the first epoch (counted from "
                   f"1) at lr x{recipe.LR_DECAY}, and again every as many epochs, as the released code decays it "
                   "[%(default)s]")
    p.add_argument("--epochs", type=int, default=None, help=f"[{recipe.EPOCHS}; demo: {recipe.DEMO['epochs']}]")
    p.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE,
                   help="global batch, split across processes [%(default)s]")
    p.add_argument("--margin", type=float, default=recipe.MARGIN, help="of the hinge losses [%(default)s]")
    p.add_argument("--mask-same-image", action="store_true", help="captions of one image are not each other's negatives")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="[bf16 on GPUs and CPUs with bf16 units, else off]")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the encoders; MODE reduce-overhead adds CUDA graphs [off; MODE: default]")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off) [%(default)s]")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images [%(default)s]")
    p.add_argument("--out", default=None, help="run folder [runs/<dataset>-<method>-<loss>]")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run a folder holds (else refused)")
    p.add_argument("--seed", type=int, default=recipe.SEED, help="[%(default)s, the paper's]")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines [%(default)s]")
    p.add_argument("--save-minutes", type=float, default=10, help="mid-epoch saves of last.pt: at the first progress "
                   "line this many minutes after the last save (0: at every progress line) [%(default)s]")
    data.add_arguments(p)
    args = p.parse_args(argv)
    for name, value in (recipe.DEMO if args.dataset == "demo" else dict(lr=recipe.LR, epochs=recipe.EPOCHS)).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = os.path.join("runs", f"{data.dataset_label(args.dataset)}-{args.method}-{args.loss}")
    # Recorded in the checkpoints as absolute paths: evaluate.py finds the data again from any folder.
    args.dataset = os.path.abspath(args.dataset) if data.is_archive(args.dataset) else args.dataset
    args.data_root = args.data_root and os.path.abspath(args.data_root)
    check_values(p, args)
    return args


def check_values(p, args):
    """Each impossible value refused in one line that names its flag, before any data is read or model loaded
    (else Adam refuses it, the run trains on nan, or no step runs)."""
    for flag, what in (("--dataset", "a dataset"), ("--clip", "a model or file"), ("--out", "a folder"),
                       ("--data-root", "a folder")):
        if getattr(args, flag[2:].replace("-", "_")) == "":
            p.error(f"{flag} is empty: name {what}, or leave the option out for its default")
    for flag, value, least in (("--batch-size", args.batch_size, 2), ("--epochs", args.epochs, 1),
                               ("--log-every", args.log_every, 1), ("--lr-decay-epoch", args.lr_decay_epoch, 1),
                               ("--workers", args.workers, 1)):
        if value < least:
            why = " (a pair's negatives are the batch's other pairs)" if flag == "--batch-size" else ""
            p.error(f"{flag} must be at least {least}{why}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.margin) and args.margin >= 0):  # a negative margin asks less than an equal score
        p.error(f"--margin must be a number >= 0, got {args.margin}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        p.error(f"--grad-clip must be a number >= 0 (0: off), got {args.grad_clip}")
    if not args.save_minutes >= 0:  # nan too
        p.error(f"--save-minutes must be a number >= 0, got {args.save_minutes}")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be between 0 and 2^32 - 1, got {args.seed}")
    if args.compile and args.compile not in torch._inductor.list_mode_options():
        p.error(f"--compile {args.compile}: MODE is one of {', '.join(torch._inductor.list_mode_options())}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: choose one")


def read_splits(args, rank):
    """Train, val (the released 80/20 split of the training file, drawn with --seed) and test splits: names and
    captions, every image file checked. Read before the backbone, so a missing dataset is reported before a download.
    The validation images are listed in <out>/val_images.txt, every split's in <out>/splits.json."""
    if dist.is_initialized() and rank != 0:
        dist.barrier()  # rank 0 generates the demo, if it is needed, before the others read it
    name, root = data.prepare_dataset(args.dataset, args.data_root)
    if dist.is_initialized() and rank == 0:
        dist.barrier()
    splits = {part: data.load_split(name, root, part, seed=args.seed, csv=data.csv_options(args))
              for part in ("train", "val", "test")}
    if rank == 0:
        with open(os.path.join(args.out, "val_images.txt"), "w") as f:
            f.writelines(os.path.basename(path) + "\n" for path in splits["val"].image_paths)
        with open(os.path.join(args.out, "splits.json"), "w") as f:
            json.dump({part: {"images": s.image_paths, "captions": len(s.captions)} for part, s in splits.items()}, f,
                      indent=1)
    return splits


def decode(splits, resolution, args):
    """Each split's images decoded (once: later runs memory-map data.load_images' cache), its captions tokenized (in
    16 bits: CLIP's 49,408 token ids fit, widened per batch), and the image of each caption:
    {part: (images, tokens, image_of_caption)}."""
    decoded, cache = {}, data.decode_cache_choice(args)
    for part, split in splits.items():
        decoded[part] = (data.decode_split(split, resolution, workers=args.workers, cache=cache),
                         clip_min.tokenize(split.captions, truncate=True).to(torch.uint16),
                         torch.as_tensor(split.image_of_caption, dtype=torch.long))
        print(split.summary())
    return decoded


def train_step(encoder, optimizer, scaler, images, tokens, image_ids, args):
    """One optimisation step on a batch: clean + augmented views -> loss -> backward -> step. Returns the terms.
    tokens may stay on the CPU: they are cut there and then moved to the images' device."""
    # Cut to the longest caption while the tokens are still on the host, where reading the length costs no wait
    # for the GPU.
    tokens = clip_min.trim(tokens.long()).to(images.device, non_blocking=True)
    with runtime.autocast(images.device.type, args.amp):
        *views, logit_scale = encoder(images, tokens)
    # Negatives come from every process's batch (identity on a single process).
    image, text, image_aug, text_aug = (losses.gather_with_grad(v.float()) for v in views)
    loss, terms = losses.compute(args.loss, image, text, image_aug, text_aug, logit_scale=logit_scale,
                                 image_ids=losses.gather_with_grad(image_ids) if args.mask_same_image else None,
                                 margin=args.margin)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip > 0:  # after backward and unscaling, so it clips the true gradient
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    # Detached tensors, not floats: reading a number would make the CPU wait for the GPU at every step.
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def log(*a):
    print(*a, flush=True)


def rng_states():
    """Every process's generators that training draws from (dropout); the batch order comes from (seed, epoch)."""
    mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def set_rng_states(states):
    if (states["cuda"] is None) == torch.cuda.is_available():
        raise runtime.CommandError(f"last.pt was written on a {'CPU' if states['cuda'] is None else 'GPU'}: resume it on one")
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])  # this process's device, set before the resume


@dataclasses.dataclass
class Run:
    """A training run: its settings, its processes, the model and its data, the optimiser and what the loop keeps."""
    args: argparse.Namespace
    session: run_folder.Session
    device: torch.device
    model: nn.Module
    encoder: nn.Module  # the clean and augmented views in one pass (adapter.ViewsEncoder), maybe DDP- and compiled
    splits: dict  # {part: (images, tokens, image_of_caption)}
    optimizer: torch.optim.Optimizer | None  # None: zero-shot, nothing trains
    scaler: torch.amp.GradScaler
    steps: int  # per epoch: the training pairs // the batch size
    backbone: dict  # how the checkpoints name the backbone (runtime.backbone_record)
    best_mr: float = -1.0
    saved_at: float = dataclasses.field(default_factory=time.time)
    metrics_file: object = None


def start_processes(session):
    """torchrun's processes (or just this one) and this process's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        session.rank, session.world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        runtime.keep_freed_memory()
    if session.rank != 0:  # one process speaks for all: the others' prints (data loading, repairs) would repeat
        sys.stdout = open(os.devnull, "w")
    return device


def choose_precision(args, device, world):
    args.amp = args.amp or runtime.default_amp(device, say=log)
    if args.amp == "fp16" and device.type == "cpu":
        log("--amp fp16 on a CPU: emulated, usually slower than --amp off (fp16 is for GPUs without bf16)")
    if args.batch_size % world:
        raise runtime.CommandError(f"--batch-size {args.batch_size} must be divisible by the {world} processes", 2)


def build_model(args, device):
    """The frozen backbone with the method attached, its frozen weights kept in the autocast precision, and how the
    checkpoints name that backbone."""
    backbone = runtime.load_backbone(args.clip, args.dataset, args.seed, device, args.clip_activation)
    model = adapter.apply(backbone, args.method).to(device)
    runtime.keep_frozen_weights_in(model, args.amp)
    log(f"{args.method}: {adapter.count_trainable(model):,} trainable parameters of "
        f"{sum(p.numel() for p in model.parameters()):,}")
    return model, runtime.backbone_record(args.clip, args.dataset, args.seed)


def build_encoder(model, args, device, distributed):
    """The module the steps call: both views in one pass, under DDP across processes, compiled if asked."""
    encoder = adapter.ViewsEncoder(model)
    if distributed and any(p.requires_grad for p in model.parameters()):  # zero-shot has nothing to synchronise
        # Full fine-tuning trains CLIP's temperature, which only InfoNCE uses: DDP must expect it to get no gradient.
        encoder = nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.method == "full" and args.loss != "infonce")
    return torch.compile(encoder, mode=args.compile) if args.compile else encoder


def start(args, session):
    """The processes, the precision, the run folder held (session.lock), the data read and checked, the model, the
    data decoded, the optimiser: a Run ready to fit."""
    device = start_processes(session)
    choose_precision(args, device, session.world)
    run_folder.hold_folder(args, session)
    if args.dataset == "demo":
        log(f"demo: the synthetic dataset is in {args.data_root or data.DEMO_ROOT} (generated there on first use)")
    splits = read_splits(args, session.rank)
    torch.manual_seed(args.seed)
    check_batch_size(args, len(splits["train"].captions))  # before the backbone (maybe a download) and decoding
    model, backbone = build_model(args, device)
    splits = decode(splits, model.visual.input_resolution, args)
    if device.type == "cuda":  # the decoded training set fits on the GPU: no input pipeline
        splits["train"] = (splits["train"][0].to(device), *splits["train"][1:])
    encoder = build_encoder(model, args, device, session.world > 1)
    torch.manual_seed(args.seed + session.rank)  # the same weights everywhere (above), but each process its own dropout
    params = [p for p in model.parameters() if p.requires_grad]
    session.deferred = bool(params)  # a signal waits for the step's end only where there is something to save
    return Run(args, session, device, model, encoder, splits, torch.optim.Adam(params, lr=args.lr) if params else None,
               torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"), len(splits["train"][1]) // args.batch_size,
               backbone)


def resume(run):
    """Restore <out>/last.pt: weights, optimizer, scaler, each process's generators. Returns (epoch, step) to go on
    from. Refuses settings that would change the batches, the model or the objective of the interrupted run."""
    args, path = run.args, os.path.join(run.args.out, "last.pt")
    try:
        state = clip_min.formats.torch_load(path)
    except clip_min.formats.UnreadableFile as e:
        raise runtime.CommandError(f"{e}: the run cannot be resumed from it; start again with --overwrite (or "
                                   "another --out)") from e
    if not (isinstance(state, dict) and {"rng", "optimizer", "trainable"} <= set(state)):
        raise runtime.CommandError(f"{path} is not a last.pt written by train.py: it cannot be resumed")
    if len(state["rng"]) != run.session.world:
        raise runtime.CommandError(f"{path} was written by {len(state['rng'])} processes: resume it with as many")
    changed = [f"--{k.replace('_', '-')} {state['args'].get(k)} -> {getattr(args, k)}" for k in
               ("dataset", "method", "loss", "clip_activation", "batch_size", "seed", "margin", "mask_same_image",
                "amp") if state["args"].get(k) != getattr(args, k)] + backbone_change(state, run)
    if changed:
        raise runtime.CommandError(f"--resume with other settings than {path}: {', '.join(changed)}")
    adapter.load_trainable(run.model, state["trainable"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"][run.session.rank])
    epoch, step, run.best_mr = state["epoch"], state["step"], state["best_mR"]
    if step == run.steps:  # a finished epoch, validation included
        epoch, step = epoch + 1, 0
    log(f"resumed from {path} at epoch {epoch + 1}, step {step}")
    return epoch, step


def backbone_change(state, run):
    """[what differs] between last.pt's backbone and this run's: the same weights (by SHA-256) wherever they lie
    and however --clip names them; a checkpoint of an earlier version, without a record: --clip as typed."""
    typed = f"--clip {state['args'].get('clip')} -> {run.args.clip}"
    if "backbone" not in state:
        return [typed] if state["args"].get("clip") != run.args.clip else []
    if state["backbone"].get("sha256") == run.backbone.get("sha256"):
        return []
    return [typed if state["args"].get("clip") != run.args.clip else f"--clip {run.args.clip}: other weights now"]


def open_metrics(run, epoch, step):
    """metrics.jsonl, one JSON object per log line (rank 0 only). A resumed run keeps the lines of the steps its
    last.pt holds, so that the log reads as an uninterrupted run's."""
    if run.session.rank != 0:
        return
    path = os.path.join(run.args.out, "metrics.jsonl")
    if run.args.resume and os.path.isfile(path):
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.endswith("\n")]  # a line cut short is dropped
        # Log positions are (epoch counted from 1, step); a validation line, without step, follows its epoch's steps.
        kept = [e for e in entries if (e.get("epoch", math.inf), e.get("step", math.inf)) <= (epoch + 1, step)]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(path + ".tmp", path)
    run.metrics_file = open(path, "a" if run.args.resume else "w")


def record(run, entry):
    if run.metrics_file:
        run.metrics_file.write(json.dumps(entry) + "\n")
        run.metrics_file.flush()


def score(run, split, say_ties=False):
    """The recall metrics of a split (val or test) under the current weights."""
    images, tokens, image_of_caption = run.splits[split]
    features = metrics.split_embeddings(run.model, images, tokens, run.device, run.args.amp)
    counts = metrics.embedding_counts(*features, image_of_caption)
    scores = metrics.recalls(counts)
    bounds = metrics.tie_bounds(counts) if say_ties else ""
    if bounds:
        log(bounds)
    return scores


def score_before_training(run):
    """The starting point on both evaluation splits, so that every later number has something to be compared with."""
    before = {}
    for split in ("val", "test"):
        before[split] = scores = score(run, split)
        log(f"before training: {split} {metrics.format_metrics(scores)}")
        record(run, {"epoch": 0, "split": split, **scores})
    return before


def save(run, epoch, step, improved=False):
    """last.pt, resumable after `step` steps of `epoch` (all of them: validation done too); best.pt if improved."""
    rngs = rng_states()  # every process takes part: each one's generators are gathered
    if run.session.rank == 0:
        args = run.args
        # "clip": what load_backbone reads from any folder (an absolute path; None for the demo's bundled CLIP)
        clip = run.backbone.get("name") or run.backbone.get("file")
        state = {"trainable": adapter.trainable_state_dict(run.model), "method": args.method,
                 "options": run.model.petl_options, "clip": clip, "backbone": run.backbone,
                 "activation": run.model.config.activation,
                 "dataset": args.dataset, "epoch": epoch, "step": step, "best_mR": run.best_mr, "args": vars(args)}
        if improved:
            run_folder.save_atomically(state, os.path.join(args.out, "best.pt"))
        resumable = {**state, "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": rngs}
        run_folder.save_atomically(resumable, os.path.join(args.out, "last.pt"))
    run.saved_at = time.time()


def learning_rate(args, epoch):
    """The released schedule: x0.7 at every --lr-decay-epoch-th epoch (counted from 1), i.e. from the 20th on."""
    return args.lr * recipe.LR_DECAY ** ((epoch + 1) // args.lr_decay_epoch)


def train_epoch(run, epoch, first_step):
    """Steps first_step.. of one epoch, with progress lines and a mid-epoch save every --save-minutes."""
    args, (images_all, tokens_all, image_of_caption) = run.args, run.splits["train"]
    lr = learning_rate(args, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    # The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    order = torch.randperm(len(tokens_all), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    local = args.batch_size // run.session.world
    started, bad = time.time(), torch.tensor(-1, device=run.device)  # bad: the first step whose loss is not finite
    for step in range(first_step, run.steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size][run.session.rank * local:(run.session.rank + 1) * local]
        image_ids = image_of_caption[idx]  # each caption's own image, however many it has
        images = data.normalise(images_all[image_ids.to(images_all.device)].to(run.device, non_blocking=True))
        terms = train_step(run.encoder, run.optimizer, run.scaler, images, tokens_all[idx], image_ids.to(run.device),
                           args)
        bad = torch.where(torch.isfinite(terms["loss"]) | (bad >= 0), bad, step)  # no wait for the GPU
        logged = (step + 1) % args.log_every == 0 or step + 1 == run.steps
        if logged:
            check_finite(run, bad, epoch, lr)  # before anything is logged or saved: a nan never reaches last.pt
            terms = {k: v.item() for k, v in terms.items()}
            rate = (step + 1 - first_step) * args.batch_size / (time.time() - started)
            eta = ((run.steps - step - 1) + (args.epochs - epoch - 1) * run.steps) * args.batch_size / rate
            log(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{run.steps} "
                + " ".join(f"{k} {v:.4f}" for k, v in terms.items()) + f" lr {lr:.2e} {rate:.1f} pairs/s eta {eta:.0f}s")
            record(run, {"epoch": epoch + 1, "step": step + 1, "lr": lr, "pairs_per_s": rate, **terms})
            # A mid-epoch save once --save-minutes have passed: rank 0's clock decides for every process.
            due = [step + 1 < run.steps and time.time() - run.saved_at >= 60 * args.save_minutes]
            if dist.is_initialized():
                dist.broadcast_object_list(due, src=0)
            if due[0]:
                save(run, epoch, step + 1)
        if (logged or not dist.is_initialized()) and step + 1 < run.steps:  # the last step: after validation
            stop_if_asked(run, epoch, step + 1, lambda: check_finite(run, bad, epoch, lr))


def validate_and_save(run, epoch):
    """Model selection on the validation split (never the test split): best.pt keeps the best mR so far."""
    run.model.eval()
    scores = score(run, "val")
    improved = scores["mR"] > run.best_mr
    run.best_mr = max(run.best_mr, scores["mR"])
    log(f"epoch {epoch + 1} val {metrics.format_metrics(scores)}" + (" (best)" if improved else ""))
    record(run, {"epoch": epoch + 1, "split": "val", **scores})
    save(run, epoch, run.steps, improved)


def final_test(run, untrained_test):
    """The test split, scored once, with the weights validation chose (zero-shot: the frozen model's score)."""
    if run.optimizer is None:
        scores = untrained_test
    else:
        best = torch.load(os.path.join(run.args.out, "best.pt"), map_location="cpu", weights_only=True)
        adapter.load_trainable(run.model, best["trainable"])
        scores = score(run, "test", say_ties=True)
    log(f"test {metrics.format_metrics(scores)}")
    record(run, {"split": "test", **scores})
    with open(os.path.join(run.args.out, "test.json"), "w") as f:
        json.dump(scores, f, indent=1)
    return scores


def check_batch_size(args, pairs):
    if args.method != "zeroshot" and args.batch_size > pairs:  # else no step runs: the untrained model reported trained
        raise runtime.CommandError(f"--batch-size {args.batch_size} exceeds the {pairs} training pairs of "
                                   f"{args.dataset}: no step would run; choose at most {pairs}", 2)


def check_finite(run, bad, epoch, lr):
    """Stops a run whose loss went nan or infinite (bad: its first such step, or -1), before it is saved, with the
    command that tries again at a tenth of the lr: from the last save if there is one, else from the start."""
    if int(bad) >= 0:
        again = run_folder.resume_command(run.args, run.session, ["--lr", f"{run.args.lr / 10:g}"])
        raise runtime.CommandError(f"the loss is not finite at epoch {epoch + 1}, step {int(bad) + 1}: training "
                                   f"stopped there, nothing of it saved. Try a smaller --lr (this epoch's: {lr:g}) or "
                                   f"--grad-clip: {again}")


def stop_if_asked(run, epoch, step, before_saving=None, saved=False):
    """After a step (or the evaluation before training, or validation): if a signal asked to stop (rank 0's decides
    for all), save last.pt at (epoch, step) and stop with the command that continues."""
    asked = [run.session.signum]
    if dist.is_initialized():
        dist.broadcast_object_list(asked, src=0)
    if asked[0] is None:
        return
    if not saved:
        if before_saving:
            before_saving()
        save(run, epoch, step)
    where = f"after epoch {epoch + 1}" if step == run.steps else f"at epoch {epoch + 1}, step {step}"
    raise runtime.Interrupted(f"stopped by {signal.Signals(asked[0]).name} {where}: "
                              f"{os.path.join(run.args.out, 'last.pt')} saved. Continue with: "
                              f"{run_folder.resume_command(run.args, run.session)}", asked[0])


def fit(run):
    """Resume or score the starting point, train and validate epoch by epoch, test once; returns the test scores."""
    args = run.args
    epoch, step = resume(run) if args.resume else (0, 0)
    open_metrics(run, epoch, step)
    before = {} if args.resume else score_before_training(run)
    if run.optimizer is not None:
        stop_if_asked(run, epoch, step)
    for epoch in range(epoch, args.epochs if run.optimizer is not None else 0):  # zero-shot: nothing to train
        train_epoch(run, epoch, step)
        validate_and_save(run, epoch)
        stop_if_asked(run, epoch, run.steps, saved=True)
        step = 0
    result = final_test(run, before.get("test")) if run.session.rank == 0 else None
    if run.metrics_file:
        run.metrics_file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    session = run_folder.Session(argv)
    with run_folder.stop_on_signals(session):
        try:
            result = fit(start(args, session))
        except BaseException as e:
            run_folder.leave_folder(args, session, failed=True)  # a run that saved nothing leaves nothing
            if not isinstance(e, KeyboardInterrupt) or e.args:  # stop_if_asked's Interrupted: saved, and said
                raise
            kept = "last.pt holds the last save" if os.path.isfile(os.path.join(args.out, "last.pt")) else \
                "nothing saved"
            raise runtime.Interrupted(f"stopped at once ({kept}). Go on with: {run_folder.resume_command(args, session)}",
                                      getattr(e, "signum", signal.SIGINT)) from None
        run_folder.leave_folder(args, session)
    if session.rank == 0:
        written = [n for n in run_folder.RUN_FILES if os.path.isfile(os.path.join(args.out, n))]
        log(f"run written to {args.out}: {', '.join(written)}")
    return result


if __name__ == "__main__":
    runtime.run_command(main)
