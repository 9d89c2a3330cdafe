"""`scripts/bench_comm.py`: mesh-level communication benchmark.

`--analytic` replays every strategy on a routing with `hiermoe_jax.traffic` and
prints rows / bytes per tier without running collectives, so it works for meshes
far larger than this machine.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from hiermoe_jax import synthetic, traffic
from hiermoe_jax.config import STRATEGIES


def parse_mesh(text: str) -> tuple[int, int]:
  try:
    nodes, local = (int(v) for v in text.lower().split("x"))
  except ValueError:
    nodes = local = 0
  if nodes < 1 or local < 1:
    raise argparse.ArgumentTypeError(f"--mesh {text!r} is invalid: use NxG, e.g. 4x8")
  return nodes, local


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= 1")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--analytic", action="store_true",
                 help="count traffic on the host; run no collectives")
  p.add_argument("--mesh", type=parse_mesh, default=(2, 4), help="NxG: nodes x local devices")
  p.add_argument("--experts", type=positive_int, default=64)
  p.add_argument("--topk", type=positive_int, default=8)
  p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per device")
  p.add_argument("--hidden", type=positive_int, default=1024, help="model dim D")
  p.add_argument("--routing", default="uniform", help="uniform | zipf:ALPHA | file:PATH.npy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--capacity-factor", type=float, default=None,
                 help="MoEConfig.capacity_factor; omit for dropless buffers")
  p.add_argument("--bytes-per-elem", type=positive_int, default=4)
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--json", default=None, help="write JSON here ('-' for stdout)")
  return p


def check_args(p: argparse.ArgumentParser, args) -> None:
  nodes, local = args.mesh
  if args.experts % (nodes * local):
    p.error(f"--experts {args.experts} must be a multiple of the {nodes * local} devices of "
            f"--mesh {nodes}x{local}")
  if args.topk > args.experts:
    p.error(f"--topk {args.topk} must be <= --experts {args.experts}")
  try:
    synthetic.parse_routing(args.routing)
  except ValueError as e:
    p.error(str(e))
  bad = [s for s in args.strategies.split(",") if s not in STRATEGIES]
  if bad:
    p.error(f"--strategies: {bad[0]!r} is not one of {list(STRATEGIES)}")
  if args.capacity_factor is not None and not args.capacity_factor > 0:
    p.error(f"--capacity-factor {args.capacity_factor} must be > 0")


def analytic(args) -> dict:
  nodes, local = args.mesh
  ids = synthetic.routing(args.routing, devices=nodes * local, tokens=args.tokens,
                          num_experts=args.experts, top_k=args.topk, seed=args.seed)
  per = traffic.stats(ids, mesh_shape=(nodes, local), num_experts=args.experts,
                      d_model=args.hidden, bytes_per_elem=args.bytes_per_elem,
                      strategies=args.strategies.split(","),
                      capacity_factor=args.capacity_factor)
  floor = traffic.inter_node_floor(ids, traffic.MeshShape(nodes, local), args.experts)
  config = {"mesh": f"{nodes}x{local}", "experts": args.experts, "topk": args.topk,
            "tokens": args.tokens, "hidden": args.hidden, "routing": args.routing,
            "seed": args.seed, "capacity_factor": args.capacity_factor,
            "bytes_per_elem": args.bytes_per_elem, "inter_node_floor_rows": floor}
  return {"config": config, "results": list(per.values())}


def table(report: dict) -> str:
  results = report["results"]
  base = next((r for r in results if r["strategy"] == "flat"), results[0])
  lines = [f"{'strategy':<12}{'inter rows':>12}{'intra rows':>12}{'inter MB':>10}"
           f"{'intra MB':>10}{'max/peer inter':>15}{'max/peer intra':>15}{'inter vs flat':>14}"
           f"{'dropped':>9}"]
  for r in results:
    ratio = base["rows"]["inter"] / max(r["rows"]["inter"], 1)
    lines.append(f"{r['strategy']:<12}{r['rows']['inter']:>12}{r['rows']['intra']:>12}"
                 f"{r['bytes']['inter'] / 1e6:>10.1f}{r['bytes']['intra'] / 1e6:>10.1f}"
                 f"{r['max_rows_per_peer']['inter']:>15}{r['max_rows_per_peer']['intra']:>15}"
                 f"{ratio:>13.2f}x{r['dropped']:>9}")
  rates = results[0]["dedup_rate"]
  cfg = report["config"]
  lines.append(f"dedup rate: node {rates['node']:.3f}, device {rates['device']:.3f}; "
               f"inter-node floor (once per token per remote node): "
               f"{cfg['inter_node_floor_rows']} rows")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  if not args.analytic:
    parser.error("only --analytic is available in this version; the timed benchmark needs "
                 "the cost-model work (run with --analytic)")
  report = analytic(args)
  cfg = report["config"]
  print(f"# analytic traffic: mesh {cfg['mesh']}, E={cfg['experts']}, K={cfg['topk']}, "
        f"T={cfg['tokens']}/device, D={cfg['hidden']}, routing {cfg['routing']}")
  print(table(report))
  if args.json == "-":
    json.dump(report, sys.stdout, indent=1)
    print()
  elif args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0
