"""search/ann.py and retrieve.py --ann: the approximate index against brute force, its type by size and memory, its
updates by incremental runs (kept training, retraining), atomicity with the manifest, and the commands without
FAISS installed. Small generated archives and clustered vectors: seconds."""
import json
import os
import re
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

import retrieve
from benchmarks.bench_ann import exact_top, generate, near_queries
from search import ann, store
from helpers import REPO, assert_same, brute_force, index_archive, noise_images, retrieve_json

pytestmark = pytest.mark.usefixtures("exact_cpu")


def search(capsys, folder, query, *more):
    return retrieve_json(capsys, "search", str(folder), query, "--json", *more)


def test_the_approximate_index_gives_the_exact_top_k_and_says_so(clip, tmp_path, capsys):
    paths = sorted(noise_images(tmp_path / "archive", [f"scene{i:02d}.png" for i in range(14)]))
    index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--ann")
    manifest = store.read_manifest(str(tmp_path / "idx"))
    assert manifest["ann"]["type"] == "HNSW32,Flat" and manifest["ann"]["trained_on"] == 14
    assert os.path.isfile(tmp_path / "idx" / manifest["ann"]["file"])
    for query in ("a harbour with boats", "dense forest"):
        found = search(capsys, tmp_path / "idx", query, "--top", "6")
        assert found["approximate"] is True
        assert_same(found, brute_force(clip[1], paths, query, 6))
        forced = search(capsys, tmp_path / "idx", query, "--top", "6", "--exact")
        assert forced["approximate"] is False and forced["results"] == found["results"]
    by_image = retrieve_json(capsys, "search", str(tmp_path / "idx"), "--image", paths[5], "--json")
    assert by_image["approximate"] is True and by_image["results"][0]["path"] == paths[5]
    for exact_only in (False, True):  # the page's API, answered without a socket
        httpd = retrieve.make_server(str(tmp_path / "idx"), "127.0.0.1", 0, torch.device("cpu"), "off",
                                     exact_only=exact_only)
        code, answer = httpd.app["search"]({"q": ["a harbour with boats"], "k": ["6"]}, None)
        httpd.server_close()
        assert code == 200 and answer["approximate"] is not exact_only
        assert_same(answer, brute_force(clip[1], paths, "a harbour with boats", 6))


def test_an_incremental_run_updates_the_approximate_index_and_retrains_when_grown(clip, tmp_path, capsys):
    archive, folder = tmp_path / "archive", tmp_path / "idx"
    paths = noise_images(archive, [f"old{i}.png" for i in range(4)])
    index_archive(capsys, archive, folder, clip[0], "--ann")
    os.remove(paths[0])
    paths = paths[1:] + noise_images(archive, ["new0.png", "new1.png"], seed=5)
    assert index_archive(capsys, archive, folder, clip[0])["total"] == 5  # no --ann: the index stays approximate
    manifest = store.read_manifest(str(folder))
    assert manifest["ann"]["trained_on"] == 4 and manifest["ann"]["file"] == "ann-2.faiss"
    assert sorted(n for n in os.listdir(folder) if n.startswith("ann-")) == ["ann-2.faiss"]
    found = search(capsys, folder, "a lake", "--top", "5")
    assert found["approximate"] and sorted(hit["path"] for hit in found["results"]) == sorted(paths)
    assert_same(found, brute_force(clip[1], paths, "a lake", 5))
    paths += noise_images(archive, [f"more{i}.png" for i in range(11)], seed=6)  # 16 entries: 4 x 4
    index_archive(capsys, archive, folder, clip[0])
    assert store.read_manifest(str(folder))["ann"]["trained_on"] == 16
    assert_same(search(capsys, folder, "a lake", "--top", "8"), brute_force(clip[1], paths, "a lake", 8))


def counting_added_rows(monkeypatch):
    """A list that receives the number of rows each ann.add_rows call adds to a FAISS index."""
    added, add_rows = [], ann.add_rows
    monkeypatch.setattr(ann, "add_rows", lambda made, embeddings, first, ids: added.append(len(embeddings) - first)
                        or add_rows(made, embeddings, first, ids))
    return added


def test_an_incremental_run_removes_and_adds_only_the_changes_in_the_inverted_lists(clip, tmp_path, capsys,
                                                                                      monkeypatch):
    archive, folder = tmp_path / "archive", tmp_path / "idx"
    monkeypatch.setattr(ann, "choose_factory", lambda *args: "IVF2,Flat")  # 2 lists, both searched: exact
    paths = noise_images(archive, [f"old{i}.png" for i in range(8)])
    index_archive(capsys, archive, folder, clip[0], "--ann")
    for gone in (paths[1], paths[4]):
        os.remove(gone)
    noise_images(archive, ["old6.png"], seed=4)  # changed: its old row dropped, its new one added
    os.utime(paths[6], ns=(os.stat(paths[6]).st_atime_ns, os.stat(paths[6]).st_mtime_ns + 10 ** 9))
    paths = [p for p in paths if p not in (paths[1], paths[4])] + noise_images(archive, ["new0.png", "new1.png",
                                                                                         "new2.png"], seed=5)
    added = counting_added_rows(monkeypatch)
    assert index_archive(capsys, archive, folder, clip[0])["entries"] == 9
    assert added == [4]  # the changed file and the 3 new ones: not every row again
    manifest = store.read_manifest(str(folder))
    assert manifest["ann"]["trained_on"] == 8 and manifest["ann"]["ids"] == "ann-2.ids.npy"
    assert sorted(os.listdir(folder)) == ["ann-2.faiss", "ann-2.ids.npy", "embeddings-2.npy", "manifest.json"]
    made, ids = ann.load(str(folder), manifest)
    assert made.ntotal == len(ids) == 9 and np.array_equal(np.sort(ids_in_lists(made)), ids)
    found = search(capsys, folder, "a lake", "--top", "9")  # every entry, in the brute force's order
    assert_same(found, brute_force(clip[1], paths, "a lake", 9))
    os.remove(folder / "ann-2.ids.npy")  # a file the manifest names has gone: one line, the way on
    with pytest.raises(ValueError, match=r"ann-2.ids.npy, named by .*manifest.json, is missing: index again with "
                                         r"--rebuild$"):
        search(capsys, folder, "a lake")


def ids_in_lists(made):
    """Every FAISS id that the inverted lists of `made` hold."""
    lists = faiss.extract_index_ivf(made).invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
                           for n in range(lists.nlist) if lists.list_size(n)])


def test_an_interrupted_approximate_build_leaves_the_old_index(clip, tmp_path, capsys, monkeypatch):
    archive, folder = tmp_path / "archive", tmp_path / "idx"
    old = noise_images(archive, [f"old{i}.png" for i in range(5)])
    index_archive(capsys, archive, folder, clip[0], "--ann")
    noise_images(archive, ["new.png"], seed=7)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ann, "fill", killed)
    with pytest.raises(KeyboardInterrupt):
        index_archive(capsys, archive, folder, clip[0])
    manifest = store.read_manifest(str(folder))
    assert manifest["generation"] == 1 and os.path.isfile(folder / manifest["ann"]["file"])
    assert_same(search(capsys, folder, "a road", "--top", "5"), brute_force(clip[1], old, "a road", 5))
    monkeypatch.undo()
    assert index_archive(capsys, archive, folder, clip[0])["encoded"] == 1
    manifest = store.read_manifest(str(folder))
    assert sorted(os.listdir(folder)) == ["ann-2.faiss", "embeddings-2.npy", "manifest.json"]
    assert manifest["ann"]["file"] == "ann-2.faiss"


def test_without_faiss_the_commands_say_how_to_get_it(clip, tmp_path, capsys, monkeypatch):
    paths = sorted(noise_images(tmp_path / "archive", [f"{i}.png" for i in range(6)]))
    index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0], "--ann")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(SystemExit, match="pip install -r requirements-ann.txt"):
        index_archive(capsys, tmp_path / "archive", tmp_path / "new-idx", clip[0], "--ann")
    assert not os.path.exists(tmp_path / "new-idx")
    retrieve.main(["search", str(tmp_path / "idx"), "a bridge", "--top", "4", "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["approximate"] is False
    assert_same(json.loads(out), brute_force(clip[1], paths, "a bridge", 4))
    assert [line for line in err.splitlines() if "requirements-ann.txt" in line] == [
        "note: approximate search needs FAISS, an optional dependency: pip install -r requirements-ann.txt; "
        "searching exactly"]
    with pytest.raises(SystemExit, match="pip install -r requirements-ann.txt"):
        index_archive(capsys, tmp_path / "archive", tmp_path / "idx", clip[0])  # an approximate index is not dropped


def test_the_type_follows_the_size_and_the_memory_budget():
    gb = 2 ** 30
    assert ann.choose_factory(50_000, 512, 4 * gb) == "HNSW32,Flat"
    assert ann.choose_factory(50_000, 512, 0.1 * gb).startswith("IVF")  # the graph would not fit
    assert re.fullmatch(r"IVF\d+,Flat", ann.choose_factory(500_000, 512, 4 * gb))
    assert re.fullmatch(r"IVF\d+,PQ64np", ann.choose_factory(10_000_000, 512, 4 * gb))  # 8 dims a byte
    assert re.fullmatch(r"IVF\d+,PQ8np", ann.choose_factory(10_000_000, 512, 0.2 * gb))
    assert re.fullmatch(r"IVF\d+_HNSW32,PQ64np", ann.choose_factory(2_000_000_000, 512, 200 * gb))
    with pytest.raises(ValueError, match="--memory"):
        ann.choose_factory(10_000_000, 512, 0.1 * gb)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """20,000 clustered unit vectors (dim 64, fp16, as an index stores them) and 100 queries near them."""
    path = str(tmp_path_factory.mktemp("clustered") / "embeddings-1.npy")
    generate(path, 20_000, 64, clusters=64, rank=8)
    embeddings = np.load(path, mmap_mode="r")
    queries = near_queries(embeddings, 100)
    return os.path.dirname(path), embeddings, queries, exact_top(embeddings, queries, 10)


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF64,Flat", "IVF64,PQ8np", "IVF64_HNSW32,PQ8np"])
def test_each_type_finds_the_brute_force_neighbours(clustered, factory, monkeypatch):
    folder, embeddings, queries, truth = clustered
    monkeypatch.setattr(ann, "choose_factory", lambda *args: factory)
    manifest = {"generation": 1, "embeddings": "embeddings-1.npy"}
    ann.build(folder, manifest, embeddings, None)
    made, ids = ann.load(folder, manifest)
    assert made.ntotal == len(embeddings) and manifest["ann"]["type"] == factory
    if "_HNSW" in factory:  # the list centres' graph searched wide (a narrow search misses the nearest centre)
        assert faiss.downcast_index(faiss.extract_index_ivf(made).quantizer).hnsw.efSearch >= ann.QUANTIZER_EF
    found = [ann.top_k((made, ids), embeddings, torch.from_numpy(q), 10)[1] for q in queries]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth.tolist())]) >= 0.95
    scores, rows = ann.top_k((made, ids), embeddings, torch.from_numpy(queries[0]), 10)
    assert scores == pytest.approx((np.asarray(embeddings[rows], np.float32) @ queries[0]).tolist(), abs=1e-6)


@pytest.mark.slow
def test_an_update_keeps_the_training_until_the_archive_has_grown_fourfold(clustered, tmp_path, monkeypatch):
    _, embeddings, _, _ = clustered
    monkeypatch.setattr(ann, "choose_factory", lambda *args: "IVF32,Flat")
    first = {"generation": 1}
    ann.build(str(tmp_path), first, embeddings[:4000], None)

    def centroids(record):
        made = faiss.read_index(str(tmp_path / record["file"]))  # alive while its quantiser is read
        return made.quantizer.reconstruct_n(0, 32)

    grown = {"generation": 2}
    ann.build(str(tmp_path), grown, embeddings[:15_000], first["ann"])
    assert grown["ann"]["trained_on"] == 4000 and np.array_equal(centroids(grown["ann"]), centroids(first["ann"]))
    assert faiss.read_index(str(tmp_path / grown["ann"]["file"])).ntotal == 15_000
    retrained = {"generation": 3}
    ann.build(str(tmp_path), retrained, embeddings[:16_000], grown["ann"])
    assert retrained["ann"]["trained_on"] == 16_000
    assert not np.array_equal(centroids(retrained["ann"]), centroids(first["ann"]))


@pytest.mark.slow
def test_the_benchmark_runs_and_measures_against_brute_force(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_ann", "--rows", "3000", "--dim", "32", "--clusters",
                           "16", "--queries", "20", "--folder", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["recall@10"] >= 0.95 and measured["rss_anon"].endswith("kB")


@pytest.mark.slow
@pytest.mark.parametrize("factory, before_ids", [("IVF64,Flat", False), ("IVF64,Flat", True),
                                                 ("IVF64,PQ8np", False), ("IVF64_HNSW32,PQ8np", False)])
def test_an_update_equals_filling_the_kept_training_again(clustered, factory, before_ids, tmp_path, monkeypatch):
    """before_ids: the first generation as written before there were ids files (the FAISS ids are the rows)."""
    _, embeddings, queries, _ = clustered
    monkeypatch.setattr(ann, "choose_factory", lambda *args: factory)
    folder, old = str(tmp_path), np.asarray(embeddings[:12_000])
    first = {"generation": 1}
    ann.build(folder, first, old, None)
    if before_ids:
        with_ids = [ann.top_k(ann.load(folder, first), old, torch.from_numpy(q), 10) for q in queries[:20]]
        os.remove(os.path.join(folder, first["ann"].pop("ids")))
        assert [ann.top_k(ann.load(folder, first), old, torch.from_numpy(q), 10) for q in queries[:20]] == with_ids
    kept = np.sort(np.random.default_rng(0).choice(len(old), 11_000, replace=False))  # 1,000 rows dropped
    new = np.concatenate([old[kept], embeddings[12_000:14_000]])
    added = counting_added_rows(monkeypatch)
    updated, refilled = {"generation": 2}, {"generation": 3}
    ann.build(folder, updated, new, first["ann"], kept=kept)
    ann.build(folder, refilled, new, first["ann"])  # the same training, every row added again
    assert added == [2000, len(new)]
    made, ids = ann.load(folder, updated)
    assert made.ntotal == len(ids) == len(new) and np.array_equal(np.sort(ids_in_lists(made)), ids)
    assert np.array_equal(ids[:len(kept)], kept)  # the first generation's ids were its rows
    dropped = np.setdiff1d(np.arange(len(old)), kept)[:50]
    for query in [*queries, *old[dropped].astype(np.float32)]:
        query = torch.from_numpy(query)
        assert ann.top_k((made, ids), new, query, 10) == ann.top_k(ann.load(folder, refilled), new, query, 10)
