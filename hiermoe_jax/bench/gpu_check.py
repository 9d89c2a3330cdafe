"""`make gpu-check`: what only a real GPU can show, in a few minutes on one or more GPUs.

Legend: T tokens, K top-k, S = T * K slots (rows of the permuted buffer), D model dim.

1. kernels: the Pallas permute / unpermute kernels (compiled by Triton, not interpreted) against
   the pure-jnp references, forward and VJP, bf16; and their bandwidth against XLA's gather
   (`jnp.take`) and scatter-add, with the default `PermuteConfig` and the one
   `PermuteConfig.for_target` picks for this GPU.
2. moe: `moe_apply` with `expert_compute="ragged_dot"`, `all_to_all="ragged"`, both, and
   `permute_impl="pallas"`, each against the padded einsum path: outputs and gradients, on a
   1 x n mesh of the GPUs present (one GPU still runs every code path; the ragged all-to-all
   then has no peer to send to).
3. train: `scripts/train.py --config configs/tiny.yaml --mesh 1xn --steps 20` in a subprocess.

Writes one JSON (`--json`) and prints a table; exits 1 if any check fails or there is no GPU.
Throughput is the algorithmic minimum traffic (rows and index / weight vectors read and
written) over the median wall time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_EXPERTS = 16  # configs/tiny.yaml: the train check's mesh must divide them
# Tolerances of tests/test_pallas_kernels.py: results rounded once from f32 sums in another
# order are one result-dtype ulp apart, plus f32 reassociation where entries cancel.
RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-7}
ATOL_REL_TO_MAX = 1e-5


class NoGpu(Exception):
  """No GPU among jax.devices(); the message is the one line to print."""


def gpu_devices() -> list:
  """The GPUs JAX sees, or NoGpu naming what it sees instead."""
  try:
    devices = jax.devices()
  except Exception as e:  # noqa: BLE001  e.g. JAX_PLATFORMS=cuda without a driver
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise NoGpu(f"no GPU: jax.devices() failed: {detail}") from None
  if devices[0].platform != "gpu":
    kinds = sorted({d.device_kind for d in devices})
    raise NoGpu(f"no GPU: jax.devices() are {devices[0].platform} ({len(devices)} x "
                f"{', '.join(kinds)}); run on a CUDA machine with jax[cuda12] installed")
  return devices


def known_gpu(kind: str) -> tuple[str | None, bool]:
  """(hiermoe_jax.gpu_aot name of a device kind, whether its description matches exactly)."""
  from hiermoe_jax import gpu_aot
  for name, spec in gpu_aot.GPUS.items():
    if spec.description == kind:
      return name, True
  return next((name for name in gpu_aot.GPUS if name.upper() in kind.upper()), None), False


def max_error(actual, desired) -> float:
  """Largest |actual - desired| in units of the tests' tolerance (<= 1 passes), on device."""
  if actual.shape != desired.shape or actual.dtype != desired.dtype:
    return math.inf
  if actual.size == 0:
    return 0.0
  return float(_error_ratio(actual, desired))


@jax.jit
def _error_ratio(actual, desired):
  a, d = actual.astype(jnp.float32), desired.astype(jnp.float32)
  atol = ATOL_REL_TO_MAX * jnp.max(jnp.abs(d))
  allowed = RTOL[jnp.dtype(actual.dtype)] * jnp.abs(d) + atol
  excess = jnp.where(allowed > 0, jnp.abs(a - d) / allowed, jnp.where(a == d, 0.0, jnp.inf))
  return jnp.max(excess)


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up outside the timing
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass
class KernelResult:
  op: str  # permute, unpermute, permute_vjp, unpermute_vjp
  impl: str  # xla, or the pallas config
  tokens: int
  rows: int
  d: int
  max_error: float | None  # pallas against the reference, in tolerance units
  median_ms: float | None
  gbps: float | None
  peak_fraction: float | None

  @property
  def ok(self) -> bool:
    return self.max_error is None or self.max_error <= 1.0


def _inputs(t: int, d: int, top_k: int, dtype, seed: int = 0):
  """MoE-like routing: every token appears top_k times, rows in random order."""
  kx, kp, kw, kc = jax.random.split(jax.random.key(seed), 4)
  x_TD = jax.random.normal(kx, (t, d), dtype)
  idx_S = (jax.random.permutation(kp, t * top_k) // top_k).astype(jnp.int32)
  w_S = jax.random.uniform(kw, (t * top_k,), jnp.float32, 0.1, 1.0)
  dy_TD = jax.random.normal(kc, (t, d), dtype)
  return x_TD, idx_S, w_S, dy_TD


def check_kernels(t: int, d: int, *, top_k: int, repeats: int, configs: dict,
                  peak_bytes_per_s: float | None, interpret: bool = False) -> list[KernelResult]:
  """Numerics (forward and VJP) and forward bandwidth of each config, and XLA's times.

  interpret=True runs the Pallas interpreter instead (CPU; for testing this function only)."""
  from pallas_kernels import permute, permute_reference, unpermute, unpermute_reference
  dtype = jnp.bfloat16
  x_TD, idx_S, w_S, dy_TD = _inputs(t, d, top_k, dtype)
  s, item = idx_S.shape[0], jnp.dtype(dtype).itemsize
  buf_SD = jax.jit(permute_reference)(x_TD, idx_S)
  traffic = {"permute": s * 4 + 2 * s * d * item,  # ids, gathered rows read, rows written
             "unpermute": s * 8 + s * d * item + t * d * item}  # ids, w, rows, tokens

  def row(op, impl, err, fn, args):
    sec = median_seconds(jax.jit(fn), *args, repeats=repeats) if fn is not None else None
    gbps = traffic[op] / sec / 1e9 if sec else None
    frac = gbps * 1e9 / peak_bytes_per_s if gbps and peak_bytes_per_s else None
    return KernelResult(op, impl, t, s, d, err, sec and 1e3 * sec, gbps, frac)

  def vjps(permute_fn, unpermute_fn, x_TD, idx_S, buf_SD, w_S, dy_TD):
    _, pull = jax.vjp(lambda x: permute_fn(x, idx_S), x_TD)
    (dx,) = pull(buf_SD)
    _, pull = jax.vjp(lambda b, w: unpermute_fn(b, idx_S, w, num_tokens=t), buf_SD, w_S)
    return dx, *pull(dy_TD)

  vjp_args = (x_TD, idx_S, buf_SD, w_S, dy_TD)

  results = [row("permute", "xla", None, permute_reference, (x_TD, idx_S)),
             row("unpermute", "xla", None, functools.partial(unpermute_reference, num_tokens=t),
                 (buf_SD, idx_S, w_S))]
  want_y = jax.jit(unpermute_reference, static_argnames="num_tokens")(buf_SD, idx_S, w_S,
                                                                      num_tokens=t)
  want_grads = jax.jit(functools.partial(vjps, permute_reference, unpermute_reference))(
      *vjp_args)
  for name, config in configs.items():
    perm = functools.partial(permute, interpret=interpret, config=config)
    unperm = functools.partial(unpermute, interpret=interpret, config=config)
    buf = jax.jit(perm)(x_TD, idx_S)
    # A gather is exact: any difference at all is a failure.
    err = 0.0 if bool(jnp.array_equal(buf, buf_SD)) else math.inf
    results.append(row("permute", name, err, perm, (x_TD, idx_S)))
    y = jax.jit(functools.partial(unperm, num_tokens=t))(buf_SD, idx_S, w_S)
    results.append(row("unpermute", name, max_error(y, want_y),
                       functools.partial(unperm, num_tokens=t), (buf_SD, idx_S, w_S)))
    dx, dbuf, dw = jax.jit(functools.partial(vjps, perm, unperm))(*vjp_args)
    results.append(row("permute_vjp", name, max_error(dx, want_grads[0]), None, ()))
    results.append(row("unpermute_vjp", name, max(max_error(dbuf, want_grads[1]),
                                                    max_error(dw, want_grads[2])), None, ()))
  return results


# ----------------------------------------------------------------------------- moe paths


@dataclasses.dataclass
class MoeResult:
  variant: str
  mesh: str
  max_error_y: float  # against the padded einsum path, in units of the tolerance
  max_error_grads: float
  median_ms: float  # value and gradients, one step

  @property
  def ok(self) -> bool:
    return max(self.max_error_y, self.max_error_grads) <= 1.0


MOE_VARIANTS = {
    "padded": {},
    "ragged_dot": {"expert_compute": "ragged_dot"},
    "ragged_a2a": {"all_to_all": "ragged"},
    "ragged_both": {"expert_compute": "ragged_dot", "all_to_all": "ragged"},
    "pallas_permute": {"permute_impl": "pallas"},
}


def check_moe(devices: list, *, tokens_per_device: int, repeats: int) -> list[MoeResult]:
  """Each variant's outputs and gradients against the padded path, in float32 with matmuls at
  full f32 precision, so the paths differ only by summation order (the tests' tolerance)."""
  import hiermoe_jax as hm
  n = len(devices)
  mesh = hm.make_mesh(1, n, devices=devices)
  base = dict(d_model=1024, d_ff=512, num_experts=8 * n, top_k=4, dispatch="hier_dedup",
              capacity_factor=1.25, router="softmax", norm_topk_prob=True)
  keys = jax.random.split(jax.random.key(0), 3)
  params = hm.init_params(keys[0], hm.MoEConfig(**base), mesh)
  x = jax.random.normal(keys[1], (n * tokens_per_device, base["d_model"]), jnp.float32)
  cotangent = jax.random.normal(keys[2], x.shape, jnp.float32)

  def step(config):
    def loss(p, x):
      y, _ = hm.moe_apply(p, x, config=config, mesh=mesh)
      return jnp.sum(y * cotangent), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  results, want = [], None
  with jax.default_matmul_precision("float32"):
    for name, overrides in MOE_VARIANTS.items():
      fn = step(hm.MoEConfig(**base, **overrides))
      (_, y), grads = fn(params, x)
      if want is None:
        want = y, grads
      err_y = max_error(y, want[0])
      err_g = max(map(max_error, jax.tree.leaves(grads), jax.tree.leaves(want[1])))
      sec = median_seconds(fn, params, x, repeats=repeats)
      results.append(MoeResult(name, f"1x{n}", err_y, err_g, 1e3 * sec))
  return results


# ----------------------------------------------------------------------------- train


def check_train(devices: list, *, steps: int) -> dict:
  """`steps` steps of configs/tiny.yaml on a 1 x n mesh of the GPUs, in a subprocess."""
  n = max(k for k in range(1, len(devices) + 1) if TINY_EXPERTS % k == 0)
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  visible = env.get("CUDA_VISIBLE_DEVICES")
  ids = visible.split(",") if visible else [str(i) for i in range(len(devices))]
  env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
  with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as run_dir:
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
           str(REPO / "configs" / "tiny.yaml"), "--mesh", f"1x{n}", "--steps", str(steps),
           "--run-dir", run_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    records = []
    metrics = pathlib.Path(run_dir) / "metrics.jsonl"
    if metrics.exists():
      records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  losses = [r["loss"] for r in records]
  ok = (proc.returncode == 0 and len(records) == steps
        and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0])
  return {
      "command": " ".join(cmd[1:]), "mesh": f"1x{n}", "returncode": proc.returncode,
      "seconds": seconds, "steps": len(records), "first_loss": losses[0] if losses else None,
      "last_loss": losses[-1] if losses else None,
      "median_step_s": float(np.median([r["step_time_s"] for r in records[1:]]))
      if len(records) > 1 else None,
      "stderr_tail": proc.stderr.strip().splitlines()[-5:], "ok": ok,
  }


# ----------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
  device = report["device"]
  lines = [f"device: {device['count']} x {device['kind']} (gpu_aot: {device['gpu']})", ""]
  head = (f"{'op':<14}{'impl':<22}{'T':>7}{'S':>8}{'D':>6}{'err':>8}{'ms':>9}{'GB/s':>8}"
          f"{'%peak':>7}  ok")
  lines += [head, "-" * len(head)]
  for r in report["kernels"]:
    frac = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
    ok = "yes" if r["max_error"] is None or r["max_error"] <= 1 else "NO"
    lines.append(f"{r['op']:<14}{r['impl']:<22}{r['tokens']:>7}{r['rows']:>8}{r['d']:>6}"
                 f"{_fmt(r['max_error'], '.2f'):>8}{_fmt(r['median_ms'], '.3f'):>9}"
                 f"{_fmt(r['gbps'], '.0f'):>8}{_fmt(frac, '.0f'):>7}  {ok}")
  lines += ["", f"{'moe variant':<16}{'mesh':<6}{'err y':>8}{'err grads':>11}{'ms/step':>9}  ok"]
  for r in report["moe"]:
    lines.append(f"{r['variant']:<16}{r['mesh']:<6}{r['max_error_y']:>8.2f}"
                 f"{r['max_error_grads']:>11.2f}{r['median_ms']:>9.2f}  "
                 f"{'yes' if r['ok'] else 'NO'}")
  t = report["train"]
  lines += ["", (f"train tiny {t['mesh']}: exit {t['returncode']}, {t['steps']} steps, loss "
                 f"{_fmt(t['first_loss'], '.3f')} -> {_fmt(t['last_loss'], '.3f')}, "
                 f"{t['seconds']:.0f} s  {'ok' if t['ok'] else 'FAILED'}")]
  lines.append("errors are in units of the tolerance (<= 1 passes); "
               f"all checks {'passed' if report['ok'] else 'did NOT pass'} "
               f"in {report['seconds']:.0f} s")
  return "\n".join(lines)


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def run(*, tokens: int, dims: list[int], top_k: int, repeats: int, train_steps: int,
        moe_tokens: int, peak_gbps: float | None, log=_stderr) -> dict:
  """Every check on the GPUs present (NoGpu if there are none); the JSON report."""
  from pallas_kernels import PermuteConfig
  start = time.perf_counter()
  # Grow device memory on demand (no 75% preallocation), here and in the training subprocess,
  # which shares the GPUs. Read when JAX's GPU backend starts: in gpu_devices().
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  devices = gpu_devices()
  kind = devices[0].device_kind
  gpu, exact = known_gpu(kind)
  peak = peak_gbps * 1e9 if peak_gbps else None
  if peak is None and exact:
    from hiermoe_jax import gpu_aot
    peak = gpu_aot.GPUS[gpu].hbm_bandwidth
  report = {"device": {"kind": kind, "count": len(devices), "gpu": gpu},
            "jax": jax.__version__, "peak_bytes_per_s": peak}
  # Training first, while this process holds next to no device memory.
  log(f"train: configs/tiny.yaml, {train_steps} steps ...")
  report["train"] = check_train(devices, steps=train_steps)
  report["kernels"] = []
  for d in dims:
    configs = {"default 16x256w4": PermuteConfig()}
    if gpu is not None:
      auto = PermuteConfig.for_target(d, gpu)
      configs.setdefault(f"for_target {auto.block_rows}x{auto.block_d}w{auto.num_warps}", auto)
    log(f"kernels: T={tokens} K={top_k} D={d} ...")
    report["kernels"] += [dataclasses.asdict(r) | {"ok": r.ok} for r in check_kernels(
        tokens, d, top_k=top_k, repeats=repeats, configs=configs, peak_bytes_per_s=peak)]
  log(f"moe paths on 1x{len(devices)} ...")
  report["moe"] = [dataclasses.asdict(r) | {"ok": r.ok}
                   for r in check_moe(devices, tokens_per_device=moe_tokens, repeats=repeats)]
  report["ok"] = (all(r["ok"] for r in report["kernels"] + report["moe"])
                  and report["train"]["ok"])
  report["seconds"] = time.perf_counter() - start
  return report
