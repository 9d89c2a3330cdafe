"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from models.config import TrainConfig
from models.transformer import is_stacked


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to lr over warmup_steps, then cosine down to lr * min_lr_ratio at `steps`.

  The argument is the number of updates already applied, so update n (1-based) uses
  lr * n / warmup_steps during warmup: the first update is not wasted at lr = 0.
  """
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warmup, total = cfg.warmup_steps, cfg.steps

  def schedule(count):
    n = jnp.asarray(count, jnp.float32) + 1
    warm = peak * n / max(warmup, 1)
    progress = jnp.clip((n - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(n <= warmup, warm, cosine)

  return schedule


def applied_updates(opt_state) -> jax.Array:
  """The updates optax has applied: the count its learning-rate schedule reads.

  Not the train step: a skipped non-finite step (train.on_nan=skip) advances the
  step but keeps the optimizer state, so the schedule does not move."""
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
  [state] = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  return state.count


def _decay_mask(params):
  """Weight decay on matrices only: not on norm scales (or any vector). The leaves of
  scanned blocks carry a leading layer axis (models/transformer.py): not counted."""
  def decays(path, p):
    return p.ndim - is_stacked(path) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=_decay_mask),
  )
