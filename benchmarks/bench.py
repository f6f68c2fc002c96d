"""Speed of a training step and of test-set encoding, ours against the paper's released code path.

    python -m benchmarks.bench                              # CPU: ViT-B/32, batch 16, MRS-Adapter, both paths
    python -m benchmarks.bench --device cuda --batch-sizes 16 128 --compile --json
    python -m benchmarks.bench --profile                    # where our step goes, by op category

Full ViT-B/32 shapes, random weights. Ours is train.train_step, the function the training loop runs. The baseline is
OpenAI's reference CLIP modules (pip install -r requirements-test.txt) driven as the released PE-RSITR code drives
them: blocks one by one in [L, B, D] through nn.MultiheadAttention, the MRS-Adapter in fp32 beside each MLP, four
encoder passes, text always 77 tokens, fp16 weights on a GPU, backbone frozen, HMMC, Adam. Both paths hold the same
weights, and their clean embeddings are compared before anything is timed. Each path runs in its own process, so
that the peak memory it reports is its own (Linux); the paths take turns, round by round, so that each round's ratio
compares timings taken seconds apart (a shared machine's speed drifts).
"""
import argparse
import json
import os
import tempfile
import time
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import adapter
import clip_min
import data
import recipe
import train
from benchmarks import released_path
from support import demo, runtime

FLOPS_NOTE = ("useful FLOPs: analytic matmul FLOPs of what a step needs, the forward of the clean and augmented "
              "views of both encoders (text cut to the batch's longest caption, attention over all token pairs) "
              "plus its backward as input gradients only (frozen weights: 1x the weight products, 2x the attention "
              "products, for every block but the first, whose input needs no gradient); the method's own small "
              "products are not counted. Encoding: the forward only. Both paths' times divide the same count.")
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "L40S": 362, "L4": 121}  # dense bf16
WORDS = ("many planes white buildings green trees are parked in near the airport harbor river beside a large "
         "parking lot with several cars boats storage tanks and roads on both sides of dense residential area").split()


def build_ours(config, method, seed=0):
    """A random CLIP with `method` applied; a random MRS-Adapter too, so that comparing the paths tests it."""
    torch.manual_seed(seed)
    model = adapter.apply(clip_min.CLIP(config), method)
    for p in model.mrs_adapter.parameters() if method == "mrs" else []:
        nn.init.normal_(p, std=0.02)
    return model


def inputs(config, batch, device, seed=0):
    """Random images; captions of 10 to 35 words, as long as RSICD's and RSITMD's (not 77-token fillers)."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    texts = [" ".join(rng.choice(WORDS, rng.integers(10, 36))) + " ." for _ in range(batch)]
    images = torch.randn(batch, 3, config.image_resolution, config.image_resolution, generator=generator)
    return images.to(device), clip_min.tokenize(texts).to(device)


def max_differences(ours, theirs, images, tokens):
    """Max |ours - released| of the clean embeddings, eval mode (dropout off)."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        image, text, _, _ = adapter.encode_views(ours, images, clip_min.trim(tokens))
        return {"image": (image - theirs.encode_image(images, 0.0)).abs().max().item(),
                "text": (text - theirs.encode_text(tokens, 0.0)).abs().max().item()}


def useful_flops(c, images, texts, text_tokens, backward):
    """See FLOPS_NOTE. images, texts: sequences through each encoder."""
    patches = (c.image_resolution // c.patch_size) ** 2
    towers = [(images * c.vision_layers * (patches + 1) * 24 * c.vision_width ** 2,  # qkv, out, MLP products
               images * c.vision_layers * 4 * (patches + 1) ** 2 * c.vision_width, c.vision_layers),  # QK^T, AV
              (texts * c.text_layers * text_tokens * 24 * c.text_width ** 2,
               texts * c.text_layers * 4 * text_tokens ** 2 * c.text_width, c.text_layers)]
    heads = 2 * (images * c.vision_width + texts * c.text_width) * c.embed_dim
    forward = sum(w + a for w, a, _ in towers) + heads + images * 2 * patches * 3 * c.patch_size ** 2 * c.vision_width
    return forward + (heads + sum((w + 2 * a) * (n - 1) / n for w, a, n in towers) if backward else 0)


def timed(fn, warmup, iters, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + iters):
        if i == warmup:
            sync()
            start = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def matmul_gflops(dtype=torch.float32):
    """The CPU's own rate in `dtype`, on a product about the size of our layers' products: the yardstick of `eff`."""
    a = torch.randn(2048, 2048).to(dtype)
    return 2 * 2048 ** 3 / timed(lambda: a @ a, 1, 3, torch.device("cpu")) / 1e9


def peak_mb(device):
    """Peak memory since the previous call, then reset: allocated on CUDA, else the resident set's high-water mark."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return peak


def timed_parts(path, opts, batch):
    """One path at one batch size: {part: (step function, unit, items per step, useful FLOPs per step)}."""
    device, config = torch.device(opts.device), demo.MINI_CLIP if opts.tiny else clip_min.CLIPConfig()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py sets them
    if device.type == "cpu":
        runtime.keep_freed_memory()  # as train.py does, here for both paths: the allocator is the process's
    model = build_ours(config, opts.method).to(device)
    images, tokens = inputs(config, batch, device)
    test_images, test_tokens = inputs(config, opts.test_images, device, seed=1)
    test_tokens = torch.cat([test_tokens] * data.CAPTIONS_PER_IMAGE)
    test_cut, length = clip_min.trim(test_tokens), clip_min.trim(tokens).shape[1]  # ours reads cut text
    if path == "released":
        model = released_path.ReleasedPath(model, fp16=device.type == "cuda")
        optimizer = torch.optim.Adam(model.adapter.parameters(), lr=recipe.LR)
        train_fn = lambda: model.step(optimizer, images, tokens)  # noqa: E731
        encode_fn = lambda: (model.encode_image(test_images, 0.0), model.encode_text(test_tokens, 0.0))  # noqa: E731
    else:
        runtime.keep_frozen_weights_in(model, opts.amp)  # as train.py does
        encoder = adapter.ViewsEncoder(model)
        encoder = torch.compile(encoder, mode=opts.compile, backend=opts.compile_backend) if opts.compile else encoder
        args = argparse.Namespace(amp=opts.amp, loss="hmmc", mask_same_image=False, margin=recipe.MARGIN,
                                  grad_clip=0.0)
        scaler = torch.amp.GradScaler(device.type, enabled=opts.amp == "fp16")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=recipe.LR) if params else None  # zero-shot trains nothing
        host_tokens = tokens.cpu()  # as the training loop passes them: train_step cuts them on the host
        train_fn = lambda: train.train_step(encoder, optimizer, scaler, images, host_tokens, None, args)  # noqa: E731
        encode_fn = runtime.autocast(device.type, opts.amp)(lambda: (model.encode_image(test_images),
                                                                        model.encode_text(test_cut)))
    parts = {"encode": (encode_fn, "images_per_s", len(test_images),
                        useful_flops(config, len(test_images), len(test_tokens), test_cut.shape[1], False))}
    if optimizer is not None:
        parts["train"] = (train_fn, "pairs_per_s", batch, useful_flops(config, 2 * batch, 2 * batch, length, True))
    return model, parts


def time_in_worker(conn, path, opts, batch):
    """A worker process holding one path: for each part, warm up, then time it each time the parent asks.

    Encoding first: its peak memory is read before training's larger one (the allocator keeps freed memory).
    """
    device = torch.device(opts.device)
    model, parts = timed_parts(path, opts, batch)
    conn.send(list(parts))
    for part, (fn, unit, items, flops) in parts.items():
        model.train(part == "train")
        peak_mb(device)
        with torch.inference_mode(part == "encode"):
            conn.recv()  # the parent's go: one worker warms up at a time (two at once would share the cores)
            for _ in range(opts.warmup):
                fn()
            conn.send(None)
            times = []
            while conn.recv():
                times.append(timed(fn, 0, opts.iters, device))
                conn.send(None)
        conn.send({"times": times, "unit": unit, "items": items, "flops": flops, "peak_mb": peak_mb(device)})


def run(paths, opts, batch):
    """Time every part of every path, each path in its own process, the paths taking turns round by round.

    Turns make the paths' timings neighbours in time, so a round's ratio reads the machine at one speed. On
    the CPU, whose speed drifts on a shared machine, its matmul rate in each path's precision is probed between turns.
    """
    context, workers = get_context("spawn"), {}
    for path in paths:
        conn, child = context.Pipe()
        process = context.Process(target=time_in_worker, args=(child, path, opts, batch), daemon=True)
        process.start()
        child.close()  # the worker's end, now the worker's alone: its death then ends the parent's recv()
        workers[path] = (process, conn)
    cpu = opts.device == "cpu"
    # The precision each path's matrix products run in: ours under --amp, the released path in fp32 on a CPU.
    dtypes = {path: torch.bfloat16 if path == "ours" and opts.amp == "bf16" else torch.float32 for path in paths}
    probe_all = lambda: {dtype: matmul_gflops(dtype) for dtype in set(dtypes.values())}  # noqa: E731
    try:
        parts = {path: conn.recv() for path, (_, conn) in workers.items()}
        results = {path: {} for path in paths}
        for part in parts[paths[0]]:  # encode, train (zero-shot trains nothing, and then runs alone)
            for _, conn in workers.values():  # warm-up, in turn
                conn.send(True)
                conn.recv()
            probe, rates = probe_all() if cpu else None, {path: [] for path in paths}
            for _ in range(opts.rounds):
                for path in paths:
                    workers[path][1].send(True)
                    workers[path][1].recv()
                    if cpu:  # the turn's matmul rate: the faster of the probes just before and after it
                        previous, probe = probe, probe_all()
                        rates[path].append(max(previous[dtypes[path]], probe[dtypes[path]]))
            for path, (_, conn) in workers.items():
                conn.send(False)
                results[path][part] = summary(conn.recv(), rates[path])
        for process, _ in workers.values():
            process.join()
        return results
    except (EOFError, BrokenPipeError):
        raise SystemExit("a benchmark worker process died (its error is printed above)") from None
    finally:  # after an error the other worker still waits for its next turn
        for process, _ in workers.values():
            process.kill()


def summary(worker, matmul_rates):
    """Medians over rounds of a worker's timings and of the matmul rates probed around them (CPU)."""
    seconds = float(np.median(worker["times"]))
    result = {"seconds": seconds, worker["unit"]: worker["items"] / seconds,
              "useful_gflops": worker["flops"] / seconds / 1e9, "peak_mb": worker["peak_mb"], "times": worker["times"]}
    if matmul_rates:
        result["matmul_gflops"] = float(np.median(matmul_rates))
    return result


def input_pipeline(device, batch, n_files=48):
    """Images/s decoding + resizing files into the uint8 cache (once per run), and of the per-batch path."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, f"{i}.{'jpg' if i % 2 else 'tif'}") for i in range(n_files)]
        for path in paths:  # smooth random scenes at the datasets' 256 x 256, half JPEG, half TIFF
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((256, 256)).save(path)
        start = time.perf_counter()
        cache = data.cache_images(paths, 224, workers=os.cpu_count(), log_every=0).to(device)
        decode = n_files / (time.perf_counter() - start)
    index = torch.randint(0, n_files, (batch,), device=device)
    return {"decode_images_per_s": decode,
            "batch_images_per_s": batch / timed(lambda: data.normalise(cache[index]), 2, 10, device)}


# Op categories of --profile, by aten name prefix; the first match wins, the rest is "other".
CATEGORIES = (("matrix products", ("mm", "addmm", "bmm", "baddbmm", "mkldnn_convolution", "_scaled_dot_product")),
              ("attention mask checks", ("isneginf", "all", "where", "tril", "triu", "_safe_softmax")),
              ("softmax", ("_softmax",)), ("LayerNorm", ("native_layer_norm",)),
              ("activation", ("sigmoid", "silu", "threshold_backward", "clamp_min", "relu")),
              ("dropout masks", ("bernoulli", "div_")), ("copies, casts, concatenations", ("copy_", "cat", "clone")),
              ("element-wise products and sums", ("mul", "add", "sum", "sub")), ("optimizer", ("_foreach", "sqrt")))


def profile(opts, batch, say):
    """Shares of our step's and encoding's time (self time of aten ops, 3 calls each) by op category."""
    from torch.profiler import ProfilerActivity
    model, parts = timed_parts("ours", opts, batch)
    report = {}
    for part, (fn, *_) in parts.items():
        model.train(part == "train")
        with torch.inference_mode(part == "encode"):
            fn(), fn()  # warm-up
            with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn()
        shares, total = {}, 0.0
        for event in prof.key_averages():
            name = event.key.removeprefix("aten::")
            category = next((c for c, prefixes in CATEGORIES if name.startswith(prefixes)), "other")
            shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total
            total += event.self_cpu_time_total
        report[part] = {c: t / total for c, t in sorted(shares.items(), key=lambda kv: -kv[1])}
        say(f"{part}, batch {batch}: " + ", ".join(f"{c} {share:.1%}" for c, share in report[part].items()))
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="mrs", choices=adapter.METHODS, help="the baseline exists for mrs only")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="[CPU: 16; CUDA: 16 128]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="[bf16 on CUDA and on CPUs with bf16 units, else off]")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile our encoder, as train.py --compile does; MODE reduce-overhead adds CUDA graphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend; eager checks the traced "
                   "graph without generating code (dry runs)")
    p.add_argument("--warmup", type=int, help="untimed steps before the timed ones [CPU 1, CUDA 5]")
    p.add_argument("--iters", type=int, help="timed steps per round [CPU 1, CUDA 20]")
    p.add_argument("--rounds", type=int, default=3, help="the paths take turns, each timed once per round; the "
                   "medians over rounds are printed")
    p.add_argument("--test-images", type=int, help="test images encoded, 5 captions each [CPU 4, CUDA 512]")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU [by GPU name]")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--profile", action="store_true", help="instead of timing: where our step's and encoding's time "
                   "goes, by op category (torch.profiler)")
    p.add_argument("--tiny", action="store_true", help="the demo's mini CLIP shape instead of ViT-B/32 (tests, dry runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    opts = p.parse_args(argv)
    for name, on_cpu, on_cuda in (("batch_sizes", [16], [16, 128]), ("warmup", 1, 5), ("iters", 1, 20),
                                  ("test_images", 4, 512)):
        if getattr(opts, name) is None:
            setattr(opts, name, on_cuda if opts.device.startswith("cuda") else on_cpu)
    if min(opts.batch_sizes) < 2 or min(opts.iters, opts.rounds, opts.test_images) < 1 or opts.warmup < 0:
        p.error("batch sizes must be >= 2 (HMMC needs negatives), --iters, --rounds and --test-images >= 1, "
                "--warmup >= 0")
    return opts


def describe_machine(device, opts, report, say):
    """The yardstick of `eff`: a GPU's dense bf16 peak, or the CPU's probed matmul rates (both precisions)."""
    if device.type == "cuda":  # eff: model FLOP utilisation
        name = torch.cuda.get_device_name(device)
        peak = opts.peak_tflops or next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
        report.update(gpu=name, peak_tflops=peak)
        say(f"{name}: dense bf16 peak {peak} TFLOP/s (--peak-tflops overrides); eff below: MFU against it")
        return
    say(f"CPU, {report['threads']} threads, load average {os.getloadavg()[0]:.1f}; eff below: useful FLOP rate / "
        "the faster of two 2048^3 matmul rates, in the precision that path's products run in (ours: --amp; "
        "released: fp32), measured just before and after that line's timing (mm GFLOP/s)")
    report["matmul_gflops"] = {"fp32": matmul_gflops(), "bf16": matmul_gflops(torch.bfloat16)}
    say("matmul 2048^3: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s".format(**report["matmul_gflops"]))


def main(argv=None):
    opts = parse_args(argv)
    device, config = torch.device(opts.device), demo.MINI_CLIP if opts.tiny else clip_min.CLIPConfig()
    say = (lambda *a: None) if opts.json else (lambda *a: print(*a, flush=True))
    opts.amp = opts.amp or runtime.default_amp(device, say=say)
    report = dict(vars(opts), model="tiny" if opts.tiny else "ViT-B/32", threads=torch.get_num_threads(),
                  flops=FLOPS_NOTE, results={})
    describe_machine(device, opts, report, say)
    if opts.profile:
        report["profile"] = {str(b): profile(opts, b, say) for b in opts.batch_sizes}
    else:
        run_all(opts, config, device, report, say)
    if opts.json:
        print(json.dumps(report))
    return report


def run_all(opts, config, device, report, say):
    """The timings: both paths (or ours alone), every batch size, into report["results"]."""
    say(f"{report['model']}, random weights, method {opts.method}, amp {opts.amp}, compile {opts.compile or 'off'}, "
        f"{opts.warmup} warm-up steps, then {opts.rounds} rounds of {opts.iters} timed steps, the paths in turn; "
        f"medians over rounds\n{FLOPS_NOTE}")
    baseline = opts.method == "mrs" and not opts.skip_baseline  # the released code has the MRS-Adapter only
    paths = ("released", "ours") if baseline else ("ours",)
    if baseline:
        ours = build_ours(config, "mrs").to(device)
        diffs = report["max_abs_diff"] = max_differences(ours, released_path.ReleasedPath(ours), *inputs(config, 4, device, 2))
        say("same weights, eval mode, fp32: max |ours - released| of the clean embeddings: image {image:.2e}, "
            "text {text:.2e}".format(**diffs))
        if max(diffs.values()) > 1e-3:
            raise SystemExit("the two paths compute different embeddings: timing them would compare different work")
    report["input"] = input_pipeline(device, max(opts.batch_sizes))
    say("input: decode + resize files (data.cache_images) {decode_images_per_s:.0f} images/s; per batch from the "
        "uint8 cache (index + data.normalise) {batch_images_per_s:.0f} images/s".format(**report["input"]))
    say("batch     path   part | pairs/s (train), images/s (encode)   s/iter  GFLOP/s   eff  peak MB  mm GFLOP/s")
    for batch in opts.batch_sizes:
        row = report["results"][str(batch)] = run(paths, opts, batch)
        for path, parts in row.items():
            for part, r in parts.items():
                flop_rate = r.get("matmul_gflops") or (report.get("peak_tflops") or 0) * 1e3
                r["efficiency"] = r["useful_gflops"] / flop_rate if flop_rate else None
                say(f"{batch:5} {path:>8} {part:>6} | {r.get('pairs_per_s') or r['images_per_s']:34.2f} "
                    f"{r['seconds']:8.3f} {r['useful_gflops']:8.1f} {r['efficiency'] or 0:5.0%} {r['peak_mb']:8.0f}"
                    + (f" {r['matmul_gflops']:11.1f}" if "matmul_gflops" in r else ""))
        if baseline:
            ours, theirs = row["ours"], row["released"]
            # The ratio of each round's neighbouring timings, then the median over rounds.
            ratios = {part: [r / o for r, o in zip(theirs[part]["times"], ours[part]["times"])] for part in ours}
            row["speedup"] = {part: float(np.median(r)) for part, r in ratios.items()}
            row["speedup_rounds"] = ratios
            row["train_memory_ratio"] = ours["train"]["peak_mb"] / theirs["train"]["peak_mb"]
            say(f"{batch:5} ours / released: speed: " + ", ".join(
                f"{part} {row['speedup'][part]:.2f}x (rounds {min(r):.2f}-{max(r):.2f})" for part, r in ratios.items())
                + f"; training peak memory {row['train_memory_ratio']:.2f}x")


if __name__ == "__main__":
    runtime.run_command(main)
