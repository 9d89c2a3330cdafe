"""models/: config loading and validation, the transformer's pieces, data order,
the imbalance metric and the optimizer schedule."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hiermoe_jax as hm
from models import data as data_lib
from models.config import ConfigError, DataConfig, TrainConfig, load_config
from models.optimizer import learning_rate
from models.steps import imbalance
from models.train_loop import process_rows
from models.transformer import Attention, DenseFFN, RMSNorm, Transformer, moe_aux_by_layer, rope

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


# ------------------------------------------------------------------------ config

@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_validate(path):
  cfg = load_config(path)
  assert cfg.moe.d_model == cfg.model.d_model
  assert cfg.model.first_k_dense < cfg.model.n_layers  # every preset has MoE layers


def test_presets_present():
  assert {p.stem for p in PRESETS} >= {"tiny", "small", "qwen3_30b_a3b", "deepseek_v3_moe_shapes"}


def test_deepseek_v3_moe_shapes_preset_has_the_real_widths():
  cfg = load_config(ROOT / "configs" / "deepseek_v3_moe_shapes.yaml")
  m, moe = cfg.model, cfg.moe
  assert (m.d_model, m.d_ff, m.first_k_dense, m.vocab_size) == (7168, 18432, 3, 129280)
  assert (m.n_heads, m.resolved_kv_heads, m.resolved_head_dim) == (56, 56, 128)
  assert (moe.num_experts, moe.top_k, moe.d_ff, moe.router) == (256, 8, 2048, "sigmoid_grouped")
  assert (moe.n_group, moe.topk_group, moe.routed_scaling_factor) == (8, 4, 2.5)
  assert moe.norm_topk_prob and (moe.n_shared_experts, moe.shared_width) == (1, 2048)
  assert m.n_layers > m.first_k_dense  # dense layers, then MoE ones


def test_qwen3_preset_matches_the_published_shape():
  cfg = load_config(ROOT / "configs" / "qwen3_30b_a3b.yaml")
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.resolved_kv_heads, m.resolved_head_dim) == (
      2048, 48, 32, 4, 128)
  assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff, m.vocab_size) == (128, 8, 768, 151936)
  assert m.qk_norm and cfg.moe.norm_topk_prob and m.first_k_dense == 0


def test_overrides_are_coerced_to_field_types():
  cfg = load_config(ROOT / "configs" / "tiny.yaml", [
      "train.lr=1e-3", "moe.dropless=true", "data.path=null", "train.steps=7",
      "moe.capacity_factor=2", "model.n_kv_heads=2"])
  assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
  assert cfg.moe.dropless is True and cfg.data.path is None
  assert cfg.train.steps == 7 and cfg.moe.capacity_factor == 2.0
  assert cfg.model.resolved_kv_heads == 2


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "unknown config key train.bogus"),
    ("nosection.x=1", "unknown config section 'nosection'"),
    ("moe.d_model=8", "moe.d_model (it is set by model.d_model)"),
    ("train.steps=1.5", "train.steps='1.5' is invalid: expected an integer"),
    ("moe.dropless=maybe", "moe.dropless='maybe' is invalid: expected a boolean"),
    ("moe.dispatch=auto2", "moe.dispatch='auto2' is invalid: must be one of"),
    ("moe.top_k=99", "moe.top_k=99 is invalid"),
    ("model.n_heads=5", "model.n_heads=5 is invalid: must divide model.d_model=64"),
    ("model.first_k_dense=9", "model.first_k_dense=9 is invalid"),
    ("train.swap_interval=-2", "train.swap_interval=-2 is invalid"),
    ("data.eval_fraction=0", "data.eval_fraction=0.0 is invalid"),
    ("train.lr", "expected section.key=value"),
])
def test_bad_config_names_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(ROOT / "configs" / "tiny.yaml", [override])
  assert message in str(e.value)


def test_unknown_key_in_yaml_is_rejected(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  d_modle: 64\nmoe:\n  num_experts: 8\n  top_k: 2\n  d_ff: 8\n")
  with pytest.raises(ConfigError, match=r"unknown config key model\.d_modle"):
    load_config(path)


def test_missing_required_moe_key_is_named(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("moe:\n  num_experts: 8\n  d_ff: 8\n")
  with pytest.raises(ConfigError, match=r"moe\.top_k is required"):
    load_config(path)


# ------------------------------------------------------------------- transformer

def test_rmsnorm_matches_formula():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  norm = RMSNorm(16, eps=1e-6, param_dtype=jnp.float32)
  norm.scale[...] = jax.random.normal(jax.random.key(1), (16,))
  expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * norm.scale[...]
  np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

  def score(i, j):
    qi = rope(q, jnp.array([i]), 10000.0)
    kj = rope(k, jnp.array([j]), 10000.0)
    return float(jnp.sum(qi * kj))

  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
  np.testing.assert_allclose(rope(q, jnp.array([0]), 10000.0), q)  # position 0: identity
  np.testing.assert_allclose(jnp.linalg.norm(rope(q, jnp.array([7]), 1e4)), jnp.linalg.norm(q),
                             rtol=1e-6)  # a rotation


def _small_cfg(*extra):
  return load_config(ROOT / "configs" / "tiny.yaml", [
      "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
      "model.first_k_dense=1", "model.n_layers=2", "moe.num_experts=8", "moe.d_ff=16",
      "moe.top_k=2", "moe.dropless=true", *extra])


def test_attention_is_causal_with_grouped_kv_heads():
  cfg = _small_cfg("model.qk_norm=true")
  attn = Attention(cfg.model, rngs=nnx.Rngs(0))
  apply = nnx.jit(lambda module, x: module(x))
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  y = apply(attn, x)
  x2 = x.at[:, 6:].set(jax.random.normal(jax.random.key(3), (2, 4, 32)))
  y2 = apply(attn, x2)
  np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-6)  # past unaffected
  assert not np.allclose(y[:, 6:], y2[:, 6:])


def test_attention_matches_a_direct_float32_reference():
  cfg = _small_cfg()
  attn = Attention(cfg.model, rngs=nnx.Rngs(0))
  b, s, n, g, h = 2, 6, 4, 2, 8
  x = jax.random.normal(jax.random.key(4), (b, s, 32))

  @jax.jit
  def reference(x):
    q = rope((x @ attn.q.kernel[...]).reshape(b, s, n, h), jnp.arange(s), 1e4)
    k = rope((x @ attn.k.kernel[...]).reshape(b, s, g, h), jnp.arange(s), 1e4)
    v = (x @ attn.v.kernel[...]).reshape(b, s, g, h)
    k, v = jnp.repeat(k, n // g, axis=2), jnp.repeat(v, n // g, axis=2)  # head i: kv i//2
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
    logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf)
    out = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, -1), v).reshape(b, s, n * h)
    return out @ attn.o.kernel[...]

  got = nnx.jit(lambda module, x: module(x))(attn, x)
  np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_transformer_layers_forward_and_aux(scan):
  cfg = _small_cfg(f"model.scan_layers={str(scan).lower()}")
  mesh = hm.make_mesh(2, 4)
  model = Transformer(cfg.model, cfg.moe, mesh=mesh, rngs=nnx.Rngs(0))
  blocks = model.stacks if scan else model.blocks  # scanned: one stacked block per run
  assert isinstance(blocks[0].ffn, DenseFFN)  # first_k_dense = 1
  assert isinstance(blocks[1].ffn, hm.MoE)
  assert model.moe_layers == [1]
  tokens = jax.random.randint(jax.random.key(5), (8, 12), 0, 256)

  @nnx.jit
  def forward(model, tokens):
    logits, intermediates = nnx.capture(model, nnx.Intermediate)(tokens)
    return logits, moe_aux_by_layer(intermediates)

  logits, auxes = forward(model, tokens)
  assert logits.shape == (8, 12, 256) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert len(auxes) == 1 and auxes[0].strategy == cfg.moe.dispatch
  assert int(auxes[0].expert_counts.sum()) == 8 * 12 * cfg.moe.top_k
  # Causal end to end: a later token does not change earlier logits.
  logits2, _ = forward(model, tokens.at[:, 9:].set(7))
  np.testing.assert_allclose(logits[:, :9], logits2[:, :9], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- data

def test_default_corpus_is_python_docs_as_bytes():
  tokens = data_lib.load_tokens(DataConfig())
  assert tokens.dtype == np.uint8 and len(tokens) > 100_000
  assert b"def" in tokens[:200_000].tobytes()
  np.testing.assert_array_equal(tokens, data_lib.load_tokens(DataConfig()))  # deterministic


def test_batches_are_deterministic_and_split_by_rows():
  tokens = np.arange(10_000, dtype=np.uint16) % 251
  batches = data_lib.Batches(tokens, batch_size=8, seq_len=16, seed=3)
  x, y = batches.rows(5)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
  again = data_lib.Batches(tokens, batch_size=8, seq_len=16, seed=3)
  np.testing.assert_array_equal(again.rows(5)[0], x)  # resumable: a function of the index
  top, bottom = batches.rows(5, 0, 3)[0], batches.rows(5, 3, 8)[0]
  np.testing.assert_array_equal(np.concatenate([top, bottom]), x)  # per-process slices
  other_seed = data_lib.Batches(tokens, batch_size=8, seq_len=16, seed=4)
  assert not np.array_equal(other_seed.rows(5)[0], x)


def test_one_epoch_visits_every_window_once():
  tokens = np.arange(16 * 24 + 1, dtype=np.uint32)
  batches = data_lib.Batches(tokens, batch_size=4, seq_len=16, seed=0)
  assert batches.num_windows == 24
  starts = np.concatenate([batches.rows(b)[0][:, 0] for b in range(6)])
  np.testing.assert_array_equal(np.sort(starts), np.arange(24) * 16)
  assert not np.array_equal(starts, np.arange(24) * 16)  # shuffled


def test_data_from_text_bin_and_npy_files(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("hello")
  (tmp_path / "docs" / "b.txt").write_text("world")
  text = data_lib.load_tokens(DataConfig(path=str(tmp_path / "docs")))
  assert text.tobytes() == b"hello\n\nworld"
  ids = np.array([1, 70000, 3], np.uint32)
  ids.tofile(tmp_path / "ids.bin")
  np.save(tmp_path / "ids.npy", ids)
  np.testing.assert_array_equal(
      data_lib.load_tokens(DataConfig(path=str(tmp_path / "ids.bin"), token_dtype="uint32")), ids)
  np.testing.assert_array_equal(data_lib.load_tokens(DataConfig(path=str(tmp_path / "ids.npy"))),
                                ids)
  with pytest.raises(ConfigError, match="data.path"):
    data_lib.load_tokens(DataConfig(path=str(tmp_path / "missing.txt")))


def test_token_ids_beyond_the_vocabulary_are_rejected():
  batches = data_lib.Batches(np.full(100, 300, np.uint16), 2, 8, 0, vocab_size=256)
  with pytest.raises(ConfigError, match="model.vocab_size=256"):
    batches.rows(0)


# ----------------------------------------------------------------- step helpers

def test_imbalance_counts_rows_per_device_in_physical_order():
  counts = jnp.array([5, 1, 1, 1, 4, 4, 4, 4], jnp.int32)
  identity = jnp.arange(8)
  # 4 devices x 2 slots: [6, 2, 8, 8] -> max 8 / mean 6.
  assert float(imbalance(counts, identity, 4)) == pytest.approx(8 / 6)
  # Pair the hot expert 0 with a cold one and spread the rest: [6, 5, 5, 8].
  placement = jnp.array([0, 1, 2, 4, 3, 5, 6, 7])
  per_device = np.asarray(counts)[np.asarray(placement)].reshape(4, 2).sum(1)
  assert float(imbalance(counts, placement, 4)) == pytest.approx(per_device.max() /
                                                                 per_device.mean())


def test_process_rows_cover_the_batch_in_one_process():
  mesh = hm.make_mesh(2, 4)
  sharding = jax.sharding.NamedSharding(mesh, hm.mesh.sharded_rows(2))
  assert process_rows(sharding, (16, 8)) == (0, 16)


def test_learning_rate_warms_up_then_decays_to_the_floor():
  cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
  lr = learning_rate(cfg)
  assert float(lr(0)) == pytest.approx(0.1)  # the first update already moves
  assert float(lr(9)) == pytest.approx(1.0)
  assert float(lr(59)) == pytest.approx(0.55)  # half way through the cosine
  assert float(lr(109)) == pytest.approx(0.1)
  assert float(lr(500)) == pytest.approx(0.1)
