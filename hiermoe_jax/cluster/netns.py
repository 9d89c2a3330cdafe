"""A simulated cluster on one machine: one network namespace per "node".

`Cluster(n, rate)` builds, for launcher pid PID:

  hiermoe-PID-n0 ... hiermoe-PID-n{n-1}   one namespace per node; eth0 = 10.77.0.{i+1}/24
  hiermoe-PID-sw                          the "switch": bridge br0 and ports p0..p{n-1}

Each node's eth0 is a veth whose peer p{i} sits on the bridge. Both ends are shaped
with `tc qdisc ... tbf rate RATE`, so each node has a full-duplex link of RATE to
the switch: traffic between nodes crosses it, traffic inside a node (loopback, or
devices of one process) does not. `/etc/netns/NAME/hosts` maps this machine's
host name to the node's own address, because gloo binds to the address of the host
name (`ip netns exec` bind-mounts that file over /etc/hosts).

Every link lives inside these namespaces, so nothing is added to the root
namespace; `close()` deletes the namespaces and the /etc/netns directories. It is
safe to call more than once, and after a partial set-up. Needs root and iproute2.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

PREFIX = "hiermoe-"
SUBNET = "10.77.0"
NETNS_ETC = "/etc/netns"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
_UNIT_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
MAX_NODES = 250


class NetnsError(RuntimeError):
  pass


def rate_bits_per_second(rate: str) -> float:
  """Parses a tc rate ("1gbit", "100mbit", "125mbps"); units as in tc(8)."""
  match = _RATE.match(rate.strip().lower())
  if not match or float(match.group(1)) <= 0:
    raise ValueError(f"inter-node rate {rate!r} is invalid: use a positive number with a tc "
                     f"unit, one of {sorted(_UNIT_BITS)} (e.g. 1gbit, 100mbit)")
  return float(match.group(1)) * _UNIT_BITS[match.group(2)]


def tbf_args(rate: str) -> list[str]:
  """`tc qdisc ... tbf` arguments: burst covers 4 ms of traffic (a 250 Hz timer
  tick) and at least two 64 KiB GSO packets; the queue holds 50 ms."""
  bytes_per_s = rate_bits_per_second(rate) / 8
  burst = max(int(bytes_per_s * 0.004), 2 * 65536)
  return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def check_available() -> None:
  """Raises NetnsError with what is missing, if namespaces cannot be built here."""
  problems = []
  if os.geteuid() != 0:
    problems.append("root (network namespaces and tc need it)")
  for tool in ("ip", "tc"):
    if shutil.which(tool) is None:
      problems.append(f"the `{tool}` command (apt-get install iproute2)")
  if problems:
    raise NetnsError("--inter-node-rate needs " + " and ".join(problems))


def unavailable_reason() -> str | None:
  """Why namespaces cannot be built here (for skipping tests), or None."""
  try:
    check_available()
  except NetnsError as e:
    return str(e)
  return None


def _run(*args: str) -> None:
  result = subprocess.run(args, capture_output=True, text=True)
  if result.returncode:
    raise NetnsError(f"`{' '.join(args)}` failed ({result.returncode}): "
                     f"{result.stderr.strip()}")


def list_netns() -> list[str]:
  out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
  return [line.split()[0] for line in out.splitlines() if line.strip()]


class Cluster:
  """n namespaces joined through a shaped switch; see the module docstring."""

  def __init__(self, n: int, rate: str, *, tag: str | None = None):
    if not 1 <= n <= MAX_NODES:
      raise ValueError(f"processes={n} is invalid with --inter-node-rate: must be in "
                       f"[1, {MAX_NODES}]")
    check_available()
    self.rate = rate
    self.tbf = tbf_args(rate)
    self.base = f"{PREFIX}{tag or os.getpid()}"
    self.nodes = [f"{self.base}-n{i}" for i in range(n)]
    self.switch = f"{self.base}-sw"
    self.hostname = socket.gethostname()
    self._created: list[str] = []
    try:
      self._build()
    except BaseException:
      self.close()
      raise

  def address(self, i: int) -> str:
    return f"{SUBNET}.{i + 1}"

  def exec_prefix(self, i: int) -> list[str]:
    """Prepended to a command to run it inside node i."""
    return ["ip", "netns", "exec", self.nodes[i]]

  def _add_netns(self, name: str) -> None:
    _run("ip", "netns", "add", name)
    self._created.append(name)
    _run("ip", "-n", name, "link", "set", "lo", "up")

  def _build(self) -> None:
    self._add_netns(self.switch)
    _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", self.switch, "link", "set", "br0", "up")
    for i, node in enumerate(self.nodes):
      self._add_netns(node)
      etc = os.path.join(NETNS_ETC, node)
      os.makedirs(etc, exist_ok=True)
      with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n{self.address(i)} {self.hostname}\n")
      port = f"p{i}"
      _run("ip", "-n", self.switch, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", node)
      _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
      _run("ip", "-n", self.switch, "link", "set", port, "up")
      _run("ip", "-n", node, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
      _run("ip", "-n", node, "link", "set", "eth0", "up")
      _run("tc", "-n", self.switch, "qdisc", "add", "dev", port, "root", *self.tbf)
      _run("tc", "-n", node, "qdisc", "add", "dev", "eth0", "root", *self.tbf)

  def close(self) -> None:
    """Deletes the namespaces (and with them every link) and the hosts files."""
    errors = []
    for name in reversed(self._created):
      result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
      if result.returncode and name in list_netns():
        errors.append(f"ip netns del {name}: {result.stderr.strip()}")
    self._created.clear()
    for node in self.nodes:
      shutil.rmtree(os.path.join(NETNS_ETC, node), ignore_errors=True)
    if errors:
      raise NetnsError("could not remove: " + "; ".join(errors))

  def __enter__(self) -> "Cluster":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
