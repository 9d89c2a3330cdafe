"""One process of the multi-process MoE tests (run through scripts/launch.py).

  python scripts/launch.py --processes 2 --local-devices 4 -- \
      python tests/mp_worker_moe.py OUT.npz [STRATEGY ...]
  python scripts/launch.py ... -- python tests/mp_worker_moe.py --swap OUT [TRACE.npz]

The first runs the given dispatch strategies (default: all) on the
(process_count x local_device_count) mesh with the inputs of `inputs()`, gathers
each globally sharded output and, on process 0, writes them to OUT.npz keyed by
strategy. tests/test_multiprocess.py imports `inputs`/`run` to compute the same
thing in one process. The second runs `swap_decisions` and every process writes
its own result to OUT.<process>.npz; with TRACE.npz (hiermoe_jax.traces format) the
routing of step s and layer L is the trace's, replayed as benchmarks replay it.
"""

import sys

import numpy as np

CONFIG = dict(d_model=32, d_ff=64, num_experts=16, top_k=4, dropless=True)
TOKENS_PER_DEVICE = 32


def inputs(mesh, config):
  """Params (seed 0) and tokens x [T, D] (seed 1), sharded over the mesh."""
  import jax
  import hiermoe_jax as hm
  from hiermoe_jax import mesh as mesh_lib

  params = hm.init_params(jax.random.key(0), config, mesh)
  shape = (mesh.size * TOKENS_PER_DEVICE, config.d_model)
  x_np = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
  sharding = mesh_lib.named(mesh, mesh_lib.sharded_rows(2))
  x = jax.make_array_from_callback(shape, sharding, lambda index: x_np[index])
  return params, x


def run(mesh, strategies=None) -> dict[str, np.ndarray]:
  """{strategy: y} with y gathered to a host numpy array on every process."""
  import jax
  from jax.experimental import multihost_utils
  import hiermoe_jax as hm
  from hiermoe_jax.config import STRATEGIES

  base = hm.MoEConfig(**CONFIG)
  params, x = inputs(mesh, base)
  out = {}
  for name in strategies or STRATEGIES:
    config = base.replace(dispatch=name)
    y, _ = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh))(params, x)
    out[name] = np.asarray(multihost_utils.process_allgather(y, tiled=True))
  return out


SWAP_LAYERS, SWAP_STEPS, SWAP_INTERVAL = 2, 6, 2


def swap_routing(step: int, layer: int, devices: int, config, trace=None) -> np.ndarray:
  """Logical ids [devices * TOKENS_PER_DEVICE, K] of one step and layer: the trace
  file's if given, else skewed synthetic ones."""
  if trace is not None:
    from hiermoe_jax import traces
    ids_STK, _ = traces.load(trace, layer)
    return traces.replay_step(ids_STK, step, devices=devices,
                              tokens=TOKENS_PER_DEVICE).reshape(-1, config.top_k)
  from hiermoe_jax.bench import synthetic
  ids = synthetic.routing("zipf:1.5", devices=devices, tokens=TOKENS_PER_DEVICE,
                          num_experts=config.num_experts, top_k=config.top_k,
                          seed=100 * step + layer)
  return ids.reshape(-1, config.top_k)


def swap_search_config(config):
  from hiermoe_jax import cost
  from hiermoe_jax.swap import SearchConfig
  return SearchConfig(profile=cost.load_profile("paper_a6000"), d_model=config.d_model,
                      d_ff=config.d_ff, migration=False, max_pairs=2)


def swap_decisions(mesh, trace=None) -> dict[str, np.ndarray]:
  """A SwapController over two layers, fed token-sharded routing ids (each process
  holds only its rows, so every decision needs the gathered statistics).

  Returns {"placements_L": [decisions, E] placement after each decision,
  "gate_L": the layer's final gate stack gathered to the host} per layer L.
  """
  import jax
  from jax.experimental import multihost_utils
  import hiermoe_jax as hm
  from hiermoe_jax import mesh as mesh_lib
  from hiermoe_jax.swap import SwapController

  config = hm.MoEConfig(**CONFIG)
  params = {"blocks": {i: {"ffn": {"params": hm.init_params(jax.random.key(i), config, mesh)}}
                       for i in range(SWAP_LAYERS)}}
  controller = SwapController(swap_search_config(config), mesh, SWAP_INTERVAL,
                              expert_path=lambda layer: ("blocks", layer, "ffn"))
  placements = {i: np.arange(config.num_experts) for i in range(SWAP_LAYERS)}
  rows = mesh_lib.named(mesh, mesh_lib.sharded_rows(2))
  history = {i: [] for i in range(SWAP_LAYERS)}
  for step in range(SWAP_STEPS):
    for layer in range(SWAP_LAYERS):
      ids = swap_routing(step, layer, mesh.size, config, trace)
      controller.observe(layer, jax.make_array_from_callback(ids.shape, rows,
                                                             lambda index: ids[index]))
    params, placements, _ = controller.maybe_swap(step + 1, params, placements)
    if controller.due(step + 1):
      for layer in range(SWAP_LAYERS):
        history[layer].append(placements[layer])
  out = {}
  for layer in range(SWAP_LAYERS):
    out[f"placements_{layer}"] = np.stack(history[layer])
    gate = params["blocks"][layer]["ffn"]["params"]["experts"]["gate"]
    out[f"gate_{layer}"] = np.asarray(multihost_utils.process_allgather(gate, tiled=True))
  return out


def start():
  """Initialises the distributed runtime, then returns the (process x device) mesh."""
  from hiermoe_jax.cluster import distributed
  distributed.initialize()  # before anything touches JAX devices

  import jax
  import hiermoe_jax as hm

  mesh = hm.make_mesh()
  print(f"process {jax.process_index()}/{jax.process_count()}: mesh {dict(mesh.shape)}, "
        f"{jax.local_device_count()} local devices", flush=True)
  return mesh


def main(path: str, strategies: list[str]) -> None:
  import jax
  out = run(start(), strategies)
  if jax.process_index() == 0:
    np.savez(path, **out)
    print(f"wrote {sorted(out)} to {path}", flush=True)


def main_swap(prefix: str, trace=None) -> None:
  import jax
  out = swap_decisions(start(), trace)
  path = f"{prefix}.{jax.process_index()}.npz"
  np.savez(path, **out)
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "--swap":
    main_swap(*sys.argv[2:4])
  else:
    main(sys.argv[1], sys.argv[2:])
