"""Corpora, tokenizers, batches, and a validation split that holds out.

A corpus is plain text, cut into documents (the topics of the Python reference; elsewhere runs of paragraphs).
About a tenth of the documents are held out whole to validate; the rest train. A training batch is random
windows of block_size + 1 tokens of the training text (get_batch, just below).

Held out means held out. The Python reference repeats itself: a small topic such as "The while statement" is also
a section of "Compound statements". A split by position or by topic alone would validate on text the model trained
on (the old split by position did: 63 of its 728 64-byte chunks, 8.7%, occurred verbatim in the training text).
So every line of the training text that shares a passage of PASSAGE (64) bytes or more with the held-out text is
cut out of training (cut_repeats). No 64-byte passage of the validation text then occurs in the training text, at
any offset; each run measures this again independently (shared_chunks) and prints it.

Document boundaries. A training window starts at any offset, so it may span the end of one document and the start
of the next, and so may a NITP pair (t, t+1). Packed-sequence trainers mask such pairs; we do not, because these
corpora do not mark where a document ends in the token stream, and NTP's own targets and the attention cross the
same boundaries unmasked. Where a corpus does mark documents, NITP.forward takes a pair mask (nitp.py shows how).

Three corpora:
  "python-docs"  (default) the Python language reference, as shipped inside CPython 3.11.7 (pydoc_data.topics,
                 79 topics, 466k bytes), frozen in corpus/python-reference.txt (PSF License, corpus/LICENSE):
                 offline, and the same tokens whatever Python runs it.
  "shakespeare"  tiny-shakespeare (1.1M characters), downloaded once and cached.
  PATH           any UTF-8 text file.
"""
import hashlib
import io
import os
import re
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

PYTHON_REFERENCE = Path(__file__).resolve().parent / "corpus" / "python-reference.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path(os.environ.get("NITP_CACHE_DIR", Path(__file__).resolve().parent / "data_cache"))
TOKENIZERS = ("bytes", "gpt2", "r50k_base", "cl100k_base", "o200k_base")
VAL_SHARE = 0.1  # the share of the text held out to validate
PASSAGE = 64     # bytes: no passage this long occurs in both the training and the validation text


class DataError(ValueError):
    """A problem with the user's data or tokenizer choice; the message says what to do."""


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: inputs x and the next-token targets y = x shifted by one."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)  # (B, T+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def every_window(tokens: np.ndarray, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All of `tokens`, each once: consecutive windows x of block_size tokens, each with its targets y (x shifted by
    one), then a shorter window for what is left. Every token but the first is a target exactly once.
    Returns [(x, y)] with x, y (W, T) for the full windows, and (1, r) for the rest when there is one."""
    ids = torch.from_numpy(np.asarray(tokens).astype(np.int64))        # (N,)
    n_full = (len(ids) - 1) // block_size
    full = ids[:n_full * block_size + 1]
    x = full[:-1].view(n_full, block_size)                              # (W, T): windows 0..T-1, T..2T-1, ...
    y = full[1:].view(n_full, block_size)                               # (W, T): each one position on
    out = [(x, y)]
    if len(ids) - 1 > n_full * block_size:                              # the rest: r < T targets
        rest = ids[n_full * block_size:]
        out.append((rest[:-1].view(1, -1), rest[1:].view(1, -1)))       # (1, r) each
    return out


# ----------------------------------------------------------------------------------------------------
# Tokenizers

def get_tokenizer(name: str) -> tiktoken.Encoding:
    """Return a tiktoken encoding by name. "bytes" is ours; the others are OpenAI's standard encodings.

    The default, "bytes", has 256 tokens: one per byte value, no merges. It needs no download, round-trips
    any text, and keeps the embedding and LM head small enough to train on a CPU. A standard encoding has
    50k-200k tokens: its embedding table alone would dwarf a toy model and its vocabulary would be mostly
    unseen in a small corpus.
    """
    if name == "bytes":
        return tiktoken.Encoding(
            name="bytes",
            pat_str=r"""[^\n]+|\n""",  # split into lines; with no merges the split does not change the ids
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={},
        )
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    if name == "gpt2":
        name = "r50k_base"  # the same GPT-2 BPE, stored by tiktoken as a single file
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken downloads the encoding once; offline that fails in many ways
        raise DataError(
            f"could not load tiktoken encoding {name!r} ({type(e).__name__}); it is downloaded once, so go online "
            f"once or set TIKTOKEN_CACHE_DIR to a folder holding its cached file, or use --tokenizer bytes"
        ) from None


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise DataError(f"vocabulary of {vocab_size} tokens is too large")


# ----------------------------------------------------------------------------------------------------
# Corpora

def python_docs_text() -> str:
    """The Python language reference of CPython 3.11.7, from this repository (read as bytes: no newline
    translation, so the text is the same on every system)."""
    if not PYTHON_REFERENCE.is_file():
        raise DataError(f"the default corpus {PYTHON_REFERENCE} is missing; restore it with git checkout, "
                        f"or use --data shakespeare or --data PATH")
    return PYTHON_REFERENCE.read_bytes().decode("utf-8")


def shakespeare_text() -> str:
    """tiny-shakespeare, downloaded with the standard library once, then read from the cache."""
    path = CACHE_DIR / "tinyshakespeare.txt"
    if not path.exists():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                raw = response.read()
        except Exception as e:
            raise DataError(f"could not download tiny-shakespeare ({e.__class__.__name__}: {e}); save it to "
                            f"{path} by hand, or pass --data PATH") from None
        atomic_write(path, lambda f: f.write(raw))
    return path.read_text(encoding="utf-8")


def file_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"corpus file {path!r} not found; pass an existing UTF-8 text file, "
                        f"or --data python-docs / --data shakespeare")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {path!r} is not UTF-8 text (bad byte at offset {e.start}); "
                        f"convert it to UTF-8 first") from None
    if not text.strip():
        raise DataError(f"corpus file {path!r} is empty; pass a file with text in it")
    return text


def load_text(source: str) -> str:
    if source == "python-docs":
        return python_docs_text()
    if source == "shakespeare":
        return shakespeare_text()
    return file_text(source)


# ----------------------------------------------------------------------------------------------------
# The split: whole documents held out, and every line of training text that repeats them cut out

TOPIC_TITLE = re.compile(r"(?<=\n\n)(?=[^\n]+\n\*+\n)")  # a topic of the reference opens with a title over ****


def documents(text: str, source: str) -> list[str]:
    """The pieces the split holds out whole; "".join(documents) == text.

    The Python reference: its 79 topics (each opens with a title underlined with *). Any other text: its paragraphs
    (or, without blank lines, its lines), merged in order into documents of at least 1/200 of the text, so that a
    held-out document is a passage of some length, not one line of dialogue."""
    if source == "python-docs":
        return [piece for piece in TOPIC_TITLE.split(text) if piece]
    separator = "\n\n" if text.count("\n\n") >= 20 else "\n"
    pieces = [piece + separator for piece in text.split(separator)]
    pieces[-1] = pieces[-1][:-len(separator)]             # the text's own end: no separator after it
    docs, current = [], ""
    for piece in pieces:
        current += piece
        if len(current) >= len(text) / 200:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def held_out(sizes: list[int], share: float = VAL_SHARE) -> list[bool]:
    """Which documents validate: in order, each one whose size would bring the held-out part closest to `share`
    of the text so far. That holds out about `share` of the text, spread along it, whole documents only."""
    chosen, held, seen = [], 0, 0
    for size in sizes:
        seen += size
        take = abs(held + size - share * seen) < abs(held - share * seen)
        chosen.append(take)
        held += size * take
    return chosen


def passage_hashes(raw: bytes, n: int = PASSAGE) -> np.ndarray:
    """(len(raw) - n + 1,) a 64-bit hash of the n bytes starting at each offset (n a multiple of 8)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if len(a) < n:
        return np.zeros(0, dtype=np.uint64)
    out = np.empty(len(a) - n + 1, dtype=np.uint64)
    for lo in range(0, len(out), 1 << 16):                             # in slices: a window view copies n bytes each
        windows = np.lib.stride_tricks.sliding_window_view(a[lo:lo + (1 << 16) + n - 1], n)
        words = np.ascontiguousarray(windows).view(np.uint64)          # (m, n / 8) eight bytes at a time
        h = np.full(len(words), 0xcbf29ce484222325, dtype=np.uint64)
        for k in range(words.shape[1]):                                # FNV-style: mix in each word
            h = (h ^ words[:, k]) * np.uint64(0x100000001b3)
        out[lo:lo + len(h)] = h
    return out


def cut_repeats(train: bytes, val: bytes, n: int = PASSAGE) -> tuple[bytes, int]:
    """`train` without every line that shares a passage of n or more bytes with `val`; and how many bytes went.
    (A hash collision could only cut a line too many, never keep one.)"""
    shared = np.isin(passage_hashes(train, n), passage_hashes(val, n))  # (len(train) - n + 1,) offsets that repeat
    covered = np.zeros(len(train) + 1, dtype=np.int64)                 # bytes inside some shared passage
    starts = np.flatnonzero(shared)
    np.add.at(covered, starts, 1)
    np.add.at(covered, starts + n, -1)
    covered = np.cumsum(covered[:-1]) > 0                              # (len(train),)
    a = np.frombuffer(train, dtype=np.uint8)
    line = np.concatenate([[0], np.cumsum(a[:-1] == ord("\n"))])       # (len(train),) the line of each byte
    cut = np.zeros(line[-1] + 1 if len(a) else 0, dtype=bool)
    cut[line[covered]] = True                                          # whole lines: text stays text (UTF-8 too)
    keep = ~cut[line]
    return a[keep].tobytes(), int((~keep).sum())


def shared_chunks(train: bytes, val: bytes, n: int = PASSAGE) -> tuple[int, int]:
    """How many of val's n-byte chunks (at offsets 0, n, 2n, ...) occur anywhere in train, and how many there are:
    the overlap each run prints, measured apart from cut_repeats, with Python's own bytes search."""
    chunks = [val[i:i + n] for i in range(0, len(val) - n + 1, n)]
    return sum(chunk in train for chunk in chunks), len(chunks)


@dataclass
class Dataset:
    train: np.ndarray       # (N_train,) token ids of the training text
    val: np.ndarray         # (N_val,) token ids of the held-out documents, one after another
    val_starts: np.ndarray  # (n_docs,) where each held-out document starts in val
    tokenizer: tiktoken.Encoding
    about: str              # what was held out and how much of it occurs in train, as the run prints it

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab


def split_text(text: str, source: str) -> tuple[bytes, list[bytes], str]:
    """The training text, the held-out documents, and a line that says what the split did."""
    docs = [doc.encode("utf-8") for doc in documents(text, source)]
    chosen = held_out([len(doc) for doc in docs])
    val_docs = []
    for doc in (doc for doc, take in zip(docs, chosen) if take):  # a repeat of an earlier held-out document goes too:
        doc, _ = cut_repeats(doc, b"".join(val_docs))              # the probes fit and score on different text
        val_docs += [doc] if doc else []
    val = b"".join(val_docs)
    train, cut = cut_repeats(b"".join(doc for doc, take in zip(docs, chosen) if not take), val)
    found, chunks = shared_chunks(train, val)
    about = (f"held out {len(val_docs)} of {len(docs)} documents ({len(val):,} bytes, "
             f"{len(val) / len(text.encode()):.1%} of the text); cut {cut:,} bytes of training text that repeat them; "
             f"{found} of the {chunks} held-out {PASSAGE}-byte chunks occur in the training text "
             f"({found / max(chunks, 1):.1%})")
    return train, val_docs, about


def load_dataset(source: str, tokenizer: tiktoken.Encoding, block_size: int) -> Dataset:
    """Split `source` and tokenize both parts. Byte tokens are computed each time (a fraction of a second); a BPE
    tokenizer's are cached on disk, since tokenizing a large file with it takes a while."""
    text = load_text(source)
    if tokenizer.name == "bytes":
        dataset = tokenize(text, source, tokenizer)
    else:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
        dataset = cached(CACHE_DIR / f"{digest}.{source == 'python-docs'}.{tokenizer.name}.split1.npz",
                         lambda: tokenize(text, source, tokenizer), tokenizer)
    for name, ids in (("train", dataset.train), ("val", dataset.val)):
        if len(ids) < block_size + 1:
            raise DataError(f"the {name} split has {len(ids)} tokens, but --block-size {block_size} needs at least "
                            f"{block_size + 1}; use a longer corpus (about {VAL_SHARE:.0%} of it validates) or a "
                            f"smaller --block-size")
    return dataset


def tokenize(text: str, source: str, tokenizer: tiktoken.Encoding) -> Dataset:
    train, val_docs, about = split_text(text, source)
    dtype = token_dtype(tokenizer.n_vocab)
    encode = lambda raw: np.array(tokenizer.encode_ordinary(raw.decode("utf-8")), dtype=dtype)  # noqa: E731
    val_parts = [encode(doc) for doc in val_docs]
    starts = np.cumsum([0] + [len(part) for part in val_parts[:-1]])
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=dtype)  # a text too short holds none out
    return Dataset(encode(train), val, starts, tokenizer, about)


def cached(path: Path, make, tokenizer: tiktoken.Encoding) -> Dataset:
    """The dataset saved at `path`, or make() saved there. A file that cannot be read whole (cut short, changed:
    the zip format checks each array's CRC) is made again, with a note."""
    if path.exists():
        try:
            with np.load(path) as f:
                return Dataset(f["train"], f["val"], f["val_starts"], tokenizer, str(f["about"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            print(f"note: the token cache {path} is damaged; rebuilding it", file=sys.stderr)
    dataset = make()
    buffer = io.BytesIO()
    np.savez(buffer, train=dataset.train, val=dataset.val, val_starts=dataset.val_starts, about=dataset.about)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return dataset


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file, flush it to disk, then rename it to path: a crash at any moment leaves
    the old file or the new one, never half of one. The temporary name holds the process id, so that processes
    writing the same file at once (DDP ranks filling the token cache) never write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
