"""The one way to start multi-process JAX for hiermoe_jax: `initialize()`.

Call it first thing in every process, before any JAX computation (before anything
touches `jax.devices()`), then build the mesh with `hiermoe_jax.make_mesh()`, which
defaults to nodes = process count and local = devices per process.

`initialize()` picks one of three modes, in this order:

1. Launcher mode: `scripts/launch.py` (see `hiermoe_jax.cluster.launcher`) sets
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

Optional bounds (whole seconds) for modes 1 and 2: HIERMOE_INIT_TIMEOUT (connecting
to the coordinator, default 120) and HIERMOE_DEAD_HOST_TIMEOUT (default 60;
`launch.py --dead-host-timeout` sets it).

Dead hosts: if a process dies (or hangs, or its host goes away), every other process
exits within about HIERMOE_DEAD_HOST_TIMEOUT seconds with one line on stderr,

  error: process 1 stopped responding (no heartbeat for 60 s); exiting

and exit code PEER_LOST_EXIT, whatever it was doing (a collective, a barrier, the
shutdown at exit). No launcher is needed for this. What JAX 0.10.2 does on its own,
and why that is not enough:
- A gloo collective whose peer process died fails at once if the peer's socket
  was closed ("Gloo AllGather failed: ... Connection closed by peer"); if the peer
  hangs or its host vanishes (no TCP reset), the collective blocks.
- The coordination service, in process 0, declares a process dead after the
  heartbeat timeout and then aborts every other process with a C++ fatal log and
  stack trace (SIGABRT). The failed-collective path ends there too: Python's exit
  waits in JAX's shutdown barrier for the dead process until that timeout.
- If process 0 itself dies with its sockets closed, the others abort at once, the
  same way ("Terminating process because the JAX distributed service detected
  fatal errors"): JAX gives no hook to replace that message, so that case stays
  bounded but noisy. A hung or vanished process 0 is reported by the watchdog.
So `initialize()` starts a watchdog (`_Watchdog`): each process bumps a counter
in the coordination service's key-value store every few seconds and reads everyone
else's; a counter that stops for the timeout, or a coordinator that cannot be
reached for that long, ends the process with the line above. JAX's own heartbeat
timeout is set to twice the bound, so it remains a backstop (e.g. for a process
whose Python threads cannot run) without racing the watchdog.

Calling `initialize()` again is a no-op.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

from hiermoe_jax.config import ConfigError

COORDINATOR = "HIERMOE_COORDINATOR"
NUM_PROCESSES = "HIERMOE_NUM_PROCESSES"
PROCESS_ID = "HIERMOE_PROCESS_ID"
INIT_TIMEOUT = "HIERMOE_INIT_TIMEOUT"
DEAD_HOST_TIMEOUT = "HIERMOE_DEAD_HOST_TIMEOUT"
LAUNCHER_VARS = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
PEER_LOST_EXIT = 69  # EX_UNAVAILABLE

_DEFAULT_INIT_TIMEOUT = 120
DEFAULT_DEAD_HOST_TIMEOUT = 60
_ALIVE_DIR = "hiermoe/alive/"


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulated_cpu_flags(xla_flags: str, devices: int) -> str:
  """XLA_FLAGS for a process of `devices` simulated CPU devices: the device count
  replaced, all else kept.

  XLA's CPU scheduler flags stay at their defaults on purpose: with
  `--xla_cpu_enable_concurrency_optimized_scheduler=false`, `auto`'s two-branch
  lax.switch ran its flat_dedup branch 31% slower than flat_dedup compiled alone
  (2 processes x 4 devices over loopback, E=64 K=8 T=2048 D=1024); with the default
  the gap was 3% (and -3% under a 1 Gbit/s inter-node link).
  """
  flags = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"])


def _int_env(name: str, default: int | None = None) -> int:
  value = os.environ.get(name)
  if value is None:
    if default is None:
      raise ConfigError(f"environment variable {name} is not set")
    return default
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is invalid: "
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
    raise ConfigError(f"hiermoe_jax.cluster.distributed: {present} are set but {missing} "
                      f"are not; set all of {LAUNCHER_VARS} (scripts/launch.py does) or none")
  num, pid = _int_env(NUM_PROCESSES), _int_env(PROCESS_ID)
  if not 0 <= pid < num:
    raise ConfigError(f"{PROCESS_ID}={pid} is invalid: must satisfy "
                      f"0 <= id < {NUM_PROCESSES}={num}")
  return os.environ[COORDINATOR], num, pid


def _use_gloo_on_cpu() -> None:
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _timeout_env(name: str, default: int) -> int:
  value = _int_env(name, default)
  if value < 1:
    raise ConfigError(f"environment variable {name}={value} is invalid: must be >= 1 seconds")
  return value


class _Watchdog:
  """Ends this process when another one stops responding (see the module docstring).

  Two daemon threads: `_beat` talks to the key-value store (it may block for long
  in an RPC when the coordinator's host is gone), `_check` only reads timestamps, so
  the bound holds either way. At exit (`stop`) JAX's shutdown barrier runs while
  they still watch, then both end before Python finalizes: a daemon thread that
  comes back from a C++ RPC during finalization is unwound through C++ frames and
  aborts the process ("FATAL: exception not rethrown").
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: int):
    self.client, self.me, self.timeout = client, process_id, timeout_s
    self.interval = min(5.0, max(0.5, timeout_s / 10))
    now = time.monotonic()
    self.counters: dict[str, str] = {}
    # Times are when the RPC that saw the evidence began: a conservative clock.
    self.changed = {p: now for p in range(num_processes) if p != process_id}
    self.last_ok = now  # the store answered an RPC begun then
    self.last_failed = None  # an RPC begun then failed
    self.in_flight = None  # an RPC begun then has not returned yet
    self.stopped = threading.Event()
    self.threads = []

  def start(self) -> None:
    for target in (self._beat, self._check):
      thread = threading.Thread(target=target, name=f"hiermoe-watchdog{target.__name__}",
                                daemon=True)
      thread.start()
      self.threads.append(thread)
    # atexit runs this before JAX's own clean-up (registered when jax was imported).
    atexit.register(self.stop)

  def stop(self) -> None:
    """Shuts JAX's distributed runtime down (its barrier waits for every process, so
    a dead one is still caught here), then ends both threads."""
    try:
      jax.distributed.shutdown()
    finally:
      self.stopped.set()
      for thread in self.threads:
        thread.join(timeout=self.timeout)

  def _running(self) -> bool:
    return not self.stopped.is_set() and jax.distributed.is_initialized()

  def _beat(self) -> None:
    count = 0
    while self._running():
      began = self.in_flight = time.monotonic()
      try:
        self.client.key_value_set(f"{_ALIVE_DIR}{self.me}", str(count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(_ALIVE_DIR)
      except Exception:  # an unreachable store is judged by _check, with the others
        self.last_failed = began
      else:
        for key, value in entries:
          peer = int(key.rsplit("/", 1)[1])
          if peer in self.changed and self.counters.get(key) != value:
            self.counters[key], self.changed[peer] = value, began
        self.last_ok = began
      self.in_flight = None
      count += 1
      self.stopped.wait(self.interval)

  def silent(self, now: float) -> tuple[int, str] | None:
    """(process, what) if a process has been silent for the timeout, else None."""
    failed, in_flight = self.last_failed, self.in_flight
    unreachable = ((failed is not None and failed - self.last_ok >= self.timeout)
                   or (in_flight is not None and now - in_flight >= self.timeout))
    if unreachable:
      return 0, f"coordinator unreachable for {self.timeout} s"
    # Judged against the last answered RPC: a stall of this process is no evidence.
    peer, changed = min(self.changed.items(), key=lambda item: item[1], default=(None, None))
    if peer is not None and self.last_ok - changed >= self.timeout:
      return peer, f"no heartbeat for {self.timeout} s"
    return None

  def _check(self) -> None:
    while self._running():
      found = self.silent(time.monotonic())
      if found is not None:
        peer, what = found
        sys.stdout.flush()
        print(f"error: process {peer} stopped responding ({what}); exiting", file=sys.stderr,
              flush=True)
        # Not sys.exit: the main thread may be blocked in a collective or in JAX's
        # shutdown barrier, and atexit would wait for the dead peer.
        os._exit(PEER_LOST_EXIT)
      self.stopped.wait(self.interval / 2)


def _start_watchdog(timeout_s: int) -> None:
  # JAX has no public handle on its coordination client; the key-value store is the
  # one channel every process already shares with the coordinator.
  from jax._src import distributed as jax_distributed
  state = jax_distributed.global_state
  if state.num_processes > 1:
    _Watchdog(state.client, state.process_id, state.num_processes, timeout_s).start()


def initialize() -> bool:
  """Starts JAX's distributed runtime when this process is one of several.

  See the module docstring for how the mode is chosen (launcher variables, then
  SLURM / Open MPI detection, else single process) and for the dead-host watchdog
  it starts. Must run before any JAX computation. Idempotent.

  Returns:
    True if the distributed runtime is running (this call or an earlier one
    started it), False for a plain single-process run.
  """
  if jax.distributed.is_initialized():
    return True
  dead_host_s = _timeout_env(DEAD_HOST_TIMEOUT, DEFAULT_DEAD_HOST_TIMEOUT)
  timeouts = dict(
      initialization_timeout=_timeout_env(INIT_TIMEOUT, _DEFAULT_INIT_TIMEOUT),
      # JAX's heartbeat aborts with a stack trace: a backstop behind the watchdog.
      heartbeat_timeout_seconds=2 * dead_host_s)
  launched = launcher_env()
  if launched is not None:
    coordinator, num_processes, process_id = launched
    _use_gloo_on_cpu()
    # "deactivate": the launcher's values are complete; do not let a surrounding
    # SLURM/MPI environment override them.
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               cluster_detection_method="deactivate", **timeouts)
  elif _cluster_detected() is not None:
    _use_gloo_on_cpu()
    jax.distributed.initialize(**timeouts)
  else:
    return False
  _start_watchdog(dead_host_s)
  return True
