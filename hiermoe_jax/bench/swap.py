"""Expert-swap benchmark: drive `SwapController` on skewed, drifting routing and time
the `hier_dedup` dispatch + combine before and after the swaps.

    python scripts/bench_swap.py --mesh 2x4 --experts 64 --topk 8 --tokens 256 \\
        --hidden 256 --routing zipf:1.2 --steps 20 --json out.json

Routing (`drifting_routing`): Zipf expert popularity over a random ranking, with
correlated co-selection - the experts form random affinity clusters of K (random in
logical id, so the identity placement spreads each cluster over devices); each
token picks an anchor cluster by popularity and its K experts favour that cluster
(log-weight + `affinity`), drawn by Gumbel top-k. Popularity drifts slowly: a
random walk of `drift` per step in log space. Fixed seed: every process draws the
same ids, so the controller decides the same everywhere.

Protocol: steps 1..S are observed by the controller (decisions every
--swap-interval steps, migration of real expert weights and both Adam moments);
step S+1, never observed, is the evaluation batch, timed under the initial
(identity) placement ("before") and the final one ("after"), interleaved.

Legend: T tokens per device, K top-k, E experts, D model dim, F expert FFN dim.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from hiermoe_jax.bench import cli, synthetic
from hiermoe_jax.config import ConfigError

STRATEGY = "hier_dedup"


def drifting_routing(*, devices: int, tokens: int, num_experts: int, top_k: int, alpha: float,
                     steps: int, seed: int = 0, affinity: float = 3.0,
                     drift: float = 0.05) -> list[np.ndarray]:
  """`steps` routings, each int32 logical ids [devices, T, K], distinct per token."""
  rng = np.random.default_rng(seed)
  log_p = np.log(synthetic.expert_popularity(num_experts, alpha, rng))
  cluster_size = max(min(top_k, num_experts), 1)
  order = rng.permutation(num_experts)
  cluster_E = np.empty(num_experts, np.int64)
  cluster_E[order] = np.arange(num_experts) // cluster_size
  num_clusters = int(cluster_E.max()) + 1
  out = []
  for _ in range(steps):
    p_cluster = np.bincount(cluster_E, weights=np.exp(log_p), minlength=num_clusters)
    per_device = []
    for _ in range(devices):
      anchor_T = rng.choice(num_clusters, size=tokens, p=p_cluster / p_cluster.sum())
      bonus_TE = affinity * (cluster_E[None, :] == anchor_T[:, None])
      per_device.append(synthetic.sample_topk(log_p[None, :] + bonus_TE, (tokens,), top_k,
                                              rng))
    out.append(np.stack(per_device))
    log_p = log_p + drift * rng.standard_normal(num_experts)
  return out


def max_over_mean_rows(ids_ATK: np.ndarray, placement: np.ndarray, devices: int) -> float:
  """Compute imbalance: max / mean (token, expert) rows per device under `placement`."""
  slots = np.argsort(placement)[ids_ATK.ravel()]
  per_device = np.bincount(slots // (placement.shape[0] // devices), minlength=devices)
  return float(per_device.max() / max(per_device.mean(), 1e-9))


def build_parser() -> argparse.ArgumentParser:
  positive_int = cli.integer(1)
  p = cli.ArgumentParser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mesh", type=cli.mesh_shape,
                 help="NxG in one process (omit under launch.py)")
  p.add_argument("--experts", type=positive_int, default=64)
  p.add_argument("--topk", type=positive_int, default=8)
  p.add_argument("--tokens", type=positive_int, default=512, help="tokens per device")
  p.add_argument("--hidden", type=positive_int, default=512, help="d_model")
  p.add_argument("--ffn", type=positive_int, help="expert d_ff (migrated bytes; default hidden)")
  p.add_argument("--routing", default="zipf:1.2",
                 help="zipf:ALPHA (drifting, popularity exponent) or trace:PATH.npz[:LAYER] "
                      "(step s replays trace step s mod its length)")
  p.add_argument("--affinity", type=cli.real(0), default=3.0,
                 help="co-selection log-weight bonus")
  p.add_argument("--drift", type=cli.real(0), default=0.05,
                 help="popularity random walk per step")
  p.add_argument("--steps", type=positive_int, default=20, help="observed steps")
  p.add_argument("--swap-interval", type=positive_int, default=4)
  p.add_argument("--window", type=positive_int, help="observed steps per decision "
                 "(default: swap interval)")
  p.add_argument("--max-pairs", type=positive_int, default=4, help="pairs per decision")
  p.add_argument("--max-interval", type=positive_int, help="let the controller pick each "
                 "next interval in [--swap-interval, this] (default: fixed interval)")
  p.add_argument("--grow-pairs", action="store_true",
                 help="more than --max-pairs while each further pair pays")
  p.add_argument("--groups", action="store_true",
                 help="also price whole re-placements (co-location, load packing)")
  p.add_argument("--profile", default="default", help="cost profile name or JSON path")
  p.add_argument("--no-migration-cost", action="store_true",
                 help="price migration at 0 (bounds the achievable gain)")
  p.add_argument("--repeats", type=positive_int, default=20)
  p.add_argument("--warmup", type=cli.integer(0), default=3)
  p.add_argument("--seed", type=cli.seed, default=0)
  p.add_argument("--json", type=cli.output_file, help="write the report here")
  return p


def check_args(p: argparse.ArgumentParser, args) -> None:
  """Everything checkable before JAX starts; the mesh-dependent rest raises ConfigError."""
  cli.check_topk(args.topk, args.experts)
  try:
    kind, alpha = synthetic.parse_routing(args.routing)
    if kind == "trace":
      synthetic.check_trace(args.routing, num_experts=args.experts, top_k=args.topk)
  except ValueError as e:
    p.error(str(e))
  if kind not in ("zipf", "trace"):
    p.error(f"--routing={args.routing!r} is invalid: bench_swap needs zipf:ALPHA with a "
            "finite ALPHA >= 0, e.g. zipf:1.2, or trace:PATH.npz[:LAYER]")
  cli.check_profile(args.profile)
  if args.max_interval is not None and args.max_interval < args.swap_interval:
    p.error(f"--max-interval={args.max_interval} is invalid: must be >= "
            f"--swap-interval={args.swap_interval}")
  if args.mesh is not None:  # before JAX starts
    cli.check_experts_fit(args.experts, *args.mesh)


def run(args) -> dict | None:
  from hiermoe_jax.bench import timed as timed_lib  # starts JAX
  mesh = timed_lib.start(args.mesh)
  import jax
  import optax

  import hiermoe_jax as hm
  from hiermoe_jax import calibrate, cost
  from hiermoe_jax.mesh import MeshShape
  from hiermoe_jax.swap import SearchConfig, SwapController
  from hiermoe_jax.swap.migrate import stats as migration_stats

  shape = MeshShape.of(mesh)
  kind, alpha = synthetic.parse_routing(args.routing)  # zipf or trace: checked by check_args
  cli.check_experts_fit(args.experts, shape.nodes, shape.local)
  ffn = args.ffn or args.hidden
  if kind == "trace":
    steps = [synthetic.routing(args.routing, devices=shape.devices, tokens=args.tokens,
                               num_experts=args.experts, top_k=args.topk, step=s)
             for s in range(args.steps + 1)]
  else:
    steps = drifting_routing(devices=shape.devices, tokens=args.tokens,
                             num_experts=args.experts, top_k=args.topk, alpha=alpha,
                             steps=args.steps + 1, seed=args.seed, affinity=args.affinity,
                             drift=args.drift)
  observed, held_out = steps[:-1], steps[-1]

  config = SearchConfig(profile=cost.load_profile(args.profile), d_model=args.hidden, d_ff=ffn,
                        steps_until_next_decision=args.swap_interval, max_pairs=args.max_pairs,
                        grow_pairs=args.grow_pairs, group_plans=args.groups,
                        migration=not args.no_migration_cost)
  controller = SwapController(config, mesh, args.swap_interval, window=args.window,
                              max_interval=args.max_interval)
  moe = hm.MoEConfig(d_model=args.hidden, d_ff=ffn, num_experts=args.experts, top_k=args.topk)
  params = hm.init_params(jax.random.key(args.seed), moe, mesh)
  tree = (params, optax.adam(1e-3).init(params))
  identity = np.arange(args.experts, dtype=np.int32)
  placements = {0: identity}
  if not args.no_migration_cost:
    tree = controller.calibrate(tree, placements)  # compiles the migration, prices a slice
  probe_slice_ms = controller.slice_ms
  events, visited = [], [identity]  # placements in order: identity, after each decision
  for step, ids in enumerate(observed, start=1):
    controller.observe(0, ids)
    tree, placements, new = controller.maybe_swap(step, tree, placements)
    events += [{"step": step, **e} for e in new]
    if new:
      visited.append(placements[0])

  x, _, w = timed_lib.routed_inputs(held_out, args.hidden, "float32", args.seed)
  x_g, w_g = timed_lib.global_array(mesh, x), timed_lib.global_array(mesh, w)
  fns, info = {}, {}
  for n, placement in enumerate(visited):
    slots_ATK = np.argsort(placement)[held_out].astype(np.int32)
    caps = timed_lib.tight_hop_caps(slots_ATK, STRATEGY, shape, args.experts)
    step_fn = timed_lib.exchange_step(mesh, STRATEGY, caps, args.experts, backward=False)
    slots_g = timed_lib.global_array(mesh, slots_ATK.reshape(-1, args.topk))
    fns[n] = (lambda f, s: lambda: f(x_g, s, w_g, x_g))(step_fn, slots_g)
    info[n] = {"hop_capacity": list(caps),
               "max_over_mean_rows": max_over_mean_rows(held_out, placement, shape.devices)}
  ms = calibrate.samples_ms(fns, repeats=args.repeats, warmup=args.warmup,
                            barrier_each=True)
  median = {n: float(np.median(ms[n])) for n in fns}
  last = len(visited) - 1
  report = {name: {"time_ms": median[n], **timed_lib.summary(ms[n]), **info[n]}
            for name, n in (("before", 0), ("after", last))}
  report["speedup"] = report["before"]["time_ms"] / max(report["after"]["time_ms"], 1e-12)
  for n, event in enumerate(events, start=1):  # one layer: one event per decision that moved
    event["measured_gain_ms"] = median[n - 1] - median[n]  # on the held-out batch
  runs = controller.migrations
  report["migration"] = {"decisions": controller.decisions, "pairs": controller.swaps,
                         "slices": int(sum(r["slices"] for r in runs)),
                         "intervals": [list(i) for i in controller.intervals],
                         "bytes": int(sum(r["bytes"] for r in runs)),
                         "ms": float(sum(r["ms"] for r in runs)),
                         "compile_ms": 1e3 * migration_stats.compile_s,  # calibrate's too
                         "compiles": migration_stats.compiles,
                         "probe_slice_ms": probe_slice_ms, "slice_ms": controller.slice_ms,
                         "predicted_gain_ms": float(sum(e["predicted_gain_ms"] for e in events))}
  report["config"] = {"mesh": [shape.nodes, shape.local], "processes": jax.process_count(),
                      "experts": args.experts, "topk": args.topk, "tokens": args.tokens,
                      "hidden": args.hidden, "ffn": ffn, "routing": args.routing,
                      "affinity": args.affinity, "drift": args.drift, "steps": args.steps,
                      "swap_interval": args.swap_interval, "window": controller.window,
                      "max_pairs": args.max_pairs, "max_interval": args.max_interval,
                      "grow_pairs": args.grow_pairs, "groups": args.groups,
                      "profile": args.profile,
                      "migration_priced": not args.no_migration_cost, "seed": args.seed,
                      "repeats": args.repeats}
  report["events"] = events
  return report if timed_lib.is_leader() else None


def table(report: dict) -> str:
  lines = [f"{'placement':<10} {'median ms':>10} {'min ms':>8} {'max/mean rows':>14}  hop caps"]
  for name in ("before", "after"):
    r = report[name]
    lines.append(f"{name:<10} {r['time_ms']:>10.3f} {r['min']:>8.3f} "
                 f"{r['max_over_mean_rows']:>14.3f}  {r['hop_capacity']}")
  m = report["migration"]
  lines.append(f"speedup {report['speedup']:.3f}x | {m['decisions']} decisions, {m['pairs']} "
               f"pairs, {m['slices']} slices, {m['bytes'] / 1e6:.2f} MB moved in {m['ms']:.1f} ms "
               f"(+ {m['compiles']} compiles, {m['compile_ms']:.0f} ms)")
  for e in report["events"]:
    lines.append(f"  step {e['step']:>3}: {e['kind']}, {e['slices']} slices, gain/step predicted "
                 f"{e['predicted_gain_ms']:.3f} ms, measured {e['measured_gain_ms']:.3f} ms; "
                 f"migration priced {e['predicted_migration_ms']:.1f} ms ({e['priced_by']}), "
                 f"took {e['migration_ms']:.1f} ms")
  if m["intervals"]:
    lines.append("intervals chosen (step, interval): " + ", ".join(
        f"({s}, {i})" for s, i in m["intervals"]))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:  # ConfigError is bad input (some found only once the mesh is known), not a bug
    check_args(parser, args)
    report = run(args)
  except ConfigError as e:
    parser.error(str(e))
  if report is not None:
    print(table(report))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
