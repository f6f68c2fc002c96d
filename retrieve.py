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
import json
import os
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


def prepare(path, tile, resolution):
    """(box, CLIP's input tensor) for each entry of an image file, or None (said) when it cannot be decoded."""
    try:
        image = data.open_image(path)
    except (OSError, ValueError) as e:
        print(f"skipped: {e}", flush=True)
        return None
    preprocess = clip_min.transform(resolution)  # short side resized (bicubic), center crop: as data.cache_images
    return [(box, preprocess(crop(image, box))) for box in tiles(*image.size, tile)]


def embed_images(model, images, device, amp):
    """fp16 L2-normalised embeddings [N, dim] (numpy) of preprocessed image tensors."""
    out = [np.zeros((0, model.config.embed_dim), np.float16)]
    with torch.no_grad(), runtime.autocast(device.type, amp):
        for i in range(0, len(images), BATCH):
            features = model.encode_image(torch.stack(images[i:i + BATCH]).to(device))
            out.append(F.normalize(features.float(), dim=-1).half().cpu().numpy())
    return np.concatenate(out)


def embed_text(model, text, device, amp):
    tokens = clip_min.tokenize([text], model.config.context_length, truncate=True)  # too long: cut, not refused
    with torch.no_grad(), runtime.autocast(device.type, amp):
        return F.normalize(model.encode_text(clip_min.trim(tokens).to(device)).float(), dim=-1)[0].cpu()


def encode_files(model, paths, found, tile, folder, device, amp, workers):
    """Encode `paths` chunk by chunk, each chunk saved under `folder` as soon as it is done; progress with an ETA."""
    started, said = time.time(), 0.0
    per_chunk = FILES_PER_CHUNK if not tile else max(1, workers)  # a tiled scene holds hundreds of entries
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for first in range(0, len(paths), per_chunk):
            group = paths[first:first + per_chunk]
            done = [(p, entries) for p, entries in zip(group, pool.map(
                lambda p: prepare(p, tile, model.visual.input_resolution), group)) if entries is not None]
            rows = [[p, box] for p, entries in done for box, _ in entries]
            embeddings = embed_images(model, [x for _, entries in done for _, x in entries], device, amp)
            meta = json.dumps({"rows": rows, "files": {p: found[p] for p, _ in done}})
            store.write_atomically(os.path.join(folder, f"chunk-{time.time_ns()}.npz"),
                             lambda f: np.savez(f, embeddings=embeddings, meta=np.array(meta)))
            count, elapsed = first + len(group), time.time() - started
            if time.time() - said >= 5 or count == len(paths):
                rate = count / max(elapsed, 1e-9)
                print(f"encoded {count}/{len(paths)} images, {rate:.1f}/s, ETA "
                      f"{time.strftime('%H:%M:%S', time.gmtime((len(paths) - count) / rate))}", flush=True)
                said = time.time()


def index(args, device, amp):
    """Bring the index in args.index up to date with args.source; the counts of files."""
    approximate = args.ann or bool((store.read_manifest(args.index) or {}).get("ann"))  # once --ann, always
    if approximate:
        ann.import_faiss("--ann")  # refused before anything is made or encoded
    os.makedirs(args.index, exist_ok=True)
    current = store.read_manifest(args.index)
    old = None if args.rebuild else current
    record, state = model_record(args)
    tile = args.tile if args.tile is not None else (old or {}).get("tile")
    if old:
        refuse_another_model(args.index, old, record, tile)  # before loading it: a refusal needs no download
    model = load_model(record, device, amp, state)
    record["activation"] = model.config.activation
    if old:
        refuse_another_model(args.index, old, record, tile)
    found = store.scan(args.source, args.data_root, args.index)
    if not found:
        raise ValueError(f"no images ({', '.join(store.EXTENSIONS)}) under {args.source}")
    old_files = (old or {}).get("files", {})
    kept = {p for p, stat in old_files.items() if found.get(p) == stat}
    folder, key = os.path.join(args.index, store.PENDING), json.dumps([record, tile])
    wanted = lambda path, stat: found.get(path) == stat and path not in kept  # noqa: E731
    resumed = {p for rows, _ in store.pending_chunks(folder, key, wanted) for p, _ in rows}
    if resumed:
        print(f"resuming: {len(resumed)} images were encoded by an interrupted run", flush=True)
    encode_files(model, [p for p in found if p not in kept and p not in resumed], found, tile, folder, device, amp,
                 args.workers)
    new = list(store.pending_chunks(folder, key, wanted))
    fresh = {p for rows, _ in new for p, _ in rows}
    manifest = {"format": 1, "generation": (current or {}).get("generation", 0) + 1, "model": record, "tile": tile,
                "dim": model.config.embed_dim, "files": {p: found[p] for p in sorted(kept | fresh)}, "entries": []}
    manifest["embeddings"] = f"embeddings-{manifest['generation']}.npy"
    old_parts = store.kept_rows(old, store.load_index(args.index)[1], kept) if kept else []
    store.write_index(args.index, manifest, [*old_parts, *new], (lambda made, rows: ann.build(
        args.index, made, rows, (old or {}).get("ann"), args.memory)) if approximate else None)
    return {"encoded": len(fresh), "removed": len(set(old_files) - set(found)), "unchanged": len(kept),
            "total": len(manifest["files"])}


def results(manifest, embeddings, query, k, label, approximate=None):
    """The CLI's JSON: the query and its k best entries (id: the entry's row, which /image/ID serves), from the
    approximate index when one is given."""
    scores, rows = ann.top_k(approximate, embeddings, query, k) if approximate else exact.top_k(embeddings, query, k)
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
                    approximate)
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
        return 200, results(manifest, embeddings, vector, int(k), label, approximate)

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
    httpd = make_server(args.index, args.host, args.port, device, amp, exact_only=args.exact)
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
    make.add_argument("--workers", type=int, default=4, help="decoding threads")
    find = verbs.add_parser("search", help="the best matches of a text or an image")
    find.add_argument("index", metavar="DIR")
    find.add_argument("query", nargs="?", help="a description, e.g. 'a bridge over a river'")
    find.add_argument("--image", help="search by this example image instead")
    find.add_argument("--top", type=int, default=10)
    find.add_argument("--gallery", metavar="PNG", help="also draw the query and its results")
    web = verbs.add_parser("serve", help="a search page for a browser")
    web.add_argument("index", metavar="DIR")
    web.add_argument("--host", default="127.0.0.1", help="[loopback: this machine only]")
    web.add_argument("--port", type=int, default=8000, help="0: any free port")
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
    if args.verb == "index" and args.memory is not None:
        if args.memory <= 0:
            p.error(f"--memory must be positive, got {args.memory}")
        args.memory = int(args.memory * 2 ** 30)
    if args.verb == "index" and args.tile is not None and args.tile < 16:
        p.error(f"--tile SIZE must be at least 16 pixels, got {args.tile}")
    if args.verb == "search" and args.top < 1:
        p.error(f"--top must be positive, got {args.top}")
    return args


def printed(args, result):
    if args.json:
        return json.dumps(result)
    if args.verb == "index":
        return (f"{args.index}: {result['encoded']} encoded, {result['removed']} removed, {result['unchanged']} "
                f"unchanged; {result['total']} images")
    tile = lambda t: f"  tile x={t[0]} y={t[1]} {t[2]}x{t[3]}" if t else ""  # noqa: E731
    return "\n".join(f"{i + 1:4d}  {hit['score']:.4f}  {hit['path']}{tile(hit['tile'])}"
                     for i, hit in enumerate(result["results"]))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        runtime.keep_freed_memory()
    if args.verb == "serve":
        return serve(args, device, args.amp or runtime.default_amp(device))
    with contextlib.redirect_stdout(sys.stderr):  # progress and notes on stderr: stdout is the result alone
        result = (index if args.verb == "index" else search)(args, device, args.amp or runtime.default_amp(device))
    print(printed(args, result))


if __name__ == "__main__":
    runtime.run_command(main)
