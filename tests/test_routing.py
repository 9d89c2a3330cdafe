"""Routers and losses against direct numpy transcriptions of the published code."""

import jax
import jax.numpy as jnp
import numpy as np

from hiermoe_jax import routing


def _np_sigmoid_grouped(logits, bias, k, n_group, topk_group, norm, scale):
  """A transcription of Hugging Face's DeepseekV3TopkRouter / MoEGate (noaux_tc)."""
  scores = 1 / (1 + np.exp(-logits))
  choice = scores + bias
  t, e = logits.shape
  group_scores = np.sort(choice.reshape(t, n_group, -1), axis=-1)[..., -2:].sum(-1)
  group_idx = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
  mask = np.zeros((t, n_group), bool)
  np.put_along_axis(mask, group_idx, True, axis=-1)
  masked = np.where(np.repeat(mask, e // n_group, axis=-1), choice, 0.0)  # HF masks with 0
  ids = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(scores, ids, -1)
  if norm:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return ids, w * scale


def test_sigmoid_grouped_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 32)).astype(np.float32)
  bias = rng.normal(scale=0.3, size=32).astype(np.float32)
  out = routing.sigmoid_grouped_topk(jnp.asarray(logits), jnp.asarray(bias), k=6, n_group=8,
                                     topk_group=3, norm_topk_prob=True,
                                     routed_scaling_factor=2.5)
  ids, w = _np_sigmoid_grouped(logits, bias, 6, 8, 3, True, 2.5)
  np.testing.assert_array_equal(np.sort(out.ids_TK, -1), np.sort(ids, -1))
  order = np.argsort(np.asarray(out.ids_TK), -1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(out.weights_TK), order, -1),
                             np.take_along_axis(w, np.argsort(ids, -1), -1), rtol=1e-6)


def test_bias_changes_selection_not_weights():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)
  bias = jnp.zeros(8).at[3].set(100.0)
  out = routing.sigmoid_grouped_topk(logits, bias, k=2, n_group=1, topk_group=1,
                                     norm_topk_prob=False, routed_scaling_factor=1.0)
  assert bool(jnp.all(jnp.any(out.ids_TK == 3, axis=-1)))
  np.testing.assert_allclose(out.weights_TK, jax.nn.sigmoid(
      jnp.take_along_axis(logits, out.ids_TK, -1)), rtol=1e-6)


def test_softmax_topk_and_renormalisation():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8)), jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits))
  plain = routing.softmax_topk(logits, 3, norm_topk_prob=False)
  ids = np.argsort(-probs, -1)[:, :3]
  np.testing.assert_array_equal(plain.ids_TK, ids)
  np.testing.assert_allclose(plain.weights_TK, np.take_along_axis(probs, ids, -1), rtol=1e-6)
  normed = routing.softmax_topk(logits, 3, norm_topk_prob=True)
  np.testing.assert_allclose(np.asarray(normed.weights_TK).sum(-1), 1.0, rtol=1e-6)


def test_load_balance_loss_is_one_when_balanced():
  ids = jnp.asarray(np.arange(32).reshape(16, 2) % 8, jnp.int32)
  probs = jnp.full((16, 8), 1 / 8)
  loss = routing.load_balance_loss(routing.Routing(ids, jnp.ones((16, 2)), probs), 8)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_bias_update_rule():
  bias = jnp.zeros(4)
  new = routing.update_router_bias(bias, jnp.array([10, 2, 4, 4]), rate=0.01)
  np.testing.assert_allclose(new, [-0.01, 0.01, 0.01, 0.01])
