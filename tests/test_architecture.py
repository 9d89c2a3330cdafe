"""The architecture holds: three floors, no import cycles, one strategy registry,
and the DeepEP-shaped engine (dispatch -> the caller's experts -> combine)."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import cost, traffic
from hiermoe_jax.dispatch import Strategy, auto, exchange, registry
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.mesh import MeshShape
from helpers import check_against_reference, mesh_of, random_inputs, router_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("hiermoe_jax", "models", "pallas_kernels")
UPPER_FLOORS = ("hiermoe_jax.cluster", "hiermoe_jax.bench", "models")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: pathlib.Path, known: set[str], top_level_only: bool) -> set[str]:
  """Project modules `path` imports (`from a import b` counts a.b when it is a module)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in known else node.module)
  return out & known


def test_the_core_imports_neither_the_testbed_nor_the_benchmarks_nor_the_trainer():
  modules = _modules()
  core = {m: p for m, p in modules.items()
          if m.startswith("hiermoe_jax") and not m.startswith(UPPER_FLOORS)}
  assert "hiermoe_jax.moe" in core and "hiermoe_jax.cluster.launcher" not in core
  bad = {m: sorted(i for i in _imports(p, set(modules), top_level_only=False)
                   if i.startswith(UPPER_FLOORS))
         for m, p in core.items()}
  assert {m: i for m, i in bad.items() if i} == {}


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, set(modules), top_level_only=True) - {m} for m, p in modules.items()}

  def parents(m):  # importing a.b.c runs a/__init__ and a/b/__init__ first
    parts = m.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules)

  state: dict[str, int] = {}  # 1: on the stack, 2: done

  def visit(m, stack):
    state[m] = 1
    for n in sorted(graph[m] - parents(m)):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


# A strategy the library does not ship: the fast tier first, then the slow one (a
# row gathers inside its node, then crosses once to the same-local-index device).
INTRA_FIRST = Strategy("intra_first_dedup", tiers=("intra", "inter"), dedup=True,
                       auto_candidate=False)


@pytest.fixture
def intra_first():
  registry.register(INTRA_FIRST)
  yield INTRA_FIRST
  registry.unregister(INTRA_FIRST.name)


def test_a_strategy_registered_at_run_time_is_run_and_priced(intra_first):
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch=intra_first.name)
  check_against_reference(config, mesh)  # outputs and gradients

  params, x, placement, bias = random_inputs(config, mesh)
  _, aux = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement,
                        router_bias=bias)
  assert aux.strategy_ran() == intra_first.name
  assert set(aux.dropped_by_stage) == {"capacity", "intra", "inter", "expert"}
  # The host replay of the registry's record counts what the engine sent.
  ids = np.asarray(aux.topk_ids).reshape(8, -1, config.top_k)
  host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=16, d_model=16,
                       placement=np.asarray(placement), strategies=[intra_first.name])
  entry = host[intra_first.name]
  assert {k: int(v) for k, v in aux.rows.items()} == entry["rows"]
  assert {k: int(v) for k, v in aux.max_rows_per_peer.items()} == entry["max_rows_per_peer"]
  # The cost model prices it from its tiers, as the sum of its two stages.
  profile = cost.load_profile("paper_a6000")
  shape = MeshShape(2, 4)
  rows = cost.peak_rows_per_hop(intra_first.name, entry)
  assert rows == (entry["max_rows_per_peer"]["intra"], entry["max_rows_per_peer"]["inter"])
  assert cost.predict(intra_first.name, entry, profile, mesh_shape=shape, d_model=16,
                      bytes_per_elem=4) == pytest.approx(
      cost.stage_time_ms("intra", rows[0], profile, shape, 16, 4)
      + cost.stage_time_ms("inter", rows[1], profile, shape, 16, 4))
  assert intra_first.name in hm.config.DISPATCH and intra_first.name not in auto.candidates(
      shape, config.top_k)


def test_live_peaks_of_a_registered_strategy_match_the_host_replay(intra_first):
  """auto's in-graph counts come from the record too (any tier order)."""
  mesh = mesh_of("2x4")
  shape = MeshShape.of(mesh)
  rng = np.random.default_rng(0)
  ids = np.stack([np.stack([rng.choice(16, 4, replace=False) for _ in range(8)])
                  for _ in range(8)]).astype(np.int32)  # [A, T, K]
  host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=16, d_model=1)
  peaks = jax.jit(jax.shard_map(
      lambda s: auto.live_peaks(s[0], shape=shape, experts_per_device=2),
      mesh=mesh, in_specs=shape.rows(3), out_specs=jax.sharding.PartitionSpec()))(ids)
  for name in registry.names():
    excluding_self = cost.peak_rows_per_hop(name, host[name])
    assert tuple(int(v) for v in peaks[name]) == excluding_self, name


@pytest.mark.parametrize("dropless", [True, False])
@pytest.mark.parametrize("strategy", ["flat", "flat_dedup", "hier", "hier_dedup"])
def test_dispatch_combine_round_trip_with_identity_experts(strategy, dropless):
  """combine(identity experts(dispatch(x))) = x * the sum of the kept (token,
  expert) weights; with capacities, the kept pairs are those the host replay keeps."""
  mesh = mesh_of("2x4")
  shape = MeshShape.of(mesh)
  num_experts, top_k, tokens, d = 16, 4, 8, 8
  rng = np.random.default_rng(1)
  slots = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False)
                              for _ in range(tokens)]) for _ in range(8)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, slots.shape).astype(np.float32)
  x = rng.normal(size=(8 * tokens, d)).astype(np.float32)
  rec = registry.get_strategy(strategy)
  caps = capacities(rec, tokens=tokens, top_k=top_k, num_experts=num_experts, shape=shape,
                    capacity_factor=0.5, dropless=dropless)
  layout = exchange.Layout(shape, num_experts)

  def device(x_TD, slots_TK, w_TK):
    rows_RD, slots_RM, w_RM, handle = exchange.dispatch(
        x_TD, slots_TK[0], w_TK[0], rec, capacities=caps.hops, layout=layout)
    # Identity experts, pre-reduced: each row returns itself times its entries' weights.
    y_RD = rows_RD * jnp.sum(jnp.where(slots_RM >= 0, w_RM, 0.0), axis=1, keepdims=True)
    return exchange.combine(y_RD, handle)

  y = jax.jit(jax.shard_map(device, mesh=mesh, in_specs=(shape.rows(2), shape.rows(3),
                                                         shape.rows(3)),
                            out_specs=shape.rows(2)))(x, slots, w)
  kept = traffic.simulate(slots, strategy, shape, num_experts,
                          hop_caps=caps.hops, expert_cap=None)["kept_ATK"]
  if dropless:
    assert kept.all()
  else:
    assert not kept.all()  # the capacities do drop something here
  expected = x * np.sum(np.where(kept, w, 0.0), axis=-1).reshape(-1, 1)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-6)
