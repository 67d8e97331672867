"""Corpora, tokenizers and batches.

A corpus is plain text. It is tokenized once with a tiktoken encoding, cached on disk as a numpy memmap
of token ids, and split deterministically: the first 90% of the tokens train, the last 10% validate.
Batches are windows of block_size+1 tokens drawn at random offsets.

Document boundaries. A batch window starts at any offset, so it may span the end of one document (a topic of
the Python reference, a scene of tiny-shakespeare) and the start of the next, and so may a NITP pair (t, t+1).
Packed-sequence trainers mask such pairs; we do not, because these corpora do not mark where a document ends in
the token stream (a topic ends with a blank line, and so do many of its paragraphs), and NTP's own targets and
the attention cross the same boundaries unmasked. It is rare: the Python reference has 79 topics in 465k bytes,
so about one pair in 5,900 crosses one. Where a corpus does mark documents, NITP.forward takes a pair mask
(nitp.py shows how to build it from document ids or an attention mask; hf_example.py does so from padding).

Three corpora:
  "python-docs"  (default) the Python language reference, as shipped inside CPython 3.11.7 (pydoc_data.topics,
                 466k bytes), frozen in corpus/python-reference.txt (PSF License, corpus/LICENSE): offline,
                 and the same tokens whatever Python runs it (each Python release ships a different text).
  "shakespeare"  tiny-shakespeare (1.1M characters), downloaded once and cached.
  PATH           any UTF-8 text file.
"""
import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

PYTHON_REFERENCE = Path(__file__).resolve().parent / "corpus" / "python-reference.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_DIR = Path(os.environ.get("NITP_CACHE_DIR", Path(__file__).resolve().parent / "data_cache"))
TOKENIZERS = ("bytes", "gpt2", "r50k_base", "cl100k_base", "o200k_base")
VAL_FRACTION = 0.1


class DataError(ValueError):
    """A problem with the user's data or tokenizer choice; the message says what to do."""


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
# Token cache and splits

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


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise DataError(f"vocabulary of {vocab_size} tokens is too large")


@dataclass
class Dataset:
    train: np.ndarray  # (N_train,) token ids, a read-only memmap
    val: np.ndarray    # (N_val,)
    tokenizer: tiktoken.Encoding

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab


def split(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first 90% of the tokens train, the last 10% validate; each must hold one window of block_size + 1."""
    n_val = int(len(tokens) * VAL_FRACTION)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    for name, ids in (("train", train), ("val", val)):
        if len(ids) < block_size + 1:
            raise DataError(
                f"the {name} split has {len(ids)} tokens, but --block-size {block_size} needs at least "
                f"{block_size + 1}; use a longer corpus (the val split is its last {VAL_FRACTION:.0%}) "
                f"or a smaller --block-size")
    return train, val


def load_dataset(source: str, tokenizer: tiktoken.Encoding, block_size: int) -> Dataset:
    """Tokenize `source` (cached by content hash) and split it into train and val token arrays."""
    text = load_text(source)
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    dtype = token_dtype(tokenizer.n_vocab)
    path = CACHE_DIR / f"{digest}.{tokenizer.name}.{np.dtype(dtype).name}.bin"
    if not cache_is_whole(path):
        ids = np.array(tokenizer.encode_ordinary(text), dtype=dtype)
        split(ids, block_size)  # a corpus too short is refused before anything is cached
        write_cache(path, ids)
    train, val = split(np.memmap(path, dtype=dtype, mode="r"), block_size)
    return Dataset(train, val, tokenizer)


def write_cache(path: Path, ids: np.ndarray) -> None:
    """The token ids, then beside them their size and checksum (path.json), each written atomically: a crash
    between the two leaves ids without a record, which cache_is_whole refuses."""
    raw = ids.tobytes()
    atomic_write(path, lambda f: f.write(raw))
    record = {"bytes": len(raw), "sha1": hashlib.sha1(raw).hexdigest()}
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))


def cache_is_whole(path: Path) -> bool:
    """Does the cached file hold exactly the tokens that were written? A file cut short, changed, or left without
    its record is not used (load_dataset then tokenizes the corpus again and rewrites it), with a note."""
    if not path.exists():
        return False
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        raw = path.read_bytes()
        whole = len(raw) == record["bytes"] and hashlib.sha1(raw).hexdigest() == record["sha1"]
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        print(f"note: the token cache {path} does not match its recorded size and checksum; rebuilding it",
              file=sys.stderr)
    return whole


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: inputs x and the next-token targets y = x shifted by one."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)  # (B, T+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
