"""CLIP's byte-level BPE tokenizer: text -> the exact token ids OpenAI's CLIP text encoder expects."""
import functools
import gzip
import html
import os

import ftfy
import regex
import torch

MERGES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 256 bytes, 256 word-final bytes, the merges, 2 special tokens
START_TOKEN = VOCAB_SIZE - 2  # <|startoftext|>
END_TOKEN = VOCAB_SIZE - 1  # <|endoftext|>; the highest id, which is where the text feature is read
PAD_TOKEN = 0
SPECIAL_TOKENS = {"<|startoftext|>": START_TOKEN, "<|endoftext|>": END_TOKEN}

# Words before BPE: special tokens, contractions, runs of letters, single digits, runs of other non-space.
# IGNORECASE as in the original: after lower() it still matters for a few characters, e.g. "'ſ" matches 's.
WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)


def byte_to_unicode():
    """Byte -> printable character, so BPE never sees whitespace or control characters; printable Latin-1
    bytes stand for themselves, the rest move to chr(256 + k). Dict order = order of the first 256 ids."""
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    hidden = [b for b in range(256) if b not in visible]
    mapping = {b: chr(b) for b in visible}
    mapping.update({b: chr(256 + k) for k, b in enumerate(hidden)})
    return mapping


def clean_text(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))  # twice: captions scraped from the web are often double-escaped
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


class BPETokenizer:
    def __init__(self, merges_path=MERGES_PATH):
        if not os.path.isfile(merges_path):
            raise FileNotFoundError(f"BPE merges file not found: {merges_path}")
        try:
            with gzip.open(merges_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"cannot read BPE merges file {merges_path} (expected gzip'd UTF-8 text): {e}") from e
        merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_path} does not hold {NUM_MERGES} merges of two symbols each, one per line")
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder = vocab
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.word_to_ids = functools.lru_cache(maxsize=100_000)(self._word_to_ids)

    def _word_to_ids(self, word):
        """BPE on one pre-tokenized word: repeatedly join the adjacent pair that was merged earliest in
        training; '</w>' marks the word's last symbol."""
        if word in SPECIAL_TOKENS:
            return (SPECIAL_TOKENS[word],)
        chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        parts = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts[:-1], parts[1:]), key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            joined, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        return tuple(self.encoder[p] for p in parts)

    def encode(self, text):
        """Token ids of `text`, without start/end tokens or padding."""
        return [i for word in WORD_PATTERN.findall(clean_text(text)) for i in self.word_to_ids(word)]

    def decode(self, ids):
        """Text of token ids (cleaned and lower-cased as encode saw it); word ends become spaces."""
        data = bytearray(self.byte_decoder[c] for i in ids for c in self.decoder[i])
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    return BPETokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """Tokenizes a string or a list of strings -> LongTensor [N, context_length]: start token, BPE ids,
    end token, zero padding. Text longer than context_length is an error unless truncate=True, which
    cuts it and keeps the end token last (the text encoder reads its feature at the end token)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenize expects a str or a list of str, got {type(texts).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    tokenizer = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [START_TOKEN] + tokenizer.encode(text) + [END_TOKEN]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(f"text {shown!r} is {len(ids)} tokens long (with start and end tokens), more "
                                 f"than context_length={context_length}; pass truncate=True to cut it")
            ids = ids[:context_length - 1] + [END_TOKEN]
        result[row, :len(ids)] = torch.tensor(ids)
    return result


def trim(tokens):
    """tokens [N, context] cut after the batch's last end token (the end token has the highest id).

    Exact for CLIP's text encoder: its attention is causal and its feature is read at the end token, so no output
    it gives ever sees the padding after that token. Short captions then cost their length, not 77 tokens.
    """
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
