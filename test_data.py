"""Tests of the corpora, tokenizers, the held-out split, the token cache and batches (data.py)."""

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


def test_a_text_file_splits_into_whole_documents_deterministically(tmp_path):
    """A user's file: its paragraphs, merged into documents of at least 1/200 of the text, about a tenth held out
    whole; loading twice gives the same split; byte tokens are not cached (they take a fraction of a second)."""
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "iota"]
    corpus.write_text("".join(" ".join(rng.choice(words, 5 + i % 30)) + "\n\n" for i in range(400)))
    text = corpus.read_text()
    docs = data.documents(text, str(corpus))
    assert "".join(docs) == text and all(len(doc) >= len(text) / 200 for doc in docs[:-1])
    first = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    second = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=8)
    assert np.array_equal(first.val, second.val) and np.array_equal(first.train, second.train)
    assert 0.07 < len(first.val) / len(text) < 0.13
    held = [bytes(first.val[a:b]).decode() for a, b in zip(first.val_starts, [*first.val_starts[1:], len(first.val)])]
    assert all(doc in docs for doc in held)                     # whole documents
    assert not any(data.CACHE_DIR.glob("*")) if data.CACHE_DIR.exists() else True


def test_held_out_takes_about_a_tenth_spread_along_the_text():
    """The rule, on known sizes: equal documents give every tenth; it never holds out what would overshoot."""
    assert [i for i, take in enumerate(data.held_out([100] * 30)) if take] == [5, 15, 25]
    assert not data.held_out([1000] + [10] * 50)[0]             # a document that would overshoot stays in train
    sizes = list(np.random.default_rng(0).integers(100, 5000, 200))
    chosen = data.held_out(sizes)
    share = sum(s for s, c in zip(sizes, chosen) if c) / sum(sizes)
    assert abs(share - 0.1) < 0.01


def test_cut_repeats_cuts_whole_lines_that_share_a_passage():
    """A training line that shares 64 bytes with the held-out text goes whole; one sharing 63 stays; others stay."""
    shared = bytes(range(65, 65 + 64))                               # 64 bytes, A.. (no newline)
    val = b"held out: " + shared + b" end\n"
    train = b"keep this line\n" + b"xx" + shared + b"yy\n" + b"also#" + shared[:63] + b"!\n" + b"last\n"
    kept, cut = data.cut_repeats(train, val)
    assert kept == b"keep this line\n" + b"also#" + shared[:63] + b"!\n" + b"last\n"
    assert cut == len(b"xx" + shared + b"yy\n")
    assert data.shared_chunks(kept, val) == (0, 1) and data.shared_chunks(train, shared) == (1, 1)


def all_passages(raw: bytes, n: int = data.PASSAGE) -> set[bytes]:
    return {raw[i:i + n] for i in range(len(raw) - n + 1)}


def check_held_out(dataset) -> None:
    """No 64-byte passage of the validation text occurs in the training text, at any offset (checked with Python
    sets, apart from the hashes data.py uses), and the run's line says so."""
    train, val = bytes(dataset.train), bytes(dataset.val)
    assert not all_passages(val) & all_passages(train)
    assert " 0 of the " in dataset.about and "(0.0%)" in dataset.about


def test_the_python_reference_holds_out_whole_topics_and_nothing_of_them_trains():
    """The default split: 32 of the 79 topics validate (a 33rd is a copy of the "if" statement's, and goes), and
    no passage of theirs is left in the training text (before the cut, 271 of their 727 64-byte chunks were)."""
    dataset = data.load_dataset("python-docs", data.get_tokenizer("bytes"), block_size=64)
    assert len(data.documents(data.load_text("python-docs"), "python-docs")) == 79
    assert (len(dataset.train), len(dataset.val), len(dataset.val_starts)) == (394_676, 45_713, 32)
    check_held_out(dataset)
    titles = [bytes(dataset.val[s:s + 40]).split(b"\n")[0].decode() for s in dataset.val_starts]
    assert titles[:3] == ["Identifiers (Names)", "Literals", "Attribute references"]
    assert titles.count('The "if" statement') == 1


@pytest.mark.skipif(not (SHARED / "data" / "tinyshakespeare.txt").is_file(), reason="needs ../shared/data")
def test_tiny_shakespeare_holds_out_too():
    dataset = data.load_dataset(str(SHARED / "data" / "tinyshakespeare.txt"), data.get_tokenizer("bytes"), 64)
    check_held_out(dataset)
    assert 0.09 < len(dataset.val) / (len(dataset.val) + len(dataset.train)) < 0.11


def test_a_user_file_that_repeats_itself_holds_out(tmp_path):
    """A file whose paragraphs repeat: the repeats of held-out text are cut from training, and the run says so."""
    corpus = tmp_path / "repeats.txt"
    paragraphs = [f"Paragraph {i} says something of its own, at some length, number {i * 7919 % 1000}.\n" * 3
                  for i in range(60)]
    order = np.random.default_rng(0).permutation(300) % 60
    corpus.write_text("\n".join(paragraphs[i] for i in order))  # every paragraph five times, in a random order
    dataset = data.load_dataset(str(corpus), data.get_tokenizer("bytes"), block_size=16)
    check_held_out(dataset)
    assert "cut 0 bytes" not in dataset.about


def test_every_window_covers_each_token_once():
    """The final evaluation's windows: every token but the first is a target exactly once, in order."""
    tokens = np.arange(50, dtype=np.uint16)
    windows = data.every_window(tokens, 8)
    assert [x.shape for x, _ in windows] == [(6, 8), (1, 1)]
    targets = torch.cat([y.flatten() for _, y in windows])
    assert torch.equal(targets, torch.arange(1, 50))
    assert all(torch.equal(x + 1, y) for x, y in windows)
    assert [x.shape for x, _ in data.every_window(np.arange(49), 8)] == [(6, 8)]  # no rest


def test_batches_are_next_token_pairs_at_random_offsets():
    """y is x shifted by one; different generator states give different windows."""
    stream = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(stream, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y)
    assert len(set(x[:, 0].tolist())) > 1


# The default corpus's tokens, whatever Python runs it: every figure in README.md and RESULTS.md trained on them.
PYTHON_REFERENCE_TOKENS = (466_273, "f1e2ef246caf4ec5c76a259cc03bb20e688dbda6")


def test_the_default_corpus_gives_the_same_tokens_on_every_python():
    """python-docs is a file of this repository, not the running Python's own reference (which changes with every
    Python release): its byte tokens are the pinned ones, on any Python."""
    ids = np.array(data.get_tokenizer("bytes").encode_ordinary(data.load_text("python-docs")), dtype=np.uint8)
    assert (len(ids), hashlib.sha1(ids.tobytes()).hexdigest()) == PYTHON_REFERENCE_TOKENS


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the frozen corpus is Python 3.11.7's reference")
def test_the_frozen_corpus_is_python_3_11_7s_reference():
    """Where it came from: on Python 3.11.7 the frozen file equals the reference shipped with it."""
    from pydoc_data.topics import topics
    assert data.load_text("python-docs") == "\n\n".join(topics[name] for name in sorted(topics))


def test_a_damaged_token_cache_is_rebuilt(tmp_path, capsys):
    """The cache a BPE tokenizer's split is kept in: a file cut short or changed is noticed, said, and made again."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus\n" for i in range(2000)))
    tokenizer, made = data.get_tokenizer("bytes"), []
    make = lambda: made.append(1) or data.tokenize(corpus.read_text(), str(corpus), tokenizer)  # noqa: E731
    path = tmp_path / "cache" / "corpus.npz"
    whole = data.cached(path, make, tokenizer)
    again = data.cached(path, make, tokenizer)
    assert len(made) == 1 and np.array_equal(again.val, whole.val) and again.about == whole.about
    for damage in (lambda raw: raw[:100], lambda raw: raw[:200] + bytes([raw[200] ^ 1]) + raw[201:]):
        path.write_bytes(damage(path.read_bytes()))
        again = data.cached(path, make, tokenizer)
        assert "is damaged; rebuilding it" in capsys.readouterr().err
        assert np.array_equal(again.train, whole.train) and np.array_equal(again.val, whole.val)
    data.cached(path, make, tokenizer)
    assert capsys.readouterr().err == "" and len(made) == 3     # whole again: read, not rebuilt


def test_unavailable_standard_encoding_names_tiktoken_cache_dir(tmp_path, monkeypatch):
    """Offline, a standard encoding fails with a message that says how to make it work."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(data.DataError, match="TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("cl100k_base")
