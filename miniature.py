"""The paper in miniature, on a CPU: pretrain a small CLIP on a synthetic "natural" domain, then transfer it to a
synthetic "remote sensing" domain (the demo dataset) with every method, and print the paper's table.

    python miniature.py pretrain      # ~6 min on 2 cores: writes assets/mini-clip.pt (OpenAI's file format)
    python miniature.py table         # ~12 min on 2 idle cores: every method x 3 seeds via train.py --dataset demo

The natural domain shows houses from the side under a sky, left or right; the remote domain shows buildings from
above, in four positions ("top" and "bottom" are words the pretraining never saw), with other caption templates.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import time
import warnings

import numpy as np
import torch

import adapter
import clip_min
import data
import evaluate
import losses
import train

# heads = width // 64; the text width stays above the MRS-Adapter's bottleneck of 64. The 49408 x 128 token
# embedding is most of the 8.9M parameters; the towers are small enough to train on a CPU in minutes.
MINI_CONFIG = clip_min.CLIPConfig(embed_dim=128, image_resolution=64, patch_size=16, vision_width=192,
                                  vision_layers=4, text_width=128, text_layers=3)
# (method, loss, name in the table), in the paper's order: references, PETL baselines, then PE-RSITR.
ROWS = [("zeroshot", "hmmc", "Zero-shot CLIP"), ("linear", "hmmc", "Linear probe"),
        ("full", "hmmc", "Full fine-tuning"), ("coop", "hmmc", "CoOp"), ("vpt", "hmmc", "VPT"),
        ("clip_adapter", "hmmc", "CLIP-Adapter"), ("adapter", "hmmc", "Adapter"),
        ("adaptformer", "hmmc", "AdaptFormer"), ("lora", "hmmc", "LoRA"),
        ("mrs", "infonce", "MRS-Adapter + InfoNCE"), ("mrs", "hmmc", "MRS-Adapter + HMMC (PE-RSITR)")]
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"]


def save_openai_format(model, path):
    """OpenAI's file format: a traced TorchScript archive holding fp16 weights under OpenAI's names."""
    res, ctx = model.config.image_resolution, model.config.context_length
    example = (torch.zeros(1, 3, res, res), torch.zeros(1, ctx, dtype=torch.long))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        # Tracer warnings about data-dependent indexing (only the weights matter here), and TorchScript's
        # deprecation notice: OpenAI's files are TorchScript archives, so this format is the point.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False)  # .half() spares `model`
        torch.jit.save(traced.half(), str(path))


def pretrain(out=evaluate.DEMO_CLIP, steps=1200, batch_size=128, lr=5e-4, n_train=6000, n_test=200, seed=0,
             root=None, log_every=50):
    """Contrastive pretraining (CLIP's InfoNCE with a learned temperature) on the natural domain; returns the
    fp32 model and the natural-domain test metrics of the saved (fp16) file."""
    root = root or data.DEMO_ROOT
    name = data.make_demo(root, domain="natural", n_train=n_train, n_test=n_test, seed=seed)
    splits = [data.load_split(name, root, part) for part in ("trainval", "test")]
    images, test_images = (data.cache_images(s.image_paths, MINI_CONFIG.image_resolution, log_every=0) for s in splits)
    tokens, test_tokens = (clip_min.tokenize(s.captions, truncate=True) for s in splits)
    per_epoch = len(images) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} training images")
    torch.manual_seed(seed)
    model = clip_min.CLIP(MINI_CONFIG).train()
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
    metrics = evaluate.retrieval_metrics(evaluate.similarity(saved, test_images, test_tokens, torch.device("cpu")))
    print(f"pretrained in {time.time() - started:.0f}s, saved to {out}")
    print(f"natural-domain test split: {evaluate.format_metrics(metrics)}")
    return model, metrics


def summarise(results):
    """Per-seed results [{method, loss, name, seed, params, seconds, metrics}] -> one row per (method, loss), in
    first-seen order, with the mean and the sample standard deviation (ddof=1) over seeds of each metric and time."""
    rows = {}
    for r in results:
        rows.setdefault((r["method"], r["loss"]), []).append(r)
    out = []
    for (method, loss), runs in rows.items():
        values = {k: np.array([r["metrics"][k] for r in runs], dtype=float) for k in METRICS}
        values["seconds"] = np.array([r["seconds"] for r in runs], dtype=float)
        out.append({"method": method, "loss": loss, "name": runs[0]["name"], "params": runs[0]["params"],
                    "seeds": len(runs), "mean": {k: float(v.mean()) for k, v in values.items()},
                    "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}})
    return out


def markdown(rows, total_params):
    """The paper's table layout as Markdown: mean ± std over seeds."""
    lines = ["| Method | Loss | Trainable params | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 "
             "| mR | Time/run (s) |", "|" + "---|" * 11]
    for row in rows:
        cells = [f"{row['mean'][k]:.2f} ± {row['std'][k]:.2f}" for k in METRICS + ["seconds"]]
        share = f"{row['params']:,} ({100 * row['params'] / total_params:.2f}%)"
        loss = row["loss"] if row["method"] != "zeroshot" else "-"
        lines.append(f"| {row['name']} | {loss} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(seeds=(0, 1, 2), epochs=3, lr=1e-3, out_root=os.path.join("runs", "miniature"), clip=evaluate.DEMO_CLIP):
    """Every row of ROWS x every seed through train.main on the demo (remote) domain; writes table.md."""
    if not os.path.isfile(clip):
        raise SystemExit(f"no pretrained checkpoint at {clip}: run `python miniature.py pretrain` first")
    backbone = clip_min.load(clip)[0]
    total_params, results, started = sum(p.numel() for p in backbone.parameters()), [], time.time()
    for method, loss, name in ROWS:
        params = adapter.count_trainable(adapter.apply(copy.deepcopy(backbone), method))
        # One lr and epoch count for every method, except full fine-tuning: it moves every weight of the
        # backbone and takes the customary 10x smaller lr. Nothing is chosen on the test split.
        run_lr = lr / 10 if method == "full" else lr
        for seed in seeds:
            out, run_started = os.path.join(out_root, f"{method}-{loss}-s{seed}"), time.time()
            shutil.rmtree(out, ignore_errors=True)  # a fresh folder: no file of an earlier run is left to mislead
            os.makedirs(out)
            with open(os.path.join(out, "log.txt"), "w") as log, contextlib.redirect_stdout(log):
                metrics = train.main(["--dataset", "demo", "--clip", clip, "--method", method, "--loss", loss,
                                      "--epochs", str(epochs), "--lr", str(run_lr), "--seed", str(seed), "--out", out])
            with contextlib.suppress(FileNotFoundError):  # last.pt only serves resuming; full fine-tuning's is 100 MB
                os.remove(os.path.join(out, "last.pt"))
            seconds = time.time() - run_started
            results.append(dict(method=method, loss=loss, name=name, seed=seed, params=params, seconds=seconds,
                                metrics=metrics))
            print(f"{name} seed {seed}: mR {metrics['mR']:.2f} ({seconds:.0f}s, log in {out})", flush=True)
    rows = summarise(results)
    ours = next(r for r in rows if (r["method"], r["loss"]) == ("mrs", "hmmc"))  # say plainly what beats it
    better = [f"{r['name']} ({r['mean']['mR'] - ours['mean']['mR']:+.2f} mR)" for r in rows
              if r["mean"]["mR"] > ours["mean"]["mR"]]
    text = (f"Mini CLIP ({total_params:,} parameters) pretrained on the synthetic natural domain, transferred to the "
            f"synthetic remote sensing domain (demo test split). Mean ± std (ddof=1) over seeds {list(seeds)}; "
            f"{epochs} epochs, batch 16, lr {lr:g} (full fine-tuning {lr / 10:g}). Time/run includes evaluation.\n\n"
            + markdown(rows, total_params) + f"\nHigher mean mR than {ours['name']}: {', '.join(better) or 'none'}.\n")
    with open(os.path.join(out_root, "table.md"), "w") as md, open(os.path.join(out_root, "results.json"), "w") as js:
        md.write(text)
        json.dump(results, js, indent=1)
    print("\n" + text + f"\nall runs took {time.time() - started:.0f}s on {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[1]:.1f} over the last 5 min); written to {out_root}/table.md")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pretrain", help="pretrain the mini CLIP on the natural domain")
    p.add_argument("--out", default=evaluate.DEMO_CLIP)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    t = commands.add_parser("table", help="transfer it to the remote domain with every method")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3)
    args = vars(parser.parse_args())
    (pretrain if args.pop("command") == "pretrain" else table)(**args)
