"""Tests of the corpora, tokenizers, token cache and batches (data.py)."""

import hashlib
import sys

import numpy as np
import pytest
import tiktoken
import tiktoken.load  # the module whose download function the offline test replaces
import torch

import data
from conftest import SHARED

# ---------------------------------------------------------------------------------------------------- data

def test_byte_tokenizer_round_trips_text():
    """The default tokenizer has 256 ids and decodes back to exactly the text it encoded."""
    tok = data.get_tokenizer("bytes")
    text = "Tiny GPT — naïve café, 東京\n\ttabs and emoji 🙂"
    ids = tok.encode_ordinary(text)
    assert tok.n_vocab == 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.skipif(not (SHARED / "tiktoken_cache").is_dir(), reason="needs ../shared/tiktoken_cache (offline GPT-2 BPE)")
def test_gpt2_tokenizer_round_trips_text(monkeypatch):
    """--tokenizer gpt2 is the GPT-2 BPE (r50k_base), loaded from TIKTOKEN_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    tok = data.get_tokenizer("gpt2")
    text = "To be, or not to be: that is the question."
    assert tok.n_vocab == 50257 and tok.decode(tok.encode_ordinary(text)) == text
    assert data.token_dtype(tok.n_vocab) == np.uint16


def test_token_dtype_follows_vocabulary_size():
    """Token ids are stored in the smallest unsigned type that fits the vocabulary."""
    assert [data.token_dtype(v) for v in (256, 257, 65536, 100277)] == [np.uint8, np.uint16, np.uint16, np.uint32]


def test_split_is_deterministic_and_cached_as_memmap(tmp_path):
    """The last 10% of the tokens validate; loading twice gives the same split from the memmap cache."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)
    first = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    second = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint8
    assert (len(first.train), len(first.val)) == (900, 100)
    assert np.array_equal(first.val, second.val) and bytes(first.val[:10]) == b"abcdefghij"


def test_batches_are_next_token_pairs_at_random_offsets():
    """y is x shifted by one; different generator states give different windows."""
    stream = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(stream, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y)
    assert len(set(x[:, 0].tolist())) > 1


# The default corpus's tokens, whatever Python runs it: every figure in README.md and RESULTS.md trained on them.
PYTHON_REFERENCE_TOKENS = (466_273, "f1e2ef246caf4ec5c76a259cc03bb20e688dbda6")


def test_the_default_corpus_gives_the_same_tokens_on_every_python(tmp_path):
    """python-docs is a file of this repository, not the running Python's own reference (which changes with every
    Python release): its byte tokens, through the cache, are the pinned ones, on any Python."""
    tokens = data.load_dataset("python-docs", data.get_tokenizer("bytes"), block_size=64)
    ids = np.concatenate([tokens.train, tokens.val])
    assert (len(ids), hashlib.sha1(ids.tobytes()).hexdigest()) == PYTHON_REFERENCE_TOKENS
    assert (len(tokens.train), len(tokens.val)) == (419_646, 46_627)


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the frozen corpus is Python 3.11.7's reference")
def test_the_frozen_corpus_is_python_3_11_7s_reference():
    """Where it came from: on Python 3.11.7 the frozen file equals the reference shipped with it."""
    from pydoc_data.topics import topics
    assert data.load_text("python-docs") == "\n\n".join(topics[name] for name in sorted(topics))


def test_a_damaged_token_cache_is_rebuilt(tmp_path, capsys):
    """A cache file cut short (or otherwise changed) is noticed, said, and rebuilt: the run gets every token."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)
    whole = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    whole_train, whole_val = np.array(whole.train), np.array(whole.val)  # copies: the damage rewrites the mapped file
    del whole
    (cache,) = data.CACHE_DIR.glob(f"*{hashlib.sha1(corpus.read_bytes()).hexdigest()[:12]}*.bin")
    for damage in (lambda raw: raw[:100], lambda raw: raw[:-1] + b"x"):
        cache.write_bytes(damage(cache.read_bytes()))
        again = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
        assert "does not match its recorded size and checksum; rebuilding it" in capsys.readouterr().err
        assert np.array_equal(again.train, whole_train) and np.array_equal(again.val, whole_val)
        del again
    cache.with_suffix(".json").unlink()                       # a crash between the two writes leaves no record
    data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    assert "rebuilding it" in capsys.readouterr().err
    data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    assert capsys.readouterr().err == ""                      # whole again: read, not rebuilt


def test_unavailable_standard_encoding_names_tiktoken_cache_dir(tmp_path, monkeypatch):
    """Offline, a standard encoding fails with a message that says how to make it work."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(data.DataError, match="TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("cl100k_base")
