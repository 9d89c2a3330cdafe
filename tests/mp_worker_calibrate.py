"""One process of tests/test_calibrate.py's two-process test (run through scripts/launch.py).

  python scripts/launch.py --processes 2 --local-devices 2 -- \
      python tests/mp_worker_calibrate.py OUT_DIR

Process 0 finds flat_dedup faster, process 1 hier_dedup (sleeps stand in for the
steps); `calibrate.measure` reduces the samples over processes, so both decide from
the same numbers. Then both time a real MoE layer on the (2 x 2) mesh and decide.
Each process writes OUT_DIR/decision.<process>.json.
"""

import json
import pathlib
import sys
import time


def main(out_dir: str) -> None:
  from hiermoe_jax.cluster import distributed
  distributed.initialize()
  import jax
  import hiermoe_jax as hm
  from hiermoe_jax import calibrate

  me = jax.process_index()
  delays = {"flat_dedup": 0.004 if me == 0 else 0.016, "hier_dedup": 0.010}
  steps = {name: (lambda d=d: time.sleep(d)) for name, d in delays.items()}
  candidates = tuple(delays)
  local_choice = calibrate.fastest(delays, candidates)
  times = calibrate.measure(steps, repeats=3, warmup=0)
  tuner = calibrate.AutoTuner(layers=1, candidates=candidates)
  tuner.decide(0, [times], reason="start")

  mesh = hm.make_mesh()
  config = hm.MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, dropless=True)
  ids = calibrate.uniform_ids(config, mesh.size * 16)
  layer_times = calibrate.time_layer(mesh, config, ids, repeats=3, backward=False)
  layer_tuner = calibrate.AutoTuner(layers=1, candidates=calibrate.candidates(config, mesh))
  layer_tuner.decide(0, [layer_times])
  out = {"times": times, "choices": list(tuner.choices), "local_choice": local_choice,
         "layer_times": layer_times, "layer_choices": list(layer_tuner.choices)}
  (pathlib.Path(out_dir) / f"decision.{me}.json").write_text(json.dumps(out))
  print(f"process {me}: {out}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
