"""Expert-swap search (HierD-ES and beyond, docs/design.md, section 7). Pure numpy.

Given a window of routing decisions and the current placement, find the expert
swaps (pairs of physical slots on different devices) that minimise the modelled
`hier_dedup` all-to-all time, and keep only those that pay for their migration.

Objective of a placement (milliseconds per step):

    time = sum over stages s in (inter, intra) with group size > 1 of
             2 * (alpha_s + beta_s * group_s * smoothmax(loads_s) * D * bytes)
         + compute_ms_per_pair * smoothmax(pairs per device)

for one step (a window of several: the mean over its steps), exactly
`cost.predict_from_peak_rows("hier_dedup", ...)` with the peak replaced by the smooth
max `max(x) * (sum_i (x_i / max x)^g)^(1/g)` (= the g-norm), g = 10.
Loads (dropless, only rows that leave their device, as in `traffic.stats`):
  stage 1 `L1[s, n]`: distinct tokens of source device s with an expert on node
    n != node(s);
  stage 2 `L2[l, d]`: distinct tokens, over source devices with local index l,
    with an expert on device d; the stage-1 receiver is (node(d), l), so entries
    with local(d) == l stay on their device and do not count.

Incremental update, O(tokens * E^2) as dense BLAS products per group of tokens:
for a token that chose r and not c, moving r to c's unit (node or device) adds 1
to that unit unless the token already goes there, and removes 1 from r's old unit
unless another chosen expert stays there (symmetric for c). With H[t, e] the
token's hits per slot and C[t, u] its hits per unit,

    delta at unit(r) for pair (r, c) = sum_t C[t, unit(r)] == 0 and H[t, c]
                                     - sum_t C[t, unit(r)] == 1 and H[t, r] and not H[t, c]

per group of tokens (source device for stage 1, source local index for stage 2).

Legend (docs/legend.md): T tokens (all source devices), K top-k, E experts
(= slots), U units, Y sender groups, N nodes, L local devices per node.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hiermoe_jax import cost as cost_lib
from hiermoe_jax.errors import check_bool, check_int, check_real, fail
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.validate import check_experts_fit, check_placement

PARAM_MATRICES = 3  # gate, up, down per expert


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Cost parameters of a swap decision.

  profile: alpha-beta per stage kind (`cost.load_profile(...)`).
  d_model, d_ff: expert dims (activation rows are d_model wide; an expert holds
    3 matrices of d_model * d_ff).
  bytes_per_elem: bytes per activation element in the all-to-all, averaged over
    dispatch and combine (`dispatch.wire.bytes_per_elem`: fractional for fp8).
  param_bytes_per_elem: bytes per weight / optimizer-state element.
  optimizer_slots: optimizer-state copies per weight that move with it (Adam: 2).
  steps_until_next_decision: steps over which a swap's per-step saving is earned.
  max_pairs: disjoint pairs accepted per decision (the paper uses 1).
  grow_pairs: continue past max_pairs while the next pair still pays (its saving
    x steps_until_next_decision exceeds its migration price), up to E/2 pairs.
  group_plans: also price whole re-placements (`groups.py`: co-location of
    co-selected experts per node, load packing over devices) and take the plan
    with the largest saving x horizon - migration among the pair search and them.
  compute_ms_per_pair: weight of the compute-imbalance term, ms per (token,
    expert) pair on the most loaded device; 0 disables it (the paper's objective).
  smooth_g: exponent of the smooth max.
  exact_peaks: a plan keeps only the prefix of its greedily chosen pairs whose
    modelled time with the exact peaks falls by enough to pay, and reports exact
    times. False (the default, the paper's search): trust the smooth objective,
    which also falls when only entries below a peak do - on a real trace
    (README, "Routing traces") it took 16 pairs that raised every step's modelled
    time by up to 6%; several pairs together can also lower a peak no single pair moves.
  migration: price migration (False: free, for tests and for bounding the
    achievable gain).
  window_steps: steps of routing concatenated along T in `topk_ids` (the controller
    sets it); the objective is the mean over them of each step's time, so times and
    gains are per step and priced on each step's own peaks.
  slice_ms: measured wall ms to move one expert slice (weights and optimizer state)
    between devices, e.g. `SwapController`'s average over its migrations; None:
    price through the cost model (one stage moving `bytes_per_swap`).
  """
  profile: cost_lib.CostProfile
  d_model: int
  d_ff: int
  bytes_per_elem: float = 4
  param_bytes_per_elem: int = 4
  optimizer_slots: int = 2
  steps_until_next_decision: int = 100
  max_pairs: int = 1
  grow_pairs: bool = False
  group_plans: bool = False
  compute_ms_per_pair: float = 0.0
  smooth_g: float = 10.0
  exact_peaks: bool = False
  migration: bool = True
  window_steps: int = 1
  slice_ms: float | None = None

  def __post_init__(self):
    if not isinstance(self.profile, cost_lib.CostProfile):
      fail("SearchConfig.profile", self.profile,
           "must be a CostProfile (e.g. cost.load_profile('default'))")
    check_real("SearchConfig.bytes_per_elem", self.bytes_per_elem, 0.0, strict=True)
    for name, low in (("d_model", 1), ("d_ff", 1), ("param_bytes_per_elem", 1),
                      ("optimizer_slots", 0), ("steps_until_next_decision", 0),
                      ("max_pairs", 0), ("window_steps", 1)):
      check_int(f"SearchConfig.{name}", getattr(self, name), low)
    for name, low in (("compute_ms_per_pair", 0.0), ("smooth_g", 1.0)):
      check_real(f"SearchConfig.{name}", getattr(self, name), low)
    if self.slice_ms is not None:
      check_real("SearchConfig.slice_ms", self.slice_ms, 0.0)
    for name in ("grow_pairs", "group_plans", "migration", "exact_peaks"):
      check_bool(f"SearchConfig.{name}", getattr(self, name))

  @property
  def bytes_per_swap(self) -> int:
    """Two experts' weights and optimizer state."""
    return (2 * PARAM_MATRICES * (1 + self.optimizer_slots) * self.d_model * self.d_ff
            * self.param_bytes_per_elem)


@dataclasses.dataclass(frozen=True)
class SwapPlan:
  """The result of one decision. `placement` is the new slot -> logical expert map.

  kind: "pairs" (`pairs` are physical slot pairs (i < j), in the order accepted),
    or a group plan of `groups.py` ("colocate", "pack"; `pairs` empty).
  slices: expert slices that change device (2 per pair).
  """
  placement: np.ndarray
  pairs: tuple[tuple[int, int], ...]
  time_before_ms: float
  time_after_ms: float
  migration_ms: float
  bytes_to_move: int
  kind: str = "pairs"
  moved: int | None = None  # slices, for group plans

  @property
  def gain_ms(self) -> float:
    """Predicted saving per step."""
    return self.time_before_ms - self.time_after_ms

  @property
  def slices(self) -> int:
    return 2 * len(self.pairs) if self.moved is None else self.moved

  @property
  def changed(self) -> bool:
    return self.slices > 0

  def net_ms(self, horizon: int) -> float:
    """Saving over `horizon` steps minus the migration."""
    return self.gain_ms * horizon - self.migration_ms if self.changed else 0.0

  @property
  def break_even_steps(self) -> float:
    """Steps after which the saving has paid for the migration (inf: never)."""
    return self.migration_ms / self.gain_ms if self.gain_ms > 0 else float("inf")


# --- statistics --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tier:
  """Loads of one stage and the per-pair deltas of its units."""
  loads_YU: np.ndarray  # float64 [Y, U]
  valid_YU: np.ndarray  # bool [Y, U]: the entry is a row that leaves its device
  delta_YEE: np.ndarray  # [Y, r, c]: change at unit(r) when slots r and c swap
  unit_E: np.ndarray  # unit of each slot


def _hits(topk_ids, placement, shape: MeshShape) -> np.ndarray:
  """H [M, E] float32 0/1: token m chose the expert in slot e (tokens in source order)."""
  ids = np.asarray(topk_ids)
  devices, tokens, top_k = ids.shape
  num_experts = placement.shape[0]
  slot_of = np.argsort(placement)
  slots_TK = slot_of[ids.reshape(devices * tokens, top_k)]
  hits = np.zeros((devices * tokens, num_experts), np.float32)
  np.put_along_axis(hits, slots_TK, 1.0, axis=1)
  return hits


def _unit_counts(hits_YTE, unit_E, num_units):
  """[Y, T, U] hits of each token per unit."""
  onehot_EU = np.zeros((unit_E.shape[0], num_units), np.float32)
  onehot_EU[np.arange(unit_E.shape[0]), unit_E] = 1.0
  return hits_YTE @ onehot_EU


def _tier(hits_YTE, unit_E, num_units, valid_YU) -> _Tier:
  """Loads and per-pair deltas of one tier (units: nodes or devices).

  hits_YTE: float32 0/1 hits of the tokens grouped by load row y (exact sums
  while a group has < 2^24 tokens).
  """
  count_YTU = _unit_counts(hits_YTE, unit_E, num_units)
  zero_YTE = (count_YTU == 0)[..., unit_E].astype(np.float32)  # the token misses unit(e)
  only_YTE = hits_YTE * (count_YTU == 1)[..., unit_E]  # e is its only hit on unit(e)
  loads = np.sum(count_YTU > 0, axis=1).astype(np.float64)
  # Gains at unit(r) from tokens with c: z^T h. Losses at unit(r) from tokens whose
  # only hit there is r and that do not have c: sum(o) - o^T h.
  # (2D products per group: numpy's batched matmul of transposed views can miss BLAS.)
  delta = np.stack([z.T @ h + o.T @ h for z, o, h in zip(zero_YTE, only_YTE, hits_YTE)])
  delta = delta.astype(np.float64) - only_YTE.sum(1, dtype=np.float64)[:, :, None]
  same = unit_E[:, None] == unit_E[None, :]
  delta[:, same] = 0.0
  return _Tier(np.where(valid_YU, loads, 0.0), valid_YU, delta, unit_E)


def _tier_inputs(hits_TE, shape: MeshShape, tokens: int):
  """(kind, hits grouped by load row, unit per slot, units, valid rows) per stage."""
  num_experts = hits_TE.shape[1]
  slot_device = np.arange(num_experts) // (num_experts // shape.devices)
  source_node = np.arange(shape.devices) // shape.local
  hits = np.asarray(hits_TE, np.float32)
  # Stage 1 rows: source device. Stage 2 rows: source local index (over all nodes).
  by_source = hits.reshape(shape.devices, tokens, num_experts)
  by_local = np.swapaxes(hits.reshape(shape.nodes, shape.local, tokens, num_experts), 0, 1)
  by_local = by_local.reshape(shape.local, shape.nodes * tokens, num_experts)
  return (("inter", by_source, slot_device // shape.local, shape.nodes,
           source_node[:, None] != np.arange(shape.nodes)[None, :]),
          ("intra", by_local, slot_device, shape.devices,
           np.arange(shape.local)[:, None] != (np.arange(shape.devices) % shape.local)[None]))


def _tiers(hits_TE, shape: MeshShape, tokens: int):
  return tuple(_tier(*args) for _, *args in _tier_inputs(hits_TE, shape, tokens))


def _power_sums(tier: _Tier, g: float, scale: float):
  """(sum x^g over all entries, per unit, per pair after the swap), x scaled."""
  x_YU = tier.loads_YU / scale
  col_U = np.sum(np.where(tier.valid_YU, x_YU, 0.0) ** g, axis=0)
  unit_E = tier.unit_E
  new_YEE = (tier.loads_YU[:, unit_E][:, :, None] + tier.delta_YEE) / scale
  new_YEE = np.where(tier.valid_YU[:, unit_E][:, :, None], np.maximum(new_YEE, 0.0), 0.0)
  new_col_EE = np.sum(new_YEE ** g, axis=0)  # [r, c]: new sum over unit(r)'s column
  total = col_U.sum()
  pair = (total - col_U[unit_E][:, None] - col_U[unit_E][None, :]
          + new_col_EE + new_col_EE.T)
  same = unit_E[:, None] == unit_E[None, :]
  return total, np.where(same, total, np.maximum(pair, 0.0))


def smooth_max(x, g: float = 10.0) -> float:
  """max(x) * (sum_i (x_i / max x)^g)^(1/g); 0 for an all-zero x."""
  x = np.asarray(x, np.float64).ravel()
  top = x.max(initial=0.0)
  return 0.0 if top == 0 else float(top * np.sum((x / top) ** g) ** (1.0 / g))


def _stage_time(kind: str, smax, config: SearchConfig, shape: MeshShape):
  return cost_lib.stage_time_ms(kind, smax, config.profile, shape, config.d_model,
                                config.bytes_per_elem)


def _compute_per_device(hits_TE, shape: MeshShape) -> np.ndarray:
  """(token, expert) pairs per device."""
  return hits_TE.sum(0, dtype=np.float64).reshape(shape.devices, -1).sum(1)


def _steps(hits_TE, shape: MeshShape, tokens: int, steps: int):
  """(hits, tokens) of each step of a window whose `steps` steps are concatenated
  along T on every device: the a2a is paid per step, on that step's peak rows, so
  the objective is the mean over steps, not the time of the window's summed loads
  (whose peak can fall while every step's rises)."""
  if steps == 1:
    return [(hits_TE, tokens)]
  if tokens % steps:
    raise ValueError(f"a window of {steps} steps holds {tokens} tokens per device: "
                     "not whole steps (SearchConfig.window_steps)")
  per_step = tokens // steps
  by_step = hits_TE.reshape(shape.devices, steps, per_step, hits_TE.shape[1])
  return [(by_step[:, s].reshape(-1, hits_TE.shape[1]), per_step) for s in range(steps)]


def _time_ms(hits_TE, shape: MeshShape, tokens: int, config: SearchConfig, *,
             smooth: bool | None = None) -> float:
  """The modelled time of the placement `hits_TE` was built with (ms per step), from
  the loads alone (no pair deltas). smooth=True: the search's objective, equal to
  `_objectives(...)[0]`; False: with the exact peaks; None: as config.exact_peaks
  prices plans."""
  smooth = not config.exact_peaks if smooth is None else smooth

  def peak(x):
    return smooth_max(x, config.smooth_g) if smooth else float(np.max(x, initial=0.0))
  total = 0.0
  for step_hits, step_tokens in _steps(hits_TE, shape, tokens, config.window_steps):
    for kind, hits, unit_E, units, valid in _tier_inputs(step_hits, shape, step_tokens):
      loads = np.sum(_unit_counts(hits, unit_E, units) > 0, axis=1).astype(np.float64)
      total += _stage_time(kind, peak(np.where(valid, loads, 0.0)), config, shape)
    if config.compute_ms_per_pair:
      total += config.compute_ms_per_pair * peak(_compute_per_device(step_hits, shape))
  return float(total) / config.window_steps


def _objectives(hits_TE, shape: MeshShape, tokens: int, config: SearchConfig):
  """(time now, time after swapping slots r and c [E, E]) in ms per step: the mean
  over the window's steps (`_steps`)."""
  now, after = 0.0, 0.0
  for step_hits, step_tokens in _steps(hits_TE, shape, tokens, config.window_steps):
    step_now, step_after = _step_objectives(step_hits, shape, step_tokens, config)
    now, after = now + step_now, after + step_after
  return float(now) / config.window_steps, np.asarray(after, np.float64) / config.window_steps


def _step_objectives(hits_TE, shape: MeshShape, tokens: int, config: SearchConfig):
  """(time now, [E, E] time after each swap) of one step's hits, in ms."""
  g = config.smooth_g
  now, after = 0.0, 0.0
  for kind, tier in zip(("inter", "intra"), _tiers(hits_TE, shape, tokens)):
    scale = max(float(tier.loads_YU.max(initial=0.0)), 1.0)
    total, pair = _power_sums(tier, g, scale)
    now = now + _stage_time(kind, scale * total ** (1 / g), config, shape)
    after = after + _stage_time(kind, scale * pair ** (1 / g), config, shape)
  if config.compute_ms_per_pair:
    num_experts = hits_TE.shape[1]
    per_device = num_experts // shape.devices
    n_E = hits_TE.sum(0, dtype=np.float64)
    w_U = _compute_per_device(hits_TE, shape)
    unit_E = np.arange(num_experts) // per_device
    diff = n_E[None, :] - n_E[:, None]  # [r, c]: unit(r) gains n_c - n_r
    scale = max(float(w_U.max()), 1.0)
    col_U = (w_U / scale) ** g
    total = col_U.sum()
    pair = (total - col_U[unit_E][:, None] - col_U[unit_E][None, :]
            + ((w_U[unit_E][:, None] + diff) / scale) ** g
            + ((w_U[unit_E][None, :] - diff) / scale) ** g)
    same = unit_E[:, None] == unit_E[None, :]
    pair = np.where(same, total, np.maximum(pair, 0.0))
    now = now + config.compute_ms_per_pair * scale * total ** (1 / g)
    after = after + config.compute_ms_per_pair * scale * pair ** (1 / g)
  return now, after


# --- public API --------------------------------------------------------------

def stage_loads(topk_ids, placement, mesh_shape):
  """Deduplicated `hier_dedup` loads (L1 [N*G, N], L2 [G, N*G]), self entries zero."""
  shape = _shape(mesh_shape)
  placement = _placement(placement, np.asarray(topk_ids), shape)
  hits = _hits(topk_ids, placement, shape)
  inter, intra = _tiers(hits, shape, np.asarray(topk_ids).shape[1])
  return inter.loads_YU.astype(np.int64), intra.loads_YU.astype(np.int64)


def swapped_loads(topk_ids, placement, mesh_shape, i: int, j: int):
  """The loads after swapping slots i and j, by the incremental update."""
  shape = _shape(mesh_shape)
  placement = _placement(placement, np.asarray(topk_ids), shape)
  hits = _hits(topk_ids, placement, shape)
  out = []
  for tier in _tiers(hits, shape, np.asarray(topk_ids).shape[1]):
    loads = tier.loads_YU.copy()
    ui, uj = tier.unit_E[i], tier.unit_E[j]
    if ui != uj:
      loads[:, ui] += np.where(tier.valid_YU[:, ui], tier.delta_YEE[:, i, j], 0.0)
      loads[:, uj] += np.where(tier.valid_YU[:, uj], tier.delta_YEE[:, j, i], 0.0)
    out.append(loads.astype(np.int64))
  return tuple(out)


def predicted_time_ms(topk_ids, placement, mesh_shape, config: SearchConfig) -> float:
  """The modelled all-to-all (+ compute term) time of one placement, ms per step, as
  a plan's `time_before_ms` / `time_after_ms` report it (exact peaks, unless
  config.exact_peaks is False)."""
  shape = _shape(mesh_shape)
  ids = np.asarray(topk_ids)
  placement = _placement(placement, ids, shape)
  return placement_time_ms(ids, placement, shape, config)


def swap_objectives(topk_ids, placement, mesh_shape, config: SearchConfig):
  """(time now, [E, E] time after swapping each slot pair); same-device pairs = now."""
  shape = _shape(mesh_shape)
  placement = _placement(placement, np.asarray(topk_ids), shape)
  return _objectives(_hits(topk_ids, placement, shape), shape,
                     np.asarray(topk_ids).shape[1], config)


def migration_ms(i: int, j: int, num_experts: int, mesh_shape, config: SearchConfig) -> float:
  """Modelled time to exchange the experts (and optimizer state) in slots i and j."""
  if not config.migration:
    return 0.0
  if config.slice_ms is not None:  # measured: both slices of the pair move
    return 2.0 * config.slice_ms
  shape = _shape(mesh_shape)
  per_device = num_experts // shape.devices
  node_i, node_j = (s // per_device // shape.local for s in (i, j))
  kind = "inter" if node_i != node_j else "intra"
  return config.profile.stage(kind).time_ms(config.bytes_per_swap)


def slice_price_ms(source: int, dest: int, num_experts: int, mesh_shape,
             config: SearchConfig) -> float:
  """Price of moving one expert slice from slot `source`'s device to slot `dest`'s:
  measured (`config.slice_ms`) or half a modelled pair swap over the same link."""
  return 0.5 * migration_ms(source, dest, num_experts, mesh_shape, config)


def search(topk_ids, placement, mesh_shape, config: SearchConfig) -> SwapPlan:
  """Chooses up to `config.max_pairs` disjoint slot swaps, greedily (and, with
  `config.group_plans`, the best of that and whole re-placements).

  topk_ids: int [N*G, T, K] logical expert ids, one row of tokens per source
    device in mesh order (concatenate several steps along T for a longer window).
  placement: [E] slot -> logical expert, the current placement (None: identity).
  Each round evaluates every pair of slots on different devices not yet used,
  takes the lowest time (ties: lowest (i, j) in row-major order), and accepts it
  only if its saving times `steps_until_next_decision` exceeds its migration
  time; the next round starts from the placement with the accepted swaps
  (`grow_pairs`: rounds continue past max_pairs while a pair pays).
  Deterministic: the same statistics give the same plan on every host.
  """
  shape = _shape(mesh_shape)
  ids = np.asarray(topk_ids)
  placement = _placement(placement, ids, shape)
  plan = _pair_search(ids, placement, shape, config)
  if not config.group_plans:
    return plan
  from hiermoe_jax.swap import groups  # groups imports this module
  horizon = config.steps_until_next_decision
  candidates = [plan] + [p for p in groups.group_plans(ids, placement, shape, config)
                         if _pays(p.gain_ms, p.time_before_ms, p.migration_ms, config)]
  # Largest net saving; ties keep the earlier candidate (pairs first).
  return max(candidates, key=lambda p: round(p.net_ms(horizon), 9))


def _pays(gain: float, now: float, cost_ms: float, config: SearchConfig) -> bool:
  return gain > 1e-9 * max(now, 1e-30) and gain * config.steps_until_next_decision > cost_ms


def _pair_search(ids, placement, shape: MeshShape, config: SearchConfig) -> SwapPlan:
  """Greedy rounds on the smooth objective (all pairs at once, `_objectives`), each
  pair accepted while its smooth saving pays for its migration; then the plan keeps
  the prefix of those pairs with the largest net saving by the modelled time with
  exact peaks, and reports exact times. The smooth max falls when entries below the
  peak do, which lets several pairs together lower a peak that no single pair
  moves, but it also takes pairs that no exchange would feel: the exact time
  decides what is kept (none, if no prefix lowers it enough)."""
  num_experts, tokens = placement.shape[0], ids.shape[1]
  per_device = num_experts // shape.devices
  device_E = np.arange(num_experts) // per_device
  blocked = device_E[:, None] == device_E[None, :]
  blocked |= np.tril(np.ones((num_experts, num_experts), bool))  # keep i < j only
  current = placement.copy()
  now, after = _objectives(_hits(ids, current, shape), shape, tokens, config)
  before, pairs, costs, prefixes = now, [], [], [placement.copy()]
  rounds = num_experts // 2 if config.grow_pairs else config.max_pairs
  for round_ in range(rounds):
    if round_:  # statistics of the placement with the swaps accepted so far
      now, after = _objectives(_hits(ids, current, shape), shape, tokens, config)
    # Round to 12 significant digits so float noise cannot split exact ties.
    key = np.where(blocked, np.inf, np.round(after / max(now, 1e-30), 12))
    flat = int(np.argmin(key))
    if not np.isfinite(key.flat[flat]):
      break
    i, j = divmod(flat, num_experts)
    cost_ms = migration_ms(i, j, num_experts, shape, config)
    if not _pays(now - float(after[i, j]), now, cost_ms, config):
      break
    now = float(after[i, j])
    current[[i, j]] = current[[j, i]]
    pairs.append((i, j))
    costs.append(cost_ms)
    prefixes.append(current.copy())
    blocked[[i, j], :] = True
    blocked[:, [i, j]] = True
  if not config.exact_peaks:
    return SwapPlan(placement=current, pairs=tuple(pairs), time_before_ms=float(before),
                    time_after_ms=float(now), migration_ms=float(sum(costs)),
                    bytes_to_move=len(pairs) * config.bytes_per_swap)
  # Exact times of every prefix of the accepted pairs; keep the best one that pays.
  horizon = config.steps_until_next_decision
  times = [_time_ms(_hits(ids, prefix, shape), shape, tokens, config) for prefix in prefixes]
  migration = np.concatenate([[0.0], np.cumsum(costs)])
  best = 0
  for count in range(1, len(pairs) + 1):
    gain = times[0] - times[count]
    if (_pays(gain, times[0], migration[count], config)
        and gain * horizon - migration[count] > (times[0] - times[best]) * horizon
        - migration[best] + 1e-9 * times[0]):
      best = count
  kept = pairs[:best]
  return SwapPlan(placement=prefixes[best], pairs=tuple(kept), time_before_ms=float(times[0]),
                  time_after_ms=float(times[best]), migration_ms=float(migration[best]),
                  bytes_to_move=len(kept) * config.bytes_per_swap)


def placement_time_ms(ids: np.ndarray, placement: np.ndarray, shape: MeshShape,
                      config: SearchConfig, *, smooth: bool | None = None) -> float:
  """The modelled time of a checked placement (ms per step), loads only: as plans
  report it (`_time_ms`; smooth=True: the search's objective)."""
  return _time_ms(_hits(ids, placement, shape), shape, ids.shape[1], config, smooth=smooth)


def _shape(mesh_shape) -> MeshShape:
  return mesh_shape if isinstance(mesh_shape, MeshShape) else MeshShape(*mesh_shape)


def _placement(placement, ids: np.ndarray, shape: MeshShape) -> np.ndarray:
  if ids.ndim != 3 or ids.shape[0] != shape.devices:
    raise ValueError(f"topk_ids has shape {ids.shape}; expected [N*G={shape.devices}, T, K]")
  if placement is None:
    raise ValueError("placement is None; pass the current [E] placement "
                     "(np.arange(E) for the identity)")
  placement = check_placement(np.asarray(placement))
  num_experts = placement.shape[0]
  check_experts_fit(num_experts, shape)
  if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
    raise ValueError(f"topk_ids must lie in [0, {num_experts}); got [{ids.min()}, {ids.max()}]")
  return placement
