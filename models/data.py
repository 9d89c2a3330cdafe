"""Token streams and a deterministic, resumable batch order.

Sources (`load_tokens`):
  * default: the documentation text that ships with Python (`pydoc_data.topics`),
    as UTF-8 bytes: byte-level tokens, no downloads, runs anywhere;
  * a text file, or a directory of text files (read recursively, sorted), as bytes;
    or, when the run directory holds a Hugging Face `tokenizer.json` (scripts/
    convert_hf.py copies the checkpoint's), tokenized with it (`tokenizers` package,
    the hf extra). The default corpus stays byte-level;
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


TOKENIZER_FILE = "tokenizer.json"


def run_tokenizer(run_dir) -> pathlib.Path | None:
  """The run's Hugging Face tokenizer (`<run_dir>/tokenizer.json`), if it has one."""
  path = pathlib.Path(run_dir) / TOKENIZER_FILE
  return path if path.is_file() else None


def tokenize(files: list[pathlib.Path], tokenizer: pathlib.Path, key: str) -> np.ndarray:
  """The files' UTF-8 text tokenized with a Hugging Face tokenizer.json (no special
  tokens), documents joined by the tokens of a blank line, as the byte stream joins
  them; uint16 ids when the vocabulary fits, else uint32."""
  try:
    from tokenizers import Tokenizer
  except ImportError:
    raise ConfigError(f"{key} is text and the run has {tokenizer}: tokenizing needs the "
                      "tokenizers package (pip install 'hiermoe-jax[hf]')") from None
  try:
    tok = Tokenizer.from_file(str(tokenizer))
  except Exception as e:  # tokenizers raises its own Exception type
    raise ConfigError(f"tokenizer {str(tokenizer)!r} is invalid: not a Hugging Face "
                      f"tokenizer.json ({' '.join(str(e).split())})") from None
  texts = []
  for f in files:
    try:
      texts.append(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
      raise ConfigError(f"{key} file {str(f)!r} is not UTF-8 text; it is tokenized with "
                        f"{tokenizer}") from None
  dtype = np.uint16 if tok.get_vocab_size(with_added_tokens=True) <= 2 ** 16 else np.uint32
  separator = np.asarray(tok.encode("\n\n", add_special_tokens=False).ids, dtype)
  parts = []
  for n, encoding in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
    parts += [separator] if n else []
    parts.append(np.asarray(encoding.ids, dtype))
  return np.concatenate(parts)


def load_tokens(cfg: DataConfig, tokenizer: pathlib.Path | None = None) -> np.ndarray:
  """A 1-D integer array (possibly a read-only memmap) of the whole corpus; text files
  are tokenized with `tokenizer` (a tokenizer.json path) if given, else bytes."""
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
  if tokenizer is not None:
    return tokenize(files, pathlib.Path(tokenizer), f"data.path={cfg.path!r}")
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
