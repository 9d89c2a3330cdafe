"""`scripts/bench_comm.py`: mesh-level communication benchmark.

`--analytic` replays every strategy on a routing with `hiermoe_jax.traffic` and
prints rows / bytes per tier without running collectives, so it works for meshes
far larger than this machine.

Without `--analytic` it times dispatch + combine of each strategy on the mesh
(`hiermoe_jax.bench.timed`): in one process on `--mesh NxG` host devices, or one
process per node under `scripts/launch.py`. Each result adds "time_ms"
{min, median, max} and "predicted_ms" (the `--profile` cost model on the same
buffer sizes). `--fit-profile OUT.json` first fits a cost profile on this mesh
(and then predicts with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from hiermoe_jax import cost, traffic
from hiermoe_jax.bench import cli, synthetic
from hiermoe_jax import config as config_lib
from hiermoe_jax.config import ConfigError
from hiermoe_jax.dispatch import registry
from hiermoe_jax.dispatch.base import Strategy
from hiermoe_jax.dispatch import auto
from hiermoe_jax.mesh import MeshShape

BASELINES = ("gspmd",)  # timed mode only: XLA-partitioned dense dispatch
# gspmd's one all-to-all over all devices, for the cost model (not an engine strategy).
GSPMD = Strategy("gspmd", tiers=("flat",), dedup=False, auto_candidate=False)


def _priced(name: str):
  """What the cost model prices for a result row: a registered name or GSPMD."""
  return GSPMD if name == "gspmd" else name
DEFAULT_MESH = (2, 4)


def build_parser() -> argparse.ArgumentParser:
  positive_int = cli.integer(1)
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--analytic", action="store_true",
                 help="count traffic on the host; run no collectives")
  p.add_argument("--mesh", type=cli.mesh_shape, default=None,
                 help="NxG: nodes x local devices (analytic default 2x4; timed default: "
                      "processes x local devices; NxG only in a single process)")
  p.add_argument("--experts", type=positive_int, default=64)
  p.add_argument("--topk", type=positive_int, default=8)
  p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per device")
  p.add_argument("--hidden", type=positive_int, default=1024, help="model dim D")
  p.add_argument("--routing", default="uniform", help="uniform | zipf:ALPHA | file:PATH.npy")
  p.add_argument("--seed", type=cli.seed, default=0)
  p.add_argument("--capacity-factor", type=cli.real(0, strict=True), default=None,
                 help="MoEConfig.capacity_factor; omit for dropless buffers")
  p.add_argument("--bytes-per-elem", type=positive_int, default=4,
                 help="analytic only; timed mode uses the size of --dtype")
  p.add_argument("--strategies", default=",".join(registry.names()),
                 help=f"any of {list(registry.names())} or auto; timed mode also "
                      f"{list(BASELINES)}")
  p.add_argument("--json", type=cli.output_file, default=None,
                 help="write JSON here ('-' for stdout)")
  timed = p.add_argument_group("timed mode")
  timed.add_argument("--repeats", type=positive_int, default=5)
  timed.add_argument("--warmup", type=cli.integer(0), default=2,
                     help="untimed calls per strategy")
  timed.add_argument("--backward", action="store_true", help="also time the VJP")
  timed.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  timed.add_argument("--profile", default="default",
                     help="cost profile for predicted_ms: a shipped name or a JSON path")
  timed.add_argument("--gspmd-group", type=positive_int, default=256,
                     help="gspmd baseline: tokens per dispatch group (GShard's S)")
  timed.add_argument("--fit-profile", type=cli.output_file, default=None, metavar="OUT.json",
                     help="fit alpha/beta per stage kind on this mesh, write the profile, "
                          "and predict with it")
  timed.add_argument("--fit-only", action="store_true", help="with --fit-profile: skip the "
                     "strategy benchmark")
  timed.add_argument("--fit-max-mb", type=cli.real(0, strict=True), default=None,
                     help="largest fitted message (MB per stage); default: the largest "
                          "stage of the benchmarked strategies")
  timed.add_argument("--fit-points", type=cli.integer(2), default=6,
                     help="message sizes per stage kind (a line needs >= 2)")
  return p


def check_routing(p: argparse.ArgumentParser, spec: str, tokens: int, top_k: int) -> None:
  """--routing parses; a file: routing is a readable [N*G, T, K] integer array."""
  try:
    kind, arg = synthetic.parse_routing(spec)
  except ValueError as e:
    p.error(str(e))
  if kind != "file":
    return
  if not os.path.isfile(arg):
    p.error(f"--routing={spec!r} is invalid: file {arg!r} does not exist")
  try:
    ids = np.load(arg, mmap_mode="r")
  except (OSError, EOFError, ValueError) as e:  # unreadable, empty, pickled, not .npy
    p.error(f"--routing={spec!r} is invalid: {arg!r} is not a readable .npy array ({e})")
  if ids.ndim != 3 or ids.shape[1:] != (tokens, top_k) or ids.dtype.kind not in "iu":
    p.error(f"--routing={spec!r} is invalid: {arg!r} holds {ids.dtype}{list(ids.shape)}; "
            f"expected integer ids of shape [N*G, --tokens={tokens}, --topk={top_k}]")


def routing(spec: str, **kwargs):
  """synthetic.routing; its ValueErrors are about the routing file (shape, ids)."""
  try:
    return synthetic.routing(spec, **kwargs)
  except ValueError as e:
    raise ConfigError(f"--routing={spec!r} is invalid: {e}") from None


def check_args(p: argparse.ArgumentParser, args) -> None:
  cli.check_topk(args.topk, args.experts)
  check_routing(p, args.routing, args.tokens, args.topk)
  valid = config_lib.DISPATCH if args.analytic else config_lib.DISPATCH + BASELINES
  names = args.strategies.split(",")
  bad = [s for s in names if s not in valid]
  if bad:
    p.error(f"--strategies={args.strategies!r} is invalid: {bad[0]!r} is not one of "
            f"{list(valid)}")
  if len(set(names)) < len(names):
    p.error(f"--strategies={args.strategies!r} is invalid: each strategy may appear once")
  if args.analytic and (args.fit_profile or args.backward):
    p.error("--fit-profile and --backward need the timed mode (omit --analytic)")
  if args.fit_only and not args.fit_profile:
    p.error("--fit-only needs --fit-profile OUT.json")
  if args.tokens % min(args.gspmd_group, args.tokens) and "gspmd" in names:
    p.error(f"--gspmd-group={args.gspmd_group} is invalid: must divide --tokens={args.tokens}")
  uses_profile = "auto" in names if args.analytic else not args.fit_profile
  if uses_profile:
    cli.check_profile(args.profile)


def analytic(args, ids=None) -> dict:
  nodes, local = args.mesh
  if ids is None:
    ids = routing(args.routing, devices=nodes * local, tokens=args.tokens,
                  num_experts=args.experts, top_k=args.topk, seed=args.seed)
  names = args.strategies.split(",")
  strategies = registry.names()
  known = list(strategies) if "auto" in names else [n for n in names if n in strategies]
  per = traffic.stats(ids, mesh_shape=(nodes, local), num_experts=args.experts,
                      d_model=args.hidden, bytes_per_elem=args.bytes_per_elem,
                      strategies=known or ["flat"], capacity_factor=args.capacity_factor)
  if "auto" in names:
    per["auto"] = auto_entry(per, cost.load_profile(args.profile), (nodes, local), args)
  if "gspmd" in names:  # sends what flat sends (one copy per (token, expert)), padded
    per["gspmd"] = {**(per.get("flat") or traffic.stats(
        ids, mesh_shape=(nodes, local), num_experts=args.experts, d_model=args.hidden,
        bytes_per_elem=args.bytes_per_elem, strategies=["flat"])["flat"]), "strategy": "gspmd"}
  per = {n: per[n] for n in names}
  floor = traffic.inter_node_floor(ids, traffic.MeshShape(nodes, local), args.experts)
  config = {"mesh": f"{nodes}x{local}", "experts": args.experts, "topk": args.topk,
            "tokens": args.tokens, "hidden": args.hidden, "routing": args.routing,
            "seed": args.seed, "capacity_factor": args.capacity_factor,
            "bytes_per_elem": args.bytes_per_elem, "inter_node_floor_rows": floor}
  return {"config": config, "results": list(per.values())}


def auto_entry(per: dict, profile, mesh_shape, args) -> dict:
  """What `auto` sends: the traffic of the strategy the cost model picks."""
  predicted = {n: cost.predict(n, per[n], profile, mesh_shape=mesh_shape, d_model=args.hidden,
                               bytes_per_elem=args.bytes_per_elem) for n in registry.names()}
  shape = mesh_shape if isinstance(mesh_shape, MeshShape) else MeshShape(*mesh_shape)
  names = auto.candidates(shape, args.topk)
  best = min(names, key=lambda n: (predicted[n], registry.names().index(n)))
  return {**per[best], "strategy": "auto", "auto_choice": best}


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


def timed_table(report: dict) -> str:
  results = report["results"]
  base = next((r for r in results if r["strategy"] == "flat"), None)
  lines = [f"{'strategy':<22}{'hop caps':>14}{'min ms':>10}{'median ms':>11}{'max ms':>10}"
           f"{'vs flat':>9}{'predicted':>11}{'pred err':>10}"]
  for r in results:
    t = r["time_ms"]
    speed = f"{base['time_ms']['median'] / t['median']:>8.2f}x" if base else f"{'-':>9}"
    label = f"auto:{r['auto_choice']}" if "auto_choice" in r else r["strategy"]
    caps = "/".join(str(c) for c in (r["hop_capacity_by_strategy"][r["auto_choice"]]
                                     if "auto_choice" in r else r["hop_capacity"]))
    err = (r["predicted_ms"] - t["median"]) / t["median"]
    lines.append(f"{label:<22}{caps:>14}{t['min']:>10.1f}{t['median']:>11.1f}"
                 f"{t['max']:>10.1f}{speed}{r['predicted_ms']:>11.1f}{err:>+9.0%} ")
  return "\n".join(lines)


def _write_json(report: dict, path: str | None) -> None:
  if path == "-":
    json.dump(report, sys.stdout, indent=1)
    print()
  elif path:
    with open(path, "w") as f:
      json.dump(report, f, indent=1)


def timed(args) -> dict | None:
  """Runs the timed benchmark (and --fit-profile); returns the report on rank 0."""
  from hiermoe_jax.bench import timed as timed_lib  # starts JAX; keep --analytic light
  mesh = timed_lib.start(args.mesh)
  shape = MeshShape.of(mesh)
  leader = timed_lib.is_leader()
  args.mesh = (shape.nodes, shape.local)
  cli.check_experts_fit(args.experts, shape.nodes, shape.local)
  bpe = 2 if args.dtype == "bfloat16" else 4
  args.bytes_per_elem = bpe
  names = args.strategies.split(",")
  ids = routing(args.routing, devices=shape.devices, tokens=args.tokens,
                num_experts=args.experts, top_k=args.topk, seed=args.seed)
  report = analytic(args, ids)
  report["config"].update(mode="timed", dtype=args.dtype, repeats=args.repeats,
                          warmup=args.warmup, backward=args.backward,
                          processes=__import__("jax").process_count())
  if args.capacity_factor is not None and leader:
    print("# note: timed mode uses tight dropless buffers; --capacity-factor only affects "
          "the analytic columns")

  fit_details = None
  if args.fit_profile:
    if args.fit_max_mb is not None:
      max_bytes = int(args.fit_max_mb * 1e6)
    else:
      max_bytes = max(_stage_bytes_of(timed_lib, ids, n, shape, args, bpe) for n in names)
    profile, fit_details = timed_lib.fit_profile(
        mesh, d_model=args.hidden, dtype=args.dtype, max_bytes=max_bytes,
        points=args.fit_points, repeats=args.repeats, warmup=args.warmup, tokens=args.tokens,
        name=f"fitted on mesh {shape.nodes}x{shape.local}, {report['config']['processes']} "
             f"process(es), D={args.hidden}, {args.dtype}")
    if leader:
      profile.save(args.fit_profile)
      print(f"# fitted profile -> {args.fit_profile}")
      for kind, d in fit_details.items():
        print(f"  {kind:<6} alpha {d['alpha_ms']:.3f} ms  beta {d['beta_ms_per_byte']:.3e} "
              f"ms/B ({1e-6 / max(d['beta_ms_per_byte'], 1e-30):.2f} GB/s)  r^2 "
              f"{d['r2']:.3f}")
    report["config"]["profile"] = args.fit_profile
    report["fit"] = fit_details
    if args.fit_only:
      return report if leader else None
  else:
    profile = cost.load_profile(args.profile)
    report["config"]["profile"] = args.profile

  info = timed_lib.benchmark(mesh, ids, strategies=names, num_experts=args.experts,
                             d_model=args.hidden, dtype=args.dtype, repeats=args.repeats,
                             warmup=args.warmup, backward=args.backward,
                             gspmd_group=min(args.gspmd_group, args.tokens), seed=args.seed,
                             profile=profile)
  for i, r in enumerate(report["results"]):
    name = r["strategy"]
    if name == "auto":  # decided with the profile actually in use (it may be fitted)
      stats = traffic.stats(ids, mesh_shape=(shape.nodes, shape.local),
                            num_experts=args.experts, d_model=args.hidden,
                            bytes_per_elem=bpe)
      r = report["results"][i] = auto_entry(stats, profile, shape, args)
      r.update(info[name])
      caps = r["hop_capacity_by_strategy"][r["auto_choice"]]
    else:
      r.update(info[name])
      caps = info[name]["hop_capacity"]
    r["predicted_ms"] = float(cost.predict(_priced(r.get("auto_choice", name)), caps, profile,
                                           mesh_shape=shape, d_model=args.hidden,
                                           bytes_per_elem=bpe))
    if args.backward:  # the VJP repeats every all-to-all once more
      r["predicted_ms"] *= 2
  return report if leader else None


def _stage_bytes_of(timed_lib, ids, name, shape, args, bpe) -> int:
  if name == "gspmd":
    cap = timed_lib.gspmd_capacity(ids, min(args.gspmd_group, args.tokens), args.experts)
    caps = ((args.experts // shape.devices) * (args.tokens // min(args.gspmd_group,
                                                                  args.tokens)) * cap,)
  else:
    caps = timed_lib.tight_hop_caps(ids, name, shape, args.experts)
  return max(cost.stage_bytes(cost.group_size(kind, shape), c, args.hidden, bpe)
             for kind, c in zip(cost.stage_kinds(_priced(name)), caps))


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:  # ConfigError is bad input (some found only once the mesh is known), not a bug
    check_args(parser, args)
    if args.analytic:
      args.mesh = args.mesh or DEFAULT_MESH
    if args.mesh is not None:  # before JAX starts
      cli.check_experts_fit(args.experts, *args.mesh)
    report = analytic(args) if args.analytic else timed(args)
  except ConfigError as e:
    parser.error(str(e))
  if args.analytic:
    cfg = report["config"]
    print(f"# analytic traffic: mesh {cfg['mesh']}, E={cfg['experts']}, K={cfg['topk']}, "
          f"T={cfg['tokens']}/device, D={cfg['hidden']}, routing {cfg['routing']}")
    print(table(report))
    _write_json(report, args.json)
    return 0
  if report is None:  # not rank 0
    return 0
  cfg = report["config"]
  print(f"# timed dispatch+combine{' + VJP' if cfg['backward'] else ''}: mesh {cfg['mesh']} "
        f"({cfg['processes']} process(es)), E={cfg['experts']}, K={cfg['topk']}, "
        f"T={cfg['tokens']}/device, D={cfg['hidden']}, {cfg['dtype']}, routing "
        f"{cfg['routing']}, {cfg['repeats']} repeats; predicted by profile {cfg['profile']!r}")
  print(table(report))
  if "time_ms" in report["results"][0]:
    print(timed_table(report))
  _write_json(report, args.json)
  return 0
