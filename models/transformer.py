"""A decoder-only transformer LM in Flax NNX whose FFNs are `hiermoe_jax.MoE`.

Pre-norm blocks: x += attn(rmsnorm(x)); x += ffn(rmsnorm(x)). Attention is causal
with rotary position embeddings and optional grouped-query heads; the first
`first_k_dense` FFNs are dense SwiGLU (as in DeepSeek-V3), the rest MoE.
Dense parameters are replicated (data parallel); the MoE expert stacks carry
their own ("node", "local") sharding.

How the step runs (ModelConfig; none of it changes the model's function or its
initial parameters):
- `attention`: the kernel, chosen once per model from the mesh's platform
  (`attention_impl`).
- `remat`: each block runs under `jax.checkpoint` with that policy (`REMAT_POLICIES`).
- `scan_layers`: each run of identical blocks (`layer_runs`: the dense ones, then the
  MoE ones) is one `jax.lax.scan` over their stacked state, so the step holds one
  block per run whatever the depth. The blocks are built one by one as when unrolled
  (same random draws), then stacked: the state holds `stacks[run]`, every leaf with a
  leading layer axis, instead of `blocks[layer]`. `block_site` and `layer_state`
  address one layer in either layout.

Each block's MoEAux comes out of the block explicitly (captured inside it) and the
Transformer sows them as one `moe_aux` tuple in layer order, scanned or not.

Legend: B batch, S sequence, D model dim, N query heads, G kv heads, H head dim,
F FFN hidden dim, V vocabulary.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

import hiermoe_jax as hm
from hiermoe_jax.config import MoEConfig
from hiermoe_jax.errors import fail
from models.config import ModelConfig

GPU_PLATFORMS = ("gpu", "cuda")
# model.remat -> jax.checkpoint policy; "none" runs the block as is.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


# ------------------------------------------------------------------------------ attention

@functools.cache
def cudnn_available() -> bool:
  """Whether jax's CUDA plugin can load cuDNN (jax has no public probe for it)."""
  try:
    from jax._src.lib import cuda_versions
    return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
  except Exception:  # no CUDA plugin, or RuntimeError("cuDNN not found.")
    return False


def attention_impl(cfg: ModelConfig, platform: str) -> str:
  """The attention kernel for model.attention on a mesh of `platform` devices.

  auto: cuDNN's flash attention on GPUs when cuDNN is installed and the dtype is a half
  type (cuDNN has no float32 one); else the Pallas Triton flash attention, which
  compiles without cuDNN (deviceless plans on a CPU host use it); XLA's elsewhere.
  XLA's attention materialises the [B, N, S, S] scores: 48 GiB at the Qwen3 preset's
  per-device shape, against 1.5 GiB for the Pallas kernel (forward and backward).
  """
  gpu = platform in GPU_PLATFORMS
  if cfg.attention == "auto":
    if not gpu:
      return "xla"
    return "cudnn" if cfg.dtype != "float32" and cudnn_available() else "pallas"
  if cfg.attention == "cudnn" and not (gpu and cudnn_available()):
    fail("model.attention", cfg.attention,
         f"needs a GPU mesh with cuDNN installed (this mesh is {platform}"
         f"{'' if not gpu else ', cuDNN not found'}); use auto, xla or pallas")
  return cfg.attention


def _pallas_attention(q_BSNH, k_BSGH, v_BSGH, *, mesh: Mesh | None, interpret: bool):
  """jax's Pallas Triton flash attention (forward and backward kernels), causal.

  The kernel takes no grouped kv heads, so they are repeated (autodiff sums the
  copies' gradients). A Pallas call does not partition itself: under a mesh it runs
  per device on the batch rows, which the trainer splits over all devices.
  """
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  groups = q_BSNH.shape[2] // k_BSGH.shape[2]

  def local(q_BSNH, k_BSGH, v_BSGH):
    k_BSNH = jnp.repeat(k_BSGH, groups, axis=2)
    v_BSNH = jnp.repeat(v_BSGH, groups, axis=2)
    return pallas_attention.mha(q_BSNH, k_BSNH, v_BSNH, None,
                                sm_scale=q_BSNH.shape[-1] ** -0.5, causal=True,
                                interpret=interpret)

  b, s = q_BSNH.shape[:2]
  block = min(128, s)  # the kernel's default query / key block
  if s % block:
    fail("model.attention", "pallas", f"needs a sequence length that is a multiple of 128 "
         f"(or at most 128); got {s}")
  if mesh is None:
    return local(q_BSNH, k_BSGH, v_BSGH)
  if b % mesh.size:
    fail("model.attention", "pallas", f"splits the batch over all {mesh.size} devices; "
         f"got {b} sequences")
  spec = P(mesh.axis_names)
  # check_vma=False: a pallas_call's outputs carry no varying-axes type.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q_BSNH, k_BSGH, v_BSGH)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
    self.n_heads, self.n_kv = cfg.n_heads, cfg.resolved_kv_heads
    self.head_dim, self.theta = cfg.resolved_head_dim, cfg.rope_theta
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    self.impl = attention_impl(cfg, platform)
    self.mesh = mesh
    self.interpret = platform not in GPU_PLATFORMS  # Pallas off GPU: interpret mode (tests)
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
    if self.impl == "pallas":
      out_BSNH = _pallas_attention(q_BSNH, k_BSGH, v_BSGH, mesh=self.mesh,
                                   interpret=self.interpret)
    else:  # dot_product_attention handles grouped kv heads (N a multiple of G).
      out_BSNH = jax.nn.dot_product_attention(q_BSNH, k_BSGH, v_BSGH, is_causal=True,
                                              implementation=self.impl)
    return self.o(out_BSNH.reshape(b, s, self.n_heads * self.head_dim))


# ------------------------------------------------------------------------------ blocks

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
    self.attn = Attention(cfg, rngs=rngs, mesh=mesh)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.ffn = DenseFFN(cfg, rngs=rngs) if moe is None else hm.MoE(moe, mesh=mesh, rngs=rngs)

  def __call__(self, x_BSD):
    x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
    return x_BSD + self.ffn(self.ffn_norm(x_BSD)).astype(x_BSD.dtype)


def _stacked(blocks: list[Block]) -> Block:
  """One Block whose every leaf stacks `blocks`' on a new leading layer axis (sharding
  metadata included: that axis is not split). Run it only through `_run_blocks`."""
  graphdef, _ = nnx.split(blocks[0])
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  return nnx.merge(graphdef, nnx.spmd.add_axis(state, 0, {nnx.PARTITION_NAME: None}))


def _block_fn(graphdef, remat: str, *, scanned: bool):
  """(block state, x) -> (block(x), its MoEAux or None): a pure function of the state,
  as jax.checkpoint and jax.lax.scan need, under the model.remat policy."""
  def apply(state, x_BSD):
    block = nnx.merge(graphdef, state)
    y_BSD, intermediates = nnx.capture(block, nnx.Intermediate)(x_BSD)
    auxes = hm.collect_aux(intermediates)
    return y_BSD, (auxes[-1] if auxes else None)
  if remat == "none":
    return apply
  # Inside a scan, CSE cannot merge the recomputation into the forward: no need to prevent it.
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


def is_stacked(path) -> bool:
  """Whether a leaf at `path` (a jax key path into a model state) belongs to scanned
  blocks, so that its leading axis is the layer."""
  return bool(path) and getattr(path[0], "key", None) == "stacks"


def layer_runs(cfg: ModelConfig) -> list[range]:
  """Consecutive layers of one kind, each one scan with scan_layers: dense, then MoE."""
  return [r for r in (range(cfg.first_k_dense), range(cfg.first_k_dense, cfg.n_layers)) if r]


def block_site(cfg: ModelConfig, layer: int) -> tuple[tuple, int | None]:
  """Where block `layer` is in the model's state: (keys, None) unrolled, the block's
  subtree being state["blocks"][layer]; (keys, row) scanned, row `row` of every leaf
  under state["stacks"][run]."""
  if not cfg.scan_layers:
    return ("blocks", layer), None
  for run, layers in enumerate(layer_runs(cfg)):
    if layer in layers:
      return ("stacks", run), layer - layers.start
  raise IndexError(f"layer {layer} is not in [0, model.n_layers={cfg.n_layers})")


def layer_state(state, cfg: ModelConfig, layer: int):
  """Block `layer`'s part of a model state (params, buffers or both) as an unrolled
  model holds it; scanned, its row of each stacked leaf (a copy)."""
  keys, row = block_site(cfg, layer)
  subtree = functools.reduce(operator.getitem, keys, state)
  return subtree if row is None else jax.tree.map(lambda x: x[row], subtree)


class Transformer(nnx.Module):
  """tokens [B, S] int -> logits [B, S, V] float32."""

  def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, mesh: Mesh, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype),
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    blocks = [Block(cfg, None if i < cfg.first_k_dense else moe, mesh=mesh, rngs=rngs)
              for i in range(cfg.n_layers)]
    if cfg.scan_layers:
      self.stacks = nnx.List([_stacked(blocks[r.start:r.stop]) for r in layer_runs(cfg)])
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                              param_dtype=jnp.dtype(cfg.param_dtype))
    self.lm_head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab_size, cfg,
                                                           rngs)

  @property
  def moe_layers(self) -> list[int]:
    """Block indices of the MoE layers (`block_site` finds one in the state)."""
    return list(range(self.cfg.first_k_dense, self.cfg.n_layers))

  def _run_blocks(self, x_BSD):
    """x through every block; sows each MoE layer's MoEAux, in layer order."""
    auxes = []
    if self.cfg.scan_layers:
      for layers, stack in zip(layer_runs(self.cfg), self.stacks):
        graphdef, state = nnx.split(stack)
        apply = _block_fn(graphdef, self.cfg.remat, scanned=True)
        x_BSD, aux = jax.lax.scan(lambda x, s: apply(s, x), x_BSD, state)
        if aux is not None:
          auxes += [jax.tree.map(lambda a: a[i], aux) for i in range(len(layers))]
    else:
      for block in self.blocks:
        graphdef, state = nnx.split(block)
        x_BSD, aux = _block_fn(graphdef, self.cfg.remat, scanned=False)(state, x_BSD)
        auxes += [aux] if aux is not None else []
    for aux in auxes:
      self.sow(nnx.Intermediate, "moe_aux", aux)
    return x_BSD

  def __call__(self, tokens_BS):
    return self.logits_of(self.hidden(tokens_BS))

  def hidden(self, tokens_BS):
    """Final-normed hidden states [B, S, D]: a chunked loss (models/loss.py) unembeds
    them a chunk at a time instead of holding [B, S, V] logits."""
    return self.final_norm(self._run_blocks(self.embed(tokens_BS)))

  def logits_of(self, x_BSD):
    """The unembedding: hidden states [..., D] -> float32 logits [..., V]."""
    if self.lm_head is None:
      logits_BSV = self.embed.attend(x_BSD)
    else:
      logits_BSV = self.lm_head(x_BSD)
    return logits_BSV.astype(jnp.float32)

  def update_router_biases(self, expert_counts) -> None:
    """DeepSeek's aux-loss-free bias step of every MoE layer, from its [E] counts (in
    `moe_layers` order); between steps."""
    counts = dict(zip(self.moe_layers, expert_counts, strict=True))
    if not self.cfg.scan_layers:
      for layer in self.moe_layers:
        self.blocks[layer].ffn.update_router_bias(counts[layer])
      return
    for layers, stack in zip(layer_runs(self.cfg), self.stacks):
      if isinstance(stack.ffn, hm.MoE):
        step = jax.vmap(hm.update_router_bias, in_axes=(0, 0, None))
        stack.ffn.router_bias[...] = step(stack.ffn.router_bias[...],
                                          jnp.stack([counts[i] for i in layers]),
                                          stack.ffn.config.bias_update_rate)

  def set_dispatch(self, strategies) -> None:
    """Fixes each MoE layer's strategy (one per `moe_layers` entry): a static field of
    the graph, so each tuple is its own program. Scanned layers share one program and
    must share one strategy."""
    choice = dict(zip(self.moe_layers, strategies, strict=True))
    if self.cfg.scan_layers:
      if len(set(strategies)) > 1:
        raise ValueError(f"set_dispatch: scanned MoE layers share one program; got {strategies}")
      moes = [stack.ffn for stack in self.stacks if isinstance(stack.ffn, hm.MoE)]
    else:
      moes = [self.blocks[layer].ffn for layer in self.moe_layers]
    for moe, layer in zip(moes, self.moe_layers):
      moe.config = moe.config.replace(dispatch=choice[layer])


def moe_aux_by_layer(intermediates: nnx.State) -> list[hm.MoEAux]:
  """The MoEAux of each MoE layer, in layer order (from `nnx.capture(model, nnx.Intermediate)`)."""
  return hm.collect_aux(intermediates)
