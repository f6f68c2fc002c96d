"""Score a trained run, frozen CLIP or the authors' released checkpoint on a test split (the protocol: metrics.py).

    python evaluate.py                                   # best checkpoint of the latest run, on its test split
    python evaluate.py --method zeroshot --dataset rsitmd --data-root data   # frozen CLIP
    python evaluate.py --checkpoint runs/x/best.pt --visualize 5            # also a PNG gallery of the top 5
"""
import argparse
import glob
import json
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import adapter
import clip_min
import data
import metrics
import released
import runtime


def gallery(sim, split, images, k, path, queries=4):
    """A PNG: for a few captions their top-k images (ground truth framed green), for a few images their top-k captions."""
    size, pad, per = 96, 4, data.CAPTIONS_PER_IMAGE
    k = min(k, len(images))  # a small test set may hold fewer than k images
    width = 360 + k * (size + pad)
    canvas = Image.new("RGB", (width, 2 * queries * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    picks = torch.linspace(0, len(split.captions) - 1, queries).long().tolist()
    for row, caption in enumerate(picks):
        y = row * (size + pad)
        draw.text((4, y + 4), "\n".join(textwrap.wrap(split.captions[caption], 55)[:6]), fill="black")
        for col, i in enumerate(sim[:, caption].topk(k).indices.tolist()):
            x = 360 + col * (size + pad)
            thumb = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((size, size))
            canvas.paste(thumb, (x, y))
            if i == caption // per:
                draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(0, 200, 0), width=4)
    for row, i in enumerate(torch.linspace(0, len(split.image_paths) - 1, queries).long().tolist()):
        y = (queries + row) * (size + pad)
        canvas.paste(Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((size, size)), (4, y))
        lines = [("+ " if j // per == i else "- ") + split.captions[j][:95] for j in sim[i].topk(k).indices.tolist()]
        draw.text((size + 12, y + 4), "\n".join(lines), fill="black")
    canvas.save(path)


def latest_run(root="runs"):
    found = glob.glob(os.path.join(root, "*", "best.pt"))
    if not found:
        raise SystemExit(f"no trained run under {root}/ (train one with train.py, or pass --checkpoint, "
                         "or --method zeroshot to evaluate frozen CLIP)")
    return max(found, key=os.path.getmtime)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate image-text retrieval on a test split (R@1/5/10, mR).")
    p.add_argument("--checkpoint", help="a best.pt/last.pt written by train.py [the latest run's best.pt]")
    p.add_argument("--official-checkpoint", metavar="PATH", help="a checkpoint saved by the authors' released "
                   "train.py (model_best.pth.tar): its CLIP and MRS-Adapter, read without running its code")
    p.add_argument("--dataset", help="[the checkpoint's]; a .csv/.tsv of image-caption pairs too")
    p.add_argument("--data-root", help="[the checkpoint's, else data; demo: the demo cache]")
    p.add_argument("--clip", help="model name, checkpoint path or Hugging Face folder of the backbone "
                                  "[the checkpoint's]")
    p.add_argument("--clip-activation", choices=sorted(clip_min.model.ACTIVATIONS),
                   help="the backbone's MLP activation [the checkpoint's, else what the file records, else QuickGELU]")
    p.add_argument("--method", choices=adapter.METHODS, help="'zeroshot' evaluates frozen CLIP without a checkpoint")
    p.add_argument("--split", default="test", choices=["test"])
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None)
    p.add_argument("--visualize", type=int, default=0, metavar="K", help="write a PNG gallery of the top-K results")
    p.add_argument("--out", help="JSON file for the metrics [next to the checkpoint, or runs/zeroshot-<dataset>.json]")
    p.add_argument("--workers", type=int, default=8)
    data.add_arguments(p)
    args = p.parse_args(argv)
    if args.visualize < 0:
        p.error(f"--visualize K must be positive (or 0: no gallery), got {args.visualize}")
    if args.method == "zeroshot" and args.checkpoint:
        p.error("--method zeroshot evaluates the frozen CLIP and reads no --checkpoint")
    if args.official_checkpoint and (args.checkpoint or args.method or args.clip or not args.dataset):
        p.error("--official-checkpoint brings its own CLIP and method: pass --dataset, not --checkpoint, --method or "
                "--clip")
    return args, p


def read_checkpoint(args, p):
    """The train.py checkpoint to score ({} for zero-shot and for the authors' checkpoints) and its run's train.py
    arguments; --dataset and --data-root default to that run's."""
    state = {}
    if args.official_checkpoint:
        if not os.path.isfile(args.official_checkpoint):
            raise SystemExit(f"checkpoint not found: {args.official_checkpoint}")
    elif args.method != "zeroshot":
        args.checkpoint = args.checkpoint or latest_run()
        state = runtime.read_checkpoint(args.checkpoint)
    saved = state.get("args", {})
    args.dataset = args.dataset or saved.get("dataset") or p.error("--dataset is needed without a checkpoint")
    args.data_root = args.data_root or saved.get("data_root")
    return state, saved


def build(args, state, saved, device):
    """The model to score and its method's name."""
    if args.official_checkpoint:
        return released.official_model(args.official_checkpoint, device), "mrs (released checkpoint)"
    method = args.method or state["method"]
    return runtime.trained_model(state, device, args.clip, args.clip_activation, method, args.dataset), method


def main(argv=None):
    args, p = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        runtime.keep_freed_memory()
    state, saved = read_checkpoint(args, p)
    name, root = data.prepare_dataset(args.dataset, args.data_root)
    # Before the backbone: a missing dataset is said before a download. The archive options default to the run's.
    split = data.load_split(name, root, args.split, csv=data.csv_options(args, saved))
    model, method = build(args, state, saved, device)
    # The training run's precision on a GPU; on a CPU what this CPU does best, whatever the run used.
    amp = args.amp or (saved.get("amp") if device.type == "cuda" else None) or runtime.default_amp(device)
    images = data.load_images(split.image_paths, model.visual.input_resolution, workers=args.workers,
                              cache=data.decode_cache_choice(args))
    tokens = clip_min.tokenize(split.captions, truncate=True)
    sim = metrics.similarity(model, images, tokens, device, amp)
    scores = metrics.retrieval_metrics(sim, split.image_of_caption)
    print(f"{args.dataset} {args.split} ({len(split.image_paths)} images, {len(split.captions)} captions), {method}:")
    print(metrics.format_metrics(scores))
    print(metrics.tie_bounds(sim, scores, split.image_of_caption) or "no exact ties at any query's truth")
    checkpoint = args.checkpoint or args.official_checkpoint
    out = args.out or (os.path.join(os.path.dirname(checkpoint), f"{args.split}_eval.json") if checkpoint
                       else os.path.join("runs", f"zeroshot-{args.dataset}.json"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"dataset": args.dataset, "method": method, "checkpoint": checkpoint, **scores}, f, indent=1)
    print(f"wrote {out}")
    if args.visualize:
        png = os.path.splitext(out)[0] + ".png"
        gallery(sim.cpu(), split, images, args.visualize, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # a missing dataset or file, a failed download: the message names it, a traceback adds nothing
        raise SystemExit(f"error: {e}")
