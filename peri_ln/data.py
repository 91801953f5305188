"""Language-model input pipeline: one token stream per split, packed into fixed-length windows.

Sources (config `data.source`):
  "pydocs"       byte-level text: every file matching `data.glob` under `data.path` (by default the reST
                 sources of Debian's python3.11-doc). Vocabulary: the 256 byte values; each document is
                 followed by byte 0 (EOD), which plain text never contains. Files go to the validation
                 split by a hash of their relative path, so adding files never moves the others.
  "tokens:DIR"   pre-tokenised corpora: DIR/train.bin and DIR/validation.bin hold one document stream
                 each (raw little-endian uint16 or uint32, documents separated however the tokeniser
                 chose), DIR/meta.json {"dtype": "uint16" | "uint32", "vocab_size": N}; both
                 written by `write_token_file`, read memory-mapped.

Batch contract (process-local, b = global_batch_size // jax.process_count()):
  {"inputs": int32 [b, T], "targets": int32 [b, T]}, targets = inputs shifted left by one token.
Window i covers stream[i*T : i*T + T + 1], so every token after the first is a target exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

DEFAULT_PYDOCS_DIR = "/usr/share/doc/python3.11/html/_sources"
BYTE_VOCAB_SIZE = 256
EOD = 0  # separates documents in the byte stream
SPLITS = ("train", "validation")
_META = "meta.json"


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block; the sequence length belongs to the model config and is passed in."""
    return ml_collections.ConfigDict(
        {
            "source": "pydocs",  # or "tokens:DIR" (see write_token_file)
            "path": DEFAULT_PYDOCS_DIR,  # pydocs only: the directory of text files
            "glob": "**/*.rst.txt",  # pydocs only: which files under `path` are documents
            "validation_fraction": 0.1,  # pydocs only: share of files held out, chosen by path hash
        }
    )


# ------------------------------------------------------------------------------------------------
# Token streams.
# ------------------------------------------------------------------------------------------------


def _is_validation(relative_path: str, fraction: float) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_files(path: str, glob: str, validation_fraction: float) -> dict[str, list[str]]:
    """{"train": [...], "validation": [...]} relative paths of the documents, sorted."""
    root = pathlib.Path(path)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob(glob) if p.is_file())
    if not files:
        cause = "does not exist" if not root.is_dir() else f"has no files matching {glob!r}"
        raise FileNotFoundError(
            f"Text corpus directory {path} {cause}: install Debian's python3.11-doc "
            "(sudo apt-get install python3.11-doc) or set --config.data.path=DIR (and data.glob)."
        )
    held_out = [_is_validation(f, validation_fraction) for f in files]
    return {
        "train": [f for f, v in zip(files, held_out) if not v],
        "validation": [f for f, v in zip(files, held_out) if v],
    }


def _byte_stream(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    files = split_files(data_config.path, data_config.glob, data_config.validation_fraction)[split]
    root = pathlib.Path(data_config.path)
    text = b"".join((root / f).read_bytes() + bytes([EOD]) for f in files)
    return np.frombuffer(text, np.uint8)


def _token_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path | None:
    source = data_config.source
    if source == "pydocs":
        return None
    if source.startswith("tokens:"):
        return pathlib.Path(source.removeprefix("tokens:"))
    raise ValueError(f"Unknown data source {source!r} (config data.source): 'pydocs' or 'tokens:DIR'.")


def _read_meta(directory: pathlib.Path) -> dict:
    path = directory / _META
    if not path.is_file():
        raise FileNotFoundError(
            f"No {_META} in {directory}: write token files with peri_ln.data.write_token_file, or set "
            "--config.data.source=pydocs."
        )
    return json.loads(path.read_text())


def load_stream(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """The whole `split` ("train" or "validation") as one 1-D token array (memory-mapped for tokens:)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; one of {SPLITS}.")
    directory = _token_dir(data_config)
    if directory is None:
        return _byte_stream(data_config, split)
    meta = _read_meta(directory)
    path = directory / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"No {path}: write it with peri_ln.data.write_token_file.")
    return np.memmap(path, np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def vocab_size(data_config: ml_collections.ConfigDict) -> int:
    directory = _token_dir(data_config)
    return BYTE_VOCAB_SIZE if directory is None else int(_read_meta(directory)["vocab_size"])


def write_token_file(
    directory: str | os.PathLike[str], split: str, tokens: np.ndarray, vocab_size: int
) -> pathlib.Path:
    """Writes DIR/{split}.bin and DIR/meta.json for a `tokens:DIR` source; uint16 if the vocabulary
    fits, else uint32. All splits of one directory must share the vocabulary size."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"tokens must be a non-empty 1-D array of ids in [0, {vocab_size}).")
    meta = {"dtype": "uint16" if vocab_size <= 2**16 else "uint32", "vocab_size": int(vocab_size)}
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    existing = _read_meta(root) if (root / _META).is_file() else meta
    if existing != meta:
        raise ValueError(f"{root / _META} holds {existing}, not {meta}: use another directory.")
    (root / _META).write_text(json.dumps(meta) + "\n")
    path = root / f"{split}.bin"
    tokens.astype(np.dtype(meta["dtype"]).newbyteorder("<")).tofile(path)
    return path


def unigram_entropy(stream: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the stream's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(stream, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------
# Windows and batches.
# ------------------------------------------------------------------------------------------------


def _local_batch_size(global_batch_size: int) -> int:
    count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"Global batch size {global_batch_size} must be a positive multiple of the number of "
            f"processes ({count}); change the batch size in the config."
        )
    return global_batch_size // count


def num_windows(stream: np.ndarray, seq_len: int) -> int:
    return (len(stream) - 1) // seq_len


def read_windows(stream: np.ndarray, indices: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Windows `indices` of the stream as {"inputs", "targets"}: int32 [len(indices), seq_len]."""
    windows = stream[np.asarray(indices)[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def _check_enough(stream: np.ndarray, seq_len: int, needed: int, what: str) -> None:
    if num_windows(stream, seq_len) < needed:
        raise ValueError(
            f"The {what} has {num_windows(stream, seq_len)} windows of {seq_len}+1 tokens, fewer than "
            f"one batch needs ({needed}); lower the batch size or seq_len, or use a larger corpus."
        )


def train_iterator(
    data_config: ml_collections.ConfigDict, global_batch_size: int, seq_len: int, seed: int
) -> grain.DatasetIterator:
    """Infinite grain iterator of process-local train batches; windows reshuffled every epoch from
    `seed`. Process p reads windows p::process_count only. get_state()/set_state() save and restore
    its position (grain.checkpoint.CheckpointSave/CheckpointRestore under orbax)."""
    local_batch = _local_batch_size(global_batch_size)
    stream = load_stream(data_config, "train")
    _check_enough(stream, seq_len, global_batch_size, "train split")
    windows = grain.MapDataset.range(num_windows(stream, seq_len))[jax.process_index() :: jax.process_count()]
    ds = windows.seed(seed).shuffle().repeat().batch(local_batch, drop_remainder=True)
    ds = ds.map(lambda idx: read_windows(stream, idx, seq_len))
    # One reader thread, a small buffer: overlaps reading with the step, light on a small host.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(
    data_config: ml_collections.ConfigDict, global_batch_size: int, seq_len: int, max_batches: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """The first `max_batches` (None: all) full global batches of validation windows, in order.

    The last partial global batch is dropped rather than padded, so no mask is needed; the count
    depends only on global numbers, the same on every process, so collectives never deadlock.
    Process p takes rows [p*b, (p+1)*b) of each global batch.
    """
    local_batch = _local_batch_size(global_batch_size)
    stream = load_stream(data_config, "validation")
    _check_enough(stream, seq_len, global_batch_size, "validation split")
    count = num_windows(stream, seq_len) // global_batch_size
    for step in range(count if max_batches is None else min(count, max_batches)):
        start = step * global_batch_size + jax.process_index() * local_batch
        yield read_windows(stream, np.arange(start, start + local_batch), seq_len)
