"""Timed mesh benchmark: dispatch + combine of each strategy, and profile fitting.

Legend (docs/legend.md): A devices, T tokens (per device; per gspmd group in the
baseline), K top-k, E experts, D model dim, P peers of a hop, C capacity (rows per
peer), W gspmd groups.

Every strategy runs on the same routed tokens with tight padded buffers: each
hop's capacity is the most rows any device sends to one peer in it (self
included, from `traffic.simulate`), so nothing is dropped and padding is minimal.
A variant (`variants.py`) may put its dispatched rows on a low-precision wire
(`comm_dtype`) and split each device's tokens into `overlap_chunks` independent
dispatch/combine chunks, as `moe._device_moe` does; each chunk's buffers are tight
for the fullest chunk.
The expert stage is a cheap stand-in (one weighted vector per row back, as
pre-reduce does), so the time is the exchange alone. Strategies are interleaved
across repeats (rotating order) to cancel drift on a shared machine; in a
multi-process run each sample is the slowest process's time, taken after a
barrier.

`gspmd` is the GShard / MaxText dense baseline: a one-hot [W, S, E, C] dispatch
mask einsum under jit, with a sharding constraint moving the expert dim onto
("node", "local"), so XLA inserts the all-to-all (and the reverse for combine).

`fit_profile` times one exchange hop of each kind (flat, inter, intra) over a sweep
of message sizes, small to large, and fits each kind's StageCost (`cost.fit_stage`).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from hiermoe_jax import calibrate, cost, traffic
from hiermoe_jax.bench import variants as variants_lib
from hiermoe_jax.cluster import distributed
from hiermoe_jax.config import ConfigError
from hiermoe_jax.dispatch import exchange, get_strategy
from hiermoe_jax.dispatch.base import Strategy, receiver
from hiermoe_jax.mesh import AXES, MeshShape


def start(mesh_arg: tuple[int, int] | None):
  """Initializes JAX (multi-process if launched so) and returns the mesh.

  In a single process, `--mesh NxG` forces N*G host CPU devices if XLA_FLAGS does
  not already set a device count (must happen before JAX's backend starts).
  """
  if distributed.launcher_env() is None and mesh_arg is not None:
    flags = os.environ.get("XLA_FLAGS", "")
    if distributed.DEVICE_COUNT_FLAG not in flags:
      os.environ["XLA_FLAGS"] = distributed.simulated_cpu_flags(flags, mesh_arg[0] * mesh_arg[1])
  distributed.initialize()
  import jax
  from hiermoe_jax.mesh import make_mesh
  if mesh_arg is None or jax.process_count() > 1:
    if mesh_arg is not None and tuple(mesh_arg) != (jax.process_count(),
                                                    jax.local_device_count()):
      raise ConfigError(f"--mesh={mesh_arg[0]}x{mesh_arg[1]} is invalid in a "
                        f"{jax.process_count()}-process run: the mesh is processes x local "
                        f"devices = {jax.process_count()}x{jax.local_device_count()}; "
                        "omit --mesh")
    return make_mesh()
  nodes, local = mesh_arg
  if jax.device_count() < nodes * local:
    raise ConfigError(f"--mesh={nodes}x{local} is invalid: it needs {nodes * local} devices; "
                      f"JAX has {jax.device_count()} (set "
                      f"XLA_FLAGS={distributed.DEVICE_COUNT_FLAG}=N before start)")
  return make_mesh(nodes, local, devices=jax.devices()[: nodes * local])


def is_leader() -> bool:
  import jax
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- inputs

def global_array(mesh, host_array: np.ndarray):
  """A row-sharded global array; each process feeds only its own shards."""
  import jax
  from hiermoe_jax.mesh import named, sharded_rows
  sharding = named(mesh, sharded_rows(host_array.ndim))
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def routed_inputs(ids_ATK: np.ndarray, d_model: int, dtype: str, seed: int):
  """Host arrays x [N*G*T, D], slots [N*G*T, K] (identity placement), w [N*G*T, K]."""
  devices, tokens, top_k = ids_ATK.shape
  rng = np.random.default_rng(seed + 1)
  x = rng.standard_normal((devices * tokens, d_model), dtype=np.float32)
  w = rng.random((devices * tokens, top_k), dtype=np.float32)
  w /= w.sum(-1, keepdims=True)
  if dtype == "bfloat16":
    import jax.numpy as jnp
    x = x.astype(jnp.bfloat16)
  return x, ids_ATK.reshape(devices * tokens, top_k).astype(np.int32), w


def tight_hop_caps(slots_ATK: np.ndarray, strategy: str, shape: MeshShape,
                   num_experts: int, chunks: int = 1) -> tuple[int, ...]:
  """Per-hop capacity = most rows any device sends to one peer (self included); with
  `chunks`, of any one of each device's `chunks` equal token chunks."""
  per = slots_ATK.shape[1] // chunks
  caps = [1] * len(get_strategy(strategy).tiers)
  for c in range(chunks):
    sim = traffic.simulate(slots_ATK[:, c * per:(c + 1) * per], strategy, shape, num_experts)
    caps = [max(cap, int(hop["sent"].max(initial=0))) for cap, hop in zip(caps, sim["hops"])]
  return tuple(caps)


def gspmd_capacity(slots_ATK: np.ndarray, group: int, num_experts: int) -> int:
  """Tight per-(group, expert) capacity of the gspmd baseline."""
  devices, tokens, top_k = slots_ATK.shape
  groups = slots_ATK.reshape(devices * tokens // group, group * top_k)
  counts = np.stack([np.bincount(g, minlength=num_experts) for g in groups])
  return max(int(counts.max()), 1)


# ----------------------------------------------------------------------------- steps

def _stand_in_experts(rows_RD, slots_RM, w_RM):
  """One weighted vector per received row (what pre-reduce sends back)."""
  import jax.numpy as jnp
  kept = jnp.where(slots_RM >= 0, w_RM, 0.0)
  return rows_RD * jnp.sum(kept, -1, keepdims=True).astype(rows_RD.dtype), jnp.int32(0)


def _with_backward(forward: Callable, backward: bool) -> Callable:
  """forward(x, slots, w) -> y; with backward, also the VJP of sum(y * ct) wrt x, w."""
  import jax
  if not backward:
    return lambda x, slots, w, ct: forward(x, slots, w)

  def step(x, slots, w, ct):
    y, pullback = jax.vjp(lambda x, w: forward(x, slots, w), x, w)
    return y, pullback(ct)
  return step


def _exchange_only(strategy, x_TD, slots_TK, w_TK, *, hop_caps, layout):
  """dispatch -> stand-in experts -> combine: the exchange with no expert FFN.
  Returns (y, (drops per stage,)) in the shape `auto.run_cheapest` expects."""
  rows_RD, slots_RM, w_RM, handle = exchange.dispatch(x_TD, slots_TK, w_TK, strategy,
                                                      capacities=hop_caps, layout=layout)
  y_RD, _ = _stand_in_experts(rows_RD, slots_RM, w_RM)
  return exchange.combine(y_RD, handle), ({},)


def exchange_step(mesh, strategy: str | Strategy, hop_caps: tuple[int, ...], num_experts: int,
                  backward: bool, *, comm_dtype: str | None = None, chunks: int = 1) -> Callable:
  """jit(step)(x, slots, w, ct) running one strategy's dispatch + combine, its rows on
  the wire in `comm_dtype` (MoEConfig.comm_dtype), on `chunks` independent slices of
  each device's tokens (MoEConfig.overlap_chunks; hop_caps are per chunk)."""
  import jax
  import jax.numpy as jnp
  shape = MeshShape.of(mesh)
  layout = exchange.Layout(shape, num_experts, comm_dtype=comm_dtype,
                           per_peer_blocks=exchange.Layout.per_peer_blocks_for(mesh))
  strat = get_strategy(strategy) if isinstance(strategy, str) else strategy

  def device(x_TD, slots_TK, w_TK):
    per_chunk = x_TD.shape[0] // chunks
    ys = []
    for c in range(chunks):
      part = slice(c * per_chunk, (c + 1) * per_chunk)
      with jax.named_scope(f"chunk{c}" if chunks > 1 else ""):
        ys.append(_exchange_only(strat, x_TD[part], slots_TK[part], w_TK[part],
                                 hop_caps=hop_caps, layout=layout)[0])
    return ys[0] if chunks == 1 else jnp.concatenate(ys)

  rows = shape.rows(2)
  forward = jax.shard_map(device, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows)
  return jax.jit(_with_backward(forward, backward))


def auto_step(mesh, caps_by_name: dict, num_experts: int, profile, *, top_k: int,
              d_model: int, bytes_per_elem: int, backward: bool) -> Callable:
  """Like `exchange_step`, but each call prices the strategies on the live routing
  (`auto.run_cheapest`, as in moe_apply) and runs the cheapest, decision included."""
  import jax
  from hiermoe_jax.dispatch import auto
  shape = MeshShape.of(mesh)
  layout = exchange.Layout(shape, num_experts,
                           per_peer_blocks=exchange.Layout.per_peer_blocks_for(mesh))

  def body(strategy, x_TD, slots_TK, w_TK):
    return _exchange_only(strategy, x_TD, slots_TK, w_TK, hop_caps=caps_by_name[strategy.name],
                          layout=layout)

  def device(x_TD, slots_TK, w_TK):
    (y_TD, _), _, _ = auto.run_cheapest(
        body, (x_TD, slots_TK, w_TK), slots_TK, profile=profile, shape=layout.shape,
        experts_per_device=layout.experts_per_device, top_k=top_k, d_model=d_model,
        bytes_per_elem=bytes_per_elem)
    return y_TD

  rows = shape.rows(2)
  forward = jax.shard_map(device, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows)
  return jax.jit(_with_backward(forward, backward))


def gspmd_step(mesh, *, group: int, capacity: int, num_experts: int,
               backward: bool) -> Callable:
  """GShard-style dense dispatch; XLA's SPMD partitioner inserts the all-to-alls."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from hiermoe_jax.mesh import named

  by_group = named(mesh, P(AXES, None, None, None))  # [W, ...] groups over devices
  by_expert = named(mesh, P(None, AXES, None, None))  # [W, E, C, D] experts over devices

  def forward(x_TD, slots_TK, w_TK):
    n, d = x_TD.shape
    k = slots_TK.shape[1]
    x_WTD = x_TD.reshape(n // group, group, d)
    onehot_WTKE = jax.nn.one_hot(slots_TK.reshape(n // group, group, k), num_experts,
                                 dtype=jnp.int32)
    mask_WTE = jnp.sum(onehot_WTKE, axis=2)
    gate_WTE = jnp.einsum("wtke,wtk->wte", onehot_WTKE.astype(jnp.float32),
                          w_TK.reshape(n // group, group, k))
    pos_WTE = jnp.cumsum(mask_WTE, axis=1) - 1
    keep_WTE = (mask_WTE > 0) & (pos_WTE < capacity)
    dispatch_WTEC = (jax.nn.one_hot(jnp.where(keep_WTE, pos_WTE, -1), capacity,
                                    dtype=x_TD.dtype))
    combine_WTEC = dispatch_WTEC * gate_WTE[..., None].astype(x_TD.dtype)
    with jax.named_scope("dispatch_gspmd"):
      buf_WECD = jnp.einsum("wtec,wtd->wecd", dispatch_WTEC, x_WTD)
      buf_WECD = jax.lax.with_sharding_constraint(buf_WECD, by_group)
      buf_WECD = jax.lax.with_sharding_constraint(buf_WECD, by_expert)  # all-to-all
    with jax.named_scope("experts"):
      out_WECD = buf_WECD * jnp.asarray(2, buf_WECD.dtype)  # stand-in, stays on experts
    with jax.named_scope("combine_gspmd"):
      out_WECD = jax.lax.with_sharding_constraint(out_WECD, by_group)  # all-to-all back
      y_WTD = jnp.einsum("wtec,wecd->wtd", combine_WTEC, out_WECD)
    return y_WTD.reshape(n, d)

  return jax.jit(_with_backward(forward, backward))


# ----------------------------------------------------------------------------- timing

def summary(ms: np.ndarray) -> dict:
  return {"min": float(np.min(ms)), "median": float(np.median(ms)), "max": float(np.max(ms))}


# ----------------------------------------------------------------------------- benchmark

def benchmark(mesh, ids_ATK: np.ndarray, *, strategies: list, num_experts: int,
              d_model: int, dtype: str, repeats: int, warmup: int, backward: bool,
              gspmd_group: int, seed: int, profile=None) -> dict[str, dict]:
  """Times each variant, interleaved; returns {spec: {"time_ms", "hop_capacity", ...}}.

  strategies: `variants.Variant`s, or their specs ("hier_dedup:comm_dtype=bfloat16").
  """
  import jax.numpy as jnp
  if any(isinstance(v, str) for v in strategies):
    top_k = ids_ATK.shape[-1]
    strategies = variants_lib.parse(
        ",".join(v if isinstance(v, str) else v.spec for v in strategies), timed=True,
        tokens=ids_ATK.shape[1], d_model=d_model, num_experts=num_experts, top_k=top_k)
  shape = MeshShape.of(mesh)
  x, slots, w = routed_inputs(ids_ATK, d_model, dtype, seed)
  x_g, slots_g, w_g = (global_array(mesh, a) for a in (x, slots, w))
  ct_g = global_array(mesh, np.ones(x.shape, np.float32).astype(x.dtype))
  info, steps = {}, {}
  for variant in strategies:
    name = variant.base
    if name == "gspmd":
      cap = gspmd_capacity(ids_ATK, gspmd_group, num_experts)
      fn = gspmd_step(mesh, group=gspmd_group, capacity=cap, num_experts=num_experts,
                      backward=backward)
      groups_per_device = ids_ATK.shape[1] // gspmd_group
      per_peer = (num_experts // shape.devices) * groups_per_device * cap
      info[variant.spec] = {"hop_capacity": [per_peer], "gspmd_group": gspmd_group,
                            "gspmd_expert_capacity": cap}
    elif name == "auto":
      from hiermoe_jax.dispatch import auto
      top_k = ids_ATK.shape[-1]
      caps = {n: tight_hop_caps(ids_ATK, n, shape, num_experts)
              for n in auto.candidates(shape, top_k)}
      fn = auto_step(mesh, caps, num_experts, profile, top_k=top_k, d_model=d_model,
                     bytes_per_elem=jnp.dtype(dtype).itemsize, backward=backward)
      info[variant.spec] = {"hop_capacity_by_strategy": {n: list(c) for n, c in caps.items()}}
    else:
      caps = tight_hop_caps(ids_ATK, name, shape, num_experts, variant.chunks)
      fn = exchange_step(mesh, name, caps, num_experts, backward,
                         comm_dtype=variant.comm_dtype, chunks=variant.chunks)
      info[variant.spec] = {"hop_capacity": list(caps), "overlap_chunks": variant.chunks}
    steps[variant.spec] = functools.partial(fn, x_g, slots_g, w_g, ct_g)
  times = calibrate.samples_ms(steps, repeats=repeats, warmup=warmup, barrier_each=True)
  for spec, ms in times.items():
    info[spec]["time_ms"] = summary(ms)
    info[spec]["samples_ms"] = [float(v) for v in ms]
  return info


# ----------------------------------------------------------------------------- fitting

def stage_step(mesh, kind: str, capacity: int) -> Callable:
  """jit(step)(x, slots, w, ct): one dedup hop of the kind's tier each way, run by
  the exchange engine itself (gather into the buffer, metadata and row
  all-to-alls, stand-in experts, back, scatter-add into the tokens), so a fitted
  stage prices the bookkeeping a strategy's hop does too. One expert per device;
  feed it `stage_routing`."""
  strategy = Strategy(f"{kind}_stage", (kind,), dedup=True)
  return exchange_step(mesh, strategy, (capacity,), MeshShape.of(mesh).devices,
                       backward=False)


def stage_routing(shape: MeshShape, kind: str, tokens: int, rows: int) -> np.ndarray:
  """[devices, T', K] expert ids (one expert per device) for which every device
  sends exactly `rows` rows to every peer of the kind's hop (self included): T' =
  max(tokens, rows) tokens, each routed to K = ceil(peers * rows / T') distinct
  peers (entries past peers * rows are -1, not routed)."""
  peers = cost.group_size(kind, shape)
  tokens = max(tokens, rows)
  top_k = -(-peers * rows // tokens)
  device = np.arange(shape.devices)[:, None]
  peer = np.broadcast_to(np.arange(tokens * top_k) % peers, (shape.devices, tokens * top_k))
  dest = np.where(np.arange(tokens * top_k) < peers * rows, receiver(device, peer, kind, shape),
                  -1)
  return dest.reshape(shape.devices, tokens, top_k).astype(np.int32)


FIT_SPAN = 512  # the smallest fitted stage is max_bytes / FIT_SPAN


def _fit_rows(max_bytes: int, points: int, group: int, d_model: int, bpe: int) -> list[int]:
  """Distinct rows per peer of the fitted sizes: `points` geometric steps from
  max_bytes / FIT_SPAN to max_bytes per stage, so small messages (the trainer's)
  are measured, not extrapolated from large ones."""
  targets = np.geomspace(max_bytes / FIT_SPAN, max_bytes, points)
  return sorted({max(1, int(round(t / (group * d_model * bpe)))) for t in targets})


def fit_profile(mesh, *, d_model: int, dtype: str, max_bytes: int, points: int,
                repeats: int, warmup: int, tokens: int,
                name: str = "") -> tuple[cost.CostProfile, dict]:
  """Sweeps message sizes per stage kind, fits its StageCost; returns (profile, details).

  Message sizes are geometric from max_bytes / FIT_SPAN to max_bytes, in bytes of
  one stage (group * rows per peer * D * bytes per element, as in `cost`). Each is
  a real dedup hop (`stage_step`) from the benchmark's T tokens per device (more
  when a stage needs more rows per peer than T). On CPU this prices a strategy
  better than a bare all-to-all round trip, whose scatter into P*C buffer rows
  made large stages look ~15-35% dearer than hops that scatter into T tokens.
  """
  shape = MeshShape.of(mesh)
  bpe = 2 if dtype == "bfloat16" else 4
  if shape.devices == 1:
    raise ConfigError(f"fit_profile: mesh {shape.nodes}x{shape.local} is invalid: a profile "
                      "is fitted on all-to-alls, which need >= 2 devices")
  # A kind over one device (inter on 1xG) is timed too: its hop is a local copy.
  rows_by_kind = {kind: _fit_rows(max_bytes, points, cost.group_size(kind, shape), d_model, bpe)
                  for kind in cost.STAGE_KINDS}
  for kind, rows_list in rows_by_kind.items():
    if len(rows_list) < 2:  # a line needs two sizes; say so before timing anything
      raise ConfigError(f"fit_profile: max_bytes={max_bytes} is invalid: {kind} stages "
                        f"({cost.group_size(kind, shape)} peers, D={d_model}) get one message "
                        "size only; use a larger --fit-max-mb")
  steps, meta = {}, {}
  for kind, rows_list in rows_by_kind.items():
    group = cost.group_size(kind, shape)
    for rows in rows_list:
      ids = stage_routing(shape, kind, tokens, rows)
      x, slots, w = routed_inputs(ids, d_model, dtype, seed=0)
      fn = stage_step(mesh, kind, rows)
      args = [global_array(mesh, a) for a in (x, slots, w, x)]
      key = f"{kind}:{rows}"
      steps[key] = functools.partial(fn, *args)
      meta[key] = (kind, cost.stage_bytes(group, rows, d_model, bpe))
  times = calibrate.samples_ms(steps, repeats=repeats, warmup=warmup, barrier_each=True)
  stages, details = {}, {}
  for kind in cost.STAGE_KINDS:
    keys = [k for k in steps if meta[k][0] == kind]
    nbytes = np.array([meta[k][1] for k in keys], np.float64)
    per_stage = np.array([np.median(times[k]) / 2 for k in keys])  # 2 stages per call
    fitted, r2 = cost.fit_stage(nbytes, per_stage)
    stages[kind] = fitted
    details[kind] = {**fitted.to_dict(), "r2": r2, "bytes": nbytes.tolist(),
                     "stage_ms": per_stage.tolist()}
  return cost.CostProfile(**stages, name=name), details
