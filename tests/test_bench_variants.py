"""bench_comm variants: `name[:field=value]...` parses, prices and times, labelled by spec."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from hiermoe_jax import traces
from hiermoe_jax.bench import comm, synthetic, timed, variants
from hiermoe_jax.config import ConfigError
from hiermoe_jax.mesh import MeshShape
from tests.helpers import mesh_of

ROOT = Path(__file__).resolve().parents[1]
SPECS = "flat,hier_dedup,hier_dedup:comm_dtype=bfloat16:overlap_chunks=2"
SMALL = dict(tokens=64, d_model=8, num_experts=16, top_k=2)


def run_main(argv, capsys) -> tuple[int, str, str]:
  try:
    code = comm.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err.strip()


# ----------------------------------------------------------------------------- parser

def test_good_specs_parse():
  got = variants.parse(" flat, hier_dedup:overlap_chunks=4 : comm_dtype=float8_e4m3fn,"
                       "hier_dedup,hier_dedup:comm_dtype=None:overlap_chunks=2,auto,gspmd",
                       timed=True, **SMALL)
  assert [v.spec for v in got] == [
      "flat", "hier_dedup:overlap_chunks=4 : comm_dtype=float8_e4m3fn", "hier_dedup",
      "hier_dedup:comm_dtype=None:overlap_chunks=2", "auto", "gspmd"]
  assert [v.base for v in got] == ["flat", "hier_dedup", "hier_dedup", "hier_dedup", "auto",
                                   "gspmd"]
  assert got[1].field_dict == {"overlap_chunks": 4, "comm_dtype": "float8_e4m3fn"}
  assert (got[1].chunks, got[1].comm_dtype) == (4, "float8_e4m3fn")
  assert (got[3].chunks, got[3].comm_dtype) == (2, None)
  assert got[0].to_json() == {"strategy": "flat", "base_strategy": "flat", "fields": {}}


@pytest.mark.parametrize("spec, names", [
    ("flat,teleport", ["'teleport' is not one of"]),
    ("hier_dedup:dropless=True", ["'dropless'", "MoEConfig field", "comm_dtype or overlap_chunks"]),
    ("hier_dedup:colour=red", ["'colour' is not a MoEConfig field", "comm_dtype"]),
    ("hier_dedup:comm_dtype=fp16", ["MoEConfig.comm_dtype='fp16' is invalid", "float8_e4m3fn"]),
    ("hier_dedup:overlap_chunks=0", ["MoEConfig.overlap_chunks=0 is invalid", ">= 1"]),
    ("hier_dedup:overlap_chunks=two", ["MoEConfig.overlap_chunks='two' is invalid"]),
    ("hier_dedup:overlap_chunks=3", ["overlap_chunks=3 must divide --tokens=64"]),
    ("hier_dedup:comm_dtype", ["'comm_dtype' is not FIELD=VALUE"]),
    ("hier_dedup:overlap_chunks=2:overlap_chunks=4", ["sets overlap_chunks twice"]),
    ("auto:comm_dtype=bfloat16", ["auto takes no fields", "comm_dtype=bfloat16"]),
    ("hier_dedup,hier_dedup", ["'hier_dedup' appears twice"]),
    ("hier_dedup:overlap_chunks=2,hier_dedup:overlap_chunks=2", ["appears twice"]),
    ("hier_dedup,hier_dedup:overlap_chunks=1", ["repeats 'hier_dedup'"]),
    ("flat,,hier", ["an empty entry"]),
    ("gspmd", ["'gspmd' is a timed-mode baseline"]),
])
def test_bad_specs_are_one_line_errors_naming_the_field(spec, names, capsys):
  with pytest.raises(ConfigError) as e:
    variants.parse(spec, timed=False, **SMALL)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"--strategies={spec!r} is invalid: ")
  assert all(n in message for n in names), message
  # The CLI says the same in one line, before any JAX work.
  code, _, err = run_main(["--analytic", "--experts", "16", "--topk", "2", "--tokens", "64",
                           "--hidden", "8", "--strategies", spec], capsys)
  assert code == 2 and err == f"error: {message}"


def test_timed_variants_take_gspmd_but_not_with_fields():
  assert variants.parse("gspmd", timed=True, **SMALL)[0].base == "gspmd"
  with pytest.raises(ConfigError, match="gspmd takes no fields"):
    variants.parse("gspmd:overlap_chunks=2", timed=True, **SMALL)


@pytest.mark.parametrize("argv, expected", [
    ([], ("float32", 4)),
    (["--dtype", "bfloat16"], ("bfloat16", 2)),
    (["--bytes-per-elem", "2"], ("bfloat16", 2)),  # the older spelling still works
    (["--bytes-per-elem", "4", "--dtype", "float32"], ("float32", 4)),
    (["--bytes-per-elem", "2", "--dtype", "float32"], "--dtype=float32 has 4 bytes"),
    (["--bytes-per-elem", "1"], "must be 4 (float32) or 2 (bfloat16)"),
])
def test_dtype_and_bytes_per_elem_agree(argv, expected):
  args = comm.build_parser().parse_args(["--analytic", *argv])
  if isinstance(expected, str):
    with pytest.raises(ConfigError, match=re.escape(expected)):
      comm.resolve_dtype(args)
  else:
    comm.resolve_dtype(args)
    assert (args.dtype, args.bytes_per_elem) == expected


# ----------------------------------------------------------------------------- analytic

def _analytic(tmp_path, capsys, *extra):
  out = tmp_path / "a.json"
  code, stdout, err = run_main(["--analytic", "--mesh", "2x4", "--experts", "16", "--topk", "4",
                                "--tokens", "32", "--hidden", "16", "--json", str(out), *extra],
                               capsys)
  assert code == 0, err
  return json.loads(out.read_text()), stdout


def test_analytic_bytes_follow_the_wire_dtype(tmp_path, capsys):
  specs = ("hier_dedup,hier_dedup:comm_dtype=bfloat16,hier_dedup:comm_dtype=float8_e4m3fn,"
           "hier_dedup:overlap_chunks=4,flat,auto")
  report, stdout = _analytic(tmp_path, capsys, "--strategies", specs)
  by = {r["strategy"]: r for r in report["results"]}
  assert list(by) == specs.split(",")
  f32, bf16, fp8 = (by[s] for s in specs.split(",")[:3])
  chunked = by["hier_dedup:overlap_chunks=4"]
  assert f32["rows"] == bf16["rows"] == fp8["rows"] == chunked["rows"]  # dropless
  for link in ("inter", "intra"):
    rows = f32["rows"][link]
    assert f32["bytes"][link] == rows * 16 * 4
    assert bf16["bytes"][link] == f32["bytes"][link] // 2
    assert fp8["bytes"][link] == rows * (16 + 4)  # D bytes + one f32 scale per row
    assert chunked["max_rows_per_peer"][link] <= f32["max_rows_per_peer"][link]
  assert fp8["wire_bytes_per_row"] == {"dispatch": 20, "combine": 32}  # combine in bf16
  assert bf16["base_strategy"] == "hier_dedup" and bf16["fields"] == {"comm_dtype": "bfloat16"}
  assert chunked["fields"] == {"overlap_chunks": 4}
  # Fewer bytes on the same links are predicted faster; chunks pay alpha per chunk.
  assert fp8["predicted_ms"] < bf16["predicted_ms"] < f32["predicted_ms"]
  assert by["auto"]["auto_choice"] == report["auto"]["choice"]
  assert by["auto"]["predicted_ms"] == report["auto"]["predicted_ms"][report["auto"]["choice"]]
  assert f"auto picks {report['auto']['choice']}" in stdout
  assert "dispatch MB, all devices" in stdout and "pred ms" in stdout
  # --dtype bfloat16 halves the plain variants' bytes; a bf16 wire then changes nothing.
  half, _ = _analytic(tmp_path, capsys, "--strategies", specs, "--dtype", "bfloat16")
  assert half["results"][0]["bytes"] == bf16["bytes"] == half["results"][1]["bytes"]
  same, _ = _analytic(tmp_path, capsys, "--strategies", specs, "--bytes-per-elem", "2")
  assert same["results"] == half["results"]


def test_analytic_flags_the_hottest_link(tmp_path, capsys):
  report, stdout = _analytic(tmp_path, capsys, "--mesh", "8x4", "--experts", "64",
                             "--strategies", "flat,hier_dedup")
  hot = report["hottest_link"]
  flat, hier = report["results"]
  assert hot["strategy"] == "hier_dedup" and hot["link"] == "intra"
  assert hot["max_rows_per_peer"] == hier["max_rows_per_peer"]["intra"]
  assert hot["flat_max_rows_per_peer"] == max(flat["max_rows_per_peer"].values())
  assert hot["vs_flat"] > 2  # the intra receiver forwards what a whole node sent it
  assert (f"hottest link: hier_dedup intra max {hot['max_rows_per_peer']} rows/peer = "
          f"{hot['vs_flat']:.1f}x flat's") in stdout


# ----------------------------------------------------------------------------- timed

def test_chunked_low_precision_exchange_round_trips():
  """Chunks with per-chunk tight capacities drop nothing: y = x * sum(w) = x."""
  mesh = mesh_of("2x4")
  shape = MeshShape.of(mesh)
  ids = synthetic.routing("zipf:1.0", devices=8, tokens=16, num_experts=16, top_k=4, seed=3)
  caps = timed.tight_hop_caps(ids, "hier_dedup", shape, 16, chunks=2)
  halves = [timed.tight_hop_caps(ids[:, s], "hier_dedup", shape, 16)
            for s in (slice(0, 8), slice(8, 16))]
  assert caps == tuple(max(a, b) for a, b in zip(*halves))
  x, slots, w = timed.routed_inputs(ids, 8, "float32", seed=0)
  args = [timed.global_array(mesh, a) for a in (x, slots, w, x)]
  for comm_dtype, tol in (("bfloat16", 1e-2), ("float8_e4m3fn", 8e-2)):
    fn = timed.exchange_step(mesh, "hier_dedup", caps, 16, backward=False,
                             comm_dtype=comm_dtype, chunks=2)
    np.testing.assert_allclose(np.asarray(fn(*args)), x, rtol=tol, atol=tol, err_msg=comm_dtype)


def test_timed_mode_labels_every_variant_by_its_spec(tmp_path, capsys):
  out = tmp_path / "t.json"
  code, stdout, err = run_main(["--mesh", "2x4", "--experts", "16", "--topk", "4", "--tokens",
                                "16", "--hidden", "8", "--repeats", "2", "--warmup", "1",
                                "--strategies", SPECS, "--json", str(out)], capsys)
  assert code == 0, err
  results = json.loads(out.read_text())["results"]
  assert [r["strategy"] for r in results] == SPECS.split(",")
  assert [r["base_strategy"] for r in results] == ["flat", "hier_dedup", "hier_dedup"]
  assert results[2]["fields"] == {"comm_dtype": "bfloat16", "overlap_chunks": 2}
  for r in results:
    assert len(r["samples_ms"]) == 2 and r["time_ms"]["median"] > 0 and r["predicted_ms"] > 0
  chunked, whole = results[2], results[1]
  assert chunked["overlap_chunks"] == 2 and len(chunked["hop_capacity"]) == 2
  assert all(c <= w for c, w in zip(chunked["hop_capacity"], whole["hop_capacity"]))
  timed_rows = stdout.split("median ms")[1].splitlines()[1:]
  assert [line.split()[0] for line in timed_rows] == SPECS.split(",")


# ----------------------------------------------------------------------------- README

def _readme_commands() -> list[list[str]]:
  """argv after scripts/bench_comm.py of every bench_comm command in README's code blocks."""
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  text = "\n".join(blocks).replace("\\\n", "")  # a shell line continuation
  commands = []
  for line in text.splitlines():
    if "scripts/bench_comm.py" in line:
      argv = shlex.split(line.split("scripts/bench_comm.py", 1)[1], comments=True)
      commands.append(argv)
  return commands


def _write_stand_in_traces(argv: list[str]) -> None:
  """A command replaying `--routing trace:PATH[:LAYER]` gets a small uniform trace at
  PATH (relative to the working directory), shaped by its --experts, --topk, --tokens
  and mesh, so that the command's arguments can be checked."""
  flags = {flag: value for flag, value in zip(argv, argv[1:] + [""])
           if flag.startswith("--") and not value.startswith("--")}
  routing = flags.get("--routing", "")
  if not routing.startswith("trace:"):
    return
  path, *layer = routing[len("trace:"):].split(":")
  experts, top_k = int(flags["--experts"]), int(flags["--topk"])
  nodes, local = map(int, flags.get("--mesh", "2x4").split("x"))
  tokens = nodes * local * int(flags["--tokens"])
  rng = np.random.default_rng(0)
  ids = np.argsort(rng.random((1, tokens, experts)), axis=-1)[..., :top_k]
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  traces.save(path, {int(layer[0]) if layer else 1: ids}, num_experts=experts)


def test_readme_bench_comm_commands_parse(tmp_path, monkeypatch):
  commands = _readme_commands()
  assert len(commands) >= 3 and any(":comm_dtype=" in " ".join(c) for c in commands)
  monkeypatch.chdir(tmp_path)
  for argv in commands:
    _write_stand_in_traces(argv)
    parser = comm.build_parser()
    args = parser.parse_args(argv)
    comm.check_args(parser, args)
    assert args.variants, argv
