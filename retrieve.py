"""Search an archive of remote sensing images by text or by an example image, with a train.py run or frozen CLIP.

    python retrieve.py index photos/ --index idx --checkpoint runs/rsitmd-mrs-hmmc/best.pt    # or --clip ViT-B/32
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
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

import clip_min
import data
from support import runtime

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MANIFEST, PENDING = "manifest.json", "pending"  # pending/: chunks of a run that has not finished
BATCH = 32  # images per forward pass
FILES_PER_CHUNK = 64  # files per saved chunk: what an interrupted run loses at most
SEARCH_ROWS = 32768  # embeddings per matrix product of a search: 64 MB in fp32 at dim 512, whatever the index size
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


def scan(source, data_root, index_dir):
    """path -> [size, mtime_ns] of the images under folder `source` (recursively), or of every split of dataset
    `source` (data.prepare_dataset's names, under --data-root)."""
    if os.path.isdir(source):
        paths, skip = [], os.path.abspath(index_dir)
        for folder, dirs, files in os.walk(os.path.abspath(source)):
            dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != skip)
            paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    elif os.sep in source or os.path.exists(source):  # a path, not a dataset's name
        raise FileNotFoundError(f"no folder {source}")
    else:
        name, root = data.prepare_dataset(source, data_root)
        paths = sorted({os.path.abspath(p) for part in ("trainval", "test")
                        for p in data.load_split(name, root, part).image_paths})
    return {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}


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


def write_atomically(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def pending_chunks(folder, key, wanted):
    """(rows, embeddings) saved by a run with the same model and tiling that did not finish, the rows of files
    wanted(path, stat) only; chunks of another model or tiling are removed."""
    if (read_manifest(folder) or {}).get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        write_atomically(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps({"key": key}).encode()))
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".npz")):
        with np.load(os.path.join(folder, name)) as chunk:
            meta = json.loads(str(chunk["meta"]))
            keep = np.array([wanted(p, meta["files"][p]) for p, _ in meta["rows"]], bool)
            yield [row for row, k in zip(meta["rows"], keep) if k], chunk["embeddings"][keep]


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
            write_atomically(os.path.join(folder, f"chunk-{time.time_ns()}.npz"),
                             lambda f: np.savez(f, embeddings=embeddings, meta=np.array(meta)))
            count, elapsed = first + len(group), time.time() - started
            if time.time() - said >= 5 or count == len(paths):
                rate = count / max(elapsed, 1e-9)
                print(f"encoded {count}/{len(paths)} images, {rate:.1f}/s, ETA "
                      f"{time.strftime('%H:%M:%S', time.gmtime((len(paths) - count) / rate))}", flush=True)
                said = time.time()


def kept_rows(manifest, embeddings, kept, step=65536):
    """(rows, embeddings) of the old index's entries whose files are unchanged, a bounded slice at a time."""
    rows = [i for i, (path, _) in enumerate(manifest["entries"]) if path in kept]
    for i in range(0, len(rows), step):
        yield [manifest["entries"][r] for r in rows[i:i + step]], embeddings[rows[i:i + step]]


def write_index(folder, manifest, parts):
    """The embeddings file first, then the manifest naming it replaces the old one in one os.replace: a reader sees
    the old index or the new one, never a mix. Files no manifest names any more are removed last."""
    parts = list(parts)
    rows = sum(len(e) for _, e in parts)
    path = os.path.join(folder, manifest["embeddings"])
    out = np.lib.format.open_memmap(path + ".tmp", "w+", np.float16, (rows, manifest["dim"]))
    position = 0
    for entries, embeddings in parts:
        out[position:position + len(embeddings)] = embeddings
        position += len(embeddings)
        manifest["entries"] += entries
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    write_atomically(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(manifest).encode()))
    shutil.rmtree(os.path.join(folder, PENDING), ignore_errors=True)
    for name in os.listdir(folder):
        if name.startswith("embeddings-") and name != manifest["embeddings"]:
            os.remove(os.path.join(folder, name))


def index(args, device, amp):
    """Bring the index in args.index up to date with args.source; the counts of files."""
    os.makedirs(args.index, exist_ok=True)
    current = read_manifest(args.index)
    old = None if args.rebuild else current
    record, state = model_record(args)
    tile = args.tile if args.tile is not None else (old or {}).get("tile")
    if old:
        refuse_another_model(args.index, old, record, tile)  # before loading it: a refusal needs no download
    model = load_model(record, device, amp, state)
    record["activation"] = model.config.activation
    if old:
        refuse_another_model(args.index, old, record, tile)
    found = scan(args.source, args.data_root, args.index)
    if not found:
        raise ValueError(f"no images ({', '.join(EXTENSIONS)}) under {args.source}")
    old_files = (old or {}).get("files", {})
    kept = {p for p, stat in old_files.items() if found.get(p) == stat}
    folder, key = os.path.join(args.index, PENDING), json.dumps([record, tile])
    wanted = lambda path, stat: found.get(path) == stat and path not in kept  # noqa: E731
    resumed = {p for rows, _ in pending_chunks(folder, key, wanted) for p, _ in rows}
    if resumed:
        print(f"resuming: {len(resumed)} images were encoded by an interrupted run", flush=True)
    encode_files(model, [p for p in found if p not in kept and p not in resumed], found, tile, folder, device, amp,
                 args.workers)
    new = list(pending_chunks(folder, key, wanted))
    fresh = {p for rows, _ in new for p, _ in rows}
    manifest = {"format": 1, "generation": (current or {}).get("generation", 0) + 1, "model": record, "tile": tile,
                "dim": model.config.embed_dim, "files": {p: found[p] for p in sorted(kept | fresh)}, "entries": []}
    manifest["embeddings"] = f"embeddings-{manifest['generation']}.npy"
    old_parts = kept_rows(old, load_index(args.index)[1], kept) if kept else []
    write_index(args.index, manifest, [*old_parts, *new])
    return {"encoded": len(fresh), "removed": len(set(old_files) - set(found)), "unchanged": len(kept),
            "total": len(manifest["files"])}


def load_index(folder):
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no index in {folder} (make one: python retrieve.py index SOURCE --index {folder})")
    return manifest, np.load(os.path.join(folder, manifest["embeddings"]), mmap_mode="r")


def top_k(embeddings, query, k, step=SEARCH_ROWS):
    """Exact top-k (scores, rows) of the query against every embedding: one matrix product per slice of the
    memory-mapped rows and a running top-k, so memory stays bounded at any index size."""
    scores, rows = torch.empty(0), torch.empty(0, dtype=torch.long)
    for start in range(0, len(embeddings), step):
        block = torch.from_numpy(np.array(embeddings[start:start + step])).float() @ query.float()
        scores, rows = torch.cat([scores, block]), torch.cat([rows, torch.arange(start, start + len(block))])
        scores, best = scores.topk(min(k, len(scores)))
        rows = rows[best]
    return scores.tolist(), rows.tolist()


def results(manifest, embeddings, query, k, label):
    """The CLI's JSON: the query and its k best entries (id: the entry's row, which /image/ID serves)."""
    scores, rows = top_k(embeddings, query, k)
    found = [{"id": r, "path": manifest["entries"][r][0], "score": round(s, 4), "tile": manifest["entries"][r][1]}
             for s, r in zip(scores, rows)]
    return {"query": label, "results": found}


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
    manifest, embeddings = load_index(args.index)
    model = load_model(manifest["model"], device, amp)
    query = embed_text(model, args.query, device, amp) if args.query is not None else embed_file(
        model, args.image, device, amp)
    found = results(manifest, embeddings, query, args.top, args.query if args.query is not None else args.image)
    if args.gallery:
        draw_gallery(found, args.gallery, args.image)
        print(f"wrote {args.gallery}")
    return found


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Search the archive</title><style>
body{font:15px system-ui,sans-serif;margin:24px;color:#222} h1{font-size:22px;margin:0 0 12px}
input[type=search]{font-size:16px;width:28em;padding:4px} #info{color:#555}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:14px}
.result img{width:100%;aspect-ratio:1;object-fit:cover;cursor:pointer;border-radius:4px;background:#eee}
.result div{font-size:13px;overflow-wrap:anywhere}</style></head><body>
<h1>Search the archive</h1><form id="form"><input type="search" id="q" placeholder="a bridge over a river">
<button>Search</button> or by an image: <input type="file" id="file" accept="image/*"></form>
<p id="info">Type a description, upload an image, or click a result to find images like it.</p><div id="grid"></div>
<script>
const grid = document.getElementById("grid"), info = document.getElementById("info");
function card(hit, rank) {
  const box = document.createElement("div"), img = new Image(), text = document.createElement("div");
  box.className = "result"; img.src = "/image/" + hit.id; img.title = "find images like this one";
  img.onclick = () => run("id=" + hit.id);
  const tile = hit.tile ? " @" + hit.tile[0] + "," + hit.tile[1] : "";
  text.textContent = (rank + 1) + ". " + hit.score.toFixed(3) + " " + hit.path.split("/").pop() + tile;
  box.append(img, text); return box;
}
async function run(query, upload) {
  info.textContent = "searching...";
  const answer = await (await fetch("/api/search?" + query, upload ? {method: "POST", body: upload} : {})).json();
  info.textContent = answer.error ? "error: " + answer.error : answer.results.length + " results for " + answer.query;
  grid.replaceChildren(...(answer.results || []).map(card));
}
const q = document.getElementById("q"), file = document.getElementById("file");
document.getElementById("form").onsubmit = event => {
  event.preventDefault(); history.replaceState(null, "", "?q=" + encodeURIComponent(q.value));
  run("q=" + encodeURIComponent(q.value));
};
file.onchange = () => file.files.length && run("", file.files[0]);
const asked = new URLSearchParams(location.search).get("q");
if (asked) { q.value = asked; run("q=" + encodeURIComponent(asked)); }
</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    """The page, GET/POST /api/search and GET /image/N (the N-th entry's thumbnail); no other path is served."""

    def reply(self, code, body, kind="application/json"):
        body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url, app = urlsplit(self.path), self.server.app
        image = re.fullmatch(r"/image/(\d{1,12})", url.path)  # still percent-encoded: %2e%2e cannot match
        if url.path == "/":
            self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/search":
            self.reply(*app["search"](parse_qs(url.query), None))
        elif image and int(image[1]) < len(app["entries"]) and (thumb := app["thumbnail"](int(image[1]))):
            self.reply(200, thumb, "image/jpeg")
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        url, app = urlsplit(self.path), self.server.app
        length = self.headers.get("Content-Length", "")
        if url.path != "/api/search":
            self.reply(404, {"error": "not found"})
        elif not length.isdigit() or int(length) == 0:
            self.reply(400, {"error": "POST an image file as the request body"})
        elif int(length) > app["max_upload"]:
            self.close_connection = True  # the body is not read
            self.reply(413, {"error": f"the image is over {app['max_upload']} bytes"})
        else:
            self.reply(*app["search"](parse_qs(url.query), self.rfile.read(int(length))))


def make_server(folder, host, port, device, amp, max_upload=MAX_UPLOAD):
    """A ThreadingHTTPServer for the index in `folder`, its model and embeddings loaded once."""
    manifest, embeddings = load_index(folder)
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
        return 200, results(manifest, embeddings, vector, int(k), label)

    def jpeg(row):
        try:
            out = BytesIO()
            thumbnail(manifest["entries"][row]).save(out, "JPEG", quality=85)
            return out.getvalue()
        except (OSError, ValueError):  # moved or deleted since it was indexed
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.app = {"search": query, "thumbnail": jpeg, "entries": manifest["entries"], "max_upload": max_upload}
    return server


def serve(args, device, amp):
    server = make_server(args.index, args.host, args.port, device, amp)
    host, port = server.server_address[:2]
    print(f"serving {len(server.app['entries'])} entries of {args.index} at http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Index and search remote sensing images by text or by example image.")
    verbs = p.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("index", help="encode a folder or a dataset's images into an index (again: the changes)")
    make.add_argument("source", help="a folder (searched recursively for .tif .tiff .png .jpg .jpeg), or a dataset "
                                     "name as train.py takes it (rsitmd, rsicd, ucm, demo)")
    make.add_argument("--index", required=True, metavar="DIR", help="the index folder (made if missing)")
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
    args = p.parse_args(argv)
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
