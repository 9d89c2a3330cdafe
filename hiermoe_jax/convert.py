"""Hugging Face MoE block weights -> hiermoe_jax params.

    sd = convert.open_safetensors("path/to/checkpoint")   # lazy; or any dict of tensors
    params, router_bias = convert.from_hf(sd, config, prefix="model.layers.3.mlp.", mesh=mesh)

Two layouts of the routed experts are read, for Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 alike:
- per expert, as the checkpoints store them: `experts.{i}.gate_proj.weight` [F, D],
  `up_proj` [F, D], `down_proj` [D, F] (Mixtral: `w1` gate, `w3` up, `w2` down);
- fused, as transformers 5 holds them in memory (its conversion mapping concatenates
  gate and up on load): `experts.gate_up_proj` [E, 2F, D], gate rows first
  (`linear(x, w).chunk(2, dim=-1)` gives gate, up), and `experts.down_proj` [E, D, F].
torch's Linear stores [out, in]; params store [in, out], so every matrix is
transposed. Tensors may be torch (any float dtype, bf16 included), numpy (ml_dtypes
bf16 included) or JAX arrays; each is read once, in float32, and cast to
`param_dtype`. Expert weights land in slot order = logical order (the identity
placement).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.params import param_shardings

# Per-expert naming: our name -> HF projection name, for routed experts.
_EXPERT_NAMES = {
    "proj": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
}
# A key that only the routed experts of an MoE block have, in any layout: what
# precedes it is the block's prefix.
_BLOCK_KEY = re.compile(r"^(.*?)experts\.(?:0\.(?:gate_proj|w1)\.weight|gate_up_proj)$")


class Converted(NamedTuple):
  params: dict
  router_bias: Any  # [E] float32, or None when the checkpoint has no bias


def _layout(state_dict: Mapping[str, Any], prefix: str) -> str:
  if f"{prefix}experts.gate_up_proj" in state_dict:
    return "fused"
  return "mixtral" if f"{prefix}experts.0.w1.weight" in state_dict else "proj"


def _shared_prefix(state_dict: Mapping[str, Any], prefix: str) -> str:
  if any(k.startswith(f"{prefix}shared_experts.") for k in state_dict):
    return "shared_experts."  # DeepSeek
  return "shared_expert."  # Qwen2-MoE


def _normal_prefix(prefix: str) -> str:
  if not isinstance(prefix, str):
    raise TypeError(f"from_hf: prefix={prefix!r} is invalid: must be a string such as "
                    "'model.layers.3.mlp.'")
  return prefix if not prefix or prefix.endswith(".") else prefix + "."


def expected_keys(config: MoEConfig, state_dict: Mapping[str, Any],
                  prefix: str = "") -> dict[str, tuple]:
  """HF key (relative to `prefix`) -> (expected HF shape, what its dimensions are)."""
  d, f, e, s = config.d_model, config.d_ff, config.num_experts, config.shared_width
  prefix = _normal_prefix(prefix)
  keys = {"gate.weight": ((e, d), "[num_experts, d_model]")}
  layout = _layout(state_dict, prefix)
  if layout == "fused":
    keys["experts.gate_up_proj"] = ((e, 2 * f, d), "[num_experts, 2*d_ff, d_model]")
    keys["experts.down_proj"] = ((e, d, f), "[num_experts, d_model, d_ff]")
  else:
    names = _EXPERT_NAMES[layout]
    for i in range(e):
      keys[f"experts.{i}.{names['gate']}.weight"] = ((f, d), "[d_ff, d_model]")
      keys[f"experts.{i}.{names['up']}.weight"] = ((f, d), "[d_ff, d_model]")
      keys[f"experts.{i}.{names['down']}.weight"] = ((d, f), "[d_model, d_ff]")
  if s:
    shared = _shared_prefix(state_dict, prefix)
    keys[f"{shared}gate_proj.weight"] = ((s, d), "[shared width, d_model]")
    keys[f"{shared}up_proj.weight"] = ((s, d), "[shared width, d_model]")
    keys[f"{shared}down_proj.weight"] = ((d, s), "[d_model, shared width]")
  if config.shared_gate:
    keys["shared_expert_gate.weight"] = ((1, d), "[1, d_model]")
  if config.router == "sigmoid_grouped":
    keys["gate.e_score_correction_bias"] = ((e,), "[num_experts]")
  return keys


def _block_prefixes(state_dict: Mapping[str, Any]) -> list[str]:
  found = []
  for key in state_dict:
    match = _BLOCK_KEY.match(key)
    if match and match.group(1) not in found:
      found.append(match.group(1))
  return found


def _prefix_hint(state_dict: Mapping[str, Any], prefix: str) -> str:
  """Names the prefix to pass when the keys sit under one (a full model's state dict)."""
  others = [p for p in _block_prefixes(state_dict) if p != prefix]
  if not others:
    return ""
  more = f" (and {len(others) - 1} more MoE blocks)" if len(others) > 1 else ""
  return (f"; the state dict holds an MoE block under {others[0]!r}{more}: pass "
          f"prefix={others[0]!r} to pick that layer")


def _to_float32(value: Any, key: str) -> np.ndarray:
  """A torch tensor, numpy or JAX array (any float dtype, bf16 included) as float32 numpy."""
  if type(value).__module__.split(".")[0] == "torch":
    # numpy has no bfloat16: widen in torch first. No torch import is needed.
    return value.detach().cpu().float().numpy()
  try:
    return np.asarray(value).astype(np.float32)
  except (TypeError, ValueError) as e:
    raise TypeError(f"from_hf: key {key!r} holds a {type(value).__name__}, not an array "
                    f"(torch, numpy or JAX): {e}") from None


def _read(state_dict, prefix, key, shape, dims) -> np.ndarray:
  full = prefix + key
  value = _to_float32(state_dict[full], full)
  if value.shape != shape:
    hint = ""
    if len(shape) == 3 and value.shape == (shape[0], shape[2], shape[1]):
      hint = " (it looks transposed: pass the tensor swapped on its last two dims)"
    raise ConfigError(f"from_hf: key {full!r} has shape {value.shape}, expected {shape} = "
                      f"{dims} for this MoEConfig{hint}")
  return value


def _unexpected_hint(key: str) -> str:
  if key.endswith(("_scale_inv", "weight_scale")):
    return ("; it is the scale of an FP8 block-quantized checkpoint: dequantize the "
            "weights first")
  return ""


def _place(arrays: dict, config: MoEConfig, mesh) -> dict:
  """Host arrays -> jax arrays in param_dtype; with a mesh, each device gets only its shard."""
  dtype = jnp.dtype(config.param_dtype)
  arrays = jax.tree.map(lambda a: a.astype(dtype), arrays)
  if mesh is None:
    return jax.tree.map(jnp.asarray, arrays)
  return jax.tree.map(
      lambda a, sharding: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i]),
      arrays, param_shardings(config, mesh))


def from_hf(state_dict: Mapping[str, Any], config, *, prefix: str = "",
            mesh=None) -> Converted:
  """Maps one HF MoE block's weights to (params, router_bias).

  state_dict: the block's tensors (keys as in the module, e.g. `gate.weight`) or a
    whole model's, with `prefix` naming the block (`"model.layers.3.mlp."`; Mixtral
    checkpoints on disk: `"model.layers.3.block_sparse_moe."`). Any mapping works,
    e.g. `open_safetensors(path)`, which reads only the tensors asked for.
  config: a MoEConfig, or the HF config (dict or transformers config object) it is
    built from with `MoEConfig.from_hf`.
  mesh: place the params with their shardings (each device receives its shard).

  Raises ConfigError naming the key for missing keys (and the prefix to pass when
  the dict holds a block under another one), unexpected keys and wrong shapes.
  """
  if not isinstance(config, MoEConfig):
    config = MoEConfig.from_hf(config)
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"from_hf: state_dict is a {type(state_dict).__name__}; expected a mapping "
                    "from HF key to tensor (a state dict, or open_safetensors(path))")
  prefix = _normal_prefix(prefix)
  expected = expected_keys(config, state_dict, prefix)
  missing = [k for k in expected if prefix + k not in state_dict]
  if missing:
    raise ConfigError(f"from_hf: missing key {prefix + missing[0]!r} ({len(missing)} missing "
                      f"in all){_prefix_hint(state_dict, prefix)}")
  unexpected = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in expected]
  if unexpected:
    raise ConfigError(f"from_hf: unexpected key {unexpected[0]!r} for this MoEConfig "
                      f"({len(unexpected)} unexpected in all){_unexpected_hint(unexpected[0])}")

  read = lambda key: _read(state_dict, prefix, key, *expected[key])
  d, f, e = config.d_model, config.d_ff, config.num_experts
  layout = _layout(state_dict, prefix)
  if layout == "fused":
    gate_up = read("experts.gate_up_proj")  # [E, 2F, D]: gate rows, then up rows
    experts = {"gate": gate_up[:, :f].transpose(0, 2, 1), "up": gate_up[:, f:].transpose(0, 2, 1),
               "down": read("experts.down_proj").transpose(0, 2, 1)}
  else:
    names = _EXPERT_NAMES[layout]
    experts = {"gate": np.empty((e, d, f), np.float32), "up": np.empty((e, d, f), np.float32),
               "down": np.empty((e, f, d), np.float32)}
    for i in range(e):  # one tensor at a time: a lazy state dict reads only these
      for ours, stack in experts.items():
        stack[i] = read(f"experts.{i}.{names[ours]}.weight").T
  params = {"router": {"kernel": read("gate.weight").T}, "experts": experts}
  if config.shared_width:
    shared = _shared_prefix(state_dict, prefix)
    params["shared"] = {k: read(f"{shared}{k}_proj.weight").T for k in ("gate", "up", "down")}
  if config.shared_gate:
    params["shared_gate"] = {"kernel": read("shared_expert_gate.weight").T}
  params = _place(params, config, mesh)
  if config.router != "sigmoid_grouped":
    return Converted(params, None)
  bias = jnp.asarray(read("gate.e_score_correction_bias"))
  if mesh is not None:
    bias = jax.device_put(bias, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return Converted(params, bias)


# --- safetensors -------------------------------------------------------------------

# Dtypes numpy lacks: safetensors' numpy loader refuses them, so their bytes are
# read directly (the format is an 8-byte header length, a JSON header, the data).
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def _header(path: pathlib.Path) -> tuple[dict, int]:
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(length)), 8 + length


class SafetensorsCheckpoint(Mapping):
  """A `.safetensors` file or a sharded checkpoint as a read-only mapping; a tensor is
  read from disk (memory-mapped) when it is looked up, so converting one block of a
  large model reads only that block. Needs the `safetensors` package, not torch."""

  def __init__(self, path):
    try:
      import safetensors  # noqa: F401
    except ImportError:
      raise ImportError("open_safetensors needs the safetensors package: "
                        "pip install 'hiermoe-jax[hf]'") from None
    path = pathlib.Path(path)
    if path.is_dir():
      for name in ("model.safetensors.index.json", "model.safetensors"):
        if (path / name).exists():
          path = path / name
          break
      else:
        raise ConfigError(f"open_safetensors: path={str(path)!r} is invalid: the directory has "
                          "neither model.safetensors.index.json nor model.safetensors")
    if not path.is_file():
      raise ConfigError(f"open_safetensors: path={str(path)!r} is invalid: no such file")
    if path.name.endswith(".json"):  # a sharded checkpoint's index
      weight_map = json.loads(path.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ConfigError(f"open_safetensors: {str(path)!r} is invalid: an index needs a "
                          "'weight_map' from tensor name to shard file")
      self._files = {k: path.parent / v for k, v in weight_map.items()}
    else:
      from safetensors import safe_open
      with safe_open(path, framework="numpy") as f:
        self._files = dict.fromkeys(f.keys(), path)
    self._headers: dict = {}

  def __getitem__(self, key: str) -> np.ndarray:
    from safetensors import safe_open
    path = self._files[key]
    with safe_open(path, framework="numpy") as f:
      dtype = f.get_slice(key).get_dtype()
      if dtype not in _RAW_DTYPES:
        return f.get_tensor(key)
    if path not in self._headers:
      self._headers[path] = _header(path)
    header, data_start = self._headers[path]
    info = header[key]
    begin, _ = info["data_offsets"]
    return np.memmap(path, dtype=_RAW_DTYPES[dtype], mode="r", offset=data_start + begin,
                     shape=tuple(info["shape"]))

  def __iter__(self) -> Iterator[str]:
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def __contains__(self, key) -> bool:
    return key in self._files


def open_safetensors(path) -> SafetensorsCheckpoint:
  """A checkpoint's tensors, read lazily: `path` is a `.safetensors` file, a sharded
  checkpoint's `model.safetensors.index.json`, or a directory holding either."""
  return SafetensorsCheckpoint(path)
