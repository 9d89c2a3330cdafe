"""Compare expert placements on a routing: identity, DeepSeek's EPLB and the swap search.

    python scripts/compare_placements.py --routing trace:run.npz:1 --mesh 4x2 --mesh 2x4

The routing's steps split into an observed window (the first --observe steps) and the
held-out steps after it. Each placement is chosen from the observed steps only:

  identity  slot e holds expert e;
  eplb      `swap.eplb.eplb_placement` of the observed per-expert loads (--groups);
  swap      `swap.search` run as `SwapController` runs it: after every
            --swap-interval observed steps (or once, after them all, if fewer), one
            decision on the last --window steps, starting from the identity
            (migration free unless --migration-cost).

Each is then scored per step on both windows by the cost model (docs/design.md,
section 6) with exact dropless peaks (`dedup_peaks`, equal to `traffic.stats`'s and
much cheaper): the modelled dispatch + combine time of `hier_dedup` and
`flat_dedup`, plus the compute imbalance (max / mean (token, expert) pairs per
device), averaged over the steps.

Synthetic routings (uniform, zipf:ALPHA) use bench_swap's drifting routing
(`bench.swap.drifting_routing`, default affinity and drift).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from hiermoe_jax import cost
from hiermoe_jax.bench import cli, synthetic
from hiermoe_jax.bench.swap import drifting_routing, max_over_mean_rows
from hiermoe_jax.config import ConfigError
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap import eplb
from hiermoe_jax.swap.search import SearchConfig, search

STRATEGIES = ("hier_dedup", "flat_dedup")
PLACEMENTS = ("identity", "eplb", "swap")


def swap_placement(observed, shape: MeshShape, num_experts: int, config: SearchConfig, *,
                   interval: int, window: int) -> tuple[np.ndarray, int]:
  """(placement, pairs swapped) of the controller's decisions over `observed` steps."""
  placement, swaps = np.arange(num_experts, dtype=np.int32), 0
  decisions = list(range(interval, len(observed) + 1, interval)) or [len(observed)]
  for done in decisions:
    steps = observed[max(0, done - window):done]
    plan = search(np.concatenate(steps, axis=1), placement, shape,
                  dataclasses.replace(config, window_steps=len(steps)))
    placement, swaps = plan.placement, swaps + len(plan.pairs)
  return placement, swaps


def dedup_peaks(ids_ATK, placement, shape: MeshShape) -> dict:
  """Dropless peak rows per peer of each hop, {strategy: (peak, ...)}, for STRATEGIES,
  counting only rows that leave their device (as `traffic.stats`).

  flat_dedup: distinct tokens of device a with an expert on device b != a;
  hier_dedup: inter, distinct tokens of device a with an expert on node n != node(a);
  intra, tokens of all devices with local index l with an expert on device b, where
  local(b) != l (they gather at (node(b), l) after the inter hop)."""
  devices, nodes, local = shape.devices, shape.nodes, shape.local
  num_experts = len(placement)
  device_ATK = np.argsort(placement)[ids_ATK] // (num_experts // devices)
  hit_ATB = np.zeros(ids_ATK.shape[:2] + (devices,), bool)
  np.put_along_axis(hit_ATB, device_ATK, True, axis=2)
  rows_AB = hit_ATB.sum(1)
  rows_AN = hit_ATB.reshape(devices, -1, nodes, local).any(3).sum(1)
  rows_LB = rows_AB.reshape(nodes, local, devices).sum(0)
  source = np.arange(devices)
  flat = np.where(source[:, None] != source[None, :], rows_AB, 0)
  inter = np.where(source[:, None] // local != np.arange(nodes)[None, :], rows_AN, 0)
  intra = np.where(np.arange(local)[:, None] != source[None, :] % local, rows_LB, 0)
  return {"flat_dedup": (int(flat.max()),), "hier_dedup": (int(inter.max()), int(intra.max()))}


def score(steps, placement, shape: MeshShape, num_experts: int, profile: cost.CostProfile,
          d_model: int, bytes_per_elem: int = 4) -> dict:
  """Mean modelled ms per step of each strategy and mean compute imbalance."""
  ms = {name: [] for name in STRATEGIES}
  imbalance = []
  for ids in steps:
    peaks = dedup_peaks(ids, placement, shape)
    for name in STRATEGIES:
      ms[name].append(cost.predict(name, peaks[name], profile, mesh_shape=shape,
                                   d_model=d_model, bytes_per_elem=bytes_per_elem))
    imbalance.append(max_over_mean_rows(ids, placement, shape.devices))
  return {**{f"{name}_ms": float(np.mean(v)) for name, v in ms.items()},
          "max_over_mean_pairs": float(np.mean(imbalance))}


def compare(observed, held_out, shape: MeshShape, num_experts: int, *,
            profile: cost.CostProfile, d_model: int, d_ff: int, groups: int | None = None,
            interval: int = 4, window: int | None = None, max_pairs: int = 4,
            migration: bool = False, exact_peaks: bool = False) -> dict:
  """{placement: {"observed": score, "held_out": score, ...}} on one mesh shape.

  observed, held_out: lists of int [A, T, K] logical ids per step (held_out may be
  empty)."""
  config = SearchConfig(profile=profile, d_model=d_model, d_ff=d_ff,
                        steps_until_next_decision=interval, max_pairs=max_pairs,
                        migration=migration, exact_peaks=exact_peaks)
  loads = eplb.expert_load(np.stack(observed), num_experts)
  swapped, pairs = swap_placement(observed, shape, num_experts, config, interval=interval,
                                  window=window or interval)
  chosen = {"identity": np.arange(num_experts, dtype=np.int32),
            "eplb": eplb.eplb_placement(loads, shape, groups),
            "swap": swapped}
  report = {}
  for name, placement in chosen.items():
    report[name] = {"placement": placement.tolist(),
                    "observed": score(observed, placement, shape, num_experts, profile,
                                      d_model)}
    if held_out:
      report[name]["held_out"] = score(held_out, placement, shape, num_experts, profile,
                                       d_model)
  report["swap"]["pairs"] = pairs
  return report


# ------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
  positive_int = cli.integer(1)
  p = cli.ArgumentParser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--routing", required=True,
                 help="trace:PATH.npz[:LAYER], uniform or zipf:ALPHA")
  p.add_argument("--mesh", type=cli.mesh_shape, action="append",
                 help="NxL (repeatable; default 4x2 and 2x4)")
  p.add_argument("--experts", type=positive_int, help="default: the trace's (else 64)")
  p.add_argument("--topk", type=positive_int, help="default: the trace's (else 8)")
  p.add_argument("--tokens", type=positive_int,
                 help="tokens per device (default: a trace step's tokens / devices, else 512)")
  p.add_argument("--observe", type=positive_int,
                 help="observed steps (default: the first half of the trace, else 16)")
  p.add_argument("--held-out", type=cli.integer(0),
                 help="held-out steps after them (default: the rest of the trace, else 16)")
  p.add_argument("--hidden", type=positive_int, default=512, help="d_model (row bytes)")
  p.add_argument("--ffn", type=positive_int, default=128, help="expert d_ff (migration bytes)")
  p.add_argument("--groups", type=positive_int,
                 help="EPLB expert groups kept on one node (default: one per expert)")
  p.add_argument("--profile", default="cpu_netns_1gbit", help="cost profile name or JSON path")
  p.add_argument("--swap-interval", type=positive_int, default=4)
  p.add_argument("--window", type=positive_int, help="steps per decision (default: interval)")
  p.add_argument("--max-pairs", type=positive_int, default=4, help="pairs per decision")
  p.add_argument("--migration-cost", action="store_true",
                 help="price migration (default free: placement quality only)")
  p.add_argument("--exact-peaks", action="store_true",
                 help="keep only swaps that lower the modelled time with exact peaks "
                      "(SearchConfig.exact_peaks)")
  p.add_argument("--seed", type=cli.seed, default=0)
  p.add_argument("--json", type=cli.output_file, help="write the report here")
  return p


def _steps(args, shape: MeshShape, count: int) -> list[np.ndarray]:
  kind, alpha = synthetic.parse_routing(args.routing)
  if kind == "trace":
    tokens = args.tokens or synthetic.load_trace(args.routing)[0].shape[1] // shape.devices
    return [synthetic.routing(args.routing, devices=shape.devices, tokens=tokens,
                              num_experts=args.experts, top_k=args.topk, step=s)
            for s in range(count)]
  return drifting_routing(devices=shape.devices, tokens=args.tokens or 512,
                          num_experts=args.experts, top_k=args.topk, alpha=alpha or 0.0,
                          steps=count, seed=args.seed)


def resolve(p: argparse.ArgumentParser, args) -> None:
  """Fills the defaults that depend on the routing; refuses what cannot run."""
  try:
    kind, _ = synthetic.parse_routing(args.routing)
    if kind == "file":
      p.error(f"--routing={args.routing!r} is invalid: use trace:PATH.npz[:LAYER], uniform "
              "or zipf:ALPHA")
    if kind == "trace":
      ids, experts = synthetic.load_trace(args.routing)
      args.experts = args.experts or experts
      args.topk = args.topk or ids.shape[2]
      args.observe = args.observe or max(len(ids) // 2, 1)
      args.held_out = (len(ids) - args.observe if args.held_out is None else args.held_out)
      if args.observe + args.held_out > len(ids):
        p.error(f"--observe={args.observe} and --held-out={args.held_out} need "
                f"{args.observe + args.held_out} steps; the trace has {len(ids)}")
    else:
      args.experts, args.topk = args.experts or 64, args.topk or 8
      args.observe = args.observe or 16
      args.held_out = 16 if args.held_out is None else args.held_out
  except ValueError as e:
    p.error(str(e))
  cli.check_topk(args.topk, args.experts)
  cli.check_profile(args.profile)
  args.mesh = args.mesh or [(4, 2), (2, 4)]
  for mesh in args.mesh:
    cli.check_experts_fit(args.experts, *mesh)


def run(args) -> dict:
  profile = cost.load_profile(args.profile)
  report = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "meshes": {}}
  for nodes, local in args.mesh:
    shape = MeshShape(nodes, local)
    steps = _steps(args, shape, args.observe + args.held_out)
    report["meshes"][f"{nodes}x{local}"] = compare(
        steps[:args.observe], steps[args.observe:], shape, args.experts, profile=profile,
        d_model=args.hidden, d_ff=args.ffn, groups=args.groups, interval=args.swap_interval,
        window=args.window, max_pairs=args.max_pairs, migration=args.migration_cost,
        exact_peaks=args.exact_peaks)
  return report


def table(report: dict) -> str:
  cfg = report["config"]
  lines = [f"# routing {cfg['routing']}: E={cfg['experts']}, K={cfg['topk']}, observed "
           f"steps {cfg['observe']}, held-out {cfg['held_out']}, D={cfg['hidden']}, profile "
           f"{cfg['profile']}; modelled ms per step (dispatch + combine), mean over steps"]
  windows = ("observed", "held_out") if cfg["held_out"] else ("observed",)
  head = f"{'mesh':<5} {'placement':<9}"
  for window in windows:
    head += f" | {window:<8} {'hier_dedup':>10} {'flat_dedup':>10} {'max/mean':>8}"
  lines.append(head)
  for mesh, entry in report["meshes"].items():
    for name in PLACEMENTS:
      line = f"{mesh:<5} {name:<9}"
      for window in windows:
        s = entry[name][window]
        line += (f" | {'':<8} {s['hier_dedup_ms']:>10.3f} {s['flat_dedup_ms']:>10.3f} "
                 f"{s['max_over_mean_pairs']:>8.3f}")
      lines.append(line + (f"  ({entry['swap']['pairs']} pairs)" if name == "swap" else ""))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    resolve(parser, args)
    report = run(args)
  except ConfigError as e:
    parser.error(str(e))
  print(table(report))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  return 0
