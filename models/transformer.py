"""A decoder-only transformer LM in Flax NNX whose FFNs are `hiermoe_jax.MoE`.

Pre-norm blocks: x += attn(rmsnorm(x)); x += ffn(rmsnorm(x)). Attention is causal
with rotary position embeddings and optional grouped-query heads; the first
`first_k_dense` FFNs are dense SwiGLU (as in DeepSeek-V3), the rest MoE.
Dense parameters are replicated (data parallel); the MoE expert stacks carry
their own ("node", "local") sharding.

Legend: B batch, S sequence, D model dim, N query heads, G kv heads, H head dim,
F FFN hidden dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

import hiermoe_jax as hm
from hiermoe_jax.config import MoEConfig
from models.config import ModelConfig


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_BSNH, positions_S, theta: float):
  """Rotary embedding, rotate-half convention (Llama / Qwen / HF)."""
  half = x_BSNH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_SH = positions_S.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin = jnp.sin(angles_SH)[None, :, None, :]
  cos = jnp.cos(angles_SH)[None, :, None, :]
  x32 = x_BSNH.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BSNH.dtype)


def _linear(d_in: int, d_out: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.n_heads, self.n_kv = cfg.n_heads, cfg.resolved_kv_heads
    self.head_dim, self.theta = cfg.resolved_head_dim, cfg.rope_theta
    d, h = cfg.d_model, self.head_dim
    self.q = _linear(d, self.n_heads * h, cfg, rngs)
    self.k = _linear(d, self.n_kv * h, cfg, rngs)
    self.v = _linear(d, self.n_kv * h, cfg, rngs)
    self.o = _linear(self.n_heads * h, d, cfg, rngs)
    norm = lambda: RMSNorm(h, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None

  def __call__(self, x_BSD):
    b, s, _ = x_BSD.shape
    q_BSNH = self.q(x_BSD).reshape(b, s, self.n_heads, self.head_dim)
    k_BSGH = self.k(x_BSD).reshape(b, s, self.n_kv, self.head_dim)
    v_BSGH = self.v(x_BSD).reshape(b, s, self.n_kv, self.head_dim)
    if self.q_norm is not None:
      q_BSNH, k_BSGH = self.q_norm(q_BSNH), self.k_norm(k_BSGH)
    positions_S = jnp.arange(s)
    q_BSNH = rope(q_BSNH, positions_S, self.theta)
    k_BSGH = rope(k_BSGH, positions_S, self.theta)
    # dot_product_attention handles grouped kv heads (N a multiple of G).
    out_BSNH = jax.nn.dot_product_attention(q_BSNH, k_BSGH, v_BSGH, is_causal=True)
    return self.o(out_BSNH.reshape(b, s, self.n_heads * self.head_dim))


class DenseFFN(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.gate = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
    self.up = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
    self.down = _linear(cfg.d_ff, cfg.d_model, cfg, rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, moe: MoEConfig | None, *, mesh: Mesh, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.ffn = DenseFFN(cfg, rngs=rngs) if moe is None else hm.MoE(moe, mesh=mesh, rngs=rngs)

  def __call__(self, x_BSD):
    x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
    return x_BSD + self.ffn(self.ffn_norm(x_BSD)).astype(x_BSD.dtype)


class Transformer(nnx.Module):
  """tokens [B, S] int -> logits [B, S, V] float32."""

  def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, mesh: Mesh, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype),
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.blocks = nnx.List([
        Block(cfg, None if i < cfg.first_k_dense else moe, mesh=mesh, rngs=rngs)
        for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                              param_dtype=jnp.dtype(cfg.param_dtype))
    self.lm_head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab_size, cfg,
                                                           rngs)

  @property
  def moe_layers(self) -> list[int]:
    """Block indices of the MoE layers (the keys under the state's "blocks")."""
    return list(range(self.cfg.first_k_dense, self.cfg.n_layers))

  def __call__(self, tokens_BS):
    return self.logits_of(self.hidden(tokens_BS))

  def hidden(self, tokens_BS):
    """Final-normed hidden states [B, S, D]: a chunked loss (models/loss.py) unembeds
    them a chunk at a time instead of holding [B, S, V] logits."""
    x_BSD = self.embed(tokens_BS)
    for block in self.blocks:
      x_BSD = block(x_BSD)
    return self.final_norm(x_BSD)

  def logits_of(self, x_BSD):
    """The unembedding: hidden states [..., D] -> float32 logits [..., V]."""
    if self.lm_head is None:
      logits_BSV = self.embed.attend(x_BSD)
    else:
      logits_BSV = self.lm_head(x_BSD)
    return logits_BSV.astype(jnp.float32)


def moe_aux_by_layer(intermediates: nnx.State) -> list[hm.MoEAux]:
  """The MoEAux each MoE layer sowed, in layer order (from `nnx.capture(model, nnx.Intermediate)`)."""
  found = []
  for path, value in nnx.to_flat_state(intermediates):
    if path[-1] != "aux":
      continue
    layer = next(p for p in path if isinstance(p, int))
    aux = value.get_value() if isinstance(value, nnx.Variable) else value
    found.append((layer, aux[-1] if isinstance(aux, tuple) else aux))
  return [aux for _, aux in sorted(found, key=lambda item: item[0])]
