"""The BPE tokenizer on tiny vocabularies the tests write (OpenAI merges file and HF folder)."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from apro.modeling.clip.tokenizer import EOT, SOT, SimpleTokenizer, bytes_to_unicode, load_tokenizer

MERGES = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>", "a b", "b c</w>"]


def write_openai(path, merges=MERGES):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n")


def openai_id(symbol, merges=MERGES):
    """Id of a symbol in the OpenAI layout: 256 bytes, 256 bytes + </w>, merges, specials."""
    chars = list(bytes_to_unicode().values())
    if symbol in chars:
        return chars.index(symbol)
    if symbol.endswith("</w>") and symbol[:-4] in chars:
        return 256 + chars.index(symbol[:-4])
    joined = ["".join(m.split()) for m in merges]
    if symbol in joined:
        return 512 + joined.index(symbol)
    return {SOT: 512 + len(merges), EOT: 513 + len(merges)}[symbol]


def test_byte_table_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] != " "


def test_openai_merges_file(tmp_path):
    write_openai(tmp_path / "vocab.txt.gz")
    tok = load_tokenizer(str(tmp_path / "vocab.txt.gz"))
    assert len(tok.encoder) == 512 + len(MERGES) + 2
    assert tok.encode("Hello CAT") == [openai_id("hello</w>"), openai_id("cat</w>")]
    # merge ranks decide: "ab" (rank 6) before "bc</w>" (rank 7) on "abc"
    assert tok.bpe("abc") == ["ab", "c</w>"]
    # unmerged word: single byte symbols, the last one marked
    assert tok.encode("zq") == [openai_id("z"), openai_id("q</w>")]
    # punctuation and contractions are split off
    assert tok.encode("cat's!") == [openai_id("cat</w>"), openai_id("'"), openai_id("s</w>"), openai_id("!</w>")]
    assert tok.encode("a 42") == [openai_id("a</w>"), openai_id("4</w>"), openai_id("2</w>")]
    assert tok.decode(tok.encode("hello cat")) == "hello cat"


def test_rank_order_matters():
    chars = list(bytes_to_unicode().values())
    symbols = chars + [c + "</w>" for c in chars]
    for merges, expect in (([("a", "b"), ("b", "c</w>")], ["ab", "c</w>"]),
                           ([("b", "c</w>"), ("a", "b")], ["a", "bc</w>"])):
        enc = {s: i for i, s in enumerate(symbols + ["".join(m) for m in merges] + [SOT, EOT])}
        assert SimpleTokenizer(enc, merges).bpe("abc") == expect


def test_context_padding_and_truncation(tmp_path):
    write_openai(tmp_path / "bpe.txt.gz")
    tok = load_tokenizer(str(tmp_path / "bpe.txt.gz"))
    out = tok(["hello", "cat hello"], context_length=6)
    assert out.dtype == torch.long and out.shape == (2, 6)
    sot, eot = openai_id(SOT), openai_id(EOT)
    assert out[0].tolist() == [sot, openai_id("hello</w>"), eot, 0, 0, 0]
    assert out[1].tolist() == [sot, openai_id("cat</w>"), openai_id("hello</w>"), eot, 0, 0]
    assert int(out[1].argmax()) == 3  # the end token has the largest id: CLIP pools there
    with pytest.raises(ValueError, match="context length"):
        tok("hello cat hello cat hello", context_length=4)
    cut = tok("hello cat hello cat hello", context_length=4, truncate=True)
    assert cut[0].tolist() == [sot, openai_id("hello</w>"), openai_id("cat</w>"), eot]


def test_hugging_face_folder_gives_the_same_ids(tmp_path):
    write_openai(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    openai = load_tokenizer(str(tmp_path))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "vocab.json").write_text(json.dumps(openai.encoder))
    (hf / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = load_tokenizer(str(hf))
    for text in ("hello cat", "A cat's hello.", "abc 7"):
        assert tok.encode(text) == openai.encode(text)


def test_bad_vocabularies(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.txt").write_text("header\nonly-one-symbol\n")
    with pytest.raises(ValueError, match="not two symbols"):
        SimpleTokenizer.from_merges(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="special token"):
        SimpleTokenizer({"a": 0}, [])
    enc = {"a</w>": 0, SOT: 1, EOT: 2}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        SimpleTokenizer(enc, []).encode("b")
