"""Train a parameter-efficient method on a frozen CLIP for remote sensing image-text retrieval.

    python train.py --dataset rsitmd --data-root data          # the paper's recipe: MRS-Adapter + HMMC
    python train.py --dataset demo                             # a small synthetic run on the CPU
    torchrun --nproc_per_node=4 train.py --dataset rsicd       # several GPUs (DDP)

Every run writes to its folder (--out): metrics.jsonl (one JSON object per log line), last.pt (resumable; written at
each epoch's end and every --save-minutes), best.pt (the epoch with the best validation mR; the test set never
chooses anything), test.json.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import adapter
import clip_min
import data
import evaluate
import losses


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="rsitmd", help="rsitmd, rsicd, ucm, demo, or any <name> found in --data-root")
    p.add_argument("--data-root", help="folder holding <name>_precomp/ or dataset_<name>.json [data; demo: "
                                        "$PE_RSITR_CACHE or ~/.cache/pe-rsitr, where it is generated]")
    p.add_argument("--method", default="mrs", choices=adapter.METHODS)
    p.add_argument("--loss", default="hmmc", choices=losses.LOSSES)
    p.add_argument("--clip", default=None, help="model name (ViT-B/32, ...) or checkpoint path [ViT-B/32; demo: "
                                                "assets/mini-clip.pt, else a random tiny CLIP]")
    p.add_argument("--lr", type=float, default=None, help="[2e-4; demo: 1e-3]")
    p.add_argument("--lr-decay-epoch", type=int, default=20, help="lr x0.7 after this many epochs")
    p.add_argument("--epochs", type=int, default=None, help="[30; demo: 6]")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split across processes")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--mask-same-image", action="store_true", help="captions of one image are not each other's negatives")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="[bf16 on GPUs that have it, else off]")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the encoders; MODE reduce-overhead adds CUDA graphs")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images")
    p.add_argument("--out", default=None, help="run folder [runs/<dataset>-<method>-<loss>]")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--save-minutes", type=float, default=10, help="mid-epoch saves of last.pt: at the first progress "
                   "line this many minutes after the last save (0: at every progress line)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 6 if args.dataset == "demo" else 30
    if args.lr is None:
        args.lr = 1e-3 if args.dataset == "demo" else 2e-4  # the demo trains for minutes, not hours
    if args.out is None:
        args.out = os.path.join("runs", f"{args.dataset}-{args.method}-{args.loss}")
    if args.batch_size < 2 or args.epochs < 1 or args.log_every < 1 or args.save_minutes < 0:
        p.error("--batch-size must be >= 2 (a pair's negatives are the batch's other pairs), --epochs and "
                "--log-every positive, --save-minutes >= 0")
    return args


def load_data(args, resolution, rank):
    """Train/val (seeded 80/20 split of the training file) and test splits, images decoded once into memory."""
    if rank == 0:  # the demo is generated once, by one process
        data.dataset_location(args.dataset, args.data_root)
    if dist.is_initialized():
        dist.barrier()
    name, root = data.dataset_location(args.dataset, args.data_root)
    train, val = data.split_train_val(data.load_split(name, root, "train"), seed=args.seed)
    test = data.load_split(name, root, "test")
    splits = {}
    for split in (train, val, test):
        images = data.cache_images(split.image_paths, resolution, workers=args.workers)
        tokens = clip_min.tokenize(split.captions, truncate=True)
        splits[split.split] = (images, tokens)
        print(split.summary())
    return splits


class ViewsEncoder(nn.Module):
    """The clean and augmented embeddings of a batch in one pass, as a module DDP can wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        # CLIP's temperature rides along for the InfoNCE loss (trainable only under full fine-tuning).
        return (*adapter.encode_views(self.model, images, tokens), self.model.logit_scale.exp())


def train_step(encoder, optimizer, scaler, images, tokens, image_ids, args):
    """One optimisation step on a batch: clean + augmented views -> loss -> backward -> step. Returns the terms.
    tokens may stay on the CPU: they are cut there and then moved to the images' device."""
    # Cut to the longest caption while the tokens are still on the host, where reading the length costs no wait
    # for the GPU.
    tokens = clip_min.trim(tokens).to(images.device, non_blocking=True)
    with evaluate.autocast(images.device.type, args.amp):
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


def save_atomically(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a run killed while saving never leaves a truncated checkpoint behind


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
        raise SystemExit(f"last.pt was written on a {'CPU' if states['cuda'] is None else 'GPU'}: resume it on one")
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])  # this process's device, set before the resume


def write_test(args, metrics, log, record):
    log(f"test {evaluate.format_metrics(metrics)}")
    record({"split": "test", **metrics})
    with open(os.path.join(args.out, "test.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        evaluate.keep_freed_memory()
    args.amp = args.amp or evaluate.default_amp(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    local_batch = args.batch_size // world
    if rank != 0:  # one process speaks for all: the others' prints (data loading, repairs) would repeat its lines
        sys.stdout = open(os.devnull, "w")
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    torch.manual_seed(args.seed)
    model = adapter.apply(evaluate.load_backbone(args.clip, args.dataset, args.seed, device), args.method).to(device)
    n_trainable = adapter.count_trainable(model)
    log(f"{args.method}: {n_trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")
    splits = load_data(args, model.visual.input_resolution, rank)
    train_images, train_tokens = splits["train"]
    if device.type == "cuda":
        train_images = train_images.to(device)  # the decoded training set fits on the GPU: no input pipeline

    encoder = ViewsEncoder(model)
    if distributed and any(p.requires_grad for p in model.parameters()):  # zero-shot has nothing to synchronise
        # Full fine-tuning trains CLIP's temperature, which only InfoNCE uses: DDP must expect it to get no gradient.
        encoder = nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.method == "full" and args.loss != "infonce")
    if args.compile:
        encoder = torch.compile(encoder, mode=args.compile)
    torch.manual_seed(args.seed + rank)  # the same weights everywhere (above), but each process its own dropout
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr) if params else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    start_epoch, start_step, best_mr = 0, 0, -1.0
    steps = len(train_tokens) // args.batch_size
    if args.resume:
        if not os.path.isfile(last_path):
            raise SystemExit(f"--resume: no checkpoint at {last_path}")
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if len(state["rng"]) != world:
            raise SystemExit(f"{last_path} was written by {len(state['rng'])} processes: resume it with as many")
        changed = [f"--{k.replace('_', '-')} {state['args'][k]} -> {getattr(args, k)}" for k in
                   ("dataset", "method", "loss", "clip", "batch_size", "seed", "margin", "mask_same_image", "amp")
                   if state["args"][k] != getattr(args, k)]
        if changed:  # the batches, the model or the objective would not be the interrupted run's
            raise SystemExit(f"--resume with other settings than {last_path}: {', '.join(changed)}")
        adapter.load_trainable(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][rank])
        start_epoch, start_step, best_mr = state["epoch"], state["step"], state["best_mR"]
        if start_step == steps:  # a finished epoch, validation included
            start_epoch, start_step = start_epoch + 1, 0
        log(f"resumed from {last_path} at epoch {start_epoch + 1}, step {start_step}")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0 and args.resume and os.path.isfile(metrics_path):  # keep the lines of the steps last.pt holds
        with open(metrics_path) as f:
            entries = [json.loads(line) for line in f if line.endswith("\n")]  # a line cut short is dropped
        # Log positions are (epoch counted from 1, step); a validation line, without step, follows its epoch's steps.
        kept = [e for e in entries if (e.get("epoch", math.inf), e.get("step", math.inf)) <= (start_epoch + 1,
                                                                                               start_step)]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    metrics_file = open(metrics_path, "a" if args.resume else "w") if rank == 0 else None

    def record(entry):
        if metrics_file:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def save(epoch, step, improved=False):
        """last.pt, resumable after `step` steps of `epoch` (all of them: validation done too); best.pt if improved."""
        nonlocal saved_at
        rngs = rng_states()  # every process takes part: each one's generators are gathered
        if rank == 0:
            state = {"trainable": adapter.trainable_state_dict(model), "method": args.method,
                     "options": model.petl_options, "clip": args.clip,
                     "dataset": args.dataset, "epoch": epoch, "step": step, "best_mR": best_mr, "args": vars(args)}
            if improved:
                save_atomically(state, best_path)
            save_atomically({**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                             "rng": rngs}, last_path)
        saved_at = time.time()

    def score(split):
        images, tokens = splits[split]
        return evaluate.retrieval_metrics(evaluate.similarity(model, images, tokens, device, args.amp))

    before = {}
    if not args.resume:  # the starting point, so that every later number has something to be compared with
        for split in ("val", "test"):
            before[split] = m = score(split)
            log(f"before training: {split} {evaluate.format_metrics(m)}")
            record({"epoch": 0, "split": split, **m})
    if optimizer is not None and steps == 0:  # else no step runs and the untrained model is reported as trained
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(train_tokens)} training pairs")
    saved_at = time.time()
    for epoch in range(start_epoch, args.epochs if optimizer is not None else 0):  # zero-shot: nothing to train
        lr = args.lr * (0.7 if epoch >= args.lr_decay_epoch else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        # The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
        order = torch.randperm(len(train_tokens), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        started, first = time.time(), start_step if epoch == start_epoch else 0
        for step in range(first, steps):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size][rank * local_batch:(rank + 1) * local_batch]
            image_ids = idx // 5  # five captions per image, in image order
            images = data.normalise(train_images[image_ids.to(train_images.device)].to(device, non_blocking=True))
            terms = train_step(encoder, optimizer, scaler, images, train_tokens[idx], image_ids.to(device), args)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                terms = {k: v.item() for k, v in terms.items()}
                elapsed = time.time() - started
                rate = (step + 1 - first) * args.batch_size / elapsed
                eta = ((steps - step - 1) + (args.epochs - epoch - 1) * steps) * args.batch_size / rate  # whole run
                log(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} "
                    + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                    + f" lr {lr:.2e} {rate:.1f} pairs/s eta {eta:.0f}s")
                record({"epoch": epoch + 1, "step": step + 1, "lr": lr, "pairs_per_s": rate, **terms})
                # A mid-epoch save once --save-minutes have passed: rank 0's clock decides for every process.
                due = [step + 1 < steps and time.time() - saved_at >= 60 * args.save_minutes]
                if distributed:
                    dist.broadcast_object_list(due, src=0)
                if due[0]:
                    save(epoch, step + 1)
        model.eval()
        m = score("val")
        improved = m["mR"] > best_mr
        best_mr = max(best_mr, m["mR"])
        log(f"epoch {epoch + 1} val {evaluate.format_metrics(m)}" + (" (best)" if improved else ""))
        record({"epoch": epoch + 1, "split": "val", **m})
        save(epoch, steps, improved)

    if rank == 0 and optimizer is None:
        result = write_test(args, before["test"], log, record)
    elif rank == 0:  # the test set is scored once, with the checkpoint validation chose
        adapter.load_trainable(model, torch.load(best_path, map_location="cpu", weights_only=True)["trainable"])
        result = write_test(args, score("test"), log, record)
    if metrics_file:
        metrics_file.close()
    if distributed:
        dist.destroy_process_group()
    return result if rank == 0 else None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # last.pt holds the last save: nothing before it is lost
        print("\ninterrupted: run the same command with --resume to continue from the last save", file=sys.stderr)
        sys.exit(130)
