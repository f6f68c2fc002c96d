"""Image-text retrieval evaluation: the recall protocol, encoding a split, the command line (and the CPU allocator
setting that it and train.py share).

    python evaluate.py                                   # best checkpoint of the latest run, on its test split
    python evaluate.py --method zeroshot --dataset rsitmd --data-root data   # frozen CLIP
    python evaluate.py --checkpoint runs/x/best.pt --visualize 5            # also a PNG gallery of the top 5
"""
import argparse
import glob
import json
import os
import textwrap
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import adapter
import clip_min
import data
import runtime


def hit_probability(above, tied, truths, k, ties="expected"):
    """P(rank < k) per query: `above` wrong candidates score strictly higher than its best truth, `tied` wrong ones
    equal it, and `truths` of its own candidates reach that score (so the first of them is its rank)."""
    if ties == "pessimistic":  # every tied wrong candidate ranked first
        return (above + tied < k).double()
    if ties == "optimistic":  # every tied wrong candidate ranked after the truths
        return (above < k).double()
    # Tied items in uniformly random order: the rank misses k when none of the first m = k - above tied slots holds a
    # truth, probability C(tied, m) / C(tied + truths, m) = prod_{i<m} (tied - i) / (tied + truths - i).
    slots = (k - above).clamp(0, k)[:, None]
    i = torch.arange(k, device=above.device)
    # Past i = tied the product is already 0; the clamp only keeps the factors after that finite.
    ratios = (tied[:, None] - i).double() / (tied[:, None] + truths[:, None] - i).clamp(min=1)
    return 1 - torch.where(i < slots, ratios, 1.0).prod(dim=1)


def retrieval_metrics(similarity, captions_per_image=data.CAPTIONS_PER_IMAGE, ties="expected", chunk=1024):
    """Recall@1/5/10 in both directions and their mean, in percent, from an [images x captions] similarity matrix.

    Caption j belongs to image j // captions_per_image. Image -> text: an image's rank is the best rank among its
    own captions. Text -> image: each caption ranks all images. R@K = 100 * fraction of queries with rank < K.
    Exactly tied scores (identical captions or images) are ordered by `ties`: "expected" averages R@K over all
    orders of the tied candidates (exact, no sampling; what the released code gives on average over arbitrary
    argsort orders), "pessimistic" puts every tied wrong candidate first (a collapsed model gets rank N - 1) and
    "optimistic" puts them last. "tied_queries" counts the queries (both directions) whose truth ties with a wrong
    candidate: only those differ between the rules. Queries are processed `chunk` at a time (memory O(chunk x N)).
    """
    similarity = torch.as_tensor(similarity)
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be a 2-D [images x captions] matrix, got shape {tuple(similarity.shape)}")
    n_images, n_captions = similarity.shape
    if captions_per_image < 1 or n_images == 0 or n_captions != n_images * captions_per_image:
        raise ValueError(f"similarity has {n_captions} captions for {n_images} images; expected images x "
                         f"captions_per_image = {n_images} x {captions_per_image} = {n_images * captions_per_image}")
    if torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if ties not in ("expected", "pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'expected', 'pessimistic' or 'optimistic', got {ties!r}")

    counts = {"i2t": [], "t2i": []}  # per chunk: (above, tied, truths) of each query
    for start in range(0, n_images, chunk):
        rows = similarity[start:start + chunk]
        images = torch.arange(start, start + len(rows), device=similarity.device)
        own_captions = images[:, None] * captions_per_image + torch.arange(captions_per_image, device=images.device)
        own_scores = rows.gather(1, own_captions)
        best_own = own_scores.max(dim=1, keepdim=True).values
        truths = (own_scores == best_own).sum(dim=1)
        counts["i2t"].append(((rows > best_own).sum(dim=1), (rows == best_own).sum(dim=1) - truths, truths))
    for start in range(0, n_captions, chunk):
        columns = similarity[:, start:start + chunk]
        captions = torch.arange(start, start + columns.shape[1], device=similarity.device)
        truth_score = columns[captions // captions_per_image, captions - start][None, :]
        tied = (columns == truth_score).sum(dim=0) - 1  # the truth itself is not a tied wrong candidate
        counts["t2i"].append(((columns > truth_score).sum(dim=0), tied, torch.ones_like(tied)))

    metrics, tied_queries = {}, 0
    for direction, chunks in counts.items():
        above, tied, truths = (torch.cat(c) for c in zip(*chunks))
        tied_queries += (tied > 0).sum().item()
        for k in (1, 5, 10):
            hits = hit_probability(above, tied, truths, k, ties).sum().item()
            metrics[f"{direction}_R@{k}"] = 100.0 * hits / len(above)
    metrics["mR"] = sum(metrics.values()) / 6
    metrics["tied_queries"] = tied_queries
    return metrics


def tie_bounds(similarity, metrics):
    """A line with the pessimistic and optimistic mR when exact ties touch the truth of some query, else ''."""
    if not metrics["tied_queries"]:
        return ""
    low, high = (retrieval_metrics(similarity, ties=rule)["mR"] for rule in ("pessimistic", "optimistic"))
    return (f"exact ties touch the truth of {metrics['tied_queries']} of {sum(similarity.shape)} queries: mR "
            f"{low:.2f} if every tie went against the truth, {high:.2f} if every one went for it")


def similarity(model, images, tokens, device, amp="off", batch_size=128, progress_seconds=10.0):
    """Cosine similarities [images x captions] of a split; images: uint8 [N, 3, r, r], tokens: [captions, ctx].
    A progress line at most every `progress_seconds` (a large split on a CPU takes minutes)."""
    features, said_at = {"images": [], "captions": []}, time.time()
    with torch.no_grad(), runtime.autocast(device.type, amp):
        for kind, inputs in (("images", images), ("captions", tokens)):
            for i in range(0, len(inputs), batch_size):
                if kind == "images":
                    embeddings = model.encode_image(data.normalise(inputs[i:i + batch_size].to(device)))
                else:
                    embeddings = model.encode_text(clip_min.trim(inputs[i:i + batch_size]).to(device))
                features[kind].append(F.normalize(embeddings.float(), dim=-1))
                if time.time() - said_at >= progress_seconds:
                    print(f"encoded {min(i + batch_size, len(inputs))}/{len(inputs)} {kind}", flush=True)
                    said_at = time.time()
    return torch.cat(features["images"]) @ torch.cat(features["captions"]).t()


def format_metrics(m):
    """The paper's layout: image->text R@1/5/10 | text->image R@1/5/10 | mR."""
    return (f"i2t R@1/5/10 {m['i2t_R@1']:.2f}/{m['i2t_R@5']:.2f}/{m['i2t_R@10']:.2f} | "
            f"t2i R@1/5/10 {m['t2i_R@1']:.2f}/{m['t2i_R@5']:.2f}/{m['t2i_R@10']:.2f} | mR {m['mR']:.2f}")


def official_model(path, device):
    """The model a checkpoint of the authors' released train.py holds: their CLIP (their optimizer took every
    parameter, so it trained too) with their MRS-Adapter. Says how far that CLIP moved from OpenAI's ViT-B/32 when
    OpenAI's file is in clip_min's download cache."""
    weights = adapter.released_state_dict(path)
    prefix = "PE_RSITR.model."
    clip = {k.removeprefix("module.")[len(prefix):]: v for k, v in weights.items()
            if k.removeprefix("module.").startswith(prefix)}
    if not clip:
        raise SystemExit(f"{path} holds no CLIP weights under '{prefix}'")
    model = adapter.apply(clip_min.build_model(clip), "mrs")
    adapter.load_official_mrs(model, weights)
    openai = os.path.join(os.path.expanduser(clip_min.weights.DEFAULT_ROOT), "ViT-B-32.pt")
    if os.path.isfile(openai):
        theirs = clip_min.weights.read_state_dict(openai)
        change = max((clip[k].float() - v).abs().max().item() for k, v in theirs.items() if k in clip)
        print(f"its CLIP differs from OpenAI's ViT-B/32 ({openai}) by at most {change:.3g} per weight")
    else:
        print(f"OpenAI's ViT-B/32 is not in {os.path.dirname(openai)}: how far its CLIP moved is not measured")
    return model.to(device).eval()


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
    p.add_argument("--dataset", help="[the checkpoint's]")
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
        if not os.path.isfile(args.checkpoint):
            raise SystemExit(f"checkpoint not found: {args.checkpoint}")
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if "trainable" not in state:
            raise SystemExit(f"{args.checkpoint} is not a checkpoint written by train.py (no 'trainable' entry)")
    saved = state.get("args", {})
    args.dataset = args.dataset or saved.get("dataset") or p.error("--dataset is needed without a checkpoint")
    args.data_root = args.data_root or saved.get("data_root")
    return state, saved


def build(args, state, saved, device):
    """The model to score and its method's name."""
    if args.official_checkpoint:
        return official_model(args.official_checkpoint, device), "mrs (released checkpoint)"
    method = args.method or state["method"]
    backbone = runtime.load_backbone(args.clip or state.get("clip"), args.dataset, saved.get("seed", 2), device,
                                     args.clip_activation or state.get("activation"))
    options = state.get("options", {}) if method == state.get("method") else {}  # the trained method's sizes
    model = adapter.apply(backbone, method, **options).to(device).eval()
    if state:
        adapter.load_trainable(model, state["trainable"])
    return model, method


def main(argv=None):
    args, p = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        runtime.keep_freed_memory()
    state, saved = read_checkpoint(args, p)
    name, root = data.prepare_dataset(args.dataset, args.data_root)
    split = data.load_split(name, root, args.split)  # before the backbone: a missing dataset is said before a download
    model, method = build(args, state, saved, device)
    # The training run's precision on a GPU; on a CPU what this CPU does best, whatever the run used.
    amp = args.amp or (saved.get("amp") if device.type == "cuda" else None) or runtime.default_amp(device)
    images = data.cache_images(split.image_paths, model.visual.input_resolution, workers=args.workers)
    tokens = clip_min.tokenize(split.captions, truncate=True)
    sim = similarity(model, images, tokens, device, amp)
    metrics = retrieval_metrics(sim)
    print(f"{args.dataset} {args.split} ({len(split.image_paths)} images, {len(split.captions)} captions), {method}:")
    print(format_metrics(metrics))
    print(tie_bounds(sim, metrics) or "no exact ties at any query's truth")
    checkpoint = args.checkpoint or args.official_checkpoint
    out = args.out or (os.path.join(os.path.dirname(checkpoint), f"{args.split}_eval.json") if checkpoint
                       else os.path.join("runs", f"zeroshot-{args.dataset}.json"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"dataset": args.dataset, "method": method, "checkpoint": checkpoint, **metrics}, f, indent=1)
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
