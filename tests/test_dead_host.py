"""Issue #8: when a process dies, the others exit with a clear error within the
dead-host bound instead of hanging, with no launcher stopping them.

Three processes under `scripts/launch.py --keep-going --dead-host-timeout 10`
(tests/mp_worker_dead_host.py): process 2 SIGKILLs itself after initialisation,
process 0 is in a collective, process 1 between steps. Both survivors must end
through `hiermoe_jax.cluster.distributed`'s watchdog: its one-line error, PEER_LOST_EXIT,
within the bound plus polling slack. (Without the watchdog, JAX would abort them
only at its own heartbeat timeout, with a C++ stack trace.)
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hiermoe_jax.cluster import distributed

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 10
SLACK_S = 5  # two polling intervals (1 s at this bound) plus process exit


def test_survivors_of_a_dead_process_exit_with_a_clear_error():
  command = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "3",
             "--local-devices", "1", "--keep-going", "--dead-host-timeout", str(BOUND_S),
             "--timeout", "90", "--",
             sys.executable, str(ROOT / "tests" / "mp_worker_dead_host.py")]
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  seen = []  # (time, line) of the launcher's stderr, which carries its own reports
  reader = threading.Thread(target=lambda: seen.extend((time.monotonic(), line.rstrip("\n"))
                                                       for line in proc.stderr), daemon=True)
  reader.start()
  out = proc.stdout.read()
  proc.wait(timeout=120)
  reader.join(timeout=5)
  err = "\n".join(line for _, line in seen)

  def when(text):
    times = [t for t, line in seen if text in line]
    assert times, f"{text!r} not in stderr:\n{err}\nstdout:\n{out}"
    return times[0]

  assert "[0] process 0: in collectives" in out and "[1] process 1: between steps" in out, out
  died = when("[launch] rank 2 exited with code -9")
  for rank in (0, 1):
    message = f"error: process 2 stopped responding (no heartbeat for {BOUND_S} s); exiting"
    assert f"[{rank}] {message}" in err.splitlines(), err
    assert when(f"[launch] rank {rank} exited with code {distributed.PEER_LOST_EXIT}") - died \
        < BOUND_S + SLACK_S, err
  assert proc.returncode == 128 + 9, err  # --keep-going reports the first failure


def test_watchdog_judges_silence_against_its_own_answered_polls():
  dog = distributed._Watchdog(client=None, process_id=1, num_processes=3, timeout_s=10)
  start = dog.last_ok
  assert sorted(dog.changed) == [0, 2] and dog.interval == 1.0
  assert dog.silent(start + 100) is None  # no poll answered since: this process stalled
  dog.changed[0] = dog.last_ok = start + 10  # process 0 beat, process 2 did not
  assert dog.silent(start + 10) == (2, "no heartbeat for 10 s")
  dog.changed[2] = start + 10
  assert dog.silent(start + 10) is None
  dog.last_failed = start + 19  # the store failed to answer, not yet for the bound
  assert dog.silent(start + 19) is None
  dog.last_failed = start + 20
  assert dog.silent(start + 20) == (0, "coordinator unreachable for 10 s")
  dog.last_failed, dog.in_flight = None, start + 11  # an RPC hanging for the bound
  assert dog.silent(start + 20) is None
  assert dog.silent(start + 21) == (0, "coordinator unreachable for 10 s")


def test_dead_host_timeout_must_be_positive(monkeypatch):
  monkeypatch.setenv(distributed.DEAD_HOST_TIMEOUT, "0")
  with pytest.raises(ValueError, match="HIERMOE_DEAD_HOST_TIMEOUT=0 is invalid"):
    distributed.initialize()
