"""Token streams and a deterministic, resumable batch order.

Sources (`load_tokens`):
  * default: the documentation text that ships with Python (`pydoc_data.topics`),
    as UTF-8 bytes: byte-level tokens, no downloads, runs anywhere;
  * a text file, or a directory of text files (read recursively, sorted), as bytes;
  * a pre-tokenised `.npy` array or raw `.bin` file (uint16 / uint32), memory-mapped.

The last `eval_fraction` of the stream is held out. Training windows of
seq_len + 1 tokens start every seq_len tokens; each epoch visits them in a
permutation seeded by (seed, epoch). Global batch b is rows [b*B, (b+1)*B) of
that endless sequence, so the data position is just the number of batches
consumed, and any process can build exactly its rows of any batch.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

from models.config import ConfigError, DataConfig


def default_corpus() -> np.ndarray:
  from pydoc_data.topics import topics
  text = "\n\n".join(topics[name] for name in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def load_tokens(cfg: DataConfig) -> np.ndarray:
  """A 1-D integer array (possibly a read-only memmap) of the whole corpus."""
  if cfg.path is None:
    return default_corpus()
  path = pathlib.Path(cfg.path)
  if not path.exists():
    raise ConfigError(f"data.path={cfg.path!r} is invalid: no such file or directory")
  if path.suffix == ".npy":
    try:
      tokens = np.load(path, mmap_mode="r")
    except (OSError, EOFError, ValueError) as e:
      raise ConfigError(f"data.path={cfg.path!r} is invalid: not a readable .npy array "
                        f"({e})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
      raise ConfigError(f"data.path={cfg.path!r} is invalid: a .npy corpus must be a 1-D "
                        f"integer array, not {tokens.dtype}{list(tokens.shape)}")
    return tokens
  if path.suffix == ".bin":
    itemsize, size = np.dtype(cfg.token_dtype).itemsize, path.stat().st_size
    if size == 0 or size % itemsize:
      raise ConfigError(f"data.path={cfg.path!r} is invalid: {size} bytes is not a positive "
                        f"multiple of data.token_dtype={cfg.token_dtype} ({itemsize} bytes)")
    return np.memmap(path, dtype=np.dtype(cfg.token_dtype), mode="r")
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  if not files:
    raise ConfigError(f"data.path={cfg.path!r} is invalid: the directory holds no files")
  return np.frombuffer(b"\n\n".join(f.read_bytes() for f in files), dtype=np.uint8)


def split(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval): the eval split is the tail of the stream."""
  cut = int(len(tokens) * (1 - eval_fraction))
  return tokens[:cut], tokens[cut:]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (for the order cache)
class Batches:
  """Global batches of (inputs, targets), each [batch_size, seq_len] int32."""
  tokens: np.ndarray
  batch_size: int
  seq_len: int
  seed: int
  shuffle: bool = True
  vocab_size: int | None = None

  def __post_init__(self):
    if self.num_windows < 1:
      raise ConfigError(f"train.seq_len={self.seq_len} is invalid: the split holds only "
                        f"{len(self.tokens)} tokens; use a shorter seq_len or more data")

  @property
  def num_windows(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_windows)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

  def rows(self, batch: int, start: int = 0, stop: int | None = None):
    """Rows [start, stop) of global batch `batch`: (inputs, targets) int32."""
    stop = self.batch_size if stop is None else stop
    out = np.empty((stop - start, self.seq_len + 1), np.int32)
    for r, i in enumerate(range(batch * self.batch_size + start, batch * self.batch_size + stop)):
      epoch, pos = divmod(i, self.num_windows)
      first = int(self._order(epoch)[pos]) * self.seq_len
      out[r] = self.tokens[first:first + self.seq_len + 1]
    if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
      raise ConfigError(f"model.vocab_size={self.vocab_size} is invalid for this data: "
                        f"it holds token id {int(out.max())}")
    return out[:, :-1], out[:, 1:]
