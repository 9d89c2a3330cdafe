"""Routers and balancing losses, exactly as the published references define them.

Legend: T tokens, E experts, K top-k.
All routing math runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hiermoe_jax.config import MoEConfig


class Routing(NamedTuple):
  ids_TK: jax.Array  # int32 logical expert ids, distinct per token
  weights_TK: jax.Array  # float32 combine weights
  probs_TE: jax.Array  # float32 per-expert probabilities used by the balance loss


def softmax_topk(logits_TE, k: int, norm_topk_prob: bool) -> Routing:
  """Mixtral / Qwen-MoE: softmax over all experts, top-k, optional renormalisation."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weights_TK, ids_TK = jax.lax.top_k(probs_TE, k)
  if norm_topk_prob:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return Routing(ids_TK.astype(jnp.int32), weights_TK, probs_TE)


def sigmoid_grouped_topk(logits_TE, bias_E, *, k: int, n_group: int, topk_group: int,
                         norm_topk_prob: bool, routed_scaling_factor: float) -> Routing:
  """DeepSeek-V3 routing.

  Scores s = sigmoid(logits); selection uses s + bias (the bias never changes the
  weights); a group's score is the sum of its top-2 selection scores; the best
  `topk_group` groups stay eligible; top-k within them; weights are the unbiased
  s of the chosen experts, normalised over the k, times the scaling factor.
  """
  scores_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
  choice_TE = scores_TE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  num_tokens, num_experts = scores_TE.shape
  if n_group > 1:
    grouped = choice_TE.reshape(num_tokens, n_group, num_experts // n_group)  # [T, Z, E/Z]
    group_score_TZ = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, top_groups = jax.lax.top_k(group_score_TZ, topk_group)
    group_mask_TZ = jnp.zeros((num_tokens, n_group), bool).at[
        jnp.arange(num_tokens)[:, None], top_groups].set(True)
    expert_mask_TE = jnp.repeat(group_mask_TZ, num_experts // n_group, axis=-1)
    choice_TE = jnp.where(expert_mask_TE, choice_TE, -jnp.inf)
  # Selection is not differentiated through (it picks indices); weights are.
  _, ids_TK = jax.lax.top_k(jax.lax.stop_gradient(choice_TE), k)
  weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
  if norm_topk_prob:
    weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
  weights_TK = weights_TK * routed_scaling_factor
  # The balance loss uses scores normalised per token (DeepSeek's sequence-wise loss).
  probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  return Routing(ids_TK.astype(jnp.int32), weights_TK, probs_TE)


def route(logits_TE, config: MoEConfig, bias_E=None) -> Routing:
  if config.router == "softmax":
    return softmax_topk(logits_TE, config.top_k, config.norm_topk_prob)
  if bias_E is None:
    bias_E = jnp.zeros((config.num_experts,), jnp.float32)
  return sigmoid_grouped_topk(
      logits_TE, bias_E, k=config.top_k, n_group=config.n_group, topk_group=config.topk_group,
      norm_topk_prob=config.norm_topk_prob, routed_scaling_factor=config.routed_scaling_factor)


def expert_counts(ids_TK, num_experts: int) -> jax.Array:
  """Number of (token, expert) pairs routed to each expert: [E] int32."""
  return jnp.zeros((num_experts,), jnp.int32).at[ids_TK.reshape(-1)].add(1)


def load_balance_loss(routing: Routing, num_experts: int) -> jax.Array:
  """Switch / GShard loss E * sum_i f_i * P_i; equals 1 under perfect balance.

  f_i is the fraction of (token, expert) assignments that go to expert i (no
  gradient), P_i the mean router probability of expert i.
  """
  counts_E = expert_counts(routing.ids_TK, num_experts).astype(jnp.float32)
  f_E = counts_E / jnp.sum(counts_E)
  p_E = jnp.mean(routing.probs_TE, axis=0)
  return num_experts * jnp.sum(f_E * p_E)


def z_loss(logits_TE) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def update_router_bias(bias_E, counts_E, rate: float) -> jax.Array:
  """DeepSeek aux-loss-free update: b_i += u * sign(mean load - load_i).

  Call between steps with the per-expert counts of the last step(s) (e.g.
  `aux.expert_counts`); the bias is state, not a trained parameter.
  """
  counts_E = jnp.asarray(counts_E, jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E)
