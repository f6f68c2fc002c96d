"""search/exact.py against brute force: the top-k of every query equals the fp32 product over the stored fp16 rows
(equal scores: lower row first), whatever the slices, the number of queries (either kernel, a batch's in fp32 or
bf16), near ties below fp16's resolution, rows and queries that bf16 rounds the worst way; the server gathers
concurrent queries into one pass and answers each as alone."""
import http.client
import json
import queue
import threading

import numpy as np
import pytest
import torch

import retrieve
from search import exact, store

pytestmark = pytest.mark.usefixtures("exact_cpu")
FAST_PASSES = [False, True]  # a batch's fast pass in bf16 forced on: exact on any CPU, fast where it has bf16 units


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def unit_rows(n, dim, seed=0):
    rows = np.random.default_rng(seed).standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def memmapped(tmp_path, rows):
    np.save(tmp_path / "e.npy", rows)
    return np.load(tmp_path / "e.npy", mmap_mode="r")


def brute_force(rows, query, k):
    """(scores, rows) of the k best: fp32 scores of the stored rows (from fp64 sums), equal ones lower row first."""
    scores = (rows.astype(np.float64) @ query.numpy().astype(np.float64)).astype(np.float32)
    order = np.lexsort((np.arange(len(rows)), -scores))[:k]
    return scores[order].tolist(), order.tolist()


def assert_brute_force(found, rows, queries, k):
    for (scores, best), query in zip(found, queries):
        expected_scores, expected_rows = brute_force(rows, query, k)
        assert best == expected_rows and scores == pytest.approx(expected_scores, abs=1e-6)


@pytest.mark.parametrize("n, step, k", [(1000, 64, 10), (1001, 1000, 7), (999, 4096, 5), (5, 2, 9), (1, 64, 3)])
def test_one_query_is_the_brute_force_top_k_across_slices(tmp_path, n, step, k):
    rows = memmapped(tmp_path, unit_rows(n, 32))
    query = torch.randn(32)
    for norm in (1.0, None):  # the index's bound, or measured
        assert_brute_force([exact.top_k(rows, query, k, step=step, norm=norm)], rows, [query], k)


@pytest.mark.parametrize("bf16", FAST_PASSES)
@pytest.mark.parametrize("count", [2, exact.BATCH_QUERIES - 1, exact.BATCH_QUERIES, exact.BF16_QUERIES,
                                   2 * exact.BF16_QUERIES + 1])
def test_a_batch_gives_each_query_its_brute_force_top_k(tmp_path, count, bf16):
    rows = memmapped(tmp_path, unit_rows(3000, 48, seed=1))
    queries = torch.randn(count, 48) * torch.rand(count, 1)  # any lengths: the margin scales with the query's
    found = exact.top_k(rows, queries, 12, step=700, bf16=bf16)
    assert len(found) == count
    assert_brute_force(found, rows, queries, 12)
    assert found[1] == exact.top_k(rows, queries[1], 12, step=700)


@pytest.mark.parametrize("count, bf16", [(1, False), (exact.BATCH_QUERIES, False), (exact.BF16_QUERIES, True)])
def test_near_ties_below_fp16_resolution_rank_exactly(tmp_path, count, bf16):
    """Scores within a few fp16 steps of each other near 1: only the exact re-scoring orders them."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal(64)
    rows = base + 0.02 * rng.standard_normal((2000, 64))
    rows = memmapped(tmp_path, (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16))
    queries = torch.from_numpy(base / np.linalg.norm(base)).float().repeat(count, 1)
    approximate = exact.approximate(exact.as_tensor(rows), queries, bf16)[0]
    assert len(torch.unique(approximate.topk(50).values)) < 50  # the fast pass alone cannot tell them apart
    assert_brute_force(exact.top_k(rows, queries, 20, step=300, bf16=bf16), rows, queries, 20)


@pytest.mark.parametrize("bf16", FAST_PASSES)
def test_equal_scores_take_the_lower_row_first(tmp_path, bf16):
    rows = unit_rows(500, 16, seed=3)
    rows[[37, 130, 260, 499]] = rows[400]  # copies in other slices, before and after the original
    rows = memmapped(tmp_path, rows)
    query = torch.from_numpy(rows[400].astype(np.float32))
    for queries in (query, query.repeat(exact.BATCH_QUERIES, 1), query.repeat(exact.BF16_QUERIES, 1)):
        found = exact.top_k(rows, queries, 3, step=64, norm=1.0, bf16=bf16)
        assert (found if queries.dim() == 1 else found[0])[1] == [37, 130, 260]
    assert exact.top_k(rows, torch.zeros(16), 4, step=64, bf16=bf16)[1] == [0, 1, 2, 3]  # every score 0


@pytest.fixture
def served_rows(tmp_path, monkeypatch):
    """An index of 3000 unit rows served on a free port (no model: queries by entry number)."""
    rows = unit_rows(3000, 32, seed=4)
    np.save(tmp_path / "embeddings-1.npy", rows)
    manifest = {"format": 1, "generation": 1, "model": None, "tile": None, "dim": 32, "files": {},
                "embeddings": "embeddings-1.npy", "entries": [[f"/archive/{i}.png", None] for i in range(len(rows))]}
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(retrieve, "load_model", lambda *args: None)
    queues, make_queue = [], queue.Queue  # the first queue made is the server's queue of waiting queries

    def recorded_queue():
        queues.append(make_queue())
        return queues[-1]

    monkeypatch.setattr(exact.queue, "Queue", recorded_queue)
    httpd = retrieve.make_server(str(tmp_path), "127.0.0.1", 0, torch.device("cpu"), "off")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], rows, queues[0]
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def ask(port, row, k):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", f"/api/search?id={row}&k={k}")
    return json.loads(connection.getresponse().read())


def test_concurrent_queries_are_answered_in_one_pass_as_if_alone(served_rows, monkeypatch):
    port, rows, waiting = served_rows
    alone = {(row, k): ask(port, row, k) for row, k in ((5, 3), (17, 8), (2999, 1), (640, 12), (5, 12))}
    passes, scanning, release, top_k = [], threading.Event(), threading.Event(), exact.top_k

    def held_top_k(embeddings, queries, k, **options):
        passes.append(len(queries))
        scanning.set()
        release.wait(60)  # the first pass waits until the other queries are queued behind it
        return top_k(embeddings, queries, k, **options)

    monkeypatch.setattr(exact, "top_k", held_top_k)
    answers = {}

    def request(row, k):
        answers[row, k] = ask(port, row, k)

    first = threading.Thread(target=request, args=(5, 3))
    first.start()
    assert scanning.wait(60)
    others = [threading.Thread(target=request, args=key) for key in list(alone)[1:]]
    for thread in others:
        thread.start()
    for _ in range(600):  # until all four wait (a bound, not a timing: no assertion on how long it took)
        if waiting.qsize() == len(others):
            break
        threading.Event().wait(0.1)
    release.set()
    for thread in [first] + others:
        thread.join(60)
    assert passes == [1, len(others)]
    assert answers == alone
    assert [hit["id"] for hit in alone[5, 12]["results"]] == brute_force(rows, torch.from_numpy(
        rows[5].astype(np.float32)), 12)[1]


@pytest.mark.parametrize("count, bf16", [(1, False), (exact.BATCH_QUERIES, False),
                                         (exact.BATCH_QUERIES, True)])
def test_the_fast_pass_is_within_the_margin(count, bf16):
    """Against fp64 over the stored rows, at every score from -1 to 1 (fp16 steps grow with the score)."""
    queries = torch.nn.functional.normalize(torch.randn(count, 512), dim=1)
    toward = torch.linspace(-1, 1, 2001)[:, None, None] * queries + torch.randn(2001, count, 512) * 0.03
    rows = np.concatenate([unit_rows(3000, 512, seed=5), torch.nn.functional.normalize(
        toward.reshape(-1, 512), dim=1).half().numpy()])
    scores = queries.double() @ torch.from_numpy(rows).double().T
    error = exact.approximate(exact.as_tensor(rows), queries, bf16) - scores
    assert error.abs().max() <= (exact.BF16_MARGIN if bf16 else exact.MARGIN)


def test_scores_off_by_up_to_the_margin_still_give_the_exact_top_k(tmp_path, monkeypatch):
    """Whatever the fast pass gets wrong within the margin (here: noise that reorders the rows), the result is
    exact."""
    rows = memmapped(tmp_path, unit_rows(3000, 32, seed=6))
    generator = torch.Generator().manual_seed(0)

    def noisy(chunk, units, bf16):
        exact_scores = units.double() @ chunk.double().T
        signs = torch.randint(0, 2, exact_scores.shape, generator=generator, dtype=torch.double) * 2 - 1
        return (exact_scores + 0.099 * signs).float()  # as far off as the margin allows, either way

    monkeypatch.setattr(exact, "MARGIN", 0.1)
    monkeypatch.setattr(exact, "approximate", noisy)
    queries = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    for step in (256, 3000):  # many slices, and one (the slice's own k-th alone sets the floor)
        assert_brute_force(exact.top_k(rows, queries, 10, step=step, norm=1.0), rows, queries, 10)


# Values that bf16 (8 significant bits, nearest-even) rounds as far as it can: halfway between two bf16 numbers
# just above a power of two, rounded down (1 + 2^-8 to 1) or up (1 + 3 * 2^-8 to 1 + 2^-6); all fp16 numbers.
STEP = 2.0 ** -5  # element size: 1000 of them fill most of a unit vector of dim 1024
ROUNDED_DOWN, ROUNDED_UP = STEP * (1 + 2.0 ** -8), STEP * (1 + 3 * 2.0 ** -8)


def unit_query(value, count, dim=1024):
    """`count` elements equal to value, and the rest equal ones making a fp32 vector whose length torch computes as
    exactly 1, so that top_k's normalisation keeps the values bf16 rounds worst."""
    query = torch.full((dim,), value)
    query[count:] = ((1 - count * value ** 2) / (dim - count)) ** 0.5
    while (length := torch.linalg.vector_norm(query)) != 1:
        query[-1] = torch.nextafter(query[-1], torch.tensor(0.0 if length > 1 else 1.0))
    return query


def staircase(value, count=1000, dim=1024):
    """Row m holds `value` in its first m + 1 elements: sums of every size, which bf16 rounds down or up."""
    return np.tril(np.full((count, dim), value, np.float16))


def test_the_bf16_fast_pass_is_within_its_margin_at_the_worst_rounding():
    """Row, query and score each rounded by bf16 as far as it goes, all in the same direction."""
    queries = torch.stack([unit_query(value, 1000) for value in (ROUNDED_DOWN, ROUNDED_UP)])
    queries = torch.cat([queries, -queries])  # a batch
    rows = np.concatenate([staircase(ROUNDED_DOWN), staircase(ROUNDED_UP)])
    exact_scores = queries.double() @ torch.from_numpy(rows).double().T
    error = (exact.approximate(exact.as_tensor(rows), queries, True) - exact_scores).abs()
    relative = (error / torch.linalg.vector_norm(torch.from_numpy(rows).double(), dim=1)).max()  # queries: length 1
    assert exact.BF16_MARGIN / 2 < relative <= exact.BF16_MARGIN  # these data need more than half of it


def test_rows_the_bf16_fast_pass_puts_in_the_wrong_order_still_rank_exactly(tmp_path, monkeypatch):
    """Ten rows of a first slice scored exactly in bf16 (but for the query's rounding), then in the next slice the
    true best, its elements and its sum rounded down (898 to 896): its bf16 score falls below the ten's exact scores
    by more than 2^-7, and only the margin keeps it among the rows scored again."""
    query = unit_query(ROUNDED_DOWN, 1000)
    runners_up, best = staircase(STEP)[[900] * 10], staircase(ROUNDED_DOWN)[897]
    rows = memmapped(tmp_path, np.concatenate([runners_up, best[None], unit_rows(100, 1024)]))
    queries = torch.stack([query] + [unit_query(STEP, 500)] * (exact.BF16_QUERIES - 1))
    passes, approximate = [], exact.approximate
    monkeypatch.setattr(exact, "approximate", lambda *args: passes.append(args[2]) or approximate(*args))
    assert_brute_force(exact.top_k(rows, queries, 10, step=10, norm=1.0, bf16=True), rows, queries, 10)
    assert brute_force(rows, query, 1)[1] == [10] and passes == [True] * 12  # every slice in bf16


@pytest.mark.parametrize("bf16", [False, True])
def test_gathered_passes_take_the_fast_pass_asked_for(monkeypatch, bf16):
    asked, top_k = [], exact.top_k

    def recorded_top_k(*args, **options):
        asked.append(options["bf16"])
        return top_k(*args, **options)

    monkeypatch.setattr(exact, "top_k", recorded_top_k)
    rows = unit_rows(100, 16)
    assert exact.gathering(rows, norm=1.0, bf16=bf16)(torch.from_numpy(rows[3].astype(np.float32)), 2)[1][0] == 3
    assert asked == [bf16]
