"""Score a trained run, frozen CLIP or the authors' released checkpoint on a test split (the protocol: metrics.py).

    python evaluate.py                                   # best checkpoint of the latest run, on its test split
    python evaluate.py --method zeroshot --dataset rsitmd --data-root data   # frozen CLIP
    python evaluate.py --checkpoint runs/x/best.pt --visualize 5            # also a PNG gallery of the top 5

It writes test_eval.json (and test_eval.png) into --out, by default the checkpoint's run folder; scored on another
dataset than the run's, test_eval-<dataset>.json, so that the run's own numbers are never replaced.
"""
import argparse
import glob
import json
import os

import torch
from PIL import Image, ImageDraw, ImageFont

import adapter
import clip_min
import data
import metrics
from support import released, runtime


GREEN, GREY, INK = (0, 200, 0), (120, 120, 120), (20, 20, 20)  # the truth's frame and text; other text


def font(size):
    """A scalable font (Pillow's bundled one, >= 10.1), so that words stay readable and apart at any size."""
    return ImageFont.load_default(size=size)


def wrap(text, face, width, lines=None):
    """text in lines no wider than width pixels (words kept whole; a word wider than a line, and the text past
    `lines` lines, cut with an ellipsis)."""
    out = []
    for word in text.split():
        line = f"{out[-1]} {word}" if out else word
        if out and face.getlength(line) <= width:
            out[-1] = line
        else:
            out.append(word)
    out = [shorten(line, face, width) for line in out] or [""]
    if lines and len(out) > lines:
        out = out[:lines - 1] + [shorten(out[lines - 1] + " \u2026", face, width, force=True)]
    return out


def shorten(line, face, width, force=False):
    """line cut (with an ellipsis) to width pixels; force: the line ends in an ellipsis that must stay visible."""
    if face.getlength(line) <= width and not force:
        return line
    line = line.removesuffix(" \u2026")
    while line and face.getlength(line + "\u2026") > width:
        line = line[:-1]
    return line + "\u2026"


def thumbnail(images, i, size):
    return Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((size, size))


def heading(draw, y, width, title, legend):
    """A block's title and its legend line; returns the y below them."""
    draw.text((12, y), title, fill=INK, font=font(22))
    draw.text((12, y + 30), legend, fill=GREY, font=font(15))
    draw.line([12, y + 54, width - 12, y + 54], fill=(200, 200, 200))
    return y + 64


def caption_rows(draw, canvas, scores, split, images, k, image_of_caption, picks, y, size=96):
    """Text to image: per caption, its wrapped text, its top-k images by its scores (rank above each, the truth
    framed green) and, when the truth ranks below k, the truth at the right with its rank. Returns (y below, placed
    thumbnails)."""
    text_width, pad, placed = 330, 8, []
    for caption, row in zip(picks, scores):
        order = row.argsort(descending=True).tolist()
        truth = image_of_caption[caption]
        lines = wrap(split.captions[caption], font(15), text_width, lines=6)
        draw.text((12, y + 18), "\n".join(lines), fill=INK, font=font(15), spacing=4)
        for col, i in enumerate(order[:k]):
            x = 12 + text_width + pad + col * (size + pad)
            draw.text((x, y), f"{col + 1}", fill=GREY, font=font(13))
            canvas.paste(thumbnail(images, i, size), (x, y + 18))
            if i == truth:
                draw.rectangle([x, y + 18, x + size - 1, y + 18 + size - 1], outline=GREEN, width=4)
            placed.append((caption, col, i, (x, y + 18)))
        rank = order.index(truth) + 1
        if rank > k:  # the truth, so that a miss shows what should have come first
            x = 12 + text_width + pad + k * (size + pad) + 3 * pad
            draw.text((x, y), f"truth: rank {rank}", fill=GREEN, font=font(13))
            canvas.paste(thumbnail(images, truth, size), (x, y + 18))
            draw.rectangle([x, y + 18, x + size - 1, y + 18 + size - 1], outline=GREEN, width=4)
            placed.append((caption, rank - 1, truth, (x, y + 18)))
        y += max(size + 18, 18 + len(lines) * 19) + 2 * pad
    return y, placed


def image_rows(draw, canvas, scores, split, images, k, image_of_caption, picks, y, width, size=96):
    """Image to text: per image, its thumbnail and its top-k captions by its scores, one line each, + (green) for the
    image's own, - for another's; when none of its own is in the top k, its best-ranked own caption with its rank."""
    face, line, pad, placed = font(14), 18, 8, []
    x, room = 12 + size + 2 * pad, width - 12 - size - 3 * pad
    columns = -(-k // 10)  # ten captions a column: the row stays short at k = 20 and uses the gallery's width
    for i, row in zip(picks, scores):
        canvas.paste(thumbnail(images, i, size), (12, y))
        placed.append((i, 0, i, (12, y)))
        order = row.argsort(descending=True).tolist()
        for rank, j in enumerate(order[:k], 1):
            own, column = image_of_caption[j] == i, (rank - 1) // 10
            text = shorten(f"{rank:>2}. {'+' if own else '-'} {split.captions[j]}", face, room // columns - pad)
            draw.text((x + column * room // columns, y + (rank - 1) % 10 * line), text, fill=GREEN if own else INK,
                      font=face)
        rows = min(k, 10)
        first = next(r for r, j in enumerate(order, 1) if image_of_caption[j] == i)
        if first > k:
            text = shorten(f"truth: its best caption ranks {first}: {split.captions[order[first - 1]]}", face, room)
            draw.text((x, y + rows * line), text, fill=GREEN, font=face)
            rows += 1
        y += max(size, rows * line) + 3 * pad
    return y, placed


def gallery(features, split, images, k, path, image_of_caption, queries=4):
    """A PNG for people: for a few captions their top-k images, for a few images their top-k captions; the truth
    framed (or written) in green, shown with its rank when it falls outside the top k. features: the split's image
    and caption embeddings (only the drawn queries' similarities are computed); image_of_caption[j]: the index of
    caption j's image. Returns the thumbnails placed: (query, rank - 1, image index, (x, y))."""
    image_features, caption_features = features
    k, size, pad = min(k, len(images)), 96, 8  # a small test set may hold fewer than k images
    width = 12 + 330 + pad + (k + 1) * (size + pad) + 3 * pad + 12
    captions = torch.linspace(0, len(split.captions) - 1, queries).long().tolist()
    picks = torch.linspace(0, len(split.image_paths) - 1, queries).long().tolist()
    canvas = Image.new("RGB", (width, 2 * 64 + queries * (290 + 18 * k) + 40), "white")  # cropped below
    draw = ImageDraw.Draw(canvas)
    y = heading(draw, 8, width, f"Text to image: each caption's top {k} images, best first",
                "green frame: the caption's own image (the truth); a truth ranked below "
                f"{k} is shown at the right with its rank")
    y, placed = caption_rows(draw, canvas, caption_features[captions] @ image_features.t(), split, images, k,
                             image_of_caption, captions, y)
    y = heading(draw, y + 8, width, f"Image to text: each image's top {k} captions, best first",
                "+ (green): a caption of this image (a truth); -: another image's caption")
    y, _ = image_rows(draw, canvas, image_features[picks] @ caption_features.t(), split, images, k, image_of_caption,
                      picks, y, width)
    canvas.crop((0, 0, width, y)).save(path)
    return placed


def latest_run(root="runs"):
    """The newest best.pt under root, at any depth (train.py's runs/<run>/, table.py's runs/table/<dataset>/<cell>/)."""
    found = glob.glob(os.path.join(root, "**", "best.pt"), recursive=True)
    if not found:
        raise runtime.CommandError(f"no trained run under {root}/ (train one with train.py, or pass --checkpoint, "
                                   "or --method zeroshot to evaluate frozen CLIP)")
    return max(found, key=os.path.getmtime)


def parse_args(argv=None):
    p = argparse.ArgumentParser(usage="%(prog)s [options] (see --help)",
                                description="Evaluate image-text retrieval on a test split (R@1/5/10, mR).")
    p.add_argument("--checkpoint", help="a best.pt/last.pt written by train.py [the latest run's best.pt]")
    p.add_argument("--official-checkpoint", metavar="PATH", help="a checkpoint saved by the authors' released "
                   "train.py (model_best.pth.tar): its CLIP and MRS-Adapter, read without running its code")
    p.add_argument("--dataset", help="[the checkpoint's]; a .csv/.tsv of image-caption pairs too")
    p.add_argument("--data-root", help="[the checkpoint's, else data; demo: the demo cache]")
    p.add_argument("--clip", help="model name, checkpoint path or Hugging Face folder of the backbone "
                                  "[the checkpoint's]")
    p.add_argument("--clip-activation", choices=sorted(clip_min.model.ACTIVATIONS),
                   help="the backbone's MLP activation [the checkpoint's, else what the file records, else QuickGELU]")
    p.add_argument("--method", choices=adapter.METHODS, help="[the checkpoint's]; zeroshot evaluates frozen CLIP "
                   "without a checkpoint")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="[a GPU: the run's; a CPU: bf16 where it has bf16 units, else off]")
    p.add_argument("--visualize", type=int, default=0, metavar="K",
                   help="write a PNG gallery of the top-K results [0: none]")
    p.add_argument("--out", metavar="DIR", help="folder of the metrics' JSON file (and the gallery) [the checkpoint's "
                   "folder; zero-shot: runs/zeroshot]")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images [%(default)s]")
    data.add_arguments(p)
    args = p.parse_args(argv)
    if args.visualize < 0:
        p.error(f"--visualize K must be positive (or 0: no gallery), got {args.visualize}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.out and (args.out.endswith(".json") or os.path.isfile(args.out)):
        p.error(f"--out {args.out}: a folder now, as in train.py and table.py (evaluate.py writes test_eval.json "
                f"into it): pass --out {os.path.dirname(args.out) or '.'}")
    if args.method == "zeroshot" and args.checkpoint:
        p.error("--method zeroshot evaluates the frozen CLIP and reads no --checkpoint")
    if args.official_checkpoint and (args.checkpoint or args.method or args.clip or not args.dataset):
        p.error("--official-checkpoint brings its own CLIP and method: pass --dataset, not --checkpoint, --method or "
                "--clip")
    return args, p


def checkpoint_to_score(args, p):
    """The train.py checkpoint to score ({} for zero-shot and for the authors' checkpoints) and its run's train.py
    arguments; --dataset and --data-root default to that run's."""
    state = {}
    if args.official_checkpoint:
        if not os.path.isfile(args.official_checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.official_checkpoint}")
    elif args.method != "zeroshot":
        if not args.checkpoint:
            args.checkpoint = latest_run()
            print(f"checkpoint: {args.checkpoint} (the newest best.pt under runs/; --checkpoint chooses another)")
        state = runtime.read_run_checkpoint(args.checkpoint)
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
    state, saved = checkpoint_to_score(args, p)
    name, root = data.prepare_dataset(args.dataset, args.data_root)
    # Before the backbone: a missing dataset is said before a download. The archive options default to the run's.
    split = data.load_split(name, root, "test", csv=data.csv_options(args, saved))
    model, method = build(args, state, saved, device)
    # The training run's precision on a GPU; on a CPU what this CPU does best, whatever the run used.
    amp = args.amp or (saved.get("amp") if device.type == "cuda" else None) or runtime.default_amp(device)
    images = data.decode_split(split, model.visual.input_resolution, workers=args.workers,
                               cache=data.decode_cache_choice(args))
    tokens = clip_min.tokenize(split.captions, truncate=True)
    features = metrics.split_embeddings(model, images, tokens, device, amp)
    counts = metrics.embedding_counts(*features, split.image_of_caption)
    scores = metrics.recalls(counts)
    print(f"{args.dataset} test ({len(split.image_paths)} images, {len(split.captions)} captions), {method}:")
    print(metrics.format_metrics(scores))
    print(metrics.tie_bounds(counts) or "no exact ties at any query's truth")
    checkpoint = args.checkpoint or args.official_checkpoint
    out = result_path(args, checkpoint, saved)
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump({"dataset": args.dataset, "method": method, "checkpoint": checkpoint, **scores}, f, indent=1)
    except OSError as e:
        raise OSError(f"--out {os.path.dirname(out)}: cannot write {os.path.basename(out)} there ({e.strerror})") from e
    print(f"wrote {out}")
    if args.visualize:
        png = os.path.splitext(out)[0] + ".png"
        gallery([f.cpu() for f in features], split, images, args.visualize, png, split.image_of_caption)
        print(f"wrote {png}")


def result_path(args, checkpoint, saved):
    """<--out>/test_eval.json for the run's own dataset, test_eval-<dataset>.json for any other (and zero-shot)."""
    def where(dataset, root):  # a dataset named by its file, or by its name and root, wherever it was typed from
        return (os.path.abspath(dataset) if data.is_archive(dataset) else dataset), root and os.path.abspath(root)
    folder = args.out or (os.path.dirname(checkpoint) if checkpoint else os.path.join("runs", "zeroshot"))
    own = saved and where(args.dataset, args.data_root) == where(saved.get("dataset"), saved.get("data_root"))
    return os.path.join(folder, "test_eval.json" if own else f"test_eval-{data.dataset_label(args.dataset)}.json")


if __name__ == "__main__":
    runtime.run_command(main)
