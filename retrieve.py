"""Search an archive of remote sensing images by text or by an example image, with a train.py run or frozen CLIP.

    python retrieve.py index idx photos/ --checkpoint runs/rsitmd-mrs-hmmc/best.pt            # or --clip ViT-B/32
    python retrieve.py search idx "a bridge over a river" --top 10 --gallery bridges.png
    python retrieve.py serve idx --port 8000                                                   # a search page

The index (docs/search.md): manifest.json (the model, every file's size and mtime, every entry's file and tile) and
the fp16 L2-normalised embeddings it names, one row per entry, read memory-mapped. Indexing again encodes only new or
changed files; the manifest is replaced last, so an interrupted run leaves the previous index whole.
"""
import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

import clip_min
import data
from search import ann, exact, server, store
from support import runtime

BATCH = 32  # images per forward pass
FILES_PER_CHUNK = 64  # files per saved chunk: what an interrupted run loses at most
MAX_UPLOAD = 20 * 2 ** 20
THUMBNAIL = 256
SAY_SKIPPED = 20  # skipped files said one line each, the rest counted (the summary gives all)


def model_record(args):
    """What made the embeddings, as the index keeps it: the train.py checkpoint (path, sha256) or frozen CLIP, the
    method, the backbone, the activation (None until the model is loaded); and the checkpoint's state."""
    state = runtime.read_run_checkpoint(args.checkpoint) if args.checkpoint else {}
    clip = args.clip or state.get("clip")  # None with a checkpoint: its run's backbone (the demo's)
    return {"checkpoint": args.checkpoint and os.path.abspath(args.checkpoint),
            "sha256": args.checkpoint and clip_min.download.sha256_of(args.checkpoint),
            "method": state.get("method", "zeroshot"),
            "backbone": os.path.abspath(clip) if clip and os.path.exists(clip) else clip or (
                None if state else "ViT-B/32"), "activation": args.clip_activation}, state


def load_model(record, device, amp, state=None):
    """The model an index records; its checkpoint must be the file that was hashed. Under bf16/fp16 its frozen
    weights are stored in that precision once (autocast would cast them again at every query: the same rounding)."""
    if record["checkpoint"] and not state:
        state = runtime.read_run_checkpoint(record["checkpoint"])
        if clip_min.download.sha256_of(record["checkpoint"]) != record["sha256"]:
            raise ValueError(f"{record['checkpoint']} changed since the index was made; index again with --rebuild")
    model = runtime.trained_model(state or {}, device, record["backbone"], record["activation"], record["method"])
    runtime.keep_frozen_weights_in(model, amp)
    return model


def refuse_another_model(folder, old, record, tile):
    """Embeddings of two models do not compare: an index made with another model (or tiling) is refused."""
    same = all(old["model"][key] == record[key] for key in ("sha256", "method", "backbone"))  # the path may move
    if not same or old["tile"] != tile or record["activation"] not in (None, old["model"]["activation"]):
        raise ValueError(f"{folder} was made with {model_label(old['model'])}, tiles {old['tile']}; this run uses "
                         f"{model_label(record)}, tiles {tile}. Pass the same model, or --rebuild to start over")


def model_label(record):
    made = f"checkpoint {record['checkpoint']} (sha256 {record['sha256'][:12]})" if record["checkpoint"] else "CLIP"
    return f"{made}, method {record['method']}, backbone {record['backbone']}, activation {record['activation']}"


def tiles(width, height, size):
    """[x, y, w, h] boxes of size x size covering the image, the last of each row and column flush with the edge
    (overlapping its neighbour) rather than a thin sliver; [None] (the whole image) when it fits in one."""
    if not size or (width <= size and height <= size):
        return [None]
    starts = lambda n: sorted({*range(0, max(n - size, 0), size), max(n - size, 0)})  # noqa: E731
    return [[x, y, min(size, width), min(size, height)] for y in starts(height) for x in starts(width)]


def crop(image, box):
    return image if box is None else image.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))


def prepare(path, tile, resolution, skipped):
    """(box, CLIP's input tensor) for each entry of an image file, or None when it cannot be decoded (said, and
    added to `skipped`)."""
    try:
        image = data.open_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        note_skipped(skipped, path, str(e))
        return None
    preprocess = clip_min.transform(resolution)  # short side resized (bicubic), center crop: as data.cache_images
    return [(box, preprocess(crop(image, box))) for box in tiles(*image.size, tile)]


def note_skipped(skipped, path, why):
    """A file indexing skips: said (up to SAY_SKIPPED lines, then only counted) and added to `skipped`."""
    skipped[path] = why
    if len(skipped) <= SAY_SKIPPED:
        print(f"skipped: {why}" + (" (further skipped files are counted, not said)" if len(skipped) == SAY_SKIPPED
                                   else ""), flush=True)


def embed_images(model, images, device, amp, padded=False):
    """fp16 L2-normalised embeddings [N, dim] (numpy) of preprocessed image tensors. padded: every batch padded to
    BATCH, so that an image's embedding does not depend on how many share its batch (kernels differ with the shape):
    an index comes out the same however its files were split into chunks, shards and runs."""
    out = [np.zeros((0, model.config.embed_dim), np.float16)]
    with torch.no_grad(), runtime.autocast(device.type, amp):
        for i in range(0, len(images), BATCH):
            batch = images[i:i + BATCH]
            pad = [torch.zeros_like(batch[0])] * (BATCH - len(batch)) if padded else []
            features = model.encode_image(torch.stack([*batch, *pad]).to(device))[:len(batch)]
            out.append(F.normalize(features.float(), dim=-1).half().cpu().numpy())
    return np.concatenate(out)


def embed_text(model, text, device, amp):
    tokens = clip_min.tokenize([text], model.config.context_length, truncate=True)  # too long: cut, not refused
    with torch.no_grad(), runtime.autocast(device.type, amp):
        return F.normalize(model.encode_text(clip_min.trim(tokens).to(device)).float(), dim=-1)[0].cpu()


def encode_files(model, paths, found, tile, folder, device, amp, workers, skipped=None, label=""):
    """Encode `paths` chunk by chunk, each chunk saved under `folder` as soon as it is done, with the files it could
    not decode (added to `skipped`); progress with an ETA, after `label`."""
    started, said, skipped = time.time(), 0.0, {} if skipped is None else skipped
    per_chunk = FILES_PER_CHUNK if not tile else max(1, workers)  # a tiled scene holds hundreds of entries
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for first in range(0, len(paths), per_chunk):
            group = paths[first:first + per_chunk]
            done = [(p, entries) for p, entries in zip(group, pool.map(
                lambda p: prepare(p, tile, model.visual.input_resolution, skipped), group)) if entries is not None]
            rows = [[p, box] for p, entries in done for box, _ in entries]
            embeddings = embed_images(model, [x for _, entries in done for _, x in entries], device, amp, True)
            meta = json.dumps({"rows": rows, "files": {p: found[p] for p, _ in done},
                               "skipped": {p: found[p] for p in group if p in skipped}})
            store.write_atomically(os.path.join(folder, store.chunk_name()),
                                   lambda f: np.savez(f, embeddings=embeddings, meta=np.array(meta)))
            count, elapsed = first + len(group), time.time() - started
            if time.time() - said >= 5 or count == len(paths):
                rate = count / max(elapsed, 1e-9)
                print(f"{label}encoded {count}/{len(paths)} images, {rate:.1f}/s, ETA "
                      f"{time.strftime('%H:%M:%S', time.gmtime((len(paths) - count) / rate))}", flush=True)
                said = time.time()


def in_part(path, shard):
    """Whether file `path` is in part I of N (shard (I, N); None: the whole archive). A hash of the path, not its
    position: a file stays in its part however the archive grows, on every machine that sees it at that path."""
    if shard is None:
        return True
    return int.from_bytes(hashlib.sha256(os.fsencode(path)).digest()[:8], "big") % shard[1] == shard[0]


def pending_files(chunks, wanted):
    """(files encoded, files that could not be decoded) in store.pending_chunks, of the files wanted(path, stat)."""
    encoded, failed = set(), set()
    for rows, tried, _ in chunks:
        encoded |= {p for p, _ in rows}
        failed |= {p for p, stat in tried.items() if wanted(p, stat)}
    return encoded, failed - encoded


def index(args, device, amp):
    """Bring the index in args.index up to date with args.source, or with --shard encode one part into its
    pending/ only; the counts. A failed run removes the index folder it made unless it saved chunks there (the next
    run resumes from them)."""
    made = not os.path.exists(args.index)
    try:
        return update_index(args, device, amp)
    except BaseException:
        saved = [f for _, _, files in os.walk(args.index) for f in files if f.endswith(".npz") or f == store.MANIFEST]
        if made and not saved:
            shutil.rmtree(args.index, ignore_errors=True)
        raise


def scanned(args):
    """store.scan of args.source, refused when it holds no image that can be read."""
    found, unreadable = store.scan(args.source, args.data_root, args.index)
    if not found:
        first = next(iter(unreadable.items()), None)
        raise ValueError(f"no images ({', '.join(store.EXTENSIONS)}) under {args.source}" + (
            f": {len(unreadable)} found, none readable ({first[0]}: {first[1]}{', ...' * (len(unreadable) > 1)})"
            if first else ""))
    return found, unreadable


def update_index(args, device, amp):
    """index()'s work: the checks, the scan, this process's part encoded (by --processes workers first), then,
    unless this is a shard, the join."""
    if os.path.isfile(args.index):
        raise ValueError(f"{args.index} is a file: the index DIR is a folder (made if missing)")
    current = store.read_manifest(args.index, damaged_ok=args.rebuild)
    approximate = args.ann or bool((current or {}).get("ann"))  # once --ann, always
    if approximate:
        ann.import_faiss("--ann")  # refused before anything is made or encoded
    old = None if args.rebuild else current
    record, state = model_record(args)
    tile = args.tile if args.tile is not None else (old or {}).get("tile")
    if old:
        refuse_another_model(args.index, old, record, tile)  # before loading it: a refusal needs no download
    found, unreadable = scanned(args)
    os.makedirs(args.index, exist_ok=True)
    model = load_model(record, device, amp, state)  # here too with --processes: a model refused once, not P times
    record["activation"] = model.config.activation
    if old:
        refuse_another_model(args.index, old, record, tile)
    if args.processes > 1:
        run_shard_processes(args, args.shard or (0, 1))
    key = json.dumps([{k: record[k] for k in ("sha256", "method", "backbone", "activation")}, tile])
    folder = store.pending_folder(args.index, key, only=args.shard is None)
    kept = {p for p, stat in (old or {}).get("files", {}).items() if found.get(p) == stat}
    wanted = lambda path, stat: found.get(path) == stat and path not in kept  # noqa: E731
    encoded, failed = pending_files(store.pending_chunks(folder, wanted), wanted)
    taken = [p for p in encoded if in_part(p, args.shard)]
    if taken and args.processes == 1:
        print(f"resuming: {len(taken)} images were encoded by shards or an interrupted run", flush=True)
    skipped = {}
    for path in [p for p in unreadable if in_part(p, args.shard)]:
        note_skipped(skipped, path, f"{path}: {unreadable[path]}")
    shard, done = args.shard and f"{args.shard[0]}/{args.shard[1]}", kept | encoded | failed
    encode_files(model, [p for p in found if p not in done and in_part(p, args.shard)], found, tile, folder, device,
                 amp, args.workers, skipped, f"shard {shard}: " if shard else "")
    chunks = list(store.pending_chunks(folder, wanted))  # read once after encoding: the counts and the join
    encoded, failed = pending_files(chunks, wanted)
    if shard:
        part = lambda files: len([p for p in files if in_part(p, args.shard)])  # noqa: E731
        return {"shard": shard, "encoded": part(encoded), "skipped": part(unreadable) + part(failed)}
    generation = (current or {}).get("generation", 0) + 1
    manifest = {"format": 1, "generation": generation, "model": record, "tile": tile, "dim": model.config.embed_dim,
                "files": {p: found[p] for p in sorted(kept | encoded)}, "entries": [],
                "embeddings": f"embeddings-{generation}.npy"}
    write_joined(args.index, manifest, old, kept, list(found), chunks, approximate, args.memory)
    return {"encoded": len(encoded), "removed": len(set((old or {}).get("files", {})) - set(found)),
            "unchanged": len(kept), "skipped": len(unreadable) + len(failed), "total": len(manifest["files"]),
            "entries": len(manifest["entries"])}


def write_joined(folder, manifest, old, kept, scanned, chunks, approximate=False, memory=None):
    """The new index: the old one's entries of unchanged files (read a slice at a time), then the pending chunks' in
    the order of the scan, whichever runs, shards and chunks encoded them; with `approximate`, its FAISS index too."""
    rows = store.kept_row_numbers(old, kept) if kept else np.zeros(0, np.int64)
    old_parts = store.kept_rows(old, store.load_index(folder)[1], rows) if kept else []
    new = store.pending_in_order(chunks, {p: i for i, p in enumerate(scanned)}, manifest["dim"])
    build_ann = (lambda made, embeddings: ann.build(folder, made, embeddings, (old or {}).get("ann"), memory, rows)
                 ) if approximate else None
    store.write_index(folder, manifest, itertools.chain(old_parts, [new]), len(rows) + len(new[1]), build_ann)


def run_shard_processes(args, shard):
    """--processes P: P processes of this command each encode a part of this run's part I/N (a GPU each, where
    there are several), their chunks into pending/; all have ended when this returns, for the join."""
    (i, n), count, devices = shard, args.processes, visible_devices()
    procs, codes = [], []
    try:
        for j in range(count):
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[j % len(devices)]
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))  # no oversubscription
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *args.argv, "--shard",
                                           f"{i + n * j}/{n * count}", "--processes", "1"], env=env,
                                          stdout=subprocess.DEVNULL))
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    failed = [f"{i + n * j}/{n * count}" for j, code in enumerate(codes) if code]
    if failed:
        raise ValueError(f"shard {', '.join(failed)} failed (its lines above say why); the same command again "
                         "resumes from what the shards saved")


def visible_devices():
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them; [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    return named.split(",") if named else [str(d) for d in range(torch.cuda.device_count())]


def results(manifest, embeddings, query, k, label, scan=None, approximate=None):
    """The CLI's JSON: the query and its k best entries (id: the entry's row, which /image/ID serves): from the
    approximate index when one is given, else by `scan(query, k)` if given (the server's gathers concurrent queries
    into one pass), else by the exact scan."""
    if approximate:
        scores, rows = ann.top_k(approximate, embeddings, query, k)
    else:
        scores, rows = scan(query, k) if scan else exact.top_k(embeddings, query, k, norm=1.0)  # unit rows
    found = [{"id": r, "path": manifest["entries"][r][0], "score": round(s, 4), "tile": manifest["entries"][r][1]}
             for s, r in zip(scores, rows)]
    return {"query": label, "results": found, "approximate": approximate is not None}


def embed_file(model, image, device, amp):
    """The query embedding of an image file (an upload too), preprocessed as the indexed images."""
    return torch.from_numpy(embed_images(model, [clip_min.transform(model.visual.input_resolution)(
        data.open_image(image))], device, amp)[0])


def thumbnail(entry, size=THUMBNAIL):
    image = crop(data.open_image(entry[0]), entry[1])
    image.thumbnail((size, size))
    return image


def draw_gallery(found, path, query_image=None, size=200, columns=5):
    """A PNG: a heading with the query (and the query image), then the results with rank, score and file name."""
    heading, label = ImageFont.load_default(size=24), ImageFont.load_default(size=15)
    top = (size if query_image else 0) + 56
    columns = max(1, min(columns, len(found["results"])))
    rows = max(1, -(-len(found["results"]) // columns))
    canvas = Image.new("RGB", (columns * (size + 12) + 12, top + rows * (size + 52)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((12, 12), f"query: {found['query']}", fill="black", font=heading)
    if query_image:
        canvas.paste(ImageOps.contain(thumbnail([query_image, None]), (size, size)), (12, 48))
    for i, hit in enumerate(found["results"]):
        x, y = 12 + (i % columns) * (size + 12), top + (i // columns) * (size + 52)
        canvas.paste(ImageOps.contain(thumbnail([hit["path"], hit["tile"]]), (size, size)), (x, y))
        tile = f" @{hit['tile'][0]},{hit['tile'][1]}" if hit["tile"] else ""
        draw.text((x, y + size + 4), f"{i + 1}. score {hit['score']:.3f}", fill="black", font=label)
        draw.text((x, y + size + 24), (os.path.basename(hit["path"]) + tile)[-26:], fill=(70, 70, 70), font=label)
    canvas.save(path)


def search(args, device, amp):
    if (args.query is None) == (args.image is None):
        raise ValueError("give a text query or --image PATH (one of them)")
    manifest, embeddings = store.load_index(args.index)
    approximate = None if args.exact else ann.load(args.index, manifest)
    model = load_model(manifest["model"], device, amp)
    query = embed_text(model, args.query, device, amp) if args.query is not None else embed_file(
        model, args.image, device, amp)
    found = results(manifest, embeddings, query, args.top, args.query if args.query is not None else args.image,
                    approximate=approximate)
    if args.gallery:
        draw_gallery(found, args.gallery, args.image)
        print(f"wrote {args.gallery}")
    return found


def make_server(folder, host, port, device, amp, max_upload=MAX_UPLOAD, exact_only=False):
    """A ThreadingHTTPServer for the index in `folder`, its model and embeddings (and approximate index) loaded
    once."""
    manifest, embeddings = store.load_index(folder)
    approximate = None if exact_only else ann.load(folder, manifest)
    model, lock = load_model(manifest["model"], device, amp), threading.Lock()
    scan = exact.gathering(embeddings, norm=1.0, bf16=runtime.cpu_has_native_bf16())  # the index stores unit rows

    def query(params, upload):
        k = params.get("k", ["12"])[0]
        text, row = params.get("q", [""])[0].strip(), params.get("id", [""])[0]
        if not k.isdigit() or not 1 <= int(k) <= 1000:
            return 400, {"error": "k must be a whole number from 1 to 1000"}
        if upload is not None:
            with tempfile.NamedTemporaryFile() as f, lock:
                f.write(upload)
                f.flush()
                try:
                    vector, label = embed_file(model, f.name, device, amp), "an uploaded image"
                except (ValueError, OSError, Image.DecompressionBombError):
                    return 400, {"error": "the upload is not an image this server can decode"}
        elif row:
            if not row.isdigit() or int(row) >= len(embeddings):
                return 400, {"error": f"id must be an entry number below {len(embeddings)}"}
            vector, label = torch.from_numpy(np.array(embeddings[int(row)])), f"image #{row}"
        elif text:
            with lock:
                vector, label = embed_text(model, text, device, amp), text
        else:
            return 400, {"error": "give a query: q=TEXT, id=N or an image as the POST body"}
        return 200, results(manifest, embeddings, vector, int(k), label, scan, approximate)

    def jpeg(row):
        try:
            out = BytesIO()
            thumbnail(manifest["entries"][row]).save(out, "JPEG", quality=85)
            return out.getvalue()
        except (OSError, ValueError):  # moved or deleted since it was indexed
            return None

    httpd = ThreadingHTTPServer((host, port), server.Handler)
    httpd.app = {"search": query, "thumbnail": jpeg, "entries": manifest["entries"], "max_upload": max_upload}
    return httpd


def serve(args, device, amp):
    try:
        httpd = make_server(args.index, args.host, args.port, device, amp, exact_only=args.exact)
    except OSError as e:  # the address only: a missing index is said as it is
        if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            hint = "another server holds it: pass another --port, or --port 0 for any free one" if (
                e.errno == errno.EADDRINUSE) else "pass a --host of this machine (127.0.0.1: this machine only)"
            raise ValueError(f"cannot serve at {args.host}:{args.port}: {e.strerror}; {hint}") from e
        raise
    host, port = httpd.server_address[:2]
    print(f"serving {len(httpd.app['entries'])} entries of {args.index} at http://{host}:{port}/", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Index and search remote sensing images by text or by example image.")
    verbs = p.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("index", help="encode a folder or a dataset's images into an index (again: the changes)")
    make.add_argument("index", metavar="DIR", help="the index folder (made if missing)")
    make.add_argument("source", help="a folder (searched recursively for .tif .tiff .png .jpg .jpeg), or a dataset "
                                     "name as train.py takes it (rsitmd, rsicd, ucm, demo)")
    make.add_argument("--data-root", help="where a dataset lies [data/; demo: the demo cache]")
    make.add_argument("--checkpoint", help="a best.pt/last.pt written by train.py: its method and backbone")
    make.add_argument("--clip", help="backbone name, checkpoint path or Hugging Face folder [the checkpoint's; "
                                     "without a checkpoint: frozen ViT-B/32]")
    make.add_argument("--clip-activation", choices=sorted(clip_min.model.ACTIVATIONS))
    make.add_argument("--tile", type=int, metavar="SIZE", help="cut images larger than SIZE pixels into SIZE x SIZE "
                                                               "tiles, each an entry [the index's; none]")
    make.add_argument("--rebuild", action="store_true", help="start over (the old index stays until the new is done)")
    make.add_argument("--workers", type=int, default=4, help="decoding threads [4]")
    make.add_argument("--shard", type=shard_spec, metavar="I/N", help="encode only part I of N (0 <= I < N; a hash "
                      "of each path) into DIR/pending/; then the same command without --shard joins the parts "
                      "[RANK/WORLD_SIZE when set, as torchrun sets them]")
    make.add_argument("--processes", type=int, metavar="P", help="P processes each encode a part (one GPU each), "
                      "then the join [1; every visible GPU when there are several]")
    find = verbs.add_parser("search", help="the best matches of a text or an image")
    find.add_argument("index", metavar="DIR")
    find.add_argument("query", nargs="?", help="a description, e.g. 'a bridge over a river'")
    find.add_argument("--image", help="search by this example image instead")
    find.add_argument("--top", type=int, default=10, help="how many results [10]")
    find.add_argument("--gallery", metavar="PNG", help="also draw the query and its results")
    web = verbs.add_parser("serve", help="a search page for a browser")
    web.add_argument("index", metavar="DIR")
    web.add_argument("--host", default="127.0.0.1", help="[loopback: this machine only]")
    web.add_argument("--port", type=int, default=8000, help="0: any free port [8000]")
    for verb in (make, find, web):
        verb.add_argument("--amp", choices=["bf16", "fp16", "off"], help="[bf16 where the hardware computes it]")
    for verb in (make, find):
        verb.add_argument("--json", action="store_true", help="print the result as JSON")
    make.add_argument("--ann", action="store_true", help="also build an approximate FAISS index (kept up to date "
                      "by later runs; needs requirements-ann.txt)")
    make.add_argument("--memory", type=float, metavar="GB", help="memory the approximate index may take [4; the "
                      "index's]")
    for verb in (find, web):
        verb.add_argument("--exact", action="store_true", help="score every entry even if there is an approximate "
                          "index")
    args = p.parse_args(argv)
    error = usage_error(args)
    if error:
        p.error(error)
    if args.verb == "index" and args.memory is not None:
        args.memory = int(args.memory * 2 ** 30)
    if args.verb == "index" and args.shard is None:
        args.shard = torchrun_shard(p)
    return args


def usage_error(args):
    """What parse_args refuses beyond argparse's own checks (impossible values, a blank query, a folder as --image, a
    --gallery that cannot be written), or None."""
    v = vars(args)
    if v.get("tile") is not None and v["tile"] < 16:
        return f"--tile SIZE must be at least 16 pixels, got {v['tile']}"
    for flag in ("workers", "processes"):
        if v.get(flag) is not None and v[flag] < 1:
            return f"--{flag} must be at least 1, got {v[flag]}"
    if v.get("memory") is not None and v["memory"] <= 0:
        return f"--memory must be positive, got {v['memory']}"
    if v.get("top") is not None and v["top"] < 1:
        return f"--top must be positive, got {v['top']}"
    if v.get("query") is not None and not v["query"].strip():
        return "the query is blank: describe what to find, e.g. 'a bridge over a river', or pass --image"
    if v.get("image") and os.path.isdir(v["image"]):
        return f"--image {v['image']} is a folder: give one image file"
    folder = v.get("gallery") and os.path.dirname(os.path.abspath(v["gallery"]))
    if folder and not os.path.isdir(folder):
        return f"--gallery {v['gallery']}: there is no folder {folder} to write it in"
    Image.init()  # every format's file extensions registered
    if folder and os.path.splitext(v["gallery"])[1].lower() not in Image.registered_extensions():
        return f"--gallery {v['gallery']}: name an image file to write, e.g. results.png"
    if v.get("port") is not None and not 0 <= v["port"] <= 65535:
        return f"--port must be from 0 to 65535 (0: any free port), got {v['port']}"
    return None


def shard_spec(text):
    """--shard's value: I/N, 0 <= I < N, as (I, N)."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(i), int(n)


def torchrun_shard(p):
    """(RANK, WORLD_SIZE) where a launcher (torchrun, ...) set them for several processes; None otherwise."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    if world == "1":
        return None
    try:
        return shard_spec(f"{rank}/{world}")
    except argparse.ArgumentTypeError:
        p.error(f"RANK={rank} and WORLD_SIZE={world}: as a shard I/N they must be whole numbers, 0 <= RANK < "
                "WORLD_SIZE")


def printed(args, result):
    if args.json:
        return json.dumps(result)
    if args.verb == "index" and "shard" in result:
        return (f"{args.index}: shard {result['shard']}: {result['encoded']} images encoded, {result['skipped']} "
                "skipped; when every shard is done, the same command without --shard joins them")
    if args.verb == "index":
        return (f"{args.index}: {result['encoded']} encoded, {result['removed']} removed, {result['unchanged']} "
                f"unchanged, {result['skipped']} skipped; {result['total']} images, {result['entries']} entries")
    tile = lambda t: f"  tile x={t[0]} y={t[1]} {t[2]}x{t[3]}" if t else ""  # noqa: E731
    return "\n".join(f"{i + 1:4d}  {hit['score']:.4f}  {hit['path']}{tile(hit['tile'])}"
                     for i, hit in enumerate(result["results"]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # for the --processes workers
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if args.verb == "index" and args.processes is None:  # one command uses every GPU of the machine
        args.processes = len(visible_devices()) if "WORLD_SIZE" not in os.environ and device.type == "cuda" else 1
    if device.type == "cpu":
        runtime.keep_freed_memory()
    if args.verb == "serve":
        return serve(args, device, args.amp or runtime.default_amp(device))
    with contextlib.redirect_stdout(sys.stderr):  # progress and notes on stderr: stdout is the result alone
        result = (index if args.verb == "index" else search)(args, device, args.amp or runtime.default_amp(device))
    print(printed(args, result))


if __name__ == "__main__":
    runtime.run_command(main)
