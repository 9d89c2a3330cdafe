"""The train step's memory levers (models/steps.py, models/loss.py): dense weights and
their AdamW moments sharded (model.dense_sharding), the loss without [B, S, V] logits
(train.loss_chunk) and gradient accumulation (train.microbatches). Each is the same
step: equal losses, gradients and updates to float32 rounding.

The model is configs/tiny.yaml on the 2x4 CPU mesh, dropless (capacity drops are per
call, so a dropless step is the same function of the batch however it is split), with
DeepSeek's group-limited sigmoid router and aux-loss-free bias (so the bias update, which
reads the step's expert counts, is checked too) and the swap statistics on (the step
returns its routing ids). The load-balance loss is off in the microbatch comparison: it
is a product of two batch means, not a mean over tokens, so it is per microbatch.
"""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import hiermoe_jax as hm
from hiermoe_jax import gpu_aot
from models import loss as loss_lib
from models.checkpoint import Checkpointer
from models.config import ConfigError, load_config
from models.steps import Model, dense_shardings, dense_spec

TINY = "configs/tiny.yaml"
BASE = ["mesh.nodes=2", "mesh.local=4", "moe.dropless=true", "moe.router=sigmoid_grouped",
        "moe.n_group=4", "moe.topk_group=2", "moe.bias_update_rate=0.01",
        "train.swap_interval=1", "train.loss_chunk=0"]
LAYOUTS = ("replicated", "fsdp", "hsdp")
NODE_GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]  # the 2x4 mesh's nodes


def model(*overrides) -> Model:
  cfg = load_config(TINY, [*BASE, *overrides])
  return Model(cfg, hm.make_mesh(cfg.mesh.nodes, cfg.mesh.local))


def batch(m: Model, seed=0):
  tc = m.cfg.train
  rng = np.random.default_rng(seed)
  return tuple(jax.device_put(rng.integers(0, m.cfg.model.vocab_size,
                                           (tc.batch_size, tc.seq_len)).astype(np.int32),
                              m.batch_sharding) for _ in range(2))


def host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_equal(actual, expected):
  actual, expected = host(actual), host(expected)
  assert len(actual) == len(expected)
  for a, b in zip(actual, expected):
    np.testing.assert_array_equal(a, b)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  actual, expected = host(actual), host(expected)
  assert len(actual) == len(expected)
  for a, b in zip(actual, expected):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def layouts():
  """{layout: (model, compiled train step, state after 3 steps, per-step metrics)}."""
  out = {}
  for layout in LAYOUTS:
    m = model(f"model.dense_sharding={layout}")
    inputs, targets = batch(m)
    state = m.init_state()
    step = m.jit_train_step.lower(state, inputs, targets).compile()
    metrics = []
    for _ in range(3):
      state, met = step(state, inputs, targets)
      metrics.append(jax.device_get(met))
    out[layout] = (m, step, state, metrics)
  return out


# ----------------------------------------------------------------------- dense sharding

def test_dense_spec_splits_the_largest_divisible_dim():
  axes = ("node", "local")
  assert dense_spec((256, 64), axes, 8) == P(axes, None)  # embedding: along the vocabulary
  assert dense_spec((64, 256), ("local",), 4) == P(None, "local")
  assert dense_spec((96, 64), axes, 64) == P(None, axes)  # 96 is not a multiple of 64
  assert dense_spec((64, 64), axes, 8) == P(axes, None)  # the first of equals
  assert dense_spec((64,), axes, 8) == P()  # norm scales stay replicated
  assert dense_spec((6, 10), axes, 8) == P()  # no dim divisible
  assert dense_spec((64, 64), (), 1) == P()


def test_dense_weights_and_moments_are_split_experts_keep_their_specs(layouts):
  specs = {name: jax.tree.map(lambda s: s.spec, layouts[name][0].state_shardings)
           for name in LAYOUTS}
  flat = {name: {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(specs[name].params)[0]}
          for name in LAYOUTS}
  for path, spec in flat["replicated"].items():
    if "experts" in path:  # expert-parallel over both axes whatever the layout
      assert flat["fsdp"][path] == flat["hsdp"][path] == spec != P(), path
    else:
      assert spec == P(), path
  for name, axes in (("fsdp", ("node", "local")), ("hsdp", "local")):
    dense = {p: s for p, s in flat[name].items() if "experts" not in p}
    assert all(s == P() for p, s in dense.items() if "scale" in p)  # norms
    assert all(axes in tuple(s) for p, s in dense.items() if "kernel" in p or "embed" in p)
    assert axes in tuple(flat[name]["['embed']['embedding'].value"])
    # AdamW's moments follow the parameters.
    adam = specs[name].opt_state[1][0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(specs[name].params)
    assert jax.tree.leaves(adam.nu) == jax.tree.leaves(specs[name].params)
  # The per-device share of the state shrinks.
  sizes = {name: layouts[name][1].memory_analysis().argument_size_in_bytes for name in LAYOUTS}
  assert sizes["fsdp"] < sizes["hsdp"] < sizes["replicated"], sizes


def test_fsdp_and_hsdp_train_as_replicated(layouts):
  ref_state, ref_metrics = layouts["replicated"][2:]
  for name in ("fsdp", "hsdp"):
    state, metrics = layouts[name][2:]
    for got, want in zip(metrics, ref_metrics):
      np.testing.assert_allclose(got.loss, want.loss, rtol=1e-6)
      np.testing.assert_allclose(got.grad_norm, want.grad_norm, rtol=1e-5)
      np.testing.assert_array_equal(got.imbalance, want.imbalance)
    assert_close(state.params, ref_state.params)
    assert_close(state.opt_state, ref_state.opt_state)
    assert_equal(state.buffers, ref_state.buffers)
    assert [x.sharding for x in jax.tree.leaves(state.params)] == jax.tree.leaves(
        layouts[name][0].state_shardings.params)


def _groups(attrs: str, devices: int) -> list[list[int]]:
  """Replica groups of an HLO collective (gpu_aot's parser, the named-mesh form too)."""
  return sorted(sorted(g) for g in gpu_aot.replica_groups(attrs, devices))


def collectives(text: str, devices: int) -> list[dict]:
  """{kind, shapes (result shapes, as in HLO), groups} of every collective in `text`."""
  found = []
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (all-gather|reduce-scatter|all-reduce|all-to-all)"
                 r"(?:-start)?\((.*)$", line)
    if m:
      found.append({"kind": m[2], "shapes": re.findall(r"\w+\[[\d,]*\]", m[1]),
                    "groups": _groups(m[3], devices)})
  return found


def _expert_shapes(cfg, devices: int) -> set[str]:
  e, d, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.d_ff
  return {f"{t}[{x},{a},{b}]" for t in ("f32", "bf16") for x in (e, e // devices)
          for a, b in ((d, f), (f, d))}


def test_compiled_step_gathers_dense_weights_in_their_groups_never_experts(layouts):
  """On the 2x4 CPU mesh: fsdp all-gathers the dense weights over all 8 devices, hsdp
  within each node; no layout gathers an expert stack. (The CPU compiler all-reduces the
  gradients and slices them; the GPU test below sees the reduce-scatters.)"""
  m = layouts["replicated"][0]
  d, v = m.cfg.model.d_model, m.cfg.model.vocab_size
  dense = {f"f32[{d},{d}]", f"f32[{v},{d}]", f"f32[{d},{v}]"}
  experts = _expert_shapes(m.cfg, 8)
  for name, groups in (("fsdp", [list(range(8))]), ("hsdp", NODE_GROUPS)):
    found = collectives(layouts[name][1].as_text(), 8)
    gathers = [c for c in found if c["kind"] == "all-gather"]
    weights = [c for c in gathers if dense & set(c["shapes"])]
    assert weights, name
    assert all(c["groups"] == groups for c in weights), (name, weights)
    assert not [c for c in gathers if experts & set(c["shapes"])], name
  replicated = collectives(layouts["replicated"][1].as_text(), 8)
  assert not [c for c in replicated if c["kind"] == "all-gather" and dense & set(c["shapes"])]


GPU_AOT = all(importlib.util.find_spec(m) is not None
              for m in ("jax_plugins.xla_cuda12", "jax_cuda12_plugin"))


@pytest.mark.skipif(not GPU_AOT, reason="the gpu-aot extra is not installed")
def test_gpu_step_gathers_and_reduce_scatters_within_nodes():
  """The train step compiled for 2x8 H200 (hiermoe_jax.gpu_aot, no GPU) with hsdp: the
  dense weights are all-gathered and their gradients reduce-scattered within each node,
  the gradient shards all-reduced across nodes; no expert stack is gathered."""
  cfg = load_config(TINY, [*BASE[2:], "model.dense_sharding=hsdp", "model.attention=xla"])
  mesh = gpu_aot.mesh("h200", 2, 8)
  m = Model(cfg, mesh)
  tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32,
                                sharding=m.batch_sharding)
  compiled = m.jit_train_step.lower(m.abstract_state(), tokens, tokens).compile()
  nodes = [list(range(8)), list(range(8, 16))]  # HLO ids: positions in the mesh
  found = collectives(compiled.as_text(), 16)
  d = cfg.model.d_model
  weight = {f"f32[{d},{d}]", f"f32[{d // 8},{d}]"}
  gathered = [c for c in found if c["kind"] == "all-gather" and weight & set(c["shapes"])]
  scattered = [c for c in found if c["kind"] == "reduce-scatter" and weight & set(c["shapes"])]
  assert gathered and scattered
  assert all(c["groups"] == nodes for c in gathered + scattered)
  across = [c for c in found if c["kind"] == "all-reduce" and c["groups"] == [
      [a, b] for a, b in zip(*nodes)]]
  assert across  # the hsdp gradient shards, between the nodes
  experts = _expert_shapes(cfg, 16)
  assert not [c for c in found if c["kind"] == "all-gather" and experts & set(c["shapes"])]


def test_a_checkpoint_restores_into_any_dense_layout(layouts, tmp_path):
  saved = layouts["fsdp"][2]
  checkpointer = Checkpointer(tmp_path, keep=1)
  try:
    checkpointer.save(3, saved, {"data_position": 3})
    checkpointer.wait()
    for name in ("replicated", "hsdp"):
      target = layouts[name][0]
      restored = checkpointer.restore(3, target.abstract_state()).state
      assert_equal(restored, saved)
      got = jax.tree.map(lambda x: x.sharding, restored)
      assert jax.tree.leaves(got) == jax.tree.leaves(target.state_shardings)
  finally:
    checkpointer.close()


# ----------------------------------------------------------------------- chunked loss

def test_chunked_cross_entropy_equals_plain_without_full_logits():
  b, s, d, v = 4, 64, 16, 4096
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (b, s, d))
  w = jax.random.normal(keys[1], (d, v)) / 4
  targets = jax.random.randint(keys[2], (b, s), 0, v)

  def loss(chunk):
    return jax.jit(jax.value_and_grad(
        lambda h, w: loss_lib.cross_entropy(h, targets, lambda x: x @ w, chunk), (0, 1)))

  plain_value, plain_grads = loss(0)(hidden, w)
  expected = optax.softmax_cross_entropy_with_integer_labels(hidden @ w, targets).mean()
  np.testing.assert_allclose(plain_value, expected, rtol=1e-6)
  for chunk in (8, 24, s):  # 24 does not divide 64: the last chunk is padded
    value, grads = loss(chunk)(hidden, w)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    assert_close(grads, plain_grads, rtol=1e-5, atol=1e-7)
  # The compiled gradient holds one chunk's logits at a time, never all of them.
  logits_bytes = b * s * v * 4
  temp = lambda chunk: loss(chunk).lower(hidden, w).compile().memory_analysis().temp_size_in_bytes
  assert temp(0) > logits_bytes > 2 * temp(8), (temp(0), temp(8))


def test_train_step_gradients_with_loss_chunk_equal_plain():
  plain, chunked = model(), model("train.loss_chunk=24")
  state = plain.init_state()
  inputs, targets = batch(plain)
  ce, aux, grads, stats, ids = jax.jit(plain._gradients)(state.params, state.buffers,
                                                         inputs, targets)
  ce2, aux2, grads2, stats2, ids2 = jax.jit(chunked._gradients)(state.params, state.buffers,
                                                                inputs, targets)
  np.testing.assert_allclose(ce2, ce, rtol=1e-6)
  np.testing.assert_allclose(aux2, aux, rtol=1e-6)
  assert_close(grads2, grads)
  assert_equal((stats2, ids2), (stats, ids))


# ----------------------------------------------------------------------- microbatches

def test_microbatches_equal_the_full_batch_step():
  """4 microbatches of 8 rows (4 rows per device each): the loss, gradient norm, updated
  parameters and moments equal the full-batch step's; the router biases, drops,
  imbalance and routing ids (in the global batch's order) are the same, since the bias
  update and the swap statistics see every microbatch's routing."""
  common = ["train.batch_size=32", "moe.load_balance_weight=0", "model.dense_sharding=fsdp"]
  full, micro = model(*common), model(*common, "train.microbatches=4")
  state = full.init_state()
  inputs, targets = batch(full)
  after = {}
  for name, m in (("full", full), ("micro", micro)):
    new, metrics = m.jit_train_step(jax.tree.map(jnp.copy, state), inputs, targets)
    after[name] = (jax.device_get(new), jax.device_get(metrics),
                   float(m.jit_eval_step(new, inputs, targets)))
  (s1, m1, e1), (s4, m4, e4) = after["full"], after["micro"]
  np.testing.assert_allclose(m4.loss, m1.loss, rtol=1e-6)
  np.testing.assert_allclose(m4.aux_loss, m1.aux_loss, rtol=1e-5)
  np.testing.assert_allclose(m4.grad_norm, m1.grad_norm, rtol=1e-5)
  np.testing.assert_allclose(e4, e1, rtol=1e-6)
  assert_close(s4.params, s1.params)
  assert_close(s4.opt_state, s1.opt_state)
  assert_equal(s4.buffers, s1.buffers)
  biases = [x for x in host(s1.buffers) if x.dtype == np.float32]
  assert biases and all(np.any(b != 0) for b in biases)  # the update moved them
  for field in ("dropped", "imbalance", "strategy_index"):
    np.testing.assert_array_equal(getattr(m4, field), getattr(m1, field))
  np.testing.assert_allclose(m4.dedup_node, m1.dedup_node, rtol=1e-6)
  assert len(m4.topk_ids) == len(full.moe_layers)
  for a, b in zip(m4.topk_ids, m1.topk_ids):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- precision, keys

def test_mixed_precision_keeps_float32_master_weights_and_moments():
  """bf16 matmuls, float32 parameters, AdamW moments and accumulated gradients."""
  m = model("model.dtype=bfloat16", "moe.dtype=bfloat16", "model.dense_sharding=hsdp",
            "train.microbatches=2", "train.loss_chunk=16")
  abstract = m.abstract_state()
  f32 = {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(abstract.params)} == f32
  adam = abstract.opt_state[1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == f32
  tokens = jax.ShapeDtypeStruct((m.cfg.train.batch_size, m.cfg.train.seq_len), jnp.int32,
                                sharding=m.batch_sharding)
  out = jax.eval_shape(m.train_step, abstract, tokens, tokens)[0]
  assert {x.dtype for x in jax.tree.leaves((out.params, out.opt_state[1][0].mu))} == f32
  text = m.jit_train_step.lower(abstract, tokens, tokens).as_text()
  assert re.search(r"dot_general.*tensor<[\dx]*xbf16>.*-> tensor<[\dx]*xbf16>", text)


@pytest.mark.parametrize("override, message", [
    ("model.dense_sharding=zero3", "model.dense_sharding='zero3' is invalid: must be one of"),
    ("train.microbatches=0", "train.microbatches=0 is invalid: must be an integer >= 1"),
    ("train.microbatches=3", "train.microbatches=3 is invalid: must divide train.batch_size=16"),
    ("train.loss_chunk=-1", "train.loss_chunk=-1 is invalid: must be an integer >= 0"),
])
def test_bad_keys_are_named(override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    load_config(TINY, [override])


def test_microbatches_must_divide_the_rows_per_device():
  with pytest.raises(ConfigError, match=re.escape(
      "train.microbatches=4 is invalid: must divide the 2 rows per device "
      "(train.batch_size=16 over 8 devices)")):
    model("train.microbatches=4")


def test_a_one_device_mesh_is_not_split():
  cfg = load_config(TINY, [*BASE, "mesh.nodes=1", "mesh.local=1"])
  m = Model(cfg, hm.make_mesh(1, 1, devices=jax.devices()[:1]))
  abstract = m.abstract_state().params
  for layout in LAYOUTS:
    flat = jax.tree_util.tree_flatten_with_path(dense_shardings(abstract, m.mesh, layout))[0]
    dense = [s.spec for path, s in flat if "experts" not in jax.tree_util.keystr(path)]
    assert dense and all(spec == P() for spec in dense), layout
