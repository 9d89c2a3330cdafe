"""Deviceless GPU compilation: build the CUDA executable a GPU cluster would run, here.

XLA's GPU compiler runs on the host against a description of the target GPU, so
a CPU-only machine can compile a program for, say, 2 nodes of 8 H200s and read
its per-device memory and its collectives (which devices talk) before renting
the cluster. Speed is not measured this way (no autotuning without a device).

    mesh = gpu_aot.mesh("h200", nodes=2, local=8)      # 16 compile-only devices
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    compiled = jax.jit(step).lower(x).compile()
    gpu_aot.memory(compiled, "h200"), gpu_aot.collectives(compiled, mesh)

Needs the `gpu-aot` extra (`pip install -e ".[gpu-aot]"`: the CUDA plugin at
jax's version) and `JAX_PLATFORMS=cpu` (or `jax.config.update("jax_platforms",
"cpu")` before jax's first computation): without a local CUDA the plugin registers
only when the platforms exclude cuda. Do not lower with
`lowering_platforms=("cuda",)` instead: that silently builds a CPU executable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from hiermoe_jax.config import ConfigError, is_int

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """Published facts of one GPU model, as its driver reports them (per device)."""
  description: str  # device name; compiled devices report it as `device_kind`
  compute_capability: tuple[int, int]
  sm_count: int
  hbm_bytes: int  # device memory the driver reports
  hbm_bandwidth: int  # bytes per second
  l2_bytes: int
  clock_ghz: float
  shared_memory_per_block: int = 48 * KiB  # without opt-in
  shared_memory_per_block_optin: int = 227 * KiB
  shared_memory_per_sm: int = 228 * KiB
  registers_per_sm: int = 65536  # 32-bit registers
  registers_per_block: int = 65536
  threads_per_block: int = 1024
  threads_per_sm: int = 2048
  threads_per_warp: int = 32
  fp32_units_per_sm: int = 128
  cuda_runtime: tuple[int, int, int] = (12, 8, 0)  # the cluster's software stack
  cudnn: tuple[int, int, int] = (9, 10, 0)


GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, hbm_bytes=84_942_979_072,
                    hbm_bandwidth=3_352_320_000_000, l2_bytes=50 * MiB, clock_ghz=1.98),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", (9, 0), sm_count=132, hbm_bytes=141 * GiB,
                    hbm_bandwidth=4_800_000_000_000, l2_bytes=50 * MiB, clock_ghz=1.98),
    "b200": GpuSpec("NVIDIA B200", (10, 0), sm_count=148, hbm_bytes=191_514_411_008,
                    hbm_bandwidth=7_672_320_000_000, l2_bytes=132_644_864, clock_ghz=1.965),
}


def gpu_spec(gpu: str | GpuSpec, where: str = "gpu_aot") -> GpuSpec:
  """The GpuSpec named `gpu` (a key of GPUS), or `gpu` itself if it is one."""
  if isinstance(gpu, GpuSpec):
    return gpu
  if not isinstance(gpu, str) or gpu.lower() not in GPUS:
    raise ConfigError(f"{where}: gpu={gpu!r} is invalid: must be one of {tuple(GPUS)} "
                      "or a GpuSpec")
  return GPUS[gpu.lower()]


def _version(name: str, version: tuple[int, ...]) -> str:
  fields = "".join(f" {key}: {value}" for key, value in zip(("major", "minor", "patch"), version))
  return f"{name} {{{fields} }}"


def target_config(gpu: str | GpuSpec) -> str:
  """The `GpuTargetConfigProto` text (XLA's description of the target GPU) for `gpu`."""
  s = gpu_spec(gpu, "gpu_aot.target_config")
  major, minor = s.compute_capability
  info = {
      "threads_per_block_limit": s.threads_per_block,
      "threads_per_warp": s.threads_per_warp,
      "shared_memory_per_block": s.shared_memory_per_block,
      "shared_memory_per_core": s.shared_memory_per_sm,
      "threads_per_core_limit": s.threads_per_sm,
      "core_count": s.sm_count,
      "fpus_per_core": s.fp32_units_per_sm,
      "block_dim_limit_x": 2 ** 31 - 1,
      "block_dim_limit_y": 65535,
      "block_dim_limit_z": 65535,
      "memory_bandwidth": s.hbm_bandwidth,
      "l2_cache_size": s.l2_bytes,
      "clock_rate_ghz": s.clock_ghz,
      "device_memory_size": s.hbm_bytes,
      "shared_memory_per_block_optin": s.shared_memory_per_block_optin,
      "registers_per_core_limit": s.registers_per_sm,
      "registers_per_block_limit": s.registers_per_block,
  }
  # sm_90a / sm_100a: a real H100 or B200 reports its arch-specific features.
  extension = " feature_extension: ACCELERATED_FEATURES" if major >= 9 else ""
  lines = [f"  {key}: {value}" for key, value in info.items()]
  lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor}{extension} }}")
  return "\n".join([
      "gpu_device_info {", *lines, "}",
      'platform_name: "CUDA"',
      _version("dnn_version_info", s.cudnn),
      _version("runtime_version", s.cuda_runtime),
      f"device_description_str: {json.dumps(s.description)}",
  ]) + "\n"


def _install_hint() -> str:
  v = jax.__version__
  return (f'pip install -e ".[gpu-aot]" (or pip install "jax-cuda12-plugin=={v}" '
          f'"jax-cuda12-pjrt=={v}")')


def _check_plugin() -> None:
  """The CUDA plugin is installed at jax's version (it must match exactly)."""
  for module, dist in (("jax_plugins.xla_cuda12", "jax-cuda12-pjrt"),
                       ("jax_cuda12_plugin", "jax-cuda12-plugin")):
    if importlib.util.find_spec(module) is None:
      raise ConfigError(f"gpu_aot needs {dist}, which is not installed: {_install_hint()}")
    try:
      version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue  # e.g. a source build: nothing to compare
    if version != jax.__version__:
      raise ConfigError(f"gpu_aot: {dist}=={version} does not match jax=={jax.__version__}; "
                        f"they must be equal: {_install_hint()}")


@functools.lru_cache(maxsize=None)
def _topology(text: str, nodes: int, local: int):
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=text,
                                        topology=f"1x{nodes}x{local}")
  except NotImplementedError as e:
    raise ConfigError(
        "gpu_aot: the CUDA plugin is installed but did not register: without a local CUDA "
        "it registers only if JAX_PLATFORMS excludes cuda; set JAX_PLATFORMS=cpu before "
        f"jax starts ({str(e).splitlines()[0]})") from e


def mesh(gpu: str | GpuSpec, nodes: int, local: int, axes=("node", "local")) -> Mesh:
  """A (nodes, local) Mesh of compile-only CUDA devices: `nodes` processes of `local` GPUs.

  Device (n, l) has id n * local + l and process_index n. Nothing runs on them:
  pass ShapeDtypeStructs sharded on this mesh to `jit(...).lower(...).compile()`.
  """
  s = gpu_spec(gpu, "gpu_aot.mesh")
  for name, value in (("nodes", nodes), ("local", local)):
    if not is_int(value) or value < 1:
      raise ConfigError(f"gpu_aot.mesh: {name}={value!r} is invalid: must be an integer >= 1")
  axes = tuple(axes) if isinstance(axes, (tuple, list)) else axes
  if (not isinstance(axes, tuple) or len(axes) != 2 or len(set(axes)) != 2
      or not all(isinstance(a, str) for a in axes)):
    raise ConfigError(f"gpu_aot.mesh: axes={axes!r} is invalid: must be two distinct axis names")
  _check_plugin()
  from jax.experimental import topologies
  built = topologies.make_mesh(_topology(target_config(s), nodes, local), (nodes, local), axes)
  return Mesh(built.devices, axes, axis_types=(AxisType.Auto,) * 2)


def memory(compiled, gpu: str | GpuSpec) -> dict:
  """Per-device memory of `compiled` (bytes) from XLA's buffer assignment.

  argument/output/temp are XLA's sizes; alias_bytes are outputs that reuse a
  donated argument's buffer, so counted in both. total_bytes = argument_bytes +
  output_bytes - alias_bytes + temp_bytes: what the executable holds at once
  (generated code, 0 on this path, is not counted). device_bytes is the GPU's HBM.
  """
  s = gpu_spec(gpu, "gpu_aot.memory")
  stats = compiled.memory_analysis()
  if stats is None:
    raise ValueError("gpu_aot.memory: XLA gave no memory analysis for this executable")
  out = {
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "alias_bytes": int(stats.alias_size_in_bytes),
      "temp_bytes": int(stats.temp_size_in_bytes),
  }
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  out["device_bytes"] = s.hbm_bytes
  return out


# ----------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_ITEM_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
              "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
              "c64": 64, "c128": 128}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\]")
_EXPLICIT = re.compile(r"(?:replica_groups|source_target_pairs)=(\{(?:\{[\d,\s]*\},?\s*)*\})")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAMED_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^ ]*)\))?\s*\{([^}]*)\}")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (arrays in tuples summed; fp8 types count 1 byte)."""
  bits = 0
  for dtype, dims in _ARRAY.findall(shape):
    width = _ITEM_BITS.get(dtype, 8 if dtype.startswith("f8") else None)
    if width is None:
      continue  # token[] and other non-array types
    sizes = [int(d.replace("<=", "")) for d in dims.split(",") if d.strip()]
    bits += math.prod(sizes) * width
  return (bits + 7) // 8


def _named_mesh_groups(m, num_devices: int) -> list[list[int]]:
  """`mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}`: the mesh's devices (an iota,
  reshaped and transposed, in mesh order), grouped along the named axes."""
  sizes = [int(v) for v in re.findall(r"=(\d+)", m[1])]
  names = re.findall(r"'(\w+)'=", m[1])
  ids = np.arange(num_devices)
  if m[2]:
    iota = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", m[2])
    dims = [int(v) for v in (iota[2] or iota[1]).split(",")]
    ids = ids.reshape(dims)
    if iota[3]:
      ids = ids.transpose([int(v) for v in iota[3].split(",")])
  ids = ids.reshape(sizes)
  spanned = [names.index(a) for a in re.findall(r"'(\w+)'", m[3])]
  rest = [i for i in range(len(sizes)) if i not in spanned]
  return ids.transpose(rest + spanned).reshape(
      -1, math.prod(sizes[i] for i in spanned)).tolist()


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
  """Groups of logical ids from an HLO attribute string: `{{0,1},{2,3}}`, `{}` (all
  devices), iota `[G,S]<=[d0,d1,...]T(perm)` (iota reshaped, transposed, regrouped),
  or the named-mesh form `mesh[...], device_ids=(...) {axes}`."""
  if m := _NAMED_MESH.search(attrs):
    return _named_mesh_groups(m, num_devices)
  if m := _IOTA.search(attrs):
    shape, dims = [int(v) for v in m[1].split(",")], [int(v) for v in m[2].split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m[3]:
      ids = ids.transpose([int(v) for v in m[3].split(",")])
    return ids.reshape(shape).tolist()
  if m := _EXPLICIT.search(attrs):
    groups = [[int(v) for v in g.split(",") if v.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", m[1][1:-1])]
    groups = [g for g in groups if g]
    return groups or [list(range(num_devices))]
  return [list(range(num_devices))]


def _label(groups: list[list[int]], process: dict[int, int]) -> str:
  procs = [[process[d] for d in g] for g in groups]
  if all(len(set(p)) == 1 for p in procs):
    return "intra-node"
  if all(len(set(p)) == len(p) for p in procs):
    return "inter-node"
  return "mixed"


def collectives(compiled, mesh: Mesh) -> list[dict]:
  """The collectives in `compiled`'s optimized HLO, in program order, one per op.

  Each: kind (e.g. "all-to-all"), name, async (a -start/-done pair), replica_groups
  (device ids; a collective-permute's source->target pairs), label ("intra-node":
  every group within one process, "inter-node": each group's devices on distinct
  processes, else "mixed"), op_name (jax's name scope, e.g. ".../shard_map/all_to_all"),
  operand_bytes and result_bytes per device. HLO ids are positions in the flattened
  mesh (jit's device assignment), mapped to device ids here.
  """
  flat = list(mesh.devices.flat)
  process = {d.id: d.process_index for d in flat}
  text = re.sub(r"/\*.*?\*/", "", compiled.as_text())  # drop /*index=N*/ comments
  lines = [m for line in text.splitlines() if (m := _INSTRUCTION.match(line))]
  shapes = {m[1]: m[2] for m in lines}
  done = {}  # name of a -start -> shape of its -done
  for m in lines:
    if m[3].endswith("-done") and (operands := _operands(m[4])):
      done[operands[0]] = m[2]
  found = []
  for m in lines:
    op = m[3]
    kind = op.removesuffix("-start")
    if kind not in COLLECTIVES:
      continue
    groups = [[flat[i].id for i in g] for g in replica_groups(m[4], len(flat))]
    found.append({
        "kind": kind,
        "name": m[1],
        "async": op.endswith("-start"),
        "replica_groups": groups,
        "label": _label(groups, process),
        "op_name": (n[1] if (n := _OP_NAME.search(m[4])) else ""),
        "operand_bytes": sum(shape_bytes(shapes.get(o, "")) for o in _operands(m[4])),
        "result_bytes": shape_bytes(done.get(m[1], m[2]) if op.endswith("-start") else m[2]),
    })
  return found


def _operands(rest: str) -> list[str]:
  """Operand names from the text after `opcode(` (up to its closing parenthesis)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  names = []
  for part in rest[:end].split(","):
    tokens = part.split()
    if tokens and tokens[-1].startswith("%"):
      names.append(tokens[-1][1:])
  return names
