"""pallas_kernels against an H100's and an H200's limits, compiled here without a GPU.

Real CUDA executables (hiermoe_jax.gpu_aot, a 1x1 mesh of compile-only devices) at the
presets' per-device shapes: T = 32,768 tokens, S = T * top_k 8 * capacity factor 1.25 buffer
rows, D = 2048 (Qwen3-30B-A3B) and 7168 (DeepSeek-V3), bf16, forward and VJP. XLA is told to
fail on register spills, the limit these kernels meet first (pallas_kernels.permute,
"GPU limits"); its thunk listing gives each kernel's threads and shared memory.

Also: scripts/gpu_check.py (`make gpu-check`, run on a real GPU) refuses a machine without one.
"""

import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

# As in test_gpu_aot: the plugin registers only if the platforms exclude cuda.
if not jax.config.jax_platforms:
  jax.config.update("jax_platforms", "cpu")

_MISSING = [m for m in ("jax_plugins.xla_cuda12", "jax_cuda12_plugin")
            if importlib.util.find_spec(m) is None]
needs_plugin = pytest.mark.skipif(
    bool(_MISSING), reason=f"{_MISSING} not installed (pip install -e '.[gpu-aot]')")

from hiermoe_jax import gpu_aot  # noqa: E402
from pallas_kernels import PermuteConfig, permute, unpermute  # noqa: E402
from helpers import xla_flags  # noqa: E402

T, TOP_K, CAPACITY_FACTOR = 32_768, 8, 1.25
S = int(T * TOP_K * CAPACITY_FACTOR)  # 327,680 rows of one dispatch buffer
DS = (2048, 7168)
NO_SPILLS = {"xla_gpu_fail_ptx_compilation_on_register_spilling": True}
KERNEL = re.compile(r"\] (\w*permute\w*) grid: \[[\d, ]+\] threads: \[(\d+), 1, 1\]\s+"
                    r"shared_memory: (\d+) bytes")


def _compile(fn, shapes, gpu, options):
  sharding = NamedSharding(gpu_aot.mesh(gpu, 1, 1), P())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]
  return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _permute_fwd_and_vjp(config, x_TD, src_S, dbuf_SD):
  buf_SD, vjp = jax.vjp(lambda x: permute(x, src_S, interpret=False, config=config), x_TD)
  return buf_SD, vjp(dbuf_SD)[0]


def _unpermute_fwd_and_vjp(config, buf_SD, dst_S, w_S, dy_TD):
  fn = functools.partial(unpermute, num_tokens=T, interpret=False, config=config)
  y_TD, vjp = jax.vjp(lambda b, w: fn(b, dst_S, w), buf_SD, w_S)
  return (y_TD, *vjp(dy_TD))


@needs_plugin
@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_auto_config_compiles_without_spills_at_preset_shapes(gpu, tmp_path):
  configs = {d: PermuteConfig.for_target(d, gpu) for d in DS}
  assert all(c == PermuteConfig(block_rows=16, block_d=512, num_warps=4) for c in configs.values())

  def both_dims(idx_S, w_S, *rows):  # one executable, so one compile per GPU
    out = []
    for d, (x_TD, buf_SD, y_TD) in zip(DS, zip(rows[0::3], rows[1::3], rows[2::3])):
      out += _permute_fwd_and_vjp(configs[d], x_TD, idx_S, buf_SD)
      out += _unpermute_fwd_and_vjp(configs[d], buf_SD, idx_S, w_S, y_TD)
    return out

  bf16 = jnp.bfloat16
  shapes = [((S,), jnp.int32), ((S,), jnp.float32)]
  for d in DS:
    shapes += [((T, d), bf16), ((S, d), bf16), ((T, d), bf16)]
  _compile(both_dims, shapes, gpu, {**NO_SPILLS, "xla_dump_to": str(tmp_path)})

  [listing] = tmp_path.glob("*.thunk_sequence.txt")
  kernels = KERNEL.findall(listing.read_text())
  # Per D: permute, its VJP (unpermute), unpermute and unpermute's backward kernel.
  assert sorted(name.rstrip("_0123456789") for name, _, _ in kernels) == sorted(
      ["permute", "unpermute", "unpermute", "unpermute_bwd"] * len(DS)), kernels
  spec = gpu_aot.gpu_spec(gpu)
  for name, threads, shared in kernels:
    assert int(threads) == 128, (name, threads)
    # Nothing is staged in shared memory: far below even the 48 KiB without opt-in.
    assert int(shared) <= 4096 < spec.shared_memory_per_block, (name, shared)


@needs_plugin
def test_too_wide_block_spills_and_is_refused():
  config = PermuteConfig(block_rows=16, block_d=2048)  # 256 elements per thread
  with pytest.raises(ValueError, match=re.escape(
      "PermuteConfig(block_rows=16, block_d=2048, num_warps=4) does not fit h200 at d=2048: its "
      "16 x 2048 tile is 256 elements per thread over 128 threads; valid: <= 64")):
    config.check(2048, "h200")
  fn = functools.partial(permute, interpret=False, config=config)
  shapes = [((T, 2048), jnp.bfloat16), ((S,), jnp.int32)]
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match="Compilation result discarded due to register spilling"):
    _compile(fn, shapes, "h200", NO_SPILLS)
  # The widest block that fits compiles for the same shapes.
  _compile(functools.partial(permute, interpret=False, config=PermuteConfig.for_target(
      2048, "h200")), shapes, "h200", NO_SPILLS)


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
  out = tmp_path / "gpu_check.json"
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(2)}
  proc = subprocess.run([sys.executable, str(repo / "scripts" / "gpu_check.py"), "--json",
                         str(out)], env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 1, proc.stderr
  ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert ours == [("error: no GPU: jax.devices() are cpu (2 x cpu); run on a CUDA machine with "
                   "jax[cuda12] installed")], proc.stderr
  assert proc.stdout == "" and not out.exists()
