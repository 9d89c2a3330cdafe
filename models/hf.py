"""Whole Hugging Face models in: Qwen3-MoE and Mixtral checkpoints as the trainer's
transformer, sharded as the trainer shards it.

    model, cfg = models.hf.load_pretrained("ckpt/Qwen3-30B-A3B", mesh=hm.make_mesh(4, 8))
    logits_BSV = model(tokens_BS)            # float32, as transformers' model gives them

A checkpoint directory holds `config.json` and `model.safetensors` or shards named by
`model.safetensors.index.json`. `config_from_hf` maps config.json to the run Config;
the weights are read tensor by tensor (safetensors' lazy `safe_open`; bf16 / fp8 through
`hiermoe_jax.convert`'s memory map) and each device receives only its own shard of
every parameter (`jax.make_array_from_callback` with the trainer's shardings, scanned
layers' leading layer axis included): no host or device holds the whole model.

Names (HF torch Linear weights are [out, in]; kernels are [in, out], so transposed):
    model.embed_tokens.weight [V, D]               embed.embedding
    model.layers.{i}.input_layernorm.weight        attn_norm.scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj      attn.{q,k,v,o}.kernel
    model.layers.{i}.self_attn.{q,k}_norm          attn.{q,k}_norm.scale (Qwen3)
    model.layers.{i}.post_attention_layernorm      ffn_norm.scale
    model.layers.{i}.mlp.{gate,up,down}_proj       ffn.{gate,up,down}.kernel (dense layers)
    model.layers.{i}.{mlp|block_sparse_moe}.gate   ffn.params.router.kernel
      .experts.{e}.{gate_proj|w1, up_proj|w3, down_proj|w2}, or transformers 5's fused
      .experts.gate_up_proj / .experts.down_proj   ffn.params.experts.{gate,up,down}
    model.norm.weight                              final_norm.scale
    lm_head.weight (absent when tied)              lm_head.kernel

Refused with a one-line ConfigError (before any weight is read): another model_type, a
sliding window that could take effect (Qwen3's use_sliding_window, Mixtral's
sliding_window below max_position_embeddings), RoPE scaling, attention biases, dense
layers that are not the leading ones (Qwen3's mlp_only_layers / decoder_sparse_step),
missing tensors, wrong shapes and tensors the model has no place for (e.g. FP8 scales).
Ignored: Mixtral's router_jitter_noise (training-time noise in transformers only) and
a sliding window >= max_position_embeddings (it never masks anything).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from hiermoe_jax import convert, hf_config
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.mesh import AXES
from models.config import Config, apply_overrides, config_from_dict

FAMILIES = ("mixtral", "qwen3_moe")
# transformers' defaults for keys a config.json may leave out.
DEFAULT_THETA = {"mixtral": 1e6, "qwen3_moe": 1e4}
DEFAULT_EPS = {"mixtral": 1e-5, "qwen3_moe": 1e-6}
# What the run config sets that config.json does not say: exact routing (no capacity
# drops, as transformers computes), the dedup dispatch, and a continued-training lr.
RUN_DEFAULTS = {"moe": {"dispatch": "hier_dedup", "dropless": True},
                "train": {"lr": 1e-5}}
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Tensors a checkpoint may hold that the model does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_RAW_DTYPES = ("BF16",)  # numpy has none: read through convert's memory map


# ---------------------------------------------------------------------------- config

def read_hf_config(hf_dir) -> dict:
  """The parsed config.json of checkpoint directory `hf_dir`."""
  path = pathlib.Path(hf_dir)
  if not path.is_dir():
    raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: no such directory")
  config_path = path / "config.json"
  if not config_path.is_file():
    raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: it has no config.json (a Hugging "
                      "Face checkpoint directory holds config.json and *.safetensors)")
  try:
    config = json.loads(config_path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: config.json is not valid JSON "
                      f"({' '.join(str(e).split())})") from None
  if not isinstance(config, dict):
    raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: config.json must hold an object")
  return config


def _family(hf: Mapping[str, Any]) -> str:
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ConfigError(f"Hugging Face config model_type={model_type!r} is not supported by "
                      f"models.hf; expected one of {list(FAMILIES)}")
  return model_type


def _key(hf: Mapping[str, Any], family: str, key: str, default: Any = ...) -> Any:
  value = hf.get(key)
  if value is None:
    if default is ...:
      raise ConfigError(f"Hugging Face {family} config is missing key {key!r}")
    return default
  return value


def _unsupported(family: str, key: str, value: Any, why: str):
  raise ConfigError(f"Hugging Face {family} config key {key}={value!r} is not supported: {why}")


def _rope_theta(hf: Mapping[str, Any], family: str) -> float:
  """rope_theta from transformers 5's rope_parameters or the older rope_theta /
  rope_scaling keys; any RoPE scaling (yarn, linear, ...) is refused."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  if not isinstance(params, Mapping):
    _unsupported(family, key, params, "expected an object with rope_type and rope_theta")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    _unsupported(family, key, dict(params),
                 "only the default RoPE (rope_type 'default', no scaling) is implemented")
  factor = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
  if factor not in (None, 1, 1.0):
    _unsupported(family, "partial_rotary_factor", factor, "RoPE rotates every head dim")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  return float(DEFAULT_THETA[family] if theta is None else theta)


def _check_attention(hf: Mapping[str, Any], family: str) -> None:
  """Full causal attention without biases, as the model computes it."""
  if hf.get("attention_bias"):
    _unsupported(family, "attention_bias", hf["attention_bias"],
                 "the attention projections have no bias")
  if family == "qwen3_moe" and hf.get("use_sliding_window"):
    _unsupported(family, "use_sliding_window", True,
                 f"the model attends over the whole sequence (sliding_window="
                 f"{hf.get('sliding_window')!r})")
  window = hf.get("sliding_window")
  positions = hf.get("max_position_embeddings")
  if family == "mixtral" and window is not None and not (
      isinstance(positions, int) and isinstance(window, int) and window >= positions):
    _unsupported(family, "sliding_window", window,
                 "the model attends over the whole sequence; only null or a window >= "
                 f"max_position_embeddings={positions!r} (which never masks) is accepted")
  kinds = set(hf.get("layer_types") or ())
  if kinds - {"full_attention"}:
    _unsupported(family, "layer_types", sorted(kinds),
                 "every layer must be 'full_attention'")


def _first_k_dense(hf: Mapping[str, Any], family: str, n_layers: int) -> int:
  """Qwen3-MoE's dense layers (mlp_only_layers, and those decoder_sparse_step skips) as
  model.first_k_dense: they must be the leading ones."""
  if family == "mixtral":
    return 0
  step = _key(hf, family, "decoder_sparse_step", 1)
  only = _key(hf, family, "mlp_only_layers", [])
  if not isinstance(step, int) or isinstance(step, bool) or step < 1:
    raise ConfigError(f"Hugging Face {family} config key decoder_sparse_step={step!r} is "
                      "invalid: expected an integer >= 1")
  if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
    raise ConfigError(f"Hugging Face {family} config key mlp_only_layers={only!r} is "
                      "invalid: expected a list of layer indices")
  dense = [i for i in range(n_layers) if i in only or (i + 1) % step != 0]
  if dense != list(range(len(dense))):
    key, value = (("decoder_sparse_step", step) if step != 1 else ("mlp_only_layers", only))
    _unsupported(family, key, value,
                 f"it makes layers {dense} dense; only leading dense layers (model."
                 "first_k_dense) are implemented")
  return len(dense)


def config_from_hf(hf: Mapping[str, Any], overrides: Sequence[str] = (), *,
                   mesh: Mesh | None = None) -> Config:
  """The run Config of a Hugging Face config.json (a dict): the model's shape, its
  MoEConfig (hiermoe_jax's `MoEConfig.from_hf`), `RUN_DEFAULTS`, then `overrides`
  ("section.key=value", as `--set`). `mesh` fills the mesh section and makes
  train.batch_size a multiple of its devices."""
  hf = hf_config.as_dict(hf)
  family = _family(hf)
  moe = hf_config.moe_fields_from_hf(hf)  # checks hidden_act (SwiGLU)
  moe.pop("d_model")  # the trainer sets it from model.d_model
  _check_attention(hf, family)
  n_layers = _key(hf, family, "num_hidden_layers")
  n_heads = _key(hf, family, "num_attention_heads")
  model = dict(
      vocab_size=_key(hf, family, "vocab_size"),
      d_model=_key(hf, family, "hidden_size"),
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=_key(hf, family, "num_key_value_heads", n_heads),
      head_dim=_key(hf, family, "head_dim", None),
      d_ff=_key(hf, family, "intermediate_size"),  # Qwen3's dense layers; Mixtral: unused
      first_k_dense=_first_k_dense(hf, family, n_layers) if isinstance(n_layers, int) else 0,
      qk_norm=family == "qwen3_moe",
      rope_theta=_rope_theta(hf, family),
      norm_eps=_key(hf, family, "rms_norm_eps", DEFAULT_EPS[family]),
      tie_embeddings=_key(hf, family, "tie_word_embeddings", False),
  )
  raw = {"model": model, "moe": {**moe, **RUN_DEFAULTS["moe"]},
         "train": {**RUN_DEFAULTS["train"]}}
  if mesh is not None:
    _check_mesh(mesh)
    raw["mesh"] = {"nodes": mesh.shape[AXES[0]], "local": mesh.shape[AXES[1]]}
    devices = mesh.devices.size
    batch = 16  # TrainConfig's default, rounded up to a multiple of the devices
    raw["train"]["batch_size"] = -(-batch // devices) * devices
  return config_from_dict(apply_overrides(raw, list(overrides)))


def _check_mesh(mesh) -> None:
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
    names = getattr(mesh, "axis_names", type(mesh).__name__)
    raise ConfigError(f"mesh={names!r} is invalid: expected a jax Mesh with the trainer's "
                      f"axes {AXES} (hiermoe_jax.make_mesh)")


# ---------------------------------------------------------------------------- tensors

class Checkpoint:
  """A checkpoint's tensors: names, shapes and dtypes from the safetensors headers;
  `read(name, index)` reads one slice of one tensor as float32 and nothing else."""

  def __init__(self, hf_dir):
    from safetensors import safe_open  # the hf extra
    self.directory = path = pathlib.Path(hf_dir)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
      except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: {SAFETENSORS_INDEX} needs a "
                          "'weight_map' from tensor name to shard file") from None
    else:
      files = sorted(path.glob("*.safetensors"))
    if not files:
      raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: it holds no *.safetensors "
                        "weights (convert a .bin checkpoint to safetensors first)")
    self._handles, self._raw, self.info = {}, {}, {}
    for file in files:
      if not file.is_file():
        raise ConfigError(f"hf_dir={str(hf_dir)!r} is invalid: {SAFETENSORS_INDEX} names "
                          f"shard {file.name!r}, which is missing")
      handle = self._handles[file] = safe_open(file, framework="numpy")
      for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
        tensor = handle.get_slice(name)
        self.info[name] = (tuple(tensor.get_shape()), tensor.get_dtype(), file)

  def read(self, name: str, index: tuple) -> np.ndarray:
    _, dtype, file = self.info[name]
    if dtype in _RAW_DTYPES:
      if file not in self._raw:
        self._raw[file] = convert.open_safetensors(file)
      value = self._raw[file][name][index]
    else:
      value = self._handles[file].get_slice(name)[index]
    return np.asarray(value, dtype=np.float32)


class _Source(NamedTuple):
  """Where one layer's part of a parameter comes from: the HF tensors it needs (name ->
  expected shape) and `read(index)`, the float32 slice `index` of the parameter."""
  needs: dict
  read: Callable[[tuple], np.ndarray]


def _slices(index: tuple, shape: tuple) -> tuple:
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _plain(ckpt: Checkpoint, name: str, shape: tuple) -> _Source:
  return _Source({name: shape}, lambda idx: ckpt.read(name, idx))


def _transposed(ckpt: Checkpoint, name: str, shape: tuple) -> _Source:
  """A torch Linear weight [out, in] as an [in, out] kernel."""
  return _Source({name: shape[::-1]}, lambda idx: ckpt.read(name, idx[::-1]).T)


def _experts(ckpt: Checkpoint, moe: str, leaf: str, shape: tuple) -> _Source:
  """An [E, in, out] expert stack from per-expert weights (Qwen3 gate_proj/up_proj/
  down_proj, Mixtral w1/w3/w2) or transformers 5's fused gate_up_proj [E, 2F, D] (gate
  rows first) and down_proj [E, D, F]."""
  e, d_in, d_out = shape
  if f"{moe}experts.gate_up_proj" in ckpt.info:
    if leaf == "down":
      name = f"{moe}experts.down_proj"
      return _Source({name: (e, d_out, d_in)},
                     lambda idx: ckpt.read(name, (idx[0], idx[2], idx[1])).transpose(0, 2, 1))
    name, offset = f"{moe}experts.gate_up_proj", 0 if leaf == "gate" else d_out

    def read_fused(idx):
      idx = _slices(idx, shape)
      rows = slice(idx[2].start + offset, idx[2].stop + offset)
      return ckpt.read(name, (idx[0], rows, idx[1])).transpose(0, 2, 1)
    return _Source({name: (e, 2 * d_out, d_in)}, read_fused)
  mixtral = f"{moe}experts.0.w1.weight" in ckpt.info
  proj = {"gate": "w1", "up": "w3", "down": "w2"}[leaf] if mixtral else f"{leaf}_proj"
  names = [f"{moe}experts.{i}.{proj}.weight" for i in range(e)]

  def read_experts(idx):
    idx = _slices(idx, shape)
    return np.stack([ckpt.read(names[i], (idx[2], idx[1])).T for i in range(*idx[0].indices(e))])
  return _Source(dict.fromkeys(names, (d_out, d_in)), read_experts)


def _moe_prefix(ckpt: Checkpoint, layer: str) -> str:
  """Mixtral's checkpoints name the MoE block block_sparse_moe; transformers 5 and
  Qwen3 mlp."""
  sparse = f"{layer}block_sparse_moe."
  return sparse if f"{sparse}gate.weight" in ckpt.info else f"{layer}mlp."


_BLOCK_NAMES = {
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("ffn_norm", "scale"): "post_attention_layernorm.weight",
    ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
    **{("attn", p, "kernel"): f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{("ffn", p, "kernel"): f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def _block_source(ckpt: Checkpoint, layer: int, keys: tuple, shape: tuple) -> _Source:
  prefix = f"model.layers.{layer}."
  if keys in _BLOCK_NAMES:
    name = prefix + _BLOCK_NAMES[keys]
    return (_transposed if keys[-1] == "kernel" else _plain)(ckpt, name, shape)
  if keys == ("ffn", "params", "router", "kernel"):
    return _transposed(ckpt, _moe_prefix(ckpt, prefix) + "gate.weight", shape)
  if keys[:3] == ("ffn", "params", "experts") and len(keys) == 4:
    return _experts(ckpt, _moe_prefix(ckpt, prefix), keys[3], shape)
  raise NotImplementedError(f"models.hf has no Hugging Face source for block parameter "
                            f"{'.'.join(keys)} (layer {layer})")


def _source(ckpt: Checkpoint, keys: tuple, shape: tuple) -> _Source:
  if keys == ("embed", "embedding"):
    return _plain(ckpt, "model.embed_tokens.weight", shape)
  if keys == ("final_norm", "scale"):
    return _plain(ckpt, "model.norm.weight", shape)
  if keys == ("lm_head", "kernel"):
    return _transposed(ckpt, "lm_head.weight", shape)
  raise NotImplementedError(f"models.hf has no Hugging Face source for parameter "
                            f"{'.'.join(keys)}")


def _name(entry) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _leaf_sources(ckpt: Checkpoint, cfg: Config, path, shape) -> tuple[list | None, list]:
  """(layers, sources): a block parameter has one source per layer, stacked on a leading
  axis when layers are scanned (state["stacks"][run]); others (None, [source])."""
  keys = tuple(_name(k) for k in path)
  keys = keys[:-1] if keys[-1] == "value" else keys  # an nnx Variable's value
  if keys[0] == "blocks":
    return None, [_block_source(ckpt, keys[1], keys[2:], shape)]
  if keys[0] == "stacks":
    from models.transformer import layer_runs  # with model.scan_layers
    layers = list(layer_runs(cfg.model)[keys[1]])
    return layers, [_block_source(ckpt, i, keys[2:], shape[1:]) for i in layers]
  return None, [_source(ckpt, keys, shape)]


def _check_tensors(ckpt: Checkpoint, needs: dict, cfg: Config) -> None:
  """Every tensor the model needs is there with its shape and a float dtype, and every
  tensor there has a place in the model (else it would compute something else)."""
  where = f"Hugging Face checkpoint {str(ckpt.directory)!r}"
  missing = [name for name in needs if name not in ckpt.info]
  if missing:
    raise ConfigError(f"{where} is missing tensor {missing[0]!r} ({len(missing)} missing in "
                      "all)")
  for name, shape in needs.items():
    actual, dtype, _ = ckpt.info[name]
    if actual != shape:
      raise ConfigError(f"{where}: tensor {name!r} has shape {list(actual)}, but config.json "
                        f"makes it {list(shape)}")
    if dtype not in _FLOAT_DTYPES:
      raise ConfigError(f"{where}: tensor {name!r} has dtype {dtype}; expected one of "
                        f"{list(_FLOAT_DTYPES)} (dequantize the checkpoint first)")
  ignored = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
  unexpected = [name for name in ckpt.info if name not in needs and name not in ignored
                and not name.endswith(_IGNORED_SUFFIXES)]
  if unexpected:
    hint = ""
    if unexpected[0].endswith(("_scale_inv", "weight_scale", "input_scale")):
      hint = "; it is a quantization scale: dequantize the checkpoint first"
    elif unexpected[0].endswith(".bias"):
      hint = "; the model's projections have no bias"
    raise ConfigError(f"{where} holds tensor {unexpected[0]!r}, which the model has no place "
                      f"for ({len(unexpected)} such tensors){hint}")


def _place(abstract, read: Callable[[tuple], np.ndarray]) -> jax.Array:
  """A leaf built on its sharding: each addressable device reads only its own slice."""
  dtype = np.dtype(abstract.dtype)
  return jax.make_array_from_callback(abstract.shape, abstract.sharding,
                                      lambda idx: read(idx).astype(dtype))


def _buffer(abstract, name: str) -> jax.Array:
  """Router biases start at zero (Qwen3 and Mixtral have none), placements at the
  identity (experts in the checkpoint's order); scanned runs stack them per layer."""
  shape = abstract.shape
  if name == "placement":
    value = np.broadcast_to(np.arange(shape[-1], dtype=abstract.dtype), shape)
  elif name == "router_bias":
    value = np.zeros(shape, abstract.dtype)
  else:
    raise NotImplementedError(f"models.hf does not know how to initialise buffer {name!r}")
  return jax.make_array_from_callback(shape, abstract.sharding, lambda idx: value[idx])


def load_params(hf_dir, model) -> tuple[Any, Any]:
  """(params, buffers) of `model` (a models.steps.Model) from the checkpoint in `hf_dir`,
  each leaf on its trainer sharding. Every tensor is checked before any is read."""
  ckpt = Checkpoint(hf_dir)
  abstract = model.abstract_state()
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract.params)
  plans, needs = [], {}
  for path, leaf in flat:
    layers, sources = _leaf_sources(ckpt, model.cfg, path, leaf.shape)
    plans.append((layers, sources))
    for source in sources:
      needs.update(source.needs)
  _check_tensors(ckpt, needs, model.cfg)

  def build(leaf, layers, sources):
    if layers is None:
      return _place(leaf, sources[0].read)

    def read_rows(idx):  # a scanned run: rows of the leading layer axis
      rows = range(*idx[0].indices(len(layers)))
      return np.stack([sources[r].read(idx[1:]) for r in rows])
    return _place(leaf, read_rows)

  params = jax.tree_util.tree_unflatten(
      treedef, [build(leaf, *plan) for (_, leaf), plan in zip(flat, plans)])
  buffers = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _buffer(leaf, next(n for n in map(_name, reversed(path))
                                            if n != "value")), abstract.buffers)
  return params, buffers


# ---------------------------------------------------------------------------- models

def _model(hf_dir, mesh: Mesh | None, overrides: Sequence[str]):
  from models.steps import Model
  from models.train_loop import run_mesh, validate_run
  hf = read_hf_config(hf_dir)
  cfg = config_from_hf(hf, overrides, mesh=mesh)
  mesh = run_mesh(cfg) if mesh is None else mesh
  validate_run(cfg, mesh)
  return Model(cfg, mesh)


def load_pretrained(hf_dir, *, mesh: Mesh | None = None,
                    overrides: Sequence[str] = ()) -> tuple[Any, Config]:
  """(model, config): the Transformer of the Hugging Face checkpoint in `hf_dir` with
  its weights, sharded on `mesh` (default: processes x local devices) as the trainer
  shards it, and its run Config (`config_from_hf`; `overrides` as `--set`)."""
  model = _model(hf_dir, mesh, overrides)
  params, buffers = load_params(hf_dir, model)
  return nnx.merge(model.graphdef, params, buffers), model.cfg


def train_state(hf_dir, *, mesh: Mesh | None = None, overrides: Sequence[str] = ()):
  """(models.steps.Model, TrainState at step 0): the checkpoint's weights, fresh AdamW
  moments and the train RNG a fresh run of the config starts with."""
  from models.steps import TrainState
  model = _model(hf_dir, mesh, overrides)
  params, buffers = load_params(hf_dir, model)
  shardings = model.state_shardings
  with jax.set_mesh(model.mesh):
    opt_state = jax.jit(model.tx.init, out_shardings=shardings.opt_state)(params)
    # As models.steps.Model._init_state draws it.
    rng = jax.jit(lambda: jax.random.key_data(jax.random.fold_in(
        jax.random.key(model.cfg.train.seed), 1)), out_shardings=shardings.rng)()
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return model, TrainState(step=step, params=params, opt_state=opt_state, buffers=buffers,
                           rng=rng)


def param_count(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------- command line

def parse_args(argv=None):
  from hiermoe_jax.bench import cli  # one-line errors with exit code 2
  p = cli.ArgumentParser(description=CLI_DOC,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hf-dir", required=True,
                 help="Hugging Face checkpoint: config.json + *.safetensors (+ tokenizer.json)")
  p.add_argument("--run-dir", required=True, type=cli.output_dir,
                 help="new run directory: the step-0 checkpoint, config.yaml, tokenizer.json")
  p.add_argument("--mesh", type=cli.mesh_shape, metavar="NxG",
                 help="mesh.nodes x mesh.local (default: processes x local devices)")
  p.add_argument("--config-out", type=cli.output_file,
                 help="where the run config YAML goes (default RUN/config.yaml)")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a run config key (repeatable), e.g. train.lr=3e-5")
  return p.parse_args(argv)


CLI_DOC = """Converts a Hugging Face Qwen3-MoE or Mixtral checkpoint into a run directory that
scripts/train.py continues: a step-0 checkpoint in the trainer's format, the run config
YAML and the checkpoint's tokenizer.json (text data is then tokenized with it).

  python scripts/convert_hf.py --hf-dir ckpt/Qwen3-30B-A3B --run-dir runs/qwen3 --mesh 4x8
  python scripts/train.py --config runs/qwen3/config.yaml --run-dir runs/qwen3 --data corpus/

Exit codes: 0 done; 2 bad input (one line: the option, key or tensor and what is valid).
"""


def _existing_steps(run_dir: pathlib.Path) -> list[int]:
  folder = run_dir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if (
      folder.is_dir()) else []


def main(argv=None) -> int:
  args = parse_args(argv)
  import hiermoe_jax as hm
  from hiermoe_jax.cluster import distributed
  from models import data as data_lib
  from models.checkpoint import Checkpointer
  from models.config import as_run_keys
  from models.train_loop import NonFiniteError, save_checkpoint
  run_dir = pathlib.Path(args.run_dir)
  config_out = pathlib.Path(args.config_out or run_dir / "config.yaml")
  try:
    distributed.initialize()  # no-op in a single plain process
    steps = _existing_steps(run_dir)
    if steps:
      raise ConfigError(f"--run-dir={args.run_dir!r} is invalid: it already holds checkpoints "
                        f"(steps {steps}); a converted model starts a new run directory")
    try:
      mesh = hm.make_mesh(*args.mesh) if args.mesh else None
    except ConfigError as e:
      raise as_run_keys(e) from None
    model, state = train_state(args.hf_dir, mesh=mesh, overrides=args.set)
    cfg, lead = model.cfg, jax.process_index() == 0
    checkpointer = Checkpointer(run_dir, keep=cfg.train.keep)
    try:
      save_checkpoint(checkpointer, 0, state, {"config": cfg.to_dict(),
                                               "mesh": dict(model.mesh.shape)})
    finally:
      checkpointer.close()
  except (ConfigError, NonFiniteError) as e:
    message = str(e)
    if message.startswith("hf_dir="):
      message = "--hf-dir=" + message.removeprefix("hf_dir=")
    print(f"error: {message}", file=sys.stderr)
    return 2
  tokenizer = pathlib.Path(args.hf_dir) / data_lib.TOKENIZER_FILE
  if lead:
    config_out.parent.mkdir(parents=True, exist_ok=True)
    family = read_hf_config(args.hf_dir)["model_type"]
    config_out.write_text(
        f"# {family} from {args.hf_dir}, converted by scripts/convert_hf.py (step 0 in "
        f"{run_dir}).\n# Continue: python scripts/train.py --config {config_out} "
        f"--run-dir {run_dir}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if tokenizer.is_file():
      shutil.copyfile(tokenizer, run_dir / data_lib.TOKENIZER_FILE)
    mesh_shape = "x".join(str(n) for n in model.mesh.shape.values())
    print(f"converted {args.hf_dir} ({family}, {param_count(state.params) / 1e6:.1f}M "
          f"parameters, {cfg.model.n_layers} layers, {cfg.moe.num_experts} experts) on a "
          f"{mesh_shape} mesh: wrote {checkpointer.step_dir(0)}, {config_out}"
          + (f", {run_dir / data_lib.TOKENIZER_FILE}" if tokenizer.is_file() else
             " (no tokenizer.json: text data stays byte-level)"), file=sys.stderr)
  return 0
