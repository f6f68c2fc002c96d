"""clip_min.tokenizer against OpenAI's reference tokenizer (PyPI clip-anytorch) on a broad corpus."""
import gzip
import hashlib
import random
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
    import clip as openai_clip
    from clip.simple_tokenizer import SimpleTokenizer

from clip_min import tokenizer as T

MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

CORPUS = [
    # remote-sensing captions, RSITMD / RSICD / UCM style
    "there are 3 white planes parked near the terminal.",
    "Many buildings and green trees are around a playground .",
    "a baseball field is surrounded by some green trees and a road",
    "Two small boats are moored at the harbor, near 12 storage tanks!",
    "An industrial area with many factories ; several roads go through it .",
    "it's a dense residential area where they're building; we've seen i'm he'll she'd",
    "THE RUNWAY IS VERY LONG AND STRAIGHT",
    # punctuation and digits
    "Hello, world!!! ... ??? (a) [b] {c} <d> \"quoted\" 'single' `tick` ~tilde~ @#$%^&*_+=|\\/",
    "1234567890 3.14159 1,000,000 -42 +7 1e-5 0x1F 50% #1",
    "a--b---c ... --- ,,, ;;; ::: !!?? ''' \"\"",
    # accents, other scripts, emoji
    "naïve café résumé façade coöperate Ångström Ærø Øresund straße İstanbul",
    "Ελληνικά Русский текст עברית العربية हिन्दी ไทย",
    "中文的遥感图像 日本語のテキスト 한국어 텍스트",
    "emoji 🚀🛰️🌍 🏳️‍🌈 👨‍👩‍👧‍👦 ✈️ 🙂🙂🙂",
    # HTML entities, once and twice escaped
    "<b>markup</b> stops ftfy unescaping: &amp;amp; &amp;lt; &amp;#39; &amp;amp;amp; &lt;i&gt;",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; don&#39;t &quot;x&quot; &amp;amp; &#x27;y&#x27; &nbsp;z",
    # mojibake that ftfy repairs
    "cafÃ© Ã©tÃ© naÃ¯ve â€œquotedâ€\x9d donâ€™t",
    # special-token strings typed by a user, and odd whitespace / control characters
    "<|startoftext|> a <|endoftext|> <|ENDOFTEXT|>",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2028line sep\u3000ideographic\x1cfile sep \u200bzero-width",
    "'ſ ﬁ ligature Ｆｕｌｌｗｉｄｔｈ ½ ² ⅷ",
    # empty and whitespace-only
    "",
    " ",
    " \t\n  \r ",
]


def random_corpus(n=200, seed=0):
    """Random strings over a pool mixing ASCII, Latin-1, combining marks, CJK, emoji, entities and spaces."""
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()[]&#<>|/\\")
            + list("éèàçñøåüßÉÀ\u0301\u0308 \t\n\u00a0") + list("中国遥感图像飞机场") + list("🚀🌍✈️🙂")
            + ["&amp;", "&lt;", "&#39;", "'s", "'ll", "Ã©", "<|endoftext|>", "  "])
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer()


def test_merges_file_is_the_released_one():
    with open(T.MERGES_PATH, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == MERGES_SHA256


def test_vocabulary_equals_reference(reference):
    tokenizer = T.default_tokenizer()
    assert len(tokenizer.encoder) == T.VOCAB_SIZE == 49408
    assert tokenizer.encoder == reference.encoder
    assert (T.START_TOKEN, T.END_TOKEN, T.PAD_TOKEN) == (49406, 49407, 0)
    assert reference.encoder["<|startoftext|>"] == T.START_TOKEN and reference.encoder["<|endoftext|>"] == T.END_TOKEN
    assert T.default_tokenizer() is tokenizer  # merges are loaded once


@pytest.mark.parametrize("corpus", ["fixed", "random"])
def test_ids_equal_reference(corpus):
    texts = CORPUS if corpus == "fixed" else random_corpus()
    ours = T.tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, openai_clip.tokenize(texts))


def test_encode_and_decode_equal_reference(reference):
    tokenizer = T.default_tokenizer()
    for text in CORPUS + random_corpus(50, seed=1):
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids), text


def test_empty_text_is_start_end_padding():
    row = T.tokenize("")[0].tolist()
    assert row == [T.START_TOKEN, T.END_TOKEN] + [0] * 75
    assert torch.equal(T.tokenize(" \n\t "), T.tokenize(""))


def test_str_and_list_input():
    text = CORPUS[0]
    assert torch.equal(T.tokenize(text), T.tokenize([text]))
    assert torch.equal(T.tokenize(text), openai_clip.tokenize(text))
    assert T.tokenize([]).shape == (0, 77)
    assert torch.equal(T.tokenize(CORPUS[:3])[1], T.tokenize(CORPUS[1])[0])


@pytest.mark.parametrize("context_length", [8, 16, 100])
def test_custom_context_length(context_length):
    texts = CORPUS[:6]
    ours = T.tokenize(texts, context_length=context_length, truncate=True)
    assert ours.shape == (len(texts), context_length)
    assert torch.equal(ours, openai_clip.tokenize(texts, context_length=context_length, truncate=True))


def test_too_long_text():
    long_text = " ".join(["many green trees are planted around the large white storage tanks"] * 12)
    n_tokens = len(T.default_tokenizer().encode(long_text)) + 2
    assert n_tokens > 77
    with pytest.raises(RuntimeError):  # the reference refuses it too
        openai_clip.tokenize(long_text)
    with pytest.raises(ValueError, match=f"{n_tokens} tokens") as error:
        T.tokenize(["short", long_text])
    assert "many green trees" in str(error.value) and len(str(error.value)) < 250  # names the text, shortened

    ours = T.tokenize(["short", long_text], truncate=True)
    assert torch.equal(ours, openai_clip.tokenize(["short", long_text], truncate=True))
    assert ours[1, -1] == T.END_TOKEN and ours[1, 0] == T.START_TOKEN and (ours[1] != 0).all()

    exactly_full = " ".join(["tree"] * 75)  # 75 words + start + end = 77: fits, no error
    assert torch.equal(T.tokenize(exactly_full), openai_clip.tokenize(exactly_full))
    assert T.tokenize(exactly_full)[0, -1] == T.END_TOKEN
    with pytest.raises(ValueError):
        T.tokenize(exactly_full + " tree")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        T.tokenize(42)
    with pytest.raises(TypeError):
        T.tokenize(["ok", None])
    with pytest.raises(ValueError, match="context_length"):
        T.tokenize("x", context_length=1)
    with pytest.raises(FileNotFoundError, match="nothing.txt.gz"):
        T.BPETokenizer(str(tmp_path / "nothing.txt.gz"))
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="plain.txt.gz"):
        T.BPETokenizer(str(not_gzip))
    truncated = tmp_path / "short.txt.gz"
    with gzip.open(truncated, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="short.txt.gz"):
        T.BPETokenizer(str(truncated))
