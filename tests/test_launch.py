"""scripts/launch.py: environment, output prefixes, failure, --keep-going, timeout,
clean-up. (tests/test_dead_host.py runs JAX processes under --keep-going.)

The children are tiny `sh` scripts (no JAX), so each launch takes about as long as
the launcher's own start-up. The namespace variants need root and iproute2.
"""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hiermoe_jax.cluster import distributed, launcher, netns

LAUNCH = Path(__file__).resolve().parents[1] / "scripts" / "launch.py"
NETNS_MISSING = netns.unavailable_reason()
needs_netns = pytest.mark.skipif(NETNS_MISSING is not None,
                                 reason=f"--inter-node-rate: {NETNS_MISSING}")

# Every rank reports its pid and a background child's pid, then rank 1 fails
# (FAIL) or nobody does (HANG); the others would sleep for a minute.
REPORT = 'sleep 60 & echo "pids $$ $!"; '
FAIL = REPORT + 'if [ "$HIERMOE_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi; wait'
HANG = REPORT + 'wait'


def start(*options, script):
  return subprocess.Popen([sys.executable, str(LAUNCH), *options, "--", "sh", "-c", script],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=60):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def reported_pids(out: str) -> list[int]:
  pids = [int(p) for line in out.splitlines() if "pids" in line
          for p in line.split("pids", 1)[1].split()]
  assert pids, f"no pids reported in: {out!r}"
  return pids


def alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state not in ("Z", "X")


def launcher_traces(launcher_pid: int) -> list[str]:
  """Namespaces, /etc/netns entries and root-namespace links named after this launch."""
  tag = f"{netns.PREFIX}{launcher_pid}-"
  links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
  return ([n for n in netns.list_netns() if n.startswith(tag)]
          + glob.glob(os.path.join(netns.NETNS_ETC, tag + "*"))
          + [line for line in links.splitlines() if tag in line])


def root_links() -> set[str]:
  out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
  return {line.split(":")[1].strip() for line in out.splitlines()}


def test_prefixes_output_and_sets_child_environment():
  script = ('echo "rank=$HIERMOE_PROCESS_ID of $HIERMOE_NUM_PROCESSES at $HIERMOE_COORDINATOR '
            'flags=$XLA_FLAGS"; echo "to stderr $HIERMOE_PROCESS_ID" >&2')
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/x")
  proc = subprocess.Popen([sys.executable, str(LAUNCH), "--processes", "3", "--local-devices",
                           "2", "--", "sh", "-c", script], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  code, out, err = finish(proc)
  assert code == 0, err
  lines = out.splitlines()
  for rank in range(3):
    [line] = [l for l in lines if l.startswith(f"[{rank}] ")]
    assert f"rank={rank} of 3 at 127.0.0.1:" in line
    # The inherited device count is replaced, other XLA flags are kept.
    assert line.endswith("flags=--xla_dump_to=/x --xla_force_host_platform_device_count=2")
    assert f"[{rank}] to stderr {rank}" in err.splitlines()
  assert len(lines) == 3


def test_simulated_cpu_flags_keep_other_flags():
  flags = distributed.simulated_cpu_flags(
      "--xla_cpu_enable_concurrency_optimized_scheduler=true "
      "--xla_force_host_platform_device_count=8", 4)
  assert flags == ("--xla_cpu_enable_concurrency_optimized_scheduler=true "
                   "--xla_force_host_platform_device_count=4")


def test_failing_rank_stops_the_others():
  begin = time.monotonic()
  code, out, err = finish(start("--processes", "3", "--local-devices", "1", script=FAIL))
  assert code == 3, err
  assert "rank 1 exited with code 3" in err
  assert time.monotonic() - begin < 30  # not the 60 s the other ranks would sleep
  pids = reported_pids(out)
  assert len(pids) == 6
  assert not [p for p in pids if alive(p)]


def test_keep_going_lets_the_others_finish():
  script = ('if [ "$HIERMOE_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 1; '
            'echo "done with $HIERMOE_DEAD_HOST_TIMEOUT"')
  code, out, err = finish(start("--processes", "3", "--local-devices", "1", "--keep-going",
                                "--dead-host-timeout", "7", script=script))
  assert code == 3, err
  assert "rank 1 exited with code 3; ranks [0, 2] keep going (--keep-going)" in err
  assert sorted(out.splitlines()) == ["[0] done with 7", "[2] done with 7"]


def test_timeout_stops_everything():
  code, out, err = finish(start("--processes", "2", "--local-devices", "1", "--timeout", "2",
                                script=HANG))
  assert code == launcher.TIMEOUT_EXIT
  assert "timed out after 2 s" in err
  assert not [p for p in reported_pids(out) if alive(p)]


def test_bad_arguments_are_rejected_with_a_message(capsys):
  for argv, message in [
      (["--processes", "2", "--local-devices", "1", "echo"], "must follow `--`"),
      (["--processes", "0", "--local-devices", "1", "--", "true"], "--processes=0 is invalid"),
      (["--processes", "2", "--local-devices", "1", "--inter-node-rate", "fast", "--", "true"],
       "inter-node rate 'fast' is invalid"),
      (["--processes", "2", "--local-devices", "1", "--dead-host-timeout", "0", "--", "true"],
       "--dead-host-timeout=0 is invalid"),
  ]:
    with pytest.raises(SystemExit) as exc:
      launcher.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_rate_parsing():
  assert netns.rate_bits_per_second("1gbit") == 1e9
  assert netns.rate_bits_per_second("125mbps") == 1e9
  assert netns.tbf_args("1gbit")[:3] == ["tbf", "rate", "1gbit"]


def test_initialize_modes(monkeypatch):
  for name in (*distributed.LAUNCHER_VARS, "SLURM_JOB_ID", "SLURM_NTASKS",
               "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.launcher_env() is None
  assert distributed.initialize() is False  # plain single process: nothing to start

  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed._cluster_detected() is None  # a one-task job is single-process
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed._cluster_detected() == "slurm"

  monkeypatch.setenv(distributed.COORDINATOR, "10.0.0.1:1234")
  with pytest.raises(ValueError, match="HIERMOE_NUM_PROCESSES"):
    distributed.launcher_env()
  monkeypatch.setenv(distributed.NUM_PROCESSES, "2")
  monkeypatch.setenv(distributed.PROCESS_ID, "2")
  with pytest.raises(ValueError, match="HIERMOE_PROCESS_ID=2 is invalid"):
    distributed.launcher_env()
  monkeypatch.setenv(distributed.PROCESS_ID, "1")
  assert distributed.launcher_env() == ("10.0.0.1:1234", 2, 1)


@needs_netns
@pytest.mark.parametrize("ending", ["failure", "timeout", "sigterm"])
def test_namespaces_are_real_and_removed(ending):
  links_before = root_links()
  # Each rank shows the address its host name resolves to and its qdisc.
  probe = 'getent hosts "$(hostname)"; tc qdisc show dev eth0; '
  options = ["--processes", "3", "--local-devices", "1", "--inter-node-rate", "1gbit"]
  if ending == "timeout":
    options += ["--timeout", "3"]
  proc = start(*options, script=probe + (FAIL if ending == "failure" else HANG))
  if ending == "sigterm":
    deadline = time.monotonic() + 30
    while not launcher_traces(proc.pid) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert launcher_traces(proc.pid), "namespaces should exist while the ranks run"
    time.sleep(1)  # let the ranks report
    proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)

  assert code == {"failure": 3, "timeout": launcher.TIMEOUT_EXIT,
                  "sigterm": 128 + signal.SIGTERM}[ending], err
  for rank in range(3):
    assert f"[{rank}] 10.77.0.{rank + 1} " in out  # gloo would bind to this address
    assert any(l.startswith(f"[{rank}] qdisc tbf") and "rate 1Gbit" in l
               for l in out.splitlines())
  assert not [p for p in reported_pids(out) if alive(p)]
  assert launcher_traces(proc.pid) == []
  assert root_links() == links_before


def test_namespaces_need_root_and_iproute2(monkeypatch):
  monkeypatch.setattr(os, "geteuid", lambda: 1000)
  with pytest.raises(netns.NetnsError, match="needs root"):
    netns.Cluster(2, "1gbit")
