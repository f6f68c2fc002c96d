"""retrieve.py: the index against brute force, incremental and interrupted updates, model records, tiles, the HTTP
API and its page in a real headless browser. A random micro CLIP and tiny generated images: seconds."""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import adapter
import clip_min
import retrieve
from search import exact, store
from helpers import REPO, MICRO, assert_same, brute_force, index_archive, make_world, noise_images, retrieve_json

pytestmark = pytest.mark.usefixtures("exact_cpu")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_search_gives_the_brute_force_top_k(clip, tmp_path, capsys):
    paths = noise_images(tmp_path / "archive", [f"{d}/scene{i}.{e}" for i, (d, e) in enumerate(
        [("a", "png"), ("a/b", "PNG"), ("c", "jpg"), ("c", "JPEG"), ("a", "tif"), ("c", "TIFF")] * 3)])
    (tmp_path / "archive" / "notes.txt").write_text("not an image")
    assert index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0]) == dict(
        encoded=18, removed=0, unchanged=0, skipped=0, total=18, entries=18)
    manifest, embeddings = store.load_index(str(tmp_path / "idx"))
    assert embeddings.dtype == np.float16 and isinstance(embeddings, np.memmap) and embeddings.shape == (18, 64)
    for query in ("a red building beside a river", "many planes"):
        assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), query, "--top", "5", "--json"),
                    brute_force(clip[1], sorted(paths), query, 5))
    gallery = tmp_path / "gallery.png"
    found = retrieve_json(capsys, "search", str(tmp_path / "idx"), "--image", paths[3], "--top", "4", "--json",
                "--gallery", str(gallery))
    assert found["results"][0]["path"] == paths[3] and found["results"][0]["score"] == pytest.approx(1, abs=2e-3)
    assert Image.open(gallery).size[0] > 4 * 200


def test_exact_search_in_slices_is_one_full_product(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "e.npy", rng.standard_normal((1000, 16)).astype(np.float16))
    embeddings, query = np.load(tmp_path / "e.npy", mmap_mode="r"), torch.randn(16)
    expected = (torch.from_numpy(np.array(embeddings)).float() @ query).topk(7)
    scores, rows = exact.top_k(embeddings, query, 7, step=64)  # 16 slices, the best spread over several
    assert rows == expected.indices.tolist() and scores == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert sorted(exact.top_k(embeddings[:3], query, 7, step=2)[1]) == [0, 1, 2]  # fewer entries than k


def test_update_encodes_only_what_changed(clip, tmp_path, capsys, monkeypatch):
    archive = tmp_path / "archive"
    paths = noise_images(archive, [f"img{i}.png" for i in range(8)])
    index_archive(capsys, archive, tmp_path / "idx", clip[0])
    encoded, real = [], retrieve.embed_images
    monkeypatch.setattr(retrieve, "embed_images", lambda m, images, *a: encoded.append(len(images)) or real(
        m, images, *a))
    os.remove(paths[0])
    noise_images(archive, ["img3.png"], seed=1)  # changed content under the same name
    os.utime(paths[3], ns=(os.stat(paths[3]).st_atime_ns, os.stat(paths[3]).st_mtime_ns + 10 ** 9))
    paths = paths[1:] + noise_images(archive, ["new/img8.png", "new/img9.png"], seed=2)
    assert index_archive(capsys, archive, tmp_path / "idx", clip[0]) == dict(encoded=3, removed=1, unchanged=6,
                                                                             skipped=0, total=9, entries=9)
    assert sum(encoded) == 3
    assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), "a lake", "--top", "9", "--json"),
                brute_force(clip[1], paths, "a lake", 9))
    assert index_archive(capsys, archive, tmp_path / "idx", clip[0]) == dict(encoded=0, removed=0, unchanged=9,
                                                                             skipped=0, total=9, entries=9)
    assert sum(encoded) == 3


def test_an_interrupted_index_is_the_old_one_and_a_rerun_resumes(clip, tmp_path, capsys, monkeypatch):
    archive = tmp_path / "archive"
    old = noise_images(archive, [f"old{i}.png" for i in range(4)])
    index_archive(capsys, archive, tmp_path / "idx", clip[0])
    before = sorted(os.listdir(tmp_path / "idx"))
    new = noise_images(archive, [f"new{i}.png" for i in range(6)], seed=3)
    monkeypatch.setattr(retrieve, "FILES_PER_CHUNK", 2)
    encoded, real = [], retrieve.embed_images

    def stopped_after(chunks):
        def embed(model, images, *a):
            if len(encoded) == chunks:
                raise KeyboardInterrupt
            encoded.append(len(images))
            return real(model, images, *a)
        return embed

    monkeypatch.setattr(retrieve, "embed_images", stopped_after(2))  # Ctrl-C while encoding the third chunk
    with pytest.raises(KeyboardInterrupt):
        index_archive(capsys, archive, tmp_path / "idx", clip[0])
    assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), "a road", "--json"),
                brute_force(clip[1], old, "a road", 10))
    monkeypatch.setattr(retrieve, "embed_images", stopped_after(99))
    real_write = store.write_atomically

    def killed_writing_the_manifest(path, write):
        if path.endswith(os.sep + store.MANIFEST) and store.PENDING not in path:
            with open(path + ".tmp", "wb") as f:
                f.write(b'{"format": 1, "entr')  # half a manifest, then the process dies
            raise KeyboardInterrupt
        real_write(path, write)

    monkeypatch.setattr(store, "write_atomically", killed_writing_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        index_archive(capsys, archive, tmp_path / "idx", clip[0])
    assert encoded == [2, 2, 2]  # the third chunk only: the first two were kept from the interrupted run
    assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), "a road", "--json"),
                brute_force(clip[1], old, "a road", 10))
    monkeypatch.setattr(store, "write_atomically", real_write)
    assert index_archive(capsys, archive, tmp_path / "idx", clip[0]) == dict(encoded=6, removed=0, unchanged=4,
                                                                               skipped=0, total=10, entries=10)
    assert encoded == [2, 2, 2]
    assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), "a road", "--json"),
                brute_force(clip[1], sorted(old + new), "a road", 10))
    assert sorted(os.listdir(tmp_path / "idx")) == ["embeddings-2.npy", "manifest.json"] != before


def test_an_index_of_another_model_is_refused(clip, tmp_path, capsys):
    noise_images(tmp_path / "archive", ["a.png", "b.png"])
    torch.manual_seed(1)
    other = str(tmp_path / "other.pt")
    torch.save(clip_min.CLIP(MICRO).state_dict(), other)
    index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0])
    with pytest.raises(ValueError, match="--rebuild"):
        index_archive(capsys, tmp_path / "archive", tmp_path / "idx", other)
    with pytest.raises(ValueError, match="tiles"):
        index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--tile", "16")
    assert index_archive(capsys, tmp_path / "archive", tmp_path / "idx", other, "--rebuild")["encoded"] == 2
    assert store.read_manifest(str(tmp_path / "idx"))["model"]["backbone"] == other


def test_a_checkpoint_is_recorded_by_hash_and_search_loads_it(clip, tmp_path, capsys):
    paths = noise_images(tmp_path / "archive", [f"{i}.png" for i in range(5)])
    model = adapter.apply(clip_min.load(clip[0], activation="quick_gelu")[0], "mrs").eval()
    for p in model.mrs_adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)  # a trained adapter: its embeddings differ from frozen CLIP's
    checkpoint = str(tmp_path / "best.pt")
    torch.save({"trainable": adapter.trainable_state_dict(model), "method": "mrs", "options": model.petl_options,
                "clip": clip[0], "activation": "quick_gelu", "args": {}}, checkpoint)
    retrieve_json(capsys, "index", str(tmp_path / "idx"), str(tmp_path / "archive"), "--checkpoint", checkpoint,
        "--json")
    record = store.read_manifest(str(tmp_path / "idx"))["model"]
    assert record["method"] == "mrs" and record["backbone"] == clip[0] and len(record["sha256"]) == 64
    assert_same(retrieve_json(capsys, "search", str(tmp_path / "idx"), "a port", "--json"),
                brute_force(model, sorted(paths), "a port", 10))
    with pytest.raises(ValueError, match="--rebuild"):
        index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0])  # frozen CLIP: another model
    with open(checkpoint, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="changed since"):
        retrieve_json(capsys, "search", str(tmp_path / "idx"), "a port", "--json")


def test_a_dataset_is_indexed_by_name(clip, tmp_path, capsys):
    world = make_world(tmp_path)
    found = index_archive(capsys, world.name, tmp_path / "idx", clip[0], "--data-root", world.root)
    assert found["total"] == 60 == len(store.read_manifest(str(tmp_path / "idx"))["entries"])


def test_tiles_carry_their_offsets(clip, tmp_path, capsys):
    assert retrieve.tiles(100, 40, 32) == [[x, y, 32, 32] for y in (0, 8) for x in (0, 32, 64, 68)]
    assert retrieve.tiles(32, 20, 32) == [None]
    noise_images(tmp_path / "archive", ["scene.png"], size=(96, 64))  # six 32 x 32 tiles, each its own noise
    assert index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--tile", "32")["total"] == 1
    scene = Image.open(tmp_path / "archive" / "scene.png")
    boxes = [entry[1] for entry in store.read_manifest(str(tmp_path / "idx"))["entries"]]
    assert sorted(boxes) == sorted([x, y, 32, 32] for x in (0, 32, 64) for y in (0, 32))
    for x, y in ((64, 0), (0, 32), (32, 32)):
        scene.crop((x, y, x + 32, y + 32)).save(tmp_path / "query.png")
        best = retrieve_json(capsys, "search", str(tmp_path / "idx"), "--image", str(tmp_path / "query.png"), "--json")
        assert best["results"][0]["tile"] == [x, y, 32, 32]
        assert best["results"][0]["score"] == pytest.approx(1, abs=2e-3)


@pytest.fixture
def server(clip, tmp_path, capsys):
    """A served index of 12 images (loopback, a free port), stopped after the test."""
    paths = noise_images(tmp_path / "archive", [f"photo{i:02d}.png" for i in range(12)])
    index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0])
    httpd = retrieve.make_server(str(tmp_path / "idx"), "127.0.0.1", 0, torch.device("cpu"), "off", max_upload=4000)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], sorted(paths)
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def ask(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.request(method, path, body=body)
    answer = connection.getresponse()
    return answer.status, answer.read(), answer.getheader("Content-Type")


def test_the_http_api_answers_and_refuses_what_it_must(server, clip):
    port, paths = server
    status, body, kind = ask(port, "GET", "/api/search?q=a+red+roof&k=4")
    assert status == 200 and kind == "application/json"
    assert_same(json.loads(body), brute_force(clip[1], paths, "a red roof", 4))
    status, body, _ = ask(port, "GET", "/api/search?q=" + "very+long+caption+" * 60 + "&k=2")
    assert status == 200 and len(json.loads(body)["results"]) == 2  # cut to CLIP's context, not refused
    status, body, _ = ask(port, "GET", "/api/search?id=5&k=1")
    assert json.loads(body)["results"][0]["path"] == paths[5]
    status, body, kind = ask(port, "GET", "/image/7")
    assert status == 200 and kind == "image/jpeg" and Image.open(BytesIO(body)).size == (30, 24)
    for path in ("/image/../idx/manifest.json", "/image/%2e%2e/manifest.json", "/image/%2e%2e", "/image//etc/passwd",
                 "/image/12", "/image/-1", "/image/1.png", "/etc/passwd", "/../manifest.json", "/manifest.json"):
        assert ask(port, "GET", path)[0] == 404, path
    with open(paths[9], "rb") as f:
        status, body, _ = ask(port, "POST", "/api/search?k=3", f.read())
    assert status == 200 and json.loads(body)["results"][0]["path"] == paths[9]
    status, body, _ = ask(port, "POST", "/api/search", b"this is not an image")
    assert status == 400 and "not an image" in json.loads(body)["error"]
    assert ask(port, "POST", "/api/search", bytes(4001))[0] == 413
    assert ask(port, "GET", "/api/search?q=x&k=lots")[0] == 400


def test_the_page_shows_results_in_a_headless_browser(server, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    port, paths = server
    dom = browse(f"http://127.0.0.1:{port}/?q=a+red+roof", tmp_path / "profile")
    assert dom.count('class="result"') == 12, dom[-2000:]
    assert "12 results for a red roof" in dom
    assert all(os.path.basename(p) in dom for p in paths)
    dom = browse(f"http://127.0.0.1:{port}/?q=a+red+roof&k=5", tmp_path / "profile")  # the number of results
    assert dom.count('class="result"') == 5 and "5 results for a red roof" in dom, dom[-2000:]
    assert 'type="number" id="k"' in dom
    for blank in ("", "+++"):  # said on the page, not the API's error for developers
        dom = browse(f"http://127.0.0.1:{port}/?q={blank}&k=3", tmp_path / "profile")
        info = re.search(r'<p id="info">(.*?)</p>', dom)[1]
        assert info.startswith("Type what to look for first") and 'class="result"' not in dom, dom[-2000:]


def browse(url, profile, screenshot=None, size="1100,700"):
    """The DOM of the page after its scripts ran (or a PNG of it), as headless Chromium renders it."""
    what = [f"--screenshot={screenshot}", f"--window-size={size}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--virtual-time-budget=10000", *what, url], capture_output=True, text=True, timeout=90)
    return done.stdout


@pytest.mark.slow
def test_bad_input_is_one_error_line(tmp_path, capsys):
    done = subprocess.run([sys.executable, os.path.join(REPO, "retrieve.py"), "search", str(tmp_path / "nowhere"),
                           "a river"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: no index in {tmp_path / 'nowhere'}")
    for argv in (["search"], ["search", str(tmp_path), "--top", "0"], ["index", "i", ".", "--tile", "3"]):
        with pytest.raises(SystemExit) as stop:
            retrieve.main(argv)
        assert stop.value.code == 2 and "error: " in capsys.readouterr().err


def index_files(folder):
    """The index as bytes and entries: what must not depend on how the encoding was split."""
    manifest, embeddings = store.load_index(str(folder))
    return manifest["entries"], manifest["files"], np.array(embeddings).tobytes()


def test_shards_then_a_join_give_the_index_of_one_process(clip, tmp_path, capsys, monkeypatch):
    noise_images(tmp_path / "archive", [f"{d}/img{i}.png" for d in "ab" for i in range(20)])
    noise_images(tmp_path / "archive", ["big.png"], size=(80, 40), seed=1)  # tiles: several entries of one file
    (tmp_path / "archive" / "broken.png").write_bytes(b"not a png")
    # One process with a file per chunk and batch (tiled: --workers files a chunk), the shards with seven: the
    # embeddings must not depend on the batch's size (the matrix kernels do)
    assert index_archive(capsys, tmp_path / "archive", tmp_path / "one", clip[0], "--tile", "32")["skipped"] == 1
    encoded, real = [], retrieve.embed_images
    monkeypatch.setattr(retrieve, "embed_images", lambda m, images, *a: encoded.extend(images) or real(m, images, *a))
    parts = [index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--tile", "32", "--shard", f"{i}/3",
                   "--workers", "7")
             for i in (2, 0, 1)]
    assert store.read_manifest(str(tmp_path / "idx")) is None  # shards switch no manifest
    assert sum(part["encoded"] for part in parts) == 41 and sum(part["skipped"] for part in parts) == 1
    assert all(0 < part["encoded"] < 41 for part in parts)  # the split shares the work
    assert len(encoded) == 40 + 6  # each entry once, the broken file none
    found = index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--tile", "32")
    assert len(encoded) == 46  # the join encodes nothing
    assert found == dict(encoded=41, removed=0, unchanged=0, skipped=1, total=41, entries=46)
    assert index_files(tmp_path / "idx") == index_files(tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "idx")) == ["embeddings-1.npy", "manifest.json"]


def test_a_file_is_in_one_part_whatever_else_the_archive_holds():
    paths = [f"/archive/{i}.png" for i in range(300)]
    parts = [[p for p in paths if retrieve.in_part(p, (i, 4))] for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(paths) and all(40 < len(part) < 110 for part in parts)
    assert [p for p in paths[:100] if retrieve.in_part(p, (1, 4))] == [p for p in parts[1] if p in paths[:100]]


def test_torchrun_ranks_are_shards(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert retrieve.parse_args(["index", "i", "s"]).shard == (2, 3)
    assert retrieve.parse_args(["index", "i", "s", "--shard", "0/5"]).shard == (0, 5)  # the option first
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert retrieve.parse_args(["index", "i", "s"]).shard is None


@pytest.mark.slow
def test_processes_encode_the_parts_at_once_then_join(clip, tmp_path, capsys, monkeypatch):
    """--processes 3: three processes of retrieve.py (one GPU each on a machine with several) write pending/ at
    once, then the join; the index is the one process's, and the join encodes nothing."""
    noise_images(tmp_path / "archive", [f"img{i:02d}.png" for i in range(30)])
    index_archive(capsys, tmp_path / "archive", tmp_path / "one", clip[0])
    encoded, real = [], retrieve.embed_images
    monkeypatch.setattr(retrieve, "embed_images", lambda m, images, *a: encoded.extend(images) or real(m, images, *a))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' threads: one, as this process's (exact_cpu)
    found = index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--processes", "3", "--amp", "off")
    assert found == dict(encoded=30, removed=0, unchanged=0, skipped=0, total=30, entries=30) and encoded == []
    assert index_files(tmp_path / "idx") == index_files(tmp_path / "one")


def test_a_bad_file_is_skipped_said_and_counted(clip, tmp_path, capsys, monkeypatch):
    archive, bad = tmp_path / "archive", ["dangling.png", "pipe.png", "broken.jpg", "empty.tif"]
    noise_images(archive, ["good0.png", "good1.png", "folder.png/inside.png"])  # a folder named like an image: walked
    noise_images(archive, ["scene.png"], size=(64, 32))  # two tiles
    os.symlink(tmp_path / "gone.png", archive / "dangling.png")
    os.mkfifo(archive / "pipe.png")  # opening it would wait forever
    (archive / "broken.jpg").write_bytes(b"\xff\xd8 a cut JPEG")
    (archive / "empty.tif").write_bytes(b"")
    monkeypatch.setattr(retrieve, "SAY_SKIPPED", 3)
    for unchanged in (0, 4):  # a skipped file is tried again next time
        retrieve.main(["index", str(tmp_path / "idx"), str(archive), "--clip", clip[0], "--tile", "32", "--json"])
        out, err = capsys.readouterr()
        assert json.loads(out) == dict(encoded=4 - unchanged, removed=0, unchanged=unchanged, skipped=4, total=4,
                                       entries=5)
        said = [line for line in err.splitlines() if line.startswith("skipped: ")]
        assert len(said) == 3 and said[-1].endswith("(further skipped files are counted, not said)")
        assert len({name for name in bad for line in said if str(archive / name) in line}) == 3  # a file a line
    retrieve.main(["index", str(tmp_path / "idx"), str(archive), "--clip", clip[0]])
    assert capsys.readouterr().out.strip().endswith(": 0 encoded, 0 removed, 4 unchanged, 4 skipped; 4 images, "
                                                    "5 entries")


def test_a_failed_first_run_leaves_no_index_folder(clip, tmp_path, capsys, monkeypatch):
    noise_images(tmp_path / "archive", ["a.png", "b.png"])
    monkeypatch.setattr(retrieve, "embed_images", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0])
    assert not (tmp_path / "idx").exists()


def test_shards_that_start_at_once_share_one_pending_folder(tmp_path, monkeypatch):
    """Processes of several shards make pending/ and its key file at once: none fails, none clears another's."""
    start, key = threading.Barrier(16), '["a model", null]'
    monkeypatch.setattr(os.path, "isfile", lambda path: False)  # every one of them writes the key file

    def shard(_):
        start.wait()
        return store.pending_folder(str(tmp_path / "idx"), key)
    with ThreadPoolExecutor(16) as pool:
        folders = set(pool.map(shard, range(16)))
    assert len(folders) == 1 and os.listdir(tmp_path / "idx" / store.PENDING) == [os.path.basename(*folders)]
    assert os.listdir(*folders) == [store.KEY] and open(os.path.join(*folders, store.KEY)).read() == key
    assert socket.gethostname() in store.chunk_name() and f"-{os.getpid()}." in store.chunk_name()


@pytest.mark.slow
def test_torchrun_ranks_encode_their_parts_and_a_plain_run_joins(clip, tmp_path, capsys, monkeypatch):
    """Under torchrun, without --shard, each rank encodes the part RANK/WORLD_SIZE names."""
    noise_images(tmp_path / "archive", [f"img{i:02d}.png" for i in range(12)])
    index_archive(capsys, tmp_path / "archive", tmp_path / "one", clip[0])
    argv = ["index", str(tmp_path / "idx"), str(tmp_path / "archive"), "--clip", clip[0], "--clip-activation",
            "quick_gelu", "--workers", "1", "--amp", "off", "--json"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(REPO, "retrieve.py"), *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(part["shard"] for part in parts) == ["0/2", "1/2"] and sum(p["encoded"] for p in parts) == 12
    encoded, real = [], retrieve.embed_images
    monkeypatch.setattr(retrieve, "embed_images", lambda m, images, *a: encoded.extend(images) or real(m, images, *a))
    assert retrieve_json(capsys, *argv)["encoded"] == 12 and encoded == []
    assert index_files(tmp_path / "idx") == index_files(tmp_path / "one")
