"""Archives of image-caption pairs: open_clip's CSV/TSV, any number of captions per image through load_split and
training, every bad input's message, the decode cache on disk, and the dataset report (python data.py)."""
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import clip_min
import data
import evaluate
import table
import train
from support import released
from helpers import REPO, MICRO, write_precomp



def write_image(path, value, size=20):
    """A solid grey image whose value names it (value k: image k)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size + 3, 3), value, np.uint8)).save(path)


def write_csv(path, rows, header=("filepath", "title"), separator=","):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=separator)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def archive(tmp_path, counts, split=None, name="pairs.csv"):
    """An archive of len(counts) images, image k with counts[k] captions "image k caption c", rows interleaved (the
    captions of one image are not adjacent); optional split labels per image."""
    rows = []
    for c in range(max(counts)):
        for k, n in enumerate(counts):
            if c < n:
                rows.append([f"images/{k}.png", f"image {k} caption {c}"] + ([split[k]] if split else []))
    for k in range(len(counts)):
        write_image(tmp_path / "images" / f"{k}.png", 3 * k)
    header = ("filepath", "title", "split") if split else ("filepath", "title")
    return write_csv(tmp_path / name, rows, header, "\t" if name.endswith(".tsv") else ",")


def names(split):
    return [os.path.basename(p) for p in split.image_paths]


# ---------------------------------------------------------------- reading


def test_csv_quotes_commas_multiline_non_adjacent_rows_and_paths(tmp_path):
    write_image(tmp_path / "sub" / "a.png", 0)
    write_image(tmp_path / "elsewhere" / "b.png", 1)
    absolute = str(tmp_path / "elsewhere" / "b.png")
    rows = [["sub/a.png", 'a "quoted" caption, with commas'], [absolute, "b one"],
            ["./sub/a.png", "a second\nline"], ["sub/../sub/a.png", "a three"], [absolute, "b two"]]
    path = write_csv(tmp_path / "pairs.csv", rows + [[f"img{k}.png", f"filler {k}"] for k in range(8)])
    for k in range(8):
        write_image(tmp_path / f"img{k}.png", 10 + k)
    parts = {p: data.load_split(path, None, p) for p in ("trainval", "test")}
    every = parts["trainval"].image_paths + parts["test"].image_paths
    assert sorted(every) == sorted([str(tmp_path / "sub" / "a.png"), absolute] + [str(tmp_path / f"img{k}.png")
                                                                                  for k in range(8)])
    for split in parts.values():
        for image, caps in ((str(tmp_path / "sub" / "a.png"), ['a "quoted" caption, with commas', "a second\nline",
                                                                "a three"]), (absolute, ["b one", "b two"])):
            if image in split.image_paths:
                i = split.image_paths.index(image)
                assert [c for c, o in zip(split.captions, split.image_of_caption) if o == i] == caps


def test_csv_without_split_column_draws_val_with_the_seed_and_test_with_a_fixed_one(tmp_path, capsys):
    counts = [1 + k % 3 for k in range(30)]
    path = archive(tmp_path, counts)
    parts = {p: data.load_split(path, None, p, seed=2) for p in ("train", "val", "trainval", "test")}
    assert "has no test rows: the test split is 6 of its images, drawn with the fixed seed" in capsys.readouterr().out
    order = [f"{k}.png" for k in range(30)]  # first-appearance order
    test = [order[i] for i in released.released_split(30, data.TEST_SEED, "val")]
    rest = [order[i] for i in released.released_split(30, data.TEST_SEED, "train")]
    assert names(parts["test"]) == test
    assert names(parts["val"]) == [rest[i] for i in released.released_split(len(rest), 2, "val")]
    assert sorted(names(parts["train"]) + names(parts["val"])) == sorted(rest) == sorted(names(parts["trainval"]))
    assert names(data.load_split(path, None, "test", seed=5)) == test  # the test split never moves with the seed
    assert names(data.load_split(path, None, "val", seed=5)) != names(parts["val"])
    for split in parts.values():  # each caption with its own image, however many it has
        assert len(split.captions) == sum(counts[int(n[:-4])] for n in names(split))
        for caption, image in zip(split.captions, split.image_of_caption):
            assert caption.startswith(f"image {names(split)[image][:-4]} ")


def test_csv_split_column(tmp_path, capsys):
    labels = ["train", "val", "test", "train", "train", "test", "val", "train"]
    path = archive(tmp_path, [2, 1, 3, 1, 2, 1, 1, 4], split=labels)
    for part in ("train", "val", "test"):
        assert names(data.load_split(path, None, part)) == [f"{k}.png" for k, s in enumerate(labels) if s == part]
    assert "no test rows" not in capsys.readouterr().out
    no_val = archive(tmp_path, [1] * 10, split=["train"] * 8 + ["test"] * 2, name="noval.csv")
    train = [f"{k}.png" for k in range(8)]
    assert names(data.load_split(no_val, None, "val", seed=3)) == [train[i] for i in released.released_split(8, 3, "val")]
    assert names(data.load_split(no_val, None, "test")) == ["8.png", "9.png"]


def test_tsv_other_columns_and_separator(tmp_path):
    write_image(tmp_path / "x.png", 0)
    tsv = write_csv(tmp_path / "pairs.tsv", [["x.png", "tab, separated", "test"]], ("image", "text", "split"), "\t")
    split = data.load_split(tsv, None, "test", csv=data.CsvOptions(img_key="image", caption_key="text"))
    assert split.captions == ["tab, separated"] and names(split) == ["x.png"]
    semi = write_csv(tmp_path / "semi.csv", [["x.png", "semi, colon", "test"]], separator=";",
                     header=("filepath", "title", "split"))
    assert data.load_split(semi, None, "test", csv=data.CsvOptions(separator=";")).captions == ["semi, colon"]
    args = train.parse_args(["--dataset", semi, "--csv-separator", "\\t", "--csv-img-key", "image"])
    assert data.csv_options(args) == data.CsvOptions(img_key="image", separator="\t")
    assert data.archive_argv(args) == ["--csv-img-key", "image", "--csv-separator", "\\t"]
    assert args.out == os.path.join("runs", "semi-mrs-hmmc")


# ---------------------------------------------------------------- every bad input names the file and the line


def bad_csv(tmp_path, text):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "empty.png").touch()
    path = tmp_path / "bad.csv"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, error, message", [
    ("image,caption\na.png,x\n", ValueError, r"bad.csv: no column 'filepath' \(columns found: 'image', 'caption'"),
    ("filepath,title\na.png,x\na.png,  \n", ValueError, r"bad.csv line 3: an empty caption"),
    ("filepath,title\na.png,x\n,y\n", ValueError, r"bad.csv line 3: an empty image path"),
    ("filepath,title\na.png,x\nmissing.png,y\n", FileNotFoundError, r"bad.csv line 3: image .*missing.png not found"),
    ("filepath,title\nempty.png,x\n", ValueError, r"bad.csv line 2: image .*empty.png is an empty file \(0 bytes\)"),
    ("filepath,title\na.png,x\na.png,caf\xe9\n".encode("latin-1"), ValueError, r"bad.csv line 3: not UTF-8"),
    ("filepath,title,split\na.png,x,train\na.png,y,tset\n", ValueError, r"bad.csv line 3: the split 'tset'"),
    ("filepath,title,split\na.png,x,train\na.png,y,test\n", ValueError,
     r"bad.csv line 3: image .*a.png is in split 'test' here but 'train' at line 2"),
    ("filepath,title\na.png,x,extra\n", ValueError, r"bad.csv line 2: 3 fields, the header has 2"),
    ("filepath,title\n", ValueError, r"bad.csv holds no rows"),
], ids=["column", "empty-caption", "empty-path", "missing-image", "zero-byte", "not-utf8", "split-value",
        "two-splits", "fields", "no-rows"])
def test_bad_csv_errors(tmp_path, text, error, message):
    path = bad_csv(tmp_path, text)
    with pytest.raises(error, match=message):
        data.load_split(path, None, "test")


def test_multiline_caption_error_names_the_rows_first_line(tmp_path):
    path = bad_csv(tmp_path, 'filepath,title\na.png,"two\nlines"\na.png,\n')
    with pytest.raises(ValueError, match="bad.csv line 4: an empty caption"):
        data.load_split(path, None, "test")


@pytest.mark.parametrize("change, message", [
    (lambda caps: caps[:-3], r"test_caps.txt has 7 lines .*expected 10 \(one caption per filename line\); it is 3 "
                             r"line\(s\) short"),
    (lambda caps: caps + [""], r"test_caps.txt has 11 lines .*its last 1 line\(s\), from line 11, are blank"),
], ids=["short", "trailing-blank"])
def test_precomp_caption_file_short_or_with_a_trailing_blank_line(tmp_path, change, message):
    folder = write_precomp(tmp_path, "fake", ["a.png"], ["b.png", "c.png"])
    caps = (folder / "test_caps.txt").read_text().splitlines()
    (folder / "test_caps.txt").write_text("".join(c + "\n" for c in change(caps)))
    with pytest.raises(ValueError, match=message):
        data.load_split("fake", str(tmp_path), "test")


def test_precomp_names_file_with_a_trailing_blank_line_and_captions_not_utf8(tmp_path):
    folder = write_precomp(tmp_path, "fake", ["a.png"], ["b.png"])
    (folder / "train_filename.txt").write_text("a.png\n\n")
    with pytest.raises(ValueError, match=r"train_filename.txt line 2: blank line\(s\) at the end"):
        data.load_split("fake", str(tmp_path), "train")
    (folder / "test_caps.txt").write_bytes(b"one\ntwo\nthr\xffee\nfour\nfive\n")
    with pytest.raises(ValueError, match=r"test_caps.txt line 3: not UTF-8 \(byte 0xff at offset 11\)"):
        data.load_split("fake", str(tmp_path), "test")


@pytest.mark.parametrize("text, message", [
    ('{"images": [\n{"filename": "a.png",, }]}', r"dataset_kp.json line 2 column 22: not valid JSON"),
    ('[1, 2]', r"dataset_kp.json is not a Karpathy-style caption file: no top-level \"images\" list"),
    ('{"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": "x"}]}, {"filename": "b.png"}]}',
     r"images\[1\] has no 'split' string"),
    ('{"images": [{"filename": "a.png", "split": "dev", "sentences": []}]}', r"images\[0\] has the split 'dev'"),
    ('{"images": [{"filename": "a.png", "split": "test", "sentences": [{"tokens": []}]}]}',
     r"images\[0\] sentence 0 has no 'raw' string"),
], ids=["syntax", "top-level", "key", "split", "sentence"])
def test_malformed_karpathy_json(tmp_path, text, message):
    (tmp_path / "dataset_kp.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        data.load_split("kp", str(tmp_path), "test")


@pytest.mark.parametrize("content", [b"", b"not an image", "truncated"], ids=["zero-byte", "garbage", "truncated"])
def test_unreadable_images_are_named_when_decoded(tmp_path, content):
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    bad = tmp_path / "bad.png"
    bad.write_bytes(whole.read_bytes()[:200] if content == "truncated" else content)
    for cache in (False, str(tmp_path / "cache")):
        with pytest.raises(ValueError, match=r"cannot decode image .*bad.png"):
            data.load_images([str(whole), str(bad)], 32, workers=1, cache=cache)
    assert not os.listdir(tmp_path / "cache")  # nothing half-written is left behind


def test_duplicate_rows_are_dropped_and_counted(tmp_path, capsys):
    """A row that repeats an image's caption word for word would count twice in training and in the recalls: it is
    dropped, counted as duplicate_rows and said, here for each split that holds such an image."""
    path = archive(tmp_path, [2, 1, 1, 2, 1, 1, 1, 1, 1, 1])
    with open(path, "a") as f:
        f.write("images/0.png,image 0 caption 1\nimages/0.png,image 0 caption 1\nimages/3.png,image 3 caption 0\n")
    splits = [data.load_split(path, None, part) for part in ("trainval", "test")]
    assert sum(len(s.captions) for s in splits) == 12 and sum(s.anomalies["duplicate_rows"] for s in splits) == 3
    for split in splits:
        for i in range(len(split.image_paths)):  # every caption once per image
            captions = [c for c, o in zip(split.captions, split.image_of_caption) if o == i]
            assert len(captions) == len(set(captions))
    assert "duplicate_rows" in capsys.readouterr().out
    data.main([path])
    assert "  dropped or repaired: duplicate_rows" in capsys.readouterr().out


def test_report_decodes_every_image_or_says_it_read_headers_only(tmp_path, capsys):
    """The report decodes every image as training does, so a truncated one fails it, with the archive's line; with
    --headers-only it passes and says that it read headers only. The note on a drawn test split comes once."""
    path = archive(tmp_path, [1] * 6)  # no split column: the test split is drawn
    png = tmp_path / "images" / "4.png"
    png.write_bytes(png.read_bytes()[:60])  # the header whole, the pixels cut short
    with pytest.raises(ValueError, match=r"pairs.csv line 6: cannot decode image .*4.png: .*truncated"):
        data.main([path])
    capsys.readouterr()
    data.main([path, "--headers-only"])
    out = capsys.readouterr().out
    assert out.count("has no test rows") == 1
    assert out.strip().splitlines()[-1].startswith("images: every header read, no pixels decoded (--headers-only)")


# ---------------------------------------------------------------- training pairs each caption with its own image


def test_training_pairs_each_caption_with_its_own_image(tmp_path, monkeypatch, exact_cpu):
    """1 to 3 captions per image, rows interleaved: every training pair's image, caption and image id agree."""
    counts = [1 + k % 3 for k in range(30)]
    path = archive(tmp_path, counts)
    torch.manual_seed(0)
    torch.save(clip_min.CLIP(MICRO).state_dict(), tmp_path / "clip.pt")
    seen, real_step = [], train.train_step
    tokenizer = clip_min.tokenizer.default_tokenizer()

    def step(encoder, optimizer, scaler, images, tokens, image_ids, args):
        for image, row, image_id in zip(images, tokens, image_ids.tolist()):
            grey = round(float(image[0, 0, 0] * 0.26862954 + 0.48145466) * 255)  # undo normalise: the image's value
            ids = [t for t in row.tolist() if t not in (0, 49406, 49407)]
            caption = tokenizer.decode(ids)  # "image 2 9 caption 0": CLIP's tokenizer splits numbers into digits
            seen.append((grey // 3, int("".join(caption.split("caption")[0].split()[1:])), image_id))
        return real_step(encoder, optimizer, scaler, images, tokens, image_ids, args)

    monkeypatch.setattr(train, "train_step", step)
    train.main(["--dataset", path, "--clip", str(tmp_path / "clip.pt"), "--workers", "1", "--batch-size", "4",
                "--amp", "off", "--epochs", "1", "--mask-same-image", "--out", str(tmp_path / "run")])
    split = data.load_split(path, None, "train")
    index = {int(n[:-4]): i for i, n in enumerate(names(split))}  # file number -> index in the training split
    assert len(seen) == 4 * (len(split.captions) // 4) > 20
    for image_number, caption_number, image_id in seen:
        assert image_number == caption_number and index[image_number] == image_id
    recorded = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert recorded["test"]["images"] == data.load_split(path, None, "test").image_paths
    # evaluate.py reads the archive the run names, its test split scored as train.py scored it
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--amp", "off", "--workers", "1"])
    scores = json.loads((tmp_path / "run" / "test_eval.json").read_text())
    assert scores["mR"] == pytest.approx(json.loads((tmp_path / "run" / "test.json").read_text())["mR"], abs=1e-9)


def test_table_runs_an_archive_with_its_options(tmp_path):
    path = write_csv(tmp_path / "mine.csv", [["a.png", "x"]], ("image", "title"))
    for k in range(10):
        with open(path, "a") as f:
            f.write(f"{k}.png,caption {k}\n")
        write_image(tmp_path / f"{k}.png", k)
    write_image(tmp_path / "a.png", 0)
    args, forwarded = table.parse_args(["--datasets", path, "--csv-img-key", "image", "--methods", "zeroshot",
                                        "--no-decode-cache"])
    datasets, skipped = table.find_datasets(args.datasets, args.data_root, data.csv_options(args))
    assert not skipped and datasets[0][0] == path
    [cell] = table.plan(args, forwarded, datasets)
    assert cell.out == os.path.join(args.out, "mine", "zeroshot-hmmc-s2")
    assert cell.argv[cell.argv.index("--csv-img-key") + 1] == "image" and "--no-decode-cache" in cell.argv
    assert "no_decode_cache" not in cell.settings and cell.settings["csv_img_key"] == "image"


# ---------------------------------------------------------------- the decode cache


def images_on_disk(tmp_path, n=6):
    paths = []
    for k in range(n):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (30 + k, 41, 3), dtype=np.uint8)).save(
            tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    return paths


def counting_decodes(monkeypatch):
    calls, real = [], data.cache_images

    def counted(paths, *a, **k):
        calls.append(len(paths))
        return real(paths, *a, **k)
    monkeypatch.setattr(data, "cache_images", counted)
    return calls


def mapping_of(address):
    """The file whose memory mapping holds `address` in this process (Linux's /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else None


def test_cache_is_decoded_once_then_memory_mapped(tmp_path, monkeypatch):
    paths, cache = images_on_disk(tmp_path), str(tmp_path / "cache")
    expected = data.cache_images(paths, 32, workers=1)
    calls = counting_decodes(monkeypatch)
    first = data.load_images(paths, 32, workers=2, cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch.from_numpy
        second = data.load_images(paths, 32, workers=2, cache=cache)
        batch = second[torch.tensor([4, 0, 4])]  # the training loop's indexing
    assert calls == [6] and torch.equal(first, expected) and torch.equal(second, expected)
    assert torch.equal(batch, expected[[4, 0, 4]])
    [file] = os.listdir(cache)
    assert file.startswith("6x32-") and file.endswith(".npy")
    mapped = np.load(os.path.join(cache, file), mmap_mode="r")
    assert mapping_of(second.data_ptr()) == os.path.join(cache, file)  # the file's pages, not a copy in memory
    second[0, 0, 0, 0] = 255 - int(second[0, 0, 0, 0])  # copy-on-write: the file never changes
    assert torch.equal(torch.from_numpy(np.array(mapped)), expected)
    data.load_images(paths, 64, workers=1, cache=cache)  # another resolution: another file
    assert len(os.listdir(cache)) == 2 and calls == [6, 6]


@pytest.mark.parametrize("change", ["rewrite", "rewrite-same-mtime", "add", "remove", "touch"])
def test_cache_follows_changed_added_and_removed_files(tmp_path, monkeypatch, change):
    paths, cache = images_on_disk(tmp_path), str(tmp_path / "cache")
    data.load_images(paths, 32, workers=1, cache=cache)
    calls = counting_decodes(monkeypatch)
    if change == "rewrite":  # new pixels, the same size on disk is not required
        Image.fromarray(np.zeros((30, 41, 3), np.uint8)).save(paths[2])
    elif change == "rewrite-same-mtime":  # another size, the modification time set back (a copy that keeps times)
        before = os.stat(paths[2])
        Image.fromarray(np.zeros((30, 41, 3), np.uint8)).save(paths[2])
        os.utime(paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(paths[2]).st_size != before.st_size and os.stat(paths[2]).st_mtime_ns == before.st_mtime_ns
    elif change == "touch":
        os.utime(paths[2], ns=(os.stat(paths[2]).st_atime_ns, os.stat(paths[2]).st_mtime_ns + 10 ** 9))
    elif change == "add":
        (tmp_path / "more").mkdir()
        paths = paths + images_on_disk(tmp_path / "more", 1)
    else:
        paths = paths[:-1]
    got = data.load_images(paths, 32, workers=1, cache=cache)
    assert calls == [len(paths)] and len(os.listdir(cache)) == 2
    assert torch.equal(got, data.cache_images(paths, 32, workers=1))


def test_half_written_or_damaged_cache_files_are_never_read(tmp_path, monkeypatch):
    paths, cache = images_on_disk(tmp_path), tmp_path / "cache"
    expected = data.cache_images(paths, 32, workers=1)
    name = data._cache_name(paths, 32)
    cache.mkdir()
    (cache / f"{name}.999-deadbeef.tmp").write_bytes(b"\x93NUMPY half a file")  # a run killed while writing
    calls = counting_decodes(monkeypatch)
    assert torch.equal(data.load_images(paths, 32, workers=1, cache=str(cache)), expected) and calls == [6]
    (cache / name).write_bytes((cache / name).read_bytes()[:1000])  # a damaged file: decoded again, replaced
    assert torch.equal(data.load_images(paths, 32, workers=1, cache=str(cache)), expected) and calls == [6, 6]

    def killed(*a, **k):
        raise KeyboardInterrupt
    os.remove(cache / name)
    monkeypatch.setattr(data, "read_image", killed)
    with pytest.raises(KeyboardInterrupt):
        data.load_images(paths, 32, workers=1, cache=str(cache))
    assert sorted(os.listdir(cache)) == [f"{name}.999-deadbeef.tmp"]  # no final file, its own tmp removed


def test_two_writers_at_once(tmp_path, monkeypatch):
    paths, cache = images_on_disk(tmp_path), str(tmp_path / "cache")
    expected, barrier, real = data.cache_images(paths, 32, workers=1), threading.Barrier(2, timeout=30), data.cache_images

    def together(*a, **k):  # both writers are mid-write before either renames its file
        result = real(*a, **k)
        barrier.wait()
        return result
    monkeypatch.setattr(data, "cache_images", together)
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, data.load_images(paths, 32, 1, cache)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)
    assert os.listdir(cache) == [data._cache_name(paths, 32)]


def test_cache_folder_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DECODE_CACHE_ENV)
    monkeypatch.setattr(data, "DEMO_ROOT", str(tmp_path / "root"))
    assert data.decode_cache_folder() == str(tmp_path / "root" / "decoded")
    monkeypatch.setenv(data.DECODE_CACHE_ENV, str(tmp_path / "env"))
    assert data.decode_cache_folder() == str(tmp_path / "env")
    assert data.decode_cache_folder(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert data.decode_cache_folder(False) is None
    monkeypatch.setenv(data.DECODE_CACHE_ENV, "off")
    assert data.decode_cache_folder() is None
    assert data.decode_cache_choice(train.parse_args(["--no-decode-cache"])) is False
    assert data.decode_cache_choice(train.parse_args(["--decode-cache", "x"])) == "x"
    paths = images_on_disk(tmp_path, 2)
    assert torch.equal(data.load_images(paths, 32, 1, cache=None), data.cache_images(paths, 32, 1))
    assert not os.path.exists(tmp_path / "root")


# ---------------------------------------------------------------- the report


def test_report(tmp_path, capsys):
    counts = [1, 2, 2, 3, 5, 1, 1, 4, 2, 2]
    path = archive(tmp_path, counts, split=["train"] * 6 + ["val", "test", "test", "test"])
    rows = (tmp_path / "pairs.csv").read_text().splitlines()
    rows.append("images/8.png," + " ".join(["word"] * 80))  # cut by the 77-token context
    rows += ["images/8.png,a shared caption", "images/9.png,a shared caption", "images/7.png,a shared caption"]
    rows = [r + (",test" if r.count(",") == 1 else "") for r in rows]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    data.main([path])
    out = capsys.readouterr().out
    assert "train: 6 images, 14 captions" in out and "captions per image (captions: images): 1: 2, 2: 2, 3: 1, 5: 1" in out
    assert "test: 3 images, 12 captions" in out
    assert "captions longer than the 77-token context (cut): 1" in out
    assert "identical captions shared by several images (exact ties): 1 texts, 3 captions" in out
    assert "images in both training and test splits: 0" in out
    (tmp_path / "images" / "3.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"pairs.csv line 5: cannot decode image .*3.png"):
        data.main([path])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), str(tmp_path / "nothing.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: archive file not found: {tmp_path / 'nothing.csv'}"]
