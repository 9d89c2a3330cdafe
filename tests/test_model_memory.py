"""The model's memory and compile-time options (model.attention, model.remat,
model.scan_layers): none changes the model's function. Attention kernels equal plain
attention; remat keeps the loss and gradients; the scanned trainer follows the unrolled
one (losses, router biases, expert swaps, final state); its program does not grow with
depth; a checkpoint in the other layout is refused in one line. The Pallas flash
attention compiles for H200 without a device (gpu-aot extra)."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hiermoe_jax as hm
from models import transformer as tf
from models.checkpoint import Checkpointer
from models.config import ConfigError, load_config
from models.metrics import read_metrics
from models.steps import Model
from models.train_loop import run, run_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
MESH_2X4 = ["mesh.nodes=2", "mesh.local=4"]


def _cfg(*extra):
  return load_config(TINY, MESH_2X4 + [
      "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
      "model.first_k_dense=1", "model.n_layers=3", "moe.num_experts=8", "moe.d_ff=16",
      "moe.top_k=2", "moe.dropless=true", "train.batch_size=8", "train.seq_len=16", *extra])


def _one_line(message: str, *parts: str) -> None:
  assert "\n" not in message and all(p in message for p in parts), message


# ------------------------------------------------------------------------- attention

def _reference_attention(q_BSNH, k_BSGH, v_BSGH):
  """Causal softmax attention in float32, kv head i // (N / G) for query head i."""
  n, g, h = q_BSNH.shape[2], k_BSGH.shape[2], q_BSNH.shape[3]
  k_BSNH, v_BSNH = (jnp.repeat(x, n // g, axis=2) for x in (k_BSGH, v_BSGH))
  logits = jnp.einsum("bqnh,bknh->bnqk", q_BSNH, k_BSNH) / np.sqrt(h)
  s = q_BSNH.shape[1]
  logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf)
  return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, -1), v_BSNH)


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas"])
def test_attention_kernels_equal_plain_attention(impl):
  """Output and gradients (q, k, v) of each kernel on the 2x4 CPU mesh; auto is XLA's
  here, Pallas runs its GPU kernels in interpret mode, one shard of the batch per device."""
  cfg = _cfg(f"model.attention={impl}").model
  mesh = hm.make_mesh(2, 4)
  attn = tf.Attention(cfg, rngs=nnx.Rngs(0), mesh=mesh)
  assert attn.impl == ("xla" if impl == "auto" else impl)
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (8, 32, 4, 8))
  k, v = (jax.random.normal(key, (8, 32, 2, 8)) for key in keys[1:3])
  cot = jax.random.normal(keys[3], q.shape)

  def kernel(q, k, v):
    if attn.impl == "pallas":
      return tf._pallas_attention(q, k, v, mesh=mesh, interpret=True)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attn.impl)

  got, got_vjp = jax.vjp(jax.jit(kernel), q, k, v)
  want, want_vjp = jax.vjp(_reference_attention, q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_vjp(cot), want_vjp(cot)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_attention_auto_is_chosen_from_the_platform(monkeypatch):
  f32, bf16 = _cfg().model, _cfg("model.dtype=bfloat16").model
  assert tf.attention_impl(f32, "cpu") == tf.attention_impl(bf16, "tpu") == "xla"
  monkeypatch.setattr(tf, "cudnn_available", lambda: False)
  assert tf.attention_impl(bf16, "cuda") == tf.attention_impl(bf16, "gpu") == "pallas"
  monkeypatch.setattr(tf, "cudnn_available", lambda: True)
  assert tf.attention_impl(bf16, "cuda") == "cudnn"
  assert tf.attention_impl(f32, "cuda") == "pallas"  # cuDNN has no float32 flash attention
  for attention in ("xla", "pallas"):
    assert tf.attention_impl(_cfg(f"model.attention={attention}").model, "cuda") == attention


def test_attention_config_errors_are_one_line(monkeypatch):
  with pytest.raises(ConfigError) as e:
    _cfg("model.attention=cudnn")  # float32
  _one_line(str(e.value), "model.attention='cudnn' is invalid", "model.dtype")
  cudnn = _cfg("model.attention=cudnn", "model.dtype=bfloat16").model
  with pytest.raises(ConfigError) as e:
    tf.attention_impl(cudnn, "cpu")
  _one_line(str(e.value), "model.attention='cudnn' is invalid", "GPU mesh")
  monkeypatch.setattr(tf, "cudnn_available", lambda: False)
  with pytest.raises(ConfigError) as e:
    tf.attention_impl(cudnn, "cuda")
  _one_line(str(e.value), "model.attention='cudnn' is invalid", "cuDNN not found")
  with pytest.raises(ConfigError) as e:
    tf._pallas_attention(*(jnp.zeros((2, 200, 2, 8)),) * 3, mesh=None, interpret=True)
  _one_line(str(e.value), "model.attention='pallas' is invalid", "multiple of 128")


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="needs the gpu-aot extra (jax's CUDA plugin)")
def test_pallas_flash_attention_compiles_for_h200_in_a_fraction_of_xla_memory():
  """model.attention=auto on a compile-only H200 mesh (no cuDNN here) is the Pallas
  kernel: forward and backward compile, run per device (no all-gather of the batch) and
  need a small fraction of XLA attention's [B, N, S, S] temporaries."""
  from hiermoe_jax import gpu_aot
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = gpu_aot.mesh("h200", 1, 2)
  cfg = _cfg("model.dtype=bfloat16", "model.n_heads=8", "model.head_dim=128").model
  if tf.cudnn_available():
    pytest.skip("cuDNN is installed: auto picks it")
  temp = {}
  for impl in ("auto", "xla"):
    attn = tf.Attention(dataclasses.replace(cfg, attention=impl), rngs=nnx.Rngs(0), mesh=mesh)
    assert attn.impl == ("pallas" if impl == "auto" else "xla")
    rows = NamedSharding(mesh, P(mesh.axis_names))
    q = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((4, 1024, 2, 128), jnp.bfloat16, sharding=rows)

    def loss(q, k, v):
      if attn.impl == "pallas":
        out = tf._pallas_attention(q, k, v, mesh=mesh, interpret=False)
      else:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
      return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    temp[impl] = gpu_aot.memory(compiled, "h200")["temp_bytes"]
    if attn.impl == "pallas":
      text = compiled.as_text()
      assert "mha_forward" in text and "mha_backward" in text
      assert "all-gather" not in text
  assert temp["auto"] * 4 < temp["xla"], temp


# ----------------------------------------------------------------------------- remat

def test_remat_keeps_the_loss_and_gradients():
  """Every model.remat policy gives the plain model's loss and gradients (scanned and
  unrolled), and the step then holds a checkpoint (remat) of each block."""
  tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, 256)
  results, states = {}, {}
  for remat, scan in (("none", False), ("full", True), ("dots", True), ("dots_no_batch", False)):
    cfg = _cfg(f"model.remat={remat}", f"model.scan_layers={str(scan).lower()}")
    model = Model(cfg, run_mesh(cfg))
    state = states[scan] = states.get(scan) or model.init_state()  # remat: same state
    loss = jax.value_and_grad(lambda p: model._loss(p, state.buffers, tokens, tokens)[0])
    traced = jax.jit(loss).trace(state.params)  # traced once: its jaxpr, then compiled
    jaxpr = str(traced.jaxpr)
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none"), remat
    value, grads = traced.lower().compile()(state.params)
    results[remat] = value, [tf.layer_state(grads, cfg.model, i) for i in range(3)]
  want = results["none"]
  for remat, (value, grads) in results.items():
    np.testing.assert_allclose(value, want[0], rtol=1e-6, err_msg=remat)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=remat)


# ------------------------------------------------------------------------------ scan

def test_scanned_layers_build_the_unrolled_model_stacked():
  """Same random draws, stacked per run (dense, then MoE), sharding unchanged per layer."""
  cfg_u, cfg_s = _cfg("model.scan_layers=false"), _cfg()
  assert tf.layer_runs(cfg_s.model) == [range(0, 1), range(1, 3)]
  assert [tf.block_site(cfg_s.model, i) for i in range(3)] == [
      (("stacks", 0), 0), (("stacks", 1), 0), (("stacks", 1), 1)]
  assert tf.block_site(cfg_u.model, 2) == (("blocks", 2), None)
  mesh = hm.make_mesh(2, 4)
  unrolled = nnx.state(tf.Transformer(cfg_u.model, cfg_u.moe, mesh=mesh, rngs=nnx.Rngs(0)))
  scanned = nnx.state(tf.Transformer(cfg_s.model, cfg_s.moe, mesh=mesh, rngs=nnx.Rngs(0)))
  gate = scanned["stacks"][1]["ffn"]["params"]["experts"]["gate"]
  assert gate.shape == (2, 8, 32, 16)
  assert gate.get_metadata()["out_sharding"] == (None, ("node", "local"), None, None)
  for i in range(3):
    a, b = tf.layer_state(scanned, cfg_s.model, i), unrolled["blocks"][i]
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_scanned_program_does_not_grow_with_depth():
  """The lowered train step of 2 vs 8 layers: scanned, about the same size (one block
  per run); unrolled, 2-4x (each layer's block is inlined, while helpers such as
  `jnp.take`'s lower once as shared functions)."""
  def size(scan, layers):
    cfg = _cfg(f"model.scan_layers={str(scan).lower()}", f"model.n_layers={layers}",
               "model.first_k_dense=0")
    model = Model(cfg, run_mesh(cfg))
    batch = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=model.batch_sharding)
    return len(model.jit_train_step.lower(model.abstract_state(), batch, batch).as_text())
  scanned, unrolled = size(True, 8) / size(True, 2), size(False, 8) / size(False, 2)
  assert scanned < 1.3 and unrolled > 2.0, (scanned, unrolled)


def is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def test_scanned_trainer_follows_the_unrolled_one(tmp_path):
  """5 steps of the trainer, tiny shapes, a dense layer then two MoE layers with
  DeepSeek's router bias and expert swaps every 2 steps: the scanned run has the
  unrolled run's losses, swaps and final state (every layer's params, AdamW moments,
  router bias and placement). Resuming its checkpoints unrolled is refused in one line."""
  extra = ["train.steps=5", "train.eval_every=0", "train.checkpoint_every=5",
           "moe.router=sigmoid_grouped", "moe.n_group=4", "moe.topk_group=2",
           "moe.bias_update_rate=0.01", "train.swap_interval=2",
           "train.swap_migration_cost=false", "train.swap_max_pairs=2"]
  results = {}
  for scan in (False, True):
    cfg = _cfg(f"model.scan_layers={str(scan).lower()}", *extra)
    result = run(cfg, tmp_path / str(scan), verbose=False)
    results[scan] = cfg, result, read_metrics(tmp_path / str(scan))
  (cfg_u, unrolled, rec_u), (cfg_s, scanned, rec_s) = results[False], results[True]
  np.testing.assert_allclose([r["loss"] for r in rec_s], [r["loss"] for r in rec_u], rtol=1e-5)
  swaps = lambda records: [[(e["layer"], e["pairs"]) for e in r["swaps"]] for r in records]
  assert swaps(rec_s) == swaps(rec_u) and any(swaps(rec_s)), swaps(rec_s)
  adam = lambda state: [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam)
                        if is_adam(s)][0]
  trees = {"params": lambda state: state.params, "buffers": lambda state: state.buffers,
           "mu": lambda state: adam(state).mu, "nu": lambda state: adam(state).nu}
  for tree, get in trees.items():
    for layer in (1, 2) if tree == "buffers" else range(3):  # buffers: MoE layers only
      a = tf.layer_state(get(scanned.state), cfg_s.model, layer)
      b = tf.layer_state(get(unrolled.state), cfg_u.model, layer)
      for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{tree}, layer {layer}: {jax.tree_util.keystr(path)}")
  bias = tf.layer_state(scanned.state.buffers, cfg_s.model, 2)["ffn"]["router_bias"][...]
  assert np.any(np.asarray(bias) != 0)
  # The same two checkpoints, read back: each in its own layout only.
  for scan, (cfg, result, _) in results.items():
    checkpointer = Checkpointer(tmp_path / str(scan), keep=1)
    try:
      saved = checkpointer.restore(5, Model(cfg, run_mesh(cfg)).abstract_state()).state
    finally:
      checkpointer.close()
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(result.state)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError) as e:
    run(cfg_u, tmp_path / "True", verbose=False)
  _one_line(str(e.value), "model.scan_layers=False is invalid", "--set model.scan_layers=true")
