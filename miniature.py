"""The paper in miniature, on a CPU: pretrain a small CLIP on a synthetic "natural" domain, then transfer it to a
synthetic "remote sensing" domain (the demo dataset) with every method, and print the paper's table.

    python miniature.py pretrain      # writes assets/mini-clip.pt (OpenAI's file format)
    python miniature.py table         # every method of adapter.METHODS x 3 seeds through table.py

Their times on a CPU and the table's output: docs/miniature.md.

The natural domain shows houses from the side under a sky, left or right; the remote domain shows buildings from
above, in four positions ("top" and "bottom" are words the pretraining never saw), with other caption templates.
"""
import argparse
import copy
import math
import os
import shlex
import tempfile
import time
import warnings

import torch

import clip_min
import data
import losses
import metrics
import table as table_py
from support import demo, runtime

def save_openai_format(model, path):
    """OpenAI's file format: a traced TorchScript archive holding fp16 weights under OpenAI's names."""
    res, ctx = model.config.image_resolution, model.config.context_length
    example = (torch.zeros(1, 3, res, res), torch.zeros(1, ctx, dtype=torch.long))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        # Tracer warnings about data-dependent indexing (only the weights matter here), and TorchScript's
        # deprecation notice: OpenAI's files are TorchScript archives, so this format is the point.
        warnings.simplefilter("ignore")
        with torch.no_grad():  # a trace records no autograd Function
            traced = torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False)  # .half() spares `model`
        torch.jit.save(traced.half(), str(path))


def pretrain(out=runtime.DEMO_CLIP, steps=1200, batch_size=128, lr=5e-4, n_train=6000, n_test=200, seed=0,
             root=None, log_every=50):
    """Contrastive pretraining (CLIP's InfoNCE with a learned temperature) on the natural domain; returns the
    fp32 model and the natural-domain test metrics of the saved (fp16) file."""
    root = root or data.DEMO_ROOT
    name = demo.make_demo(root, domain="natural", n_train=n_train, n_test=n_test, seed=seed)
    splits = [data.load_split(name, root, part) for part in ("trainval", "test")]
    images, test_images = (data.decode_split(s, demo.MINI_CLIP.image_resolution, log_every=0) for s in splits)
    tokens, test_tokens = (clip_min.tokenize(s.captions, truncate=True) for s in splits)
    per_epoch = len(images) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} training images")
    torch.manual_seed(seed)
    model = clip_min.CLIP(demo.MINI_CLIP).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices, not gains or biases
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    generator, started = torch.Generator().manual_seed(seed), time.time()
    for step in range(steps):
        if step % per_epoch == 0:  # each epoch: every image once, each with one of its five captions at random
            order = torch.randperm(len(images), generator=generator)
            caption = torch.randint(5, (len(images),), generator=generator)
        idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        text = tokens[idx * 5 + caption[idx]]
        text = clip_min.trim(text)  # as train.py does
        for group in optimizer.param_groups:  # linear warm-up, then cosine decay to zero
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = losses.infonce(model.encode_image(data.normalise(images[idx])), model.encode_text(text),
                              logit_scale=model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP caps the temperature at 1/100
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.time() - started
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"pretrain step {step + 1}/{steps} loss {loss.item():.4f} logit scale "
                  f"{model.logit_scale.exp().item():.1f} {elapsed:.0f}s, eta {eta:.0f}s", flush=True)
    save_openai_format(model.eval(), out)
    saved = clip_min.load(str(out))[0]  # score what was written, as train.py will read it
    scores = metrics.retrieval_metrics(metrics.similarity(saved, test_images, test_tokens, torch.device("cpu")),
                                       splits[1].image_of_caption)
    print(f"pretrained in {time.time() - started:.0f}s, saved to {out}")
    print(f"natural-domain test split: {metrics.format_metrics(scores)}")
    return model, scores


def table(seeds=(0, 1, 2), epochs=3, lr=1e-3, out_root=os.path.join("runs", "miniature"), clip=runtime.DEMO_CLIP):
    """table.py on the demo (remote) domain with the mini CLIP: every method, and the MRS-Adapter with InfoNCE too;
    writes <out_root>/table.md. Stopped, it continues where it was, as table.py does."""
    if not os.path.isfile(clip):
        raise SystemExit(f"no pretrained checkpoint at {clip}: run `python miniature.py pretrain` first")
    again = shlex.join(["python", "miniature.py", "table", "--seeds", *map(str, seeds), "--epochs", str(epochs),
                        "--lr", str(lr)])  # what continues it when stopped, rather than table.py's own command
    return table_py.main(["--datasets", "demo", "--methods", "all", "mrs:infonce", "--seeds", *map(str, seeds),
                          "--lr", str(lr), "--out", out_root, "--clip", clip, "--epochs", str(epochs)], again=again)


def parse_args(argv=None):
    """The command (pretrain or table) and its options, each impossible value refused in one line naming it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain the mini CLIP on the natural domain")
    p.add_argument("--out", default=runtime.DEMO_CLIP, help="the file written [%(default)s]")
    p.add_argument("--steps", type=int, default=1200, help="[%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    t = commands.add_parser("table", help="transfer it to the remote domain with every method")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="[0 1 2]")
    t.add_argument("--epochs", type=int, default=3, help="[%(default)s]")
    t.add_argument("--lr", type=float, default=1e-3, help="[%(default)s]")
    args = parser.parse_args(argv)
    if args.command == "pretrain" and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.command == "pretrain" and not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be between 0 and 2^32 - 1, got {args.seed}")
    if args.command == "pretrain" and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder: name the file to write")
    if args.command == "pretrain" and not writable(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: cannot write there")
    if args.command == "table" and args.epochs < 1:
        t.error(f"--epochs must be at least 1, got {args.epochs}")
    return vars(args)


def writable(folder):
    """Whether a file can be made in folder (a folder not there yet is made when the file is saved)."""
    if not os.path.isdir(folder):
        return True
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def main(argv=None):
    options = parse_args(argv)
    return (pretrain if options.pop("command") == "pretrain" else table)(**options)


if __name__ == "__main__":
    runtime.run_command(main)
