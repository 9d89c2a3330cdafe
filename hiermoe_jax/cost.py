"""Alpha-beta cost model of the dispatch strategies (docs/design.md, section 6).

A stage (one all-to-all hop) over tier `flat` (all devices), `inter` (the slow
axis) or `intra` (the fast axis) costs `alpha + beta * bytes`, with

    bytes = group_size * peak_rows_per_peer * d_model * bytes_per_elem

because the most loaded peer sets the padded buffer size. A strategy's time is the
sum over its stages, each run twice (dispatch, then combine in reverse).

`predict_from_peak_rows` is plain arithmetic, so it works on Python numbers and on
traced jnp scalars alike (e.g. inside jit, on per-layer routing counts, for the
`auto` strategy). `fit_stage` fits alpha and beta by least squares.

Units: milliseconds and bytes, as in the published profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np

from hiermoe_jax.dispatch import registry
from hiermoe_jax.dispatch.base import TIERS, Strategy, tier_peers
from hiermoe_jax.errors import ConfigError, check_real
from hiermoe_jax.mesh import MeshShape

STAGE_KINDS = TIERS  # a profile prices each tier a hop can cross


def stage_kinds(strategy: str | Strategy) -> tuple[str, ...]:
  """Stage kinds of a strategy (a registered name or a record): its tiers, in hop order."""
  if isinstance(strategy, Strategy):
    return strategy.tiers
  return registry.get_strategy(strategy).tiers


def group_size(kind: str, shape: MeshShape) -> int:
  """Peers of one all-to-all of this stage kind."""
  if kind not in STAGE_KINDS:
    raise ValueError(f"stage kind {kind!r} must be one of {STAGE_KINDS}")
  return tier_peers(kind, shape)


def stage_bytes(group: int, max_rows_per_peer, d_model: int, bytes_per_elem: int):
  """Bytes a device moves in one stage: group * peak rows per peer * D * bytes."""
  return group * max_rows_per_peer * d_model * bytes_per_elem


def _check_number(owner: str, field: str, value) -> float:
  return check_real(f"{owner}.{field}", value, 0)


def _excess(num_bytes, knee_bytes):
  """max(bytes - knee, 0) by arithmetic only, so it traces like plain numbers do."""
  over = num_bytes - knee_bytes
  return (over + abs(over)) / 2


@dataclasses.dataclass(frozen=True)
class StageCost:
  """time_ms = alpha_ms + beta_ms_per_byte * bytes
             + excess_ms_per_byte * max(bytes - knee_bytes, 0).

  The excess slope prices what a message past the knee pays on top (on CPU, a
  buffer that no longer fits in cache); 0 (the default, as in older profiles)
  is the plain alpha-beta line.
  """
  alpha_ms: float
  beta_ms_per_byte: float
  excess_ms_per_byte: float = 0.0
  knee_bytes: float = 0.0

  def __post_init__(self):
    for name in STAGE_FIELDS:
      object.__setattr__(self, name, _check_number("StageCost", name, getattr(self, name)))

  def time_ms(self, num_bytes):
    line = self.alpha_ms + self.beta_ms_per_byte * num_bytes
    if not self.excess_ms_per_byte:
      return line
    return line + self.excess_ms_per_byte * _excess(num_bytes, self.knee_bytes)

  def to_dict(self) -> dict:
    fields = STAGE_FIELDS if self.excess_ms_per_byte else STAGE_FIELDS[:2]
    return {name: getattr(self, name) for name in fields}


STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(StageCost))
REQUIRED_STAGE_FIELDS = STAGE_FIELDS[:2]  # the excess slope and knee are optional


@dataclasses.dataclass(frozen=True)
class CostProfile:
  """A topology profile: one StageCost per stage kind."""
  flat: StageCost
  inter: StageCost
  intra: StageCost
  name: str = ""

  def __post_init__(self):
    for kind in STAGE_KINDS:
      value = getattr(self, kind)
      if not isinstance(value, StageCost):
        raise ConfigError(f"CostProfile.{kind}={value!r} is invalid: must be a StageCost")
    if not isinstance(self.name, str):
      raise ConfigError(f"CostProfile.name={self.name!r} is invalid: must be a string")

  def stage(self, kind: str) -> StageCost:
    if kind not in STAGE_KINDS:
      raise ValueError(f"stage kind {kind!r} must be one of {STAGE_KINDS}")
    return getattr(self, kind)

  def to_json(self) -> str:
    data = {"name": self.name, "units": {"alpha": "ms", "beta": "ms/byte",
                                         "excess": "ms/byte", "knee": "bytes"}}
    data.update({kind: self.stage(kind).to_dict() for kind in STAGE_KINDS})
    return json.dumps(data, indent=1)

  @classmethod
  def from_dict(cls, data: Any, *, source: str = "profile") -> "CostProfile":
    if not isinstance(data, Mapping):
      raise ConfigError(f"{source}: a cost profile must be a JSON object, got "
                        f"{type(data).__name__}")
    stages = {}
    for kind in STAGE_KINDS:
      entry = data.get(kind)
      if not isinstance(entry, Mapping):
        raise ConfigError(f"{source}: field {kind!r} is missing or not an object "
                          f"with alpha_ms and beta_ms_per_byte")
      values = {}
      for field in STAGE_FIELDS:
        if field not in entry:
          if field in REQUIRED_STAGE_FIELDS:
            raise ConfigError(f"{source}: field {kind}.{field} is missing")
          continue
        try:
          values[field] = _check_number(f"{kind}", field, entry[field])
        except ConfigError as e:
          raise ConfigError(f"{source}: {e}") from None
      stages[kind] = StageCost(**values)
    name = data.get("name", "")
    if not isinstance(name, str):
      raise ConfigError(f"{source}: field 'name'={name!r} must be a string")
    return cls(**stages, name=name)

  @classmethod
  def from_json(cls, text: str, *, source: str = "profile") -> "CostProfile":
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{source}: not valid JSON ({e})") from None
    return cls.from_dict(data, source=source)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      f.write(self.to_json() + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "CostProfile":
    source = f"cost profile {os.fspath(path)!r}"
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise ConfigError(f"{source} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
      raise ConfigError(f"{source} cannot be read: not a UTF-8 text (JSON) file") from None
    return cls.from_json(text, source=source)


def shipped_profiles() -> list[str]:
  """Names of the profiles shipped in hiermoe_jax/profiles/."""
  folder = resources.files("hiermoe_jax") / "profiles"
  return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | os.PathLike) -> CostProfile:
  """A shipped profile by name ("default", "paper_a6000") or a JSON file path."""
  text = os.fspath(name_or_path)
  if os.sep not in text and not text.endswith(".json"):
    resource = resources.files("hiermoe_jax") / "profiles" / f"{text}.json"
    if not resource.is_file():
      raise ConfigError(f"cost profile {text!r} is neither a shipped profile "
                        f"{shipped_profiles()} nor a path to a .json file")
    return CostProfile.from_json(resource.read_text(), source=f"cost profile {text!r}")
  return CostProfile.load(text)


def stage_time_ms(kind: str, peak_rows, profile: CostProfile, shape: MeshShape,
                  d_model: int, bytes_per_elem: int):
  """Dispatch + combine time (ms) of one stage: 2 * (alpha + beta * stage bytes).

  A stage over a mesh axis of size 1 (`inter` on a 1xG mesh) crosses no link, but
  its hop still gathers the rows into a buffer and scatters them back, so it is
  priced like any other. A profile fitted on such a mesh times exactly that local
  hop (`bench_comm.py --fit-profile`); one fitted across nodes overprices it.
  """
  nbytes = stage_bytes(group_size(kind, shape), peak_rows, d_model, bytes_per_elem)
  return 2 * profile.stage(kind).time_ms(nbytes)


def predict_from_peak_rows(strategy: str | Strategy, peak_rows_per_hop: Sequence,
                           profile: CostProfile, shape: MeshShape, d_model: int,
                           bytes_per_elem: int):
  """Predicted dispatch + combine time (ms) from each hop's peak rows per peer.

  peak_rows_per_hop: one entry per hop of the strategy (flat kinds: 1, hier: 2),
  the most rows any device sends to one peer (or the hop's buffer capacity).
  Entries may be Python numbers or jnp scalars (traceable; no Python branching
  on their values), so `auto` can call this inside jit.
  """
  kinds = stage_kinds(strategy)
  if len(peak_rows_per_hop) != len(kinds):
    raise ValueError(f"peak_rows_per_hop has {len(peak_rows_per_hop)} entries; strategy "
                     f"{strategy!r} has {len(kinds)} stages {kinds}")
  return sum((stage_time_ms(kind, rows, profile, shape, d_model, bytes_per_elem)
              for kind, rows in zip(kinds, peak_rows_per_hop)), 0.0)


def peak_rows_per_hop(strategy: str | Strategy, traffic_entry: Mapping) -> tuple:
  """Per-hop peak rows per peer from one `traffic.stats` entry.

  A flat hop takes max(inter, intra) (one hop serves both link classes); an inter
  or intra hop takes its own class's maximum.
  """
  peak = traffic_entry["max_rows_per_peer"]
  return tuple(max(peak["inter"], peak["intra"]) if kind == "flat" else peak[kind]
               for kind in stage_kinds(strategy))


def predict(strategy: str | Strategy, traffic_or_rows, profile: CostProfile, *, mesh_shape,
            d_model: int, bytes_per_elem: int):
  """Predicted dispatch + combine time (ms) of one strategy.

  traffic_or_rows: a `traffic.stats(...)[strategy]` entry, or a sequence of peak
  rows per peer per hop (see `predict_from_peak_rows`).
  """
  shape = mesh_shape if isinstance(mesh_shape, MeshShape) else MeshShape(*mesh_shape)
  rows = (peak_rows_per_hop(strategy, traffic_or_rows)
          if isinstance(traffic_or_rows, Mapping) else tuple(traffic_or_rows))
  return predict_from_peak_rows(strategy, rows, profile, shape, d_model, bytes_per_elem)


KNEE_GAIN = 2.0  # a knee must cut the squared relative error by this factor to be kept
OUTLIER_FACTOR = 2.0  # a size the fit misses by more than this factor is refitted without


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
  """min |a c - y|^2 over c >= 0, exactly, by trying every support (a has <= 3 columns):
  the optimum is the unconstrained fit on its own support."""
  cols = a.shape[1]
  best, best_err = np.zeros(cols), float(np.sum(y ** 2))
  for mask in range(1, 2 ** cols):
    support = [j for j in range(cols) if mask >> j & 1]
    coef, *_ = np.linalg.lstsq(a[:, support], y, rcond=None)
    if np.all(coef >= 0):
      full = np.zeros(cols)
      full[support] = coef
      err = float(np.sum((a @ full - y) ** 2))
      if err < best_err:
        best, best_err = full, err
  return best, best_err


def _fit_relative(x: np.ndarray, y: np.ndarray, knee: float | None):
  """Non-negative alpha, beta (and excess past `knee`) minimizing squared relative error."""
  columns = [np.ones_like(x), x] + ([_excess(x, knee)] if knee is not None else [])
  a = np.stack(columns, 1) / y[:, None]
  coef, err = _nonnegative_lstsq(a, np.ones_like(y))
  excess = (coef[2], knee) if knee is not None and coef[2] > 0 else (0.0, 0.0)
  return StageCost(float(coef[0]), float(coef[1]), float(excess[0]), float(excess[1])), err


def _fit_kneed(x: np.ndarray, y: np.ndarray, knee: bool) -> StageCost:
  """The line, or the best line with a knee if that halves its error (KNEE_GAIN)."""
  fitted, err = _fit_relative(x, y, None)
  knees = np.unique(x)[1:-2] if knee else ()  # >= 2 sizes on each side of a knee
  bent = min((_fit_relative(x, y, float(k)) for k in knees), key=lambda f: f[1], default=None)
  return bent[0] if bent is not None and bent[1] * KNEE_GAIN < err else fitted


def fit_stage(num_bytes, times_ms, *, knee: bool = True) -> tuple[StageCost, float]:
  """Fits a StageCost (all coefficients >= 0) to measured (bytes, ms) pairs.

  Minimizes the squared *relative* error: a prediction is judged by its % error,
  and a plain least-squares line is steered by the largest messages, whose
  higher per-byte cost (cache misses) pushed alpha below 0 and over-priced small
  ones. With `knee`, a second slope past one of the measured sizes is tried and
  kept when it cuts that error KNEE_GAIN-fold. Sizes the fit misses by more than
  OUTLIER_FACTOR x (at most a quarter of them: a hiccup of a shared machine) are
  dropped, the worst first, refitting after each. Returns (StageCost, r^2 over all the times).
  """
  x = np.asarray(num_bytes, np.float64).ravel()
  y = np.asarray(times_ms, np.float64).ravel()
  if x.shape != y.shape or x.size < 2:
    raise ValueError(f"fit_stage needs >= 2 (bytes, time) pairs of equal length; got "
                     f"{x.size} bytes and {y.size} times")
  if np.unique(x).size < 2:
    raise ValueError("fit_stage needs at least two distinct message sizes")
  if not np.all(y > 0):
    raise ValueError(f"fit_stage needs positive times; got min {y.min()} ms")
  fitted = _fit_kneed(x, y, knee)
  kept = np.ones(x.size, bool)
  for _ in range(x.size // 4):  # one at a time: a hiccup can hide the knee from the fit
    off = np.where(kept, np.abs(np.log(y / np.maximum(fitted.time_ms(x), 1e-12))), 0)
    worst = int(np.argmax(off))
    kept[worst] = off[worst] <= np.log(OUTLIER_FACTOR)
    if kept[worst] or np.unique(x[kept]).size < 2:
      kept[worst] = True
      break
    fitted = _fit_kneed(x[kept], y[kept], knee)
  resid = y - fitted.time_ms(x)
  total = np.sum((y - y.mean()) ** 2)
  r2 = float(1.0 - np.sum(resid ** 2) / total) if total > 0 else 1.0
  return fitted, r2
