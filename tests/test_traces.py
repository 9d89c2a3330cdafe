"""Routing traces: recorded by the trainer (train.routing_trace), replayed by the
benchmarks (`--routing trace:PATH[:LAYER]`), refused with errors naming the flag.

The round trip checks the trace against the run's own metrics, which come from a
different path (the MoE block's in-step drop counts): replaying a recorded step on the
recording mesh through `traffic.stats` with the run's capacity factor gives exactly
the drops the run reported (docs/design.md, invariants 2 and 6), which holds only if
every token's ids sit on the device that routed them, in order.
"""

import json
import pathlib

import numpy as np
import pytest

from hiermoe_jax import traces, traffic
from hiermoe_jax.bench import comm, synthetic
from hiermoe_jax.bench import swap as bench_swap
from hiermoe_jax.config import ConfigError
from models.config import load_config
from models.train_loop import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
E, K, DEVICES, TOKENS = 16, 2, 8, 128  # tiny.yaml on 2x4: 16 x 64 tokens a step
KEEP = 3


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, cache_dir):
  """A 4-step tiny run keeping the last 3 steps: (trace path, metrics records)."""
  run_dir = tmp_path_factory.mktemp("trace_run")
  path = run_dir / "trace.npz"
  cfg = load_config(TINY, ["train.steps=4", "train.eval_every=0", "train.checkpoint_every=0",
                           "mesh.nodes=2", "mesh.local=4", f"train.routing_trace={path}",
                           f"train.routing_trace_steps={KEEP}"])
  result = run(cfg, run_dir, verbose=False)
  return path, result.records


def test_trace_file_holds_the_last_steps_of_every_moe_layer(recorded):
  path, _ = recorded
  assert traces.layers(path) == [0, 1]
  with np.load(path) as data:
    np.testing.assert_array_equal(data["steps"], [2, 3, 4])
    assert int(data["num_experts"]) == E and data["layer_0"].dtype == np.uint8
  for layer in (0, 1):
    ids, experts = traces.load(path, layer)
    assert ids.shape == (KEEP, DEVICES * TOKENS, K) and experts == E
    assert ids.min() >= 0 and ids.max() < E
    assert (ids[..., 0] != ids[..., 1]).all()  # K distinct experts per token
  assert not np.array_equal(traces.load(path, 0)[0], traces.load(path, 1)[0])


def test_replay_reproduces_the_runs_drops_and_expert_counts(recorded):
  """Bench step s replays trace step s: on the recording mesh its hier_dedup drops
  (capacity factor 1.25, tiny.yaml's) equal the run's, and its per-expert counts
  equal the trace's."""
  path, records = recorded
  for layer in (0, 1):
    spec = f"trace:{path}:{layer}"
    ids_STK, _ = traces.load(path, layer)
    for s in range(KEEP):
      ids_ATK = synthetic.routing(spec, devices=DEVICES, tokens=TOKENS, num_experts=E,
                                  top_k=K, step=s)
      assert ids_ATK.shape == (DEVICES, TOKENS, K) and ids_ATK.dtype == np.int32
      np.testing.assert_array_equal(np.bincount(ids_ATK.ravel(), minlength=E),
                                    np.bincount(ids_STK[s].ravel(), minlength=E))
      stats = traffic.stats(ids_ATK, mesh_shape=(2, 4), num_experts=E, d_model=8,
                            strategies=["hier_dedup"], capacity_factor=1.25)
      record = records[1 + s]  # trace steps 2..4
      assert stats["hier_dedup"]["dropped"] == record["dropped"][layer], (layer, s)
  # Steps wrap around; fewer tokens per device take each step's first ones.
  wrapped = synthetic.routing(f"trace:{path}", devices=4, tokens=8, num_experts=E, top_k=K,
                              step=KEEP + 1)
  np.testing.assert_array_equal(wrapped.reshape(32, K), traces.load(path, 0)[0][1, :32])


def test_save_is_atomic_and_round_trips(tmp_path):
  ids = np.random.default_rng(0).integers(0, 300, (2, 6, 3))
  path = tmp_path / "sub" / "t.npz"
  traces.save(path, {5: ids}, num_experts=300)
  assert sorted(p.name for p in path.parent.iterdir()) == ["t.npz"]  # no temporary left
  back, experts = traces.load(path)
  assert experts == 300 and back.dtype == np.int32
  np.testing.assert_array_equal(back, ids)
  with np.load(path) as data:
    assert data["layer_5"].dtype == np.uint16


@pytest.fixture
def small_trace(tmp_path):
  path = tmp_path / "t.npz"
  ids = synthetic.routing("zipf:1.0", devices=1, tokens=64, num_experts=16, top_k=2)
  traces.save(path, {0: ids, 2: ids}, num_experts=16)  # 1 step of 64 tokens
  return path


@pytest.mark.parametrize("suffix, argv, names", [
    ("missing", [], ["--routing=", "does not exist"]),
    (":1", [], ["--routing=", "no layer 1", "[0, 2]"]),
    ("", ["--experts", "32"], ["--experts=32 is invalid", "16 experts"]),
    ("", ["--topk", "4"], ["--topk=4 is invalid", "K=2"]),
    ("", ["--tokens", "16"], ["--tokens=16 is invalid", "128 tokens", "has 64"]),
    (":x", [], ["--routing=", "LAYER"]),
])
def test_bench_comm_rejects_a_trace_naming_the_flag(small_trace, suffix, argv, names, capsys):
  path = f"{small_trace}{suffix}" if suffix != "missing" else f"{small_trace.parent}/no.npz"
  spec = f"trace:{path}" if not suffix.startswith(":") else f"trace:{small_trace}{suffix}"
  args = (["--analytic", "--mesh", "2x4", "--experts", "16", "--topk", "2", "--tokens", "8",
           "--hidden", "8", "--routing", spec] + argv)
  with pytest.raises(SystemExit) as e:
    comm.main(args)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and "Traceback" not in err
  for name in names:
    assert name in err, (name, err)


def test_bench_comm_and_bench_swap_accept_a_trace(small_trace, tmp_path, capsys):
  out = tmp_path / "comm.json"
  assert comm.main(["--analytic", "--mesh", "2x4", "--experts", "16", "--topk", "2",
                    "--tokens", "8", "--hidden", "8", "--routing", f"trace:{small_trace}:2",
                    "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report["config"]["routing"] == f"trace:{small_trace}:2"
  parser = bench_swap.build_parser()
  args = parser.parse_args(["--mesh", "2x4", "--experts", "16", "--topk", "2", "--tokens",
                            "8", "--routing", f"trace:{small_trace}"])
  bench_swap.check_args(parser, args)  # accepted
  args.topk = 3
  with pytest.raises(SystemExit):
    bench_swap.check_args(parser, args)
  assert "--topk=3 is invalid" in capsys.readouterr().err


def test_config_rejects_bad_trace_keys():
  with pytest.raises(ConfigError, match="train.routing_trace_steps=0 is invalid"):
    load_config(TINY, ["train.routing_trace_steps=0"])
  with pytest.raises(ConfigError, match="train.routing_trace='t.npy' is invalid"):
    load_config(TINY, ["train.routing_trace=t.npy"])


def test_ring_buffer_keeps_the_last_steps_and_a_resumed_run_continues_it(tmp_path):
  """The recorder alone, fed host ids: a run to step 5 keeping 3 steps, and a run killed
  after its step-4 write then resumed from step 4, write the same trace."""
  from models.routing_trace import RoutingTrace
  rng = np.random.default_rng(0)
  steps = {s: [rng.integers(0, E, (12, K)) for _ in range(2)] for s in range(1, 6)}

  def record(path, todo, start=0):
    trace = RoutingTrace(str(path), KEEP, (1, 3), E, lead=True)
    trace.restore(start)
    for s in todo:
      trace.observe(s, steps[s])
    trace.write()

  record(tmp_path / "whole.npz", range(1, 6))
  record(tmp_path / "split.npz", range(1, 5))
  record(tmp_path / "split.npz", [5], start=4)
  for name in ("whole", "split"):
    with np.load(tmp_path / f"{name}.npz") as data:
      np.testing.assert_array_equal(data["steps"], [3, 4, 5])
      for i, layer in enumerate((1, 3)):
        np.testing.assert_array_equal(data[f"layer_{layer}"],
                                      np.stack([steps[s][i] for s in (3, 4, 5)]))
