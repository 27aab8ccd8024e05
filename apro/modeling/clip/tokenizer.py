"""CLIP's byte-level BPE tokenizer (lower-cased text, ``</w>`` marks the end of a word).

The vocabulary is read from disk, never downloaded:
- OpenAI's merges file (``bpe_simple_vocab_16e6.txt.gz``, or the same as plain text): one
  header line, then one merge ``"a b"`` per line. The vocabulary is then the 256 byte symbols,
  the same with ``</w>``, one symbol per merge (in merge order), ``<|startoftext|>`` and
  ``<|endoftext|>``; OpenAI's release keeps the first ``49152 - 256 - 2`` merges
  (``max_merges``), giving 49408 ids.
- A Hugging Face tokenizer folder: ``vocab.json`` (symbol -> id) and ``merges.txt``.

Text is cleaned by HTML unescaping, whitespace collapsing and lower-casing (OpenAI's code
also runs ``ftfy``; for plain prompts it changes nothing), split into words, numbers and
punctuation runs, and each piece is byte-encoded then merged by rank.
"""
from __future__ import annotations

import gzip
import html
import json
import os
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
OPENAI_MAX_MERGES = 49152 - 256 - 2

# Words (letters), single digits, runs of other non-space characters; contractions split off.
_PIECES = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
    re.IGNORECASE)


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters (GPT-2's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _read_lines(path: str) -> List[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """BPE tokenizer. Build with :meth:`from_merges` (OpenAI) or :meth:`from_folder` (HF).

    Args:
        encoder: symbol -> id; must contain :data:`SOT` and :data:`EOT`.
        merges: ordered merge pairs (rank = position).
    """

    def __init__(self, encoder: Dict[str, int], merges: Sequence[Tuple[str, str]]):
        for special in (SOT, EOT):
            if special not in encoder:
                raise ValueError(f"tokenizer vocabulary lacks the special token {special!r}")
        self.encoder = dict(encoder)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._cache = {SOT: SOT, EOT: EOT}

    @classmethod
    def from_merges(cls, path: str, max_merges: Optional[int] = OPENAI_MAX_MERGES) -> "SimpleTokenizer":
        """From OpenAI's merges file (``.txt`` or ``.txt.gz``; first line is a header)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocabulary: no such file {path!r}")
        lines = [l for l in _read_lines(path)[1:] if l.strip()]
        if max_merges is not None:
            lines = lines[:max_merges]
        merges = [_split_merge(l, path) for l in lines]
        symbols = list(bytes_to_unicode().values())
        symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({s: i for i, s in enumerate(symbols)}, merges)

    @classmethod
    def from_folder(cls, folder: str) -> "SimpleTokenizer":
        """From ``vocab.json`` + ``merges.txt`` (a Hugging Face CLIP tokenizer folder)."""
        folder = os.fspath(folder)
        vocab, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for p in (vocab, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"vocabulary: {folder!r} has no {os.path.basename(p)}")
        with open(vocab, encoding="utf-8") as f:
            encoder = json.load(f)
        lines = [l for l in _read_lines(merges_path) if l.strip() and not l.startswith("#version")]
        return cls(encoder, [_split_merge(l, merges_path) for l in lines])

    def bpe(self, piece: str) -> List[str]:
        """Symbols of one byte-encoded piece after merging pairs in rank order."""
        if piece in self._cache:
            return self._cache[piece].split(" ")
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = " ".join(word)
        return word

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no start/end tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for piece in _PIECES.findall(_clean(text)):
            if piece in (SOT, EOT):
                ids.append(self.encoder[piece])
                continue
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for symbol in self.bpe(encoded):
                if symbol not in self.encoder:
                    raise ValueError(f"tokenizer: symbol {symbol!r} of {text!r} is not in the vocabulary")
                ids.append(self.encoder[symbol])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (start/end tokens kept as written)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        words = []
        for part in text.split("</w>"):
            if part in (SOT, EOT) or not part:
                words.append(part)
                continue
            data = bytearray(self.byte_decoder[c] for c in part if c in self.byte_decoder)
            words.append(data.decode("utf-8", errors="replace"))
        return " ".join(w for w in words if w).strip()

    def __call__(self, texts, context_length: int = 77, truncate: bool = False) -> torch.Tensor:
        """``(N, context_length)`` int64 ids: start, the text's tokens, end, zero padding.

        A text longer than the context raises ``ValueError`` unless ``truncate`` (then the
        last kept token is the end token, as OpenAI's ``clip.tokenize(truncate=True)``).
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text {text!r} has {len(ids)} tokens, more than the context "
                                     f"length {context_length}")
                ids = ids[:context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _split_merge(line: str, path: str) -> Tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"vocabulary {path!r}: merge line {line!r} is not two symbols")
    return parts[0], parts[1]


def load_tokenizer(path: str) -> SimpleTokenizer:
    """Tokenizer from a merges file (OpenAI) or a folder holding ``vocab.json`` + ``merges.txt``
    (Hugging Face) or ``bpe_simple_vocab_16e6.txt.gz``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return SimpleTokenizer.from_folder(path)
        for name in ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return SimpleTokenizer.from_merges(os.path.join(path, name))
        raise FileNotFoundError(f"vocabulary: {path!r} has neither vocab.json + merges.txt nor "
                                "bpe_simple_vocab_16e6.txt.gz; pass --vocab PATH")
    return SimpleTokenizer.from_merges(path)
