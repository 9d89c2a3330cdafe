"""Benchmark variants: a strategy with MoEConfig fields, `name[:field=value]...`.

`bench_comm.py --strategies flat,hier_dedup,hier_dedup:comm_dtype=bfloat16:overlap_chunks=4`
benchmarks three variants side by side; each is labelled by its full spec. A variant
may set the fields that change the exchange alone:

  - `comm_dtype`: the wire dtype of dispatched rows (None, float32, bfloat16,
    float8_e4m3fn; `dispatch/wire.py`);
  - `overlap_chunks`: independent token chunks per device, each with its own
    dispatch and combine (`moe._device_moe`); it must divide --tokens.

Values are checked by `MoEConfig` itself. `auto` and the `gspmd` baseline take no
fields. Two variants with the same strategy and the same field values (defaults
filled in) are the same variant, and a list may hold it once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from hiermoe_jax import cost, traffic
from hiermoe_jax.config import ConfigError, MoEConfig
from hiermoe_jax.dispatch import registry, wire
from hiermoe_jax.dispatch.base import Strategy

FIELDS = ("comm_dtype", "overlap_chunks")  # what a variant may set
DEFAULTS = {"comm_dtype": None, "overlap_chunks": 1}
NO_FIELDS = ("auto", "gspmd")  # `auto` decides per call; gspmd is XLA's own dispatch
# gspmd's one all-to-all over all devices, for the cost model (not an engine strategy).
GSPMD = Strategy("gspmd", tiers=("flat",), dedup=False, auto_candidate=False)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One benchmarked entry: `spec` (its label, as written), `base` strategy, `fields`."""
  spec: str
  base: str
  fields: tuple[tuple[str, Any], ...] = ()  # (field, value) in the order written

  @property
  def field_dict(self) -> dict[str, Any]:
    return dict(self.fields)

  @property
  def comm_dtype(self) -> str | None:
    return self.field_dict.get("comm_dtype")

  @property
  def chunks(self) -> int:
    return self.field_dict.get("overlap_chunks", 1)

  @property
  def key(self) -> tuple:
    """What makes two variants the same: the strategy and every field's value."""
    return (self.base,) + tuple(sorted({**DEFAULTS, **self.field_dict}.items(),
                                       key=lambda kv: kv[0]))

  @property
  def priced(self) -> str | Strategy:
    """What the cost model prices: the registered strategy, or GSPMD."""
    return GSPMD if self.base == "gspmd" else self.base

  def bytes_per_row(self, d_model: int, dtype: str) -> dict[str, int]:
    """Bytes one row puts on the wire: {"dispatch", "combine"} (wire.py)."""
    back = wire.combine_dtype(dtype, self.comm_dtype).itemsize * d_model
    return {"dispatch": wire.bytes_per_row(d_model, dtype, self.comm_dtype), "combine": back}

  def bytes_per_elem(self, d_model: int, dtype: str) -> float:
    """Bytes per row element over a dispatch + combine round trip, averaged."""
    return wire.bytes_per_elem(d_model, dtype, self.comm_dtype)

  def to_json(self) -> dict:
    return {"strategy": self.spec, "base_strategy": self.base, "fields": self.field_dict}


def _parse_value(field: str, text: str):
  """The typed value of `field=text`; what does not parse goes to MoEConfig as text,
  which refuses it naming the field."""
  if field == "comm_dtype":
    return None if text in ("None", "none") else text
  try:
    return int(text)
  except ValueError:
    return text


def parse(text: str, *, timed: bool, tokens: int, d_model: int, num_experts: int,
          top_k: int) -> list[Variant]:
  """Parses --strategies; a bad entry raises a one-line ConfigError naming it."""
  valid = registry.names() + ("auto",) + (("gspmd",) if timed else ())
  variant_fields = set(FIELDS)
  config_fields = {f.name for f in dataclasses.fields(MoEConfig)}

  def fail(why: str):
    raise ConfigError(f"--strategies={text!r} is invalid: {why}")

  out, seen = [], {}
  for spec in (s.strip() for s in text.split(",")):
    if not spec:
      fail("an empty entry; expected NAME or NAME:FIELD=VALUE[:FIELD=VALUE], comma-separated")
    base, *parts = (s.strip() for s in spec.split(":"))
    if base == "gspmd" and not timed:
      fail("'gspmd' is a timed-mode baseline (omit --analytic)")
    if base not in valid:
      fail(f"{base!r} is not one of {list(valid)}")
    if parts and base in NO_FIELDS:
      fail(f"{spec!r}: {base} takes no fields; drop {':'.join(parts)!r}")
    fields = {}
    for part in parts:
      field, eq, value = (s.strip() for s in part.partition("="))
      if not eq or not field or not value:
        fail(f"{spec!r}: {part!r} is not FIELD=VALUE (a variant is NAME:FIELD=VALUE, "
             f"with FIELD one of {list(FIELDS)})")
      if field not in variant_fields:
        what = ("a MoEConfig field the benchmark does not vary" if field in config_fields
                else "not a MoEConfig field")
        fail(f"{spec!r}: {field!r} is {what}; a variant may set {' or '.join(FIELDS)}")
      if field in fields:
        fail(f"{spec!r} sets {field} twice")
      fields[field] = _parse_value(field, value)
    try:
      MoEConfig(d_model=d_model, d_ff=d_model, num_experts=num_experts, top_k=top_k,
                dispatch=base if base != "gspmd" else "flat", **fields)
    except ConfigError as e:
      fail(f"{spec!r}: {e}")
    chunks = fields.get("overlap_chunks", 1)
    if tokens % chunks:
      fail(f"{spec!r}: overlap_chunks={chunks} must divide --tokens={tokens}")
    variant = Variant(spec, base, tuple(fields.items()))
    if variant.key in seen:
      same = seen[variant.key]
      why = ("appears twice" if same == spec
             else f"repeats {same!r} (the same strategy and field values)")
      fail(f"{spec!r} {why}; list each variant once")
    seen[variant.key] = spec
    out.append(variant)
  return out


# ----------------------------------------------------------------------------- traffic

def chunked_stats(ids_ATK: np.ndarray, base: str, chunks: int, *, mesh_shape, num_experts: int,
                  d_model: int, capacity_factor: float | None) -> dict:
  """`traffic.stats` of one strategy run on `chunks` independent token chunks per
  device, as `moe._device_moe` runs them."""
  return traffic.stats(ids_ATK, mesh_shape=mesh_shape, num_experts=num_experts,
                       d_model=d_model, strategies=[base], capacity_factor=capacity_factor,
                       chunks=chunks)[base]


def variant_entry(stats: Mapping, variant: Variant, *, d_model: int, dtype: str,
                  profile: cost.CostProfile, mesh_shape) -> dict:
  """A result row: the strategy's traffic with the variant's wire bytes (dispatch
  direction) and its predicted ms (every chunk's hops priced, one after another)."""
  row = variant.bytes_per_row(d_model, dtype)
  predicted = variant.chunks * cost.predict(
      variant.priced, stats, profile, mesh_shape=mesh_shape, d_model=d_model,
      bytes_per_elem=variant.bytes_per_elem(d_model, dtype))
  return {**stats, **variant.to_json(),
          "bytes": {k: r * row["dispatch"] for k, r in stats["rows"].items()},
          "wire_bytes_per_row": row, "overlap_chunks": variant.chunks,
          "predicted_ms": float(predicted)}


def hottest_link(results: list[dict], flat: Mapping) -> dict | None:
  """The largest max_rows_per_peer of any hop in `results` (auto excluded: it repeats
  its choice), against flat's largest."""
  best = None
  for r in results:
    if r.get("base_strategy") == "auto":
      continue
    for link in ("inter", "intra"):
      rows = r["max_rows_per_peer"][link]
      if best is None or rows > best["max_rows_per_peer"]:
        best = {"strategy": r["strategy"], "link": link, "max_rows_per_peer": rows}
  if best is None:
    return None
  flat_peak = max(flat["max_rows_per_peer"].values())
  return {**best, "flat_max_rows_per_peer": flat_peak,
          "vs_flat": best["max_rows_per_peer"] / max(flat_peak, 1)}
