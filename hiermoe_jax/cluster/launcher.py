"""Runs N copies of a command as the processes of one multi-process JAX job.

  python scripts/launch.py --processes N --local-devices G \\
      [--inter-node-rate 1gbit] [--port P] [--timeout S] [--dead-host-timeout S] \\
      [--keep-going] -- COMMAND ...

Each child gets the variables `hiermoe_jax.cluster.distributed.initialize()` reads
(coordinator address, process count, its process id, and with
`--dead-host-timeout` the bound on noticing a dead peer) and
XLA_FLAGS=--xla_force_host_platform_device_count=G (replacing any count inherited
from this process; see `distributed.simulated_cpu_flags`). Output lines are
prefixed with `[rank]`. When a child fails the others are stopped and the
launcher exits with that child's code; at the timeout everything is stopped and
it exits with 124. With `--keep-going` a failure stops nobody: the launcher waits
for every child, reports each failure and exits with the first one's code. The
survivors then end on their own, as on a cluster with no launcher to stop them
(`hiermoe_jax.cluster.distributed`'s watchdog); that is what `--keep-going` is for. With
`--inter-node-rate`, each child is a node in its own network namespace behind a
shaped link (`hiermoe_jax.cluster.netns`); the namespaces are removed on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from hiermoe_jax.cluster import distributed
from hiermoe_jax.cluster import netns

TIMEOUT_EXIT = 124
_STOP_GRACE_S = 5.0
_DEFAULT_NETNS_PORT = 29500
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
  """Raised in the main thread by SIGTERM / SIGHUP so cleanup runs."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_deferral = {"active": False, "pending": None}


def _on_signal(signum, _frame):
  if _deferral["active"]:
    _deferral["pending"] = signum
  elif signum == signal.SIGINT:
    raise KeyboardInterrupt
  else:
    raise _Stop(signum)


@contextlib.contextmanager
def _signals_deferred():
  """Holds SIGINT/SIGTERM/SIGHUP until the block ends. (Blocking them with
  pthread_sigmask instead would leave them blocked in the children.)"""
  _deferral["active"] = True
  try:
    yield
  finally:
    _deferral["active"] = False
    pending, _deferral["pending"] = _deferral["pending"], None
    if pending is not None:
      _on_signal(pending, None)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="launch.py", description=__doc__.split("\n\n")[0],
      usage="%(prog)s --processes N --local-devices G [options] -- COMMAND ...")
  parser.add_argument("--processes", type=int, required=True, help="number of processes (nodes)")
  parser.add_argument("--local-devices", type=int, required=True,
                      help="simulated CPU devices per process")
  parser.add_argument("--inter-node-rate", default=None,
                      help="put each process in its own network namespace behind a link "
                           "shaped to this tc rate (e.g. 1gbit); needs root and iproute2")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: a free port; 29500 with namespaces)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="stop everything and exit 124 after this many seconds")
  parser.add_argument("--dead-host-timeout", type=int, default=None, metavar="S",
                      help="a process whose peer stops responding exits after S seconds "
                           f"(sets {distributed.DEAD_HOST_TIMEOUT}; default "
                           f"{distributed.DEFAULT_DEAD_HOST_TIMEOUT})")
  parser.add_argument("--keep-going", action="store_true",
                      help="when a child fails, let the others run until they exit on "
                           "their own (default: stop them)")
  if "--" not in argv:
    if "-h" in argv or "--help" in argv:
      parser.parse_args(argv)  # prints the help and exits
    parser.error("the command to run must follow `--`")
  split = argv.index("--")
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command:
    parser.error("no command after `--`")
  for name in ("processes", "local_devices"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
  if args.timeout is not None and args.timeout <= 0:
    parser.error(f"--timeout={args.timeout} is invalid: must be > 0 seconds")
  if args.dead_host_timeout is not None and args.dead_host_timeout < 1:
    parser.error(f"--dead-host-timeout={args.dead_host_timeout} is invalid: "
                 "must be >= 1 seconds")
  if args.inter_node_rate is not None:
    try:
      netns.rate_bits_per_second(args.inter_node_rate)
    except ValueError as e:
      parser.error(str(e))
  return args


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict[str, str], *, coordinator: str, processes: int, rank: int,
              local_devices: int, dead_host_timeout: int | None = None) -> dict[str, str]:
  """The environment of child `rank`: base + launcher variables + device count
  (+ the dead-host bound, if given; else an inherited one stays)."""
  env = dict(base)
  env["XLA_FLAGS"] = distributed.simulated_cpu_flags(env.get("XLA_FLAGS", ""), local_devices)
  env[distributed.COORDINATOR] = coordinator
  env[distributed.NUM_PROCESSES] = str(processes)
  env[distributed.PROCESS_ID] = str(rank)
  if dead_host_timeout is not None:
    env[distributed.DEAD_HOST_TIMEOUT] = str(dead_host_timeout)
  env["PYTHONUNBUFFERED"] = "1"
  return env


class _Prefixer:
  """Copies a child's stream to ours, one `[rank] `-prefixed line at a time."""

  _lock = threading.Lock()

  def __init__(self, rank: int, source, sink):
    self.thread = threading.Thread(target=self._pump, args=(f"[{rank}] ".encode(), source, sink),
                                   daemon=True)
    self.thread.start()

  def _pump(self, prefix: bytes, source, sink) -> None:
    for line in iter(source.readline, b""):
      if not line.endswith(b"\n"):
        line += b"\n"
      with self._lock:
        sink.write(prefix + line)
        sink.flush()
    source.close()


def _say(message: str) -> None:
  print(f"[launch] {message}", file=sys.stderr, flush=True)


def _stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM each still-running child's process group, then SIGKILL after a grace."""
  def signal_all(sig):
    for p in procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, sig)
  signal_all(signal.SIGTERM)
  deadline = time.monotonic() + _STOP_GRACE_S
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.05)
  signal_all(signal.SIGKILL)
  for p in procs:
    p.wait()
  # Grandchildren left in a group whose leader has exited.
  for p in procs:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(p.pid, signal.SIGKILL)


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _supervise(procs: list[subprocess.Popen], timeout: float | None,
               keep_going: bool = False) -> int:
  deadline = None if timeout is None else time.monotonic() + timeout
  failures: list[int] = []  # exit codes, in the order seen
  reported: set[int] = set()
  while True:
    codes = [p.poll() for p in procs]
    running = [r for r, c in enumerate(codes) if c is None]
    for rank, code in enumerate(codes):
      if code in (None, 0) or rank in reported:
        continue
      reported.add(rank)
      failures.append(code)
      if not keep_going:
        _say(f"rank {rank} exited with code {code}"
             + (f"; stopping ranks {running}" if running else ""))
        return _exit_code(code)
      _say(f"rank {rank} exited with code {code}"
           + (f"; ranks {running} keep going (--keep-going)" if running else ""))
    if not running:
      return _exit_code(failures[0]) if failures else 0
    if deadline is not None and time.monotonic() > deadline:
      _say(f"timed out after {timeout:g} s (--timeout); stopping ranks {running}")
      return TIMEOUT_EXIT
    time.sleep(0.05)


def launch(args: argparse.Namespace) -> int:
  cluster = None
  procs: list[subprocess.Popen] = []
  pumps: list[_Prefixer] = []
  try:
    if args.inter_node_rate is not None:
      cluster = netns.Cluster(args.processes, args.inter_node_rate)
      host = cluster.address(0)
      port = args.port or _DEFAULT_NETNS_PORT
      _say(f"{args.processes} nodes in namespaces {cluster.base}-n*, links shaped to "
           f"{args.inter_node_rate}")
    else:
      host, port = "127.0.0.1", args.port or _free_port()
    for rank in range(args.processes):
      env = child_env(os.environ, coordinator=f"{host}:{port}", processes=args.processes,
                      rank=rank, local_devices=args.local_devices,
                      dead_host_timeout=args.dead_host_timeout)
      prefix = cluster.exec_prefix(rank) if cluster else []
      with _signals_deferred():  # a child started but not recorded would leak
        procs.append(subprocess.Popen(prefix + args.command, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True))
      pumps += [_Prefixer(rank, procs[-1].stdout, sys.stdout.buffer),
                _Prefixer(rank, procs[-1].stderr, sys.stderr.buffer)]
    return _supervise(procs, args.timeout, args.keep_going)
  except KeyboardInterrupt:
    _say("interrupted; stopping all ranks")
    return 130
  except _Stop as e:
    _say(f"received {e}; stopping all ranks")
    return 128 + e.signum
  finally:
    # Signals would interrupt the cleanup itself; it is bounded, so finish it.
    for sig in _HANDLED:
      signal.signal(sig, signal.SIG_IGN)
    _stop(procs)
    for pump in pumps:
      pump.thread.join(timeout=2.0)
    if cluster is not None:
      cluster.close()


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  previous = {sig: signal.signal(sig, _on_signal) for sig in _HANDLED}
  try:
    return launch(args)
  except (netns.NetnsError, ValueError) as e:
    _say(f"error: {e}")
    return 2
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
