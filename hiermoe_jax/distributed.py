"""The one way to start multi-process JAX for hiermoe_jax: `initialize()`.

Call it first thing in every process, before any JAX computation (before anything
touches `jax.devices()`), then build the mesh with `hiermoe_jax.make_mesh()`, which
defaults to nodes = process count and local = devices per process.

`initialize()` picks one of three modes, in this order:

1. Launcher mode: `scripts/launch.py` (see `hiermoe_jax.launcher`) sets
   HIERMOE_COORDINATOR ("host:port" of process 0), HIERMOE_NUM_PROCESSES and
   HIERMOE_PROCESS_ID in each child. These three are all that is needed; any set of
   processes that exports them (one per host, on a real cluster too) works.
2. Cluster mode: SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1) or Open MPI
   (OMPI_MCA_orte_hnp_uri / OMPI_COMM_WORLD_SIZE > 1) is detected in the
   environment; `jax.distributed.initialize()` is called with no arguments and
   JAX's own cluster detection fills them in.
3. Single process: none of the above; nothing is initialised and JAX runs as a
   plain one-process program.

In modes 1 and 2 the CPU backend's cross-process collectives are set to gloo, unless
the user chose an implementation (JAX_CPU_COLLECTIVES_IMPLEMENTATION); the setting
only affects the CPU backend. The number of CPU devices per process comes from
XLA_FLAGS=--xla_force_host_platform_device_count=G, which must be in the
environment before JAX starts its backend; the launcher sets it for each child.

Optional bounds (seconds) for modes 1 and 2: HIERMOE_INIT_TIMEOUT (connecting to
the coordinator, default 120), HIERMOE_HEARTBEAT_TIMEOUT (declaring a silent peer
dead, default 30).

Calling `initialize()` again is a no-op.
"""

from __future__ import annotations

import os

import jax

COORDINATOR = "HIERMOE_COORDINATOR"
NUM_PROCESSES = "HIERMOE_NUM_PROCESSES"
PROCESS_ID = "HIERMOE_PROCESS_ID"
INIT_TIMEOUT = "HIERMOE_INIT_TIMEOUT"
HEARTBEAT_TIMEOUT = "HIERMOE_HEARTBEAT_TIMEOUT"
LAUNCHER_VARS = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)

_DEFAULT_INIT_TIMEOUT = 120
_DEFAULT_HEARTBEAT_TIMEOUT = 30


def _int_env(name: str, default: int | None = None) -> int:
  value = os.environ.get(name)
  if value is None:
    if default is None:
      raise ValueError(f"environment variable {name} is not set")
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is invalid: "
                     "must be an integer") from None


def _cluster_detected() -> str | None:
  """Names the multi-process cluster environment JAX can auto-detect, if any."""
  env = os.environ
  if "SLURM_JOB_ID" in env and _int_env("SLURM_NTASKS", 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env or _int_env("OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "ompi"
  return None


def launcher_env() -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from the launcher's variables, if set."""
  present = [name for name in LAUNCHER_VARS if name in os.environ]
  if not present:
    return None
  if len(present) != len(LAUNCHER_VARS):
    missing = sorted(set(LAUNCHER_VARS) - set(present))
    raise ValueError(f"hiermoe_jax.distributed: {present} are set but {missing} are not; "
                     f"set all of {LAUNCHER_VARS} (scripts/launch.py does) or none")
  num, pid = _int_env(NUM_PROCESSES), _int_env(PROCESS_ID)
  if not 0 <= pid < num:
    raise ValueError(f"{PROCESS_ID}={pid} is invalid: must satisfy 0 <= id < {NUM_PROCESSES}={num}")
  return os.environ[COORDINATOR], num, pid


def _use_gloo_on_cpu() -> None:
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize() -> bool:
  """Starts JAX's distributed runtime when this process is one of several.

  See the module docstring for how the mode is chosen (launcher variables, then
  SLURM / Open MPI detection, else single process). Must run before any JAX
  computation. Idempotent.

  Returns:
    True if the distributed runtime is running (this call or an earlier one
    started it), False for a plain single-process run.
  """
  if jax.distributed.is_initialized():
    return True
  timeouts = dict(
      initialization_timeout=_int_env(INIT_TIMEOUT, _DEFAULT_INIT_TIMEOUT),
      heartbeat_timeout_seconds=_int_env(HEARTBEAT_TIMEOUT, _DEFAULT_HEARTBEAT_TIMEOUT))
  launched = launcher_env()
  if launched is not None:
    coordinator, num_processes, process_id = launched
    _use_gloo_on_cpu()
    # "deactivate": the launcher's values are complete; do not let a surrounding
    # SLURM/MPI environment override them.
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               cluster_detection_method="deactivate", **timeouts)
    return True
  if _cluster_detected() is not None:
    _use_gloo_on_cpu()
    jax.distributed.initialize(**timeouts)
    return True
  return False
