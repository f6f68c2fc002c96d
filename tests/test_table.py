"""table.py on a micro CLIP and small generated datasets: one row per cell with ours, the paper's and the difference;
a killed table continues to the same table; a changed setting is refused; the statistics and the figure."""
import json
import os
import shlex
import signal
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import adapter
import clip_min
import table
import train
from helpers import MICRO, interrupted, make_world

pytestmark = pytest.mark.usefixtures("exact_cpu")
# 40 images -> 32 train images -> 160 pairs -> 20 steps of 8; a last.pt every 5 steps, so a kill loses little.
TRAIN = ["--workers", "1", "--batch-size", "8", "--amp", "off", "--epochs", "1", "--log-every", "5",
         "--save-minutes", "0"]
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"]
# Transcribed from the paper (RSITMD rows of its main results table), independently of table.PAPER.
RSITMD = {"zeroshot": [9.29, 26.33, 37.39, 7.79, 23.67, 38.89, 23.89],
          "full": [24.16, 47.12, 61.28, 20.40, 50.53, 68.54, 45.33],
          "mrs": [23.67, 44.07, 60.36, 20.10, 50.63, 67.97, 44.47]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def command(world, out, *extra):
    return table.main(["--datasets", world.name, "--data-root", world.root, "--clip", world.clip, "--out", str(out),
                       *TRAIN, *extra])


def read(path):
    with open(path) as f:
        return f.read()


def snapshot(folder):
    """Every file under folder with its modification time and content."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_mtime_ns, read(os.path.join(d, n)) if n.endswith(
        (".json", ".jsonl", ".txt")) else None) for d, _, names in os.walk(folder) for n in names}


def released_rsitmd(world, root):
    """The world's dataset as RSITMD is released: rsitmd_precomp/ caption and filename files, .tif images beside it
    in rsitmd_images/, and a training image whose five captions are empty lines (as four of RSITMD's are)."""
    source = os.path.join(world.root, f"{world.name}_precomp")
    os.makedirs(root / "rsitmd_precomp")
    os.makedirs(root / "rsitmd_images")
    for split in ("train", "test"):
        names = read(os.path.join(source, f"{split}_filename.txt")).split()
        captions = read(os.path.join(source, f"{split}_caps.txt")).splitlines()
        if split == "train":
            captions[5:10] = [""] * 5
        (root / "rsitmd_precomp" / f"{split}_filename.txt").write_text("".join(n[:-4] + ".tif\n" for n in names))
        (root / "rsitmd_precomp" / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))
        for name in dict.fromkeys(names):
            Image.open(os.path.join(world.root, f"{world.name}_images", name)).save(root / "rsitmd_images" /
                                                                                   (name[:-4] + ".tif"))


def bar_heights(pixels, colour):
    """Heights in pixels of the bars of one colour, left to right (each bar: a run of columns holding the colour)."""
    columns = (pixels == colour).all(axis=-1).sum(axis=0)
    edges = np.flatnonzero(np.diff(np.r_[0, columns > 0, 0]))
    return [int(columns[(start + end) // 2]) for start, end in zip(edges[::2], edges[1::2])]


def test_released_layout_gives_ours_the_papers_and_the_difference(world, tmp_path, capsys):
    released_rsitmd(world, tmp_path / "data")
    out = tmp_path / "table"
    rows = table.main(["--data-root", str(tmp_path / "data"), "--clip", world.clip, "--out", str(out), *TRAIN])
    printed = capsys.readouterr().out
    assert "skipped rsicd" in printed and "skipped ucm" in printed  # the paper's other two datasets are absent
    saved = json.loads(read(out / "table.json"))
    assert saved["rows"] == rows and set(saved["skipped"]) == {"rsicd", "ucm"}
    assert [(r["dataset"], r["method"], r["loss"]) for r in rows] == [("rsitmd", m, "hmmc") for m in RSITMD]
    lines = read(out / "table.md").splitlines()[-3:]
    for row, line in zip(rows, lines):
        ours = json.loads(read(out / "rsitmd" / f"{row['method']}-hmmc-s2" / "test.json"))  # the run's own result
        paper = dict(zip(METRICS, RSITMD[row["method"]]))
        assert row["mean"] == {k: ours[k] for k in METRICS} and row["paper"] == paper
        assert row["diff"] == pytest.approx({k: ours[k] - paper[k] for k in METRICS})
        assert line.startswith(f"| rsitmd | {row['name']} |")
        for k in METRICS:
            assert f"| {ours[k]:.2f} ({paper[k]:.2f}, {ours[k] - paper[k]:+.2f}) |" in line
    assert [r["params"] for r in rows][:2] == [0, sum(p.numel() for p in clip_min.CLIP(MICRO).parameters())]
    drawn = np.array(Image.open(out / "table.png").convert("RGB"))[96:]  # below the title and legend
    for colour, source in ((table.OURS, "mean"), (table.THEIRS, "paper")):  # bars 300 px tall at mR 100
        assert bar_heights(drawn, colour) == pytest.approx([r[source]["mR"] * 3 for r in rows], abs=1.5)
    # The paper's recipe (lr 2e-4) for the MRS-Adapter; full fine-tuning at a tenth of it, as stated.
    lr = {m: torch.load(out / "rsitmd" / f"{m}-hmmc-s2" / "best.pt", weights_only=True)["args"]["lr"]
          for m in ("full", "mrs")}
    assert lr == {"full": pytest.approx(2e-5), "mrs": 2e-4}
    assert not os.path.exists(out / "rsitmd" / "mrs-hmmc-s2" / "last.pt")  # a finished cell keeps no resume state


@pytest.mark.slow
def test_a_killed_table_continues_to_the_same_table(world, tmp_path, monkeypatch, capsys):
    extra = ("--seeds", "0", "1")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    command(world, straight, *extra)
    assert "first speed measured" in capsys.readouterr().out

    # Cells in order: zeroshot s0, s1, full s0, s1, mrs s0, s1. Ctrl-C after 12 steps of the second trained cell.
    interrupted(monkeypatch, 20 + 12, lambda: command(world, broken, *extra))
    real_main, called = train.main, []
    cut = broken / world.name / "full-hmmc-s1"
    assert os.path.isfile(cut / "last.pt") and not os.path.exists(cut / "test.json")
    finished = {c: snapshot(broken / world.name / c) for c in ("zeroshot-hmmc-s0", "zeroshot-hmmc-s1", "full-hmmc-s0")}
    capsys.readouterr()

    def spy(argv):
        called.append((os.path.basename(argv[argv.index("--out") + 1]), "--resume" in argv))
        return real_main(argv)

    monkeypatch.setattr(train, "main", spy)
    command(world, broken, *extra)
    printed = capsys.readouterr().out
    assert called == [("full-hmmc-s1", True), ("mrs-hmmc-s0", False), ("mrs-hmmc-s1", False)]
    assert {c: snapshot(broken / world.name / c) for c in finished} == finished  # finished cells untouched
    assert "6 runs" in printed and "3 finished, 1 to resume, 2 to start" in printed
    resumed = next(line for line in printed.splitlines() if line.startswith("cell 4/6"))
    # Full fine-tuning's speed is known from the finished cell: the ETAs are numbers from the start.
    assert "resuming" in resumed and "unknown" not in resumed and "left: this run" in resumed

    assert json.loads(read(broken / "table.json")) == json.loads(read(straight / "table.json"))
    assert read(broken / "table.md") == read(straight / "table.md")
    assert all(len(r["seeds"]) == 2 for r in json.loads(read(broken / "table.json"))["rows"])


def test_a_changed_setting_is_refused(world, tmp_path, monkeypatch):
    clip, out = tmp_path / "clip.pt", tmp_path / "table"
    clip.write_bytes(open(world.clip, "rb").read())

    def run(*extra):
        return table.main(["--datasets", world.name, "--data-root", world.root, "--clip", str(clip), "--out", str(out),
                           "--methods", "mrs", "zeroshot", *TRAIN, *extra])

    run()
    before = snapshot(out)
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"trained despite a refusal: {argv}"))
    for extra, said in [(("--epochs", "2"), "epochs 1 -> 2"), (("--margin", "0.3"), "margin 0.2 -> 0.3"),
                        (("--lr", "1e-3"), "lr 0.0002 -> 0.001"), (("--batch-size", "4"), "batch_size 8 -> 4")]:
        with pytest.raises(SystemExit, match=said):
            run(*extra)
    torch.manual_seed(1)  # other weights at the same path
    torch.save(clip_min.CLIP(MICRO).state_dict(), clip)
    with pytest.raises(SystemExit, match="clip_sha256"):
        run()
    assert {k: v for k, v in snapshot(out).items() if not k.endswith(".png")} == \
        {k: v for k, v in before.items() if not k.endswith(".png")}
    stray = out / world.name / "mrs-hmmc-s5"
    stray.mkdir()
    (stray / "test.json").write_text("{}")
    with pytest.raises(SystemExit, match="did not record"):
        run("--seeds", "5")


def test_a_stopped_table_says_its_own_command_and_what_was_saved(world, tmp_path, monkeypatch, capsys):
    """SIGTERM during a cell's 13th step, between progress lines (every 50 steps): the cell saves that step and the
    stop says the table's command, never the cell's train.py; started again, the cell resumes from what it saved."""
    out, real_step, calls = tmp_path / "table", train.train_step, []
    argv = ["--datasets", world.name, "--data-root", world.root, "--clip", world.clip, "--out", str(out), "--methods",
            "mrs", *TRAIN, "--log-every", "50"]

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; the step ends and is saved
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(KeyboardInterrupt) as stopped:
        table.main(argv)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.args[0] == (
        f"cell 1/1 {world.name} mrs-hmmc s2 stopped (104 of 160 pairs saved): finished cells are kept, an "
        f"interrupted one resumes from its last save. Continue with: {shlex.join(['python', 'table.py', *argv])}")
    monkeypatch.setattr(train, "train_step", real_step)
    capsys.readouterr()
    table.main(argv)
    assert "cell 1/1 demo_natural mrs-hmmc s2: resuming: 104 of 160 pairs trained, 56 to go" in capsys.readouterr().out


def test_a_failed_cell_says_the_table_way_on(world, tmp_path, monkeypatch):
    """A cell whose loss turns nan: the table stops naming the cell and its log, never the cell's own train.py
    command (a smaller lr in one cell's folder would mix settings); the same table command retries the cell."""
    import losses
    real = losses.compute
    monkeypatch.setattr(losses, "compute", lambda *a, **k: (lambda loss, terms: (loss * float("nan"), terms))(
        *real(*a, **k)))
    with pytest.raises(SystemExit) as failed:
        command(world, tmp_path, "--methods", "mrs")
    said = str(failed.value.code)
    assert said.startswith(f"cell 1/1 {world.name} mrs-hmmc s2 failed: the loss is not finite at epoch 1, step 1")
    assert "python train.py" not in said and said.endswith("changes every cell's settings: pass it with another --out")
    assert os.path.isfile(said.split("Its log: ")[1].split(". ")[0])
    monkeypatch.setattr(losses, "compute", real)
    assert [row["method"] for row in command(world, tmp_path, "--methods", "mrs")] == ["mrs"]


def test_a_zero_shot_cell_ignores_what_only_training_reads(world, tmp_path, monkeypatch):
    """A zero-shot cell trains nothing: other epochs, lr, batch size or margin leave it done; another precision,
    which its scores depend on, is refused."""
    def run(*extra):
        return table.main(["--datasets", world.name, "--data-root", world.root, "--clip", world.clip, "--out",
                           str(tmp_path), "--methods", "zeroshot", *TRAIN, *extra])

    rows = run()
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail(f"ran a finished zero-shot cell again: {argv}"))
    assert run("--epochs", "2", "--lr", "1e-3", "--batch-size", "4", "--margin", "0.3") == rows
    with pytest.raises(SystemExit, match="amp 'off' -> 'bf16'"):
        run("--amp", "bf16")


def test_progress_lines_from_metrics_jsonl(tmp_path, monkeypatch):
    """While a cell trains, its speed read from metrics.jsonl gives its ETA and the table's; a row not measured yet
    is assumed as fast as the mean of those measured."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "step": 5, "pairs_per_s": 40.0}) + "\n")

    def cell(name, method, state):  # 2 epochs of 10 steps of 8 pairs
        return SimpleNamespace(dataset="ucm", method=method, loss="hmmc", out=str(tmp_path / name), steps=10,
                               pairs=160, settings={"batch_size": 8}, state=state)

    running, waiting, done = cell("a", "mrs", "running"), cell("b", "lora", "start"), cell("c", "full", "done")
    monkeypatch.setattr(table, "PROGRESS_SECONDS", 0)
    stop, said, rates = threading.Event(), [], {}
    table.watch(running, [done, running, waiting], rates, "cell 2/3", lambda line: (said.append(line), stop.set()),
                stop)
    # 15 steps of 8 pairs done (epoch 2, step 5), 40 left at 40 pairs/s: 1 s; the waiting cell, 160 at 40: 4 s more.
    assert said == ["cell 2/3: 120/160 pairs at 40.0 pairs/s; left: this run 1 s, the table 5 s"]
    assert rates == {("mrs", "hmmc"): 40.0}


def test_methods_and_the_options_table_py_owns():
    args, forwarded = table.parse_args(["--methods", "all", "mrs:infonce", "--epochs", "3"])
    assert sorted(args.rows) == sorted([(m, "hmmc") for m in adapter.METHODS] + [("mrs", "infonce")])
    assert args.rows[-1] == ("mrs", "infonce") and forwarded == ["--epochs", "3"]
    assert table.parse_args([])[0].rows == [("zeroshot", "hmmc"), ("full", "hmmc"), ("mrs", "hmmc")]
    for bad in (["--methods", "nope"], ["--methods", "mrs:nope"], ["--seed", "3"], ["--method=lora"]):
        with pytest.raises(SystemExit):
            table.parse_args(bad)


def test_summarise_mean_std_and_the_papers_numbers():
    rng = np.random.default_rng(0)
    results = [dict(dataset=d, method=m, loss=loss, seed=s, params=1000,
                    metrics={k: float(rng.uniform(0, 100)) for k in METRICS})
               for d, m, loss in (("rsicd", "mrs", "hmmc"), ("ucm", "coop", "hmmc"), ("rsicd", "mrs", "infonce"),
                                  ("demo", "lora", "hmmc")) for s in range(3)]
    results.append(dict(dataset="ucm", method="zeroshot", loss="hmmc", seed=0, params=0,
                        metrics={k: 5.0 for k in METRICS}))
    rows = table.summarise(results)
    assert [(r["dataset"], r["method"], r["loss"]) for r in rows] == [
        ("rsicd", "mrs", "hmmc"), ("ucm", "coop", "hmmc"), ("rsicd", "mrs", "infonce"), ("demo", "lora", "hmmc"),
        ("ucm", "zeroshot", "hmmc")]
    for row in rows[:4]:
        runs = [r["metrics"] for r in results if (r["dataset"], r["method"], r["loss"]) ==
                (row["dataset"], row["method"], row["loss"])]
        assert row["seeds"] == [0, 1, 2]
        for k in METRICS:
            assert row["mean"][k] == pytest.approx(np.mean([m[k] for m in runs]))
            assert row["std"][k] == pytest.approx(np.std([m[k] for m in runs], ddof=1))
    # The paper: all seven numbers of PE-RSITR on RSICD and of CoOp on UCM, nothing for a loss or a method or a
    # dataset it did not report.
    assert rows[0]["paper"] == dict(zip(METRICS, [14.13, 31.51, 44.78, 11.63, 33.92, 50.73, 31.12]))
    coop = dict(zip(METRICS, [7.19, 42.76, 74.19, 9.78, 48.34, 87.41, 44.95]))
    assert rows[1]["paper"] == coop
    assert rows[1]["diff"] == {k: pytest.approx(rows[1]["mean"][k] - v) for k, v in coop.items()}
    assert rows[2]["paper"] == rows[3]["paper"] == {}
    assert rows[4]["std"]["mR"] == 0.0 and rows[4]["paper"]["mR"] == 33.08

    lines = table.markdown(rows, total_params=10_000).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| rsicd | PE-RSITR (MRS-Adapter + HMMC) | hmmc | 1,000 (10.00%; paper 0.16M) |")
    assert "| 1,000 (10.00%) |" in lines[5]  # LoRA: not in the paper
    mean, std, diff = rows[0]["mean"]["mR"], rows[0]["std"]["mR"], rows[0]["diff"]["mR"]
    assert lines[2].endswith(f"| {mean:.2f} ± {std:.2f} (31.12, {diff:+.2f}) |")
    assert "(" not in lines[5].split("|", 5)[-1]  # no paper numbers: ours alone
    assert lines[6].startswith("| ucm | Zero-shot CLIP | - | 0 (0.00%; paper 0.00M) |") and "±" not in lines[6]


def colour_pixels(path, colour):
    return int((np.asarray(Image.open(path).convert("RGB")) == colour).all(axis=-1).sum())


def test_figure_bars_follow_mr(tmp_path):
    """Ours' bar grows in proportion to our mR; the paper's bar is drawn where the paper reports a number."""
    def draw(ours, paper):
        row = dict(dataset="ucm", method="mrs", loss="hmmc", mean={"mR": ours}, std={"mR": 0.0},
                   paper={"mR": paper} if paper else {})
        path = tmp_path / f"{ours}-{paper}.png"
        table.figure([row], path)
        return colour_pixels(path, (31, 119, 180)), colour_pixels(path, (255, 127, 14))

    (a, pa), (b, pb), (c, pc) = draw(20, 50), draw(40, 50), draw(60, 50)
    assert b - a == c - b > 0 and pa == pb == pc
    assert draw(20, None)[1] < pa


def test_progress_lines_only_when_the_log_moved_and_what_a_resumed_cell_has_left(tmp_path, monkeypatch):
    """The watcher says nothing new while nothing new was logged (validation, a slow step); a resumed cell's first
    line says what its last.pt holds and what is left, not its whole length."""
    log = tmp_path / "a" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"epoch": 1, "step": 5, "pairs_per_s": 40.0}) + "\n")
    cell = SimpleNamespace(dataset="ucm", method="mrs", loss="hmmc", out=str(tmp_path / "a"), steps=10, pairs=160,
                           settings={"batch_size": 8}, state="running")
    said, ticks = [], []

    class Clock:  # six ticks of the watcher's clock; the log moves on once, at the third
        def wait(self, seconds):
            ticks.append(seconds)
            if len(ticks) == 3:
                with log.open("a") as f:
                    f.write(json.dumps({"epoch": 1, "step": 10, "pairs_per_s": 40.0}) + "\n")
            return len(ticks) > 6

    stop = Clock()
    say = said.append
    table.watch(cell, [cell], {}, "cell 1/1", say, stop)
    assert [line.split(";")[0] for line in said] == ["cell 1/1: 40/160 pairs at 40.0 pairs/s",
                                                 "cell 1/1: 80/160 pairs at 40.0 pairs/s"]
    cell.state = "resume"  # stopped by a signal at step 13 of 20, between progress lines: what last.pt holds counts
    torch.save({"epoch": 0, "step": 13, "trainable": {}}, tmp_path / "a" / "last.pt")
    assert table.begin(cell) == "resuming: 104 of 160 pairs trained, 56 to go"


def test_the_papers_rows_and_their_marks():
    """Every CLIP-based row of the paper's three tables, in the paper's order, with its parameter count; exactly two
    printed mR values are not the mean of their recalls (RSITMD AdaptFormer, UCM Cross-Modal Adapter)."""
    methods = ["zeroshot", "linear", "full", "coop", "vpt", "vl_prompt", "adapter", "clip_adapter", "convpass",
               "adaptformer", "cross_modal_adapter", "uniadapter", "mrs"]
    assert list(table.PAPER) == ["rsicd", "rsitmd", "ucm"]
    assert all(list(rows) == methods and all(len(v) == 7 for v in rows.values()) for rows in table.PAPER.values())
    assert [m for m in table.NAMES if m in methods] == methods and set(table.PAPER_PARAMS) == set(methods)
    off = {(d, m): table.misprinted_mr(dict(zip(METRICS, v))) for d, rows in table.PAPER.items()
           for m, v in rows.items() if table.misprinted_mr(dict(zip(METRICS, v))) is not None}
    assert off == {("rsitmd", "adaptformer"): pytest.approx(34.51, abs=0.005),
                   ("ucm", "cross_modal_adapter"): pytest.approx(53.35, abs=0.005)}

    result = dict(dataset="rsitmd", method="adaptformer", loss="hmmc", seed=2, params=1000,
                  metrics={k: 30.0 for k in METRICS})
    lines = table.markdown(table.summarise([result]), total_params=10_000).splitlines()
    assert lines[2].startswith("| rsitmd | AdaptFormer | hmmc | 1,000 (10.00%; paper 0.17M) |")
    assert lines[2].endswith("| 30.00 (34.81*, -4.81) |")
    assert lines[4] == "* rsitmd AdaptFormer: the paper prints mR 34.81; the mean of its six recalls is 34.51."


def test_readme_results_table_is_table_paper():
    """The README's copy of the paper's numbers says what table.PAPER and table.PAPER_PARAMS say, row for row."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        section = f.read().split("## The paper's results", 1)[1].split("\n## ", 1)[0]
    keys = {**{name: m for m, name in table.NAMES.items()}, table.PE_RSITR: "mrs"}
    rows, params, marked = {}, {}, set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("| ") or cells[0] in ("dataset", "---"):
            continue
        dataset, method = cells[0].lower(), keys[cells[1]]
        rows.setdefault(dataset, {})[method] = tuple(float(c.rstrip("*")) for c in cells[3:])
        params.setdefault(method, set()).add(cells[2])
        marked |= {(dataset, method)} if cells[-1].endswith("*") else set()
    assert rows == table.PAPER and list(rows["ucm"]) == list(table.PAPER["ucm"])
    assert params == {m: {count} for m, count in table.PAPER_PARAMS.items()}
    assert marked == {("rsitmd", "adaptformer"), ("ucm", "cross_modal_adapter")}
