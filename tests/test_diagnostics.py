"""Capacity-drop warnings with counts; dropless never drops (asserted, and checked)."""

import warnings

import pytest

import hiermoe_jax as hm
from hiermoe_jax.diagnostics import DroplessViolation, check_drop_counts
from helpers import mesh_of, random_inputs, router_config


def _aux(config, mesh):
  params, x, placement, bias = random_inputs(config, mesh, tokens_per_device=16, seed=3,
                                             bias_scale=3.0)
  return hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement,
                      router_bias=bias)[1]


def test_warns_with_counts_above_threshold():
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup", dropless=False, capacity_factor=0.5)
  aux = _aux(config, mesh)
  dropped, pairs = int(aux.dropped), 8 * 16 * config.top_k
  assert dropped > 0
  with pytest.warns(hm.CapacityWarning, match=f"layer 3: capacity dropped {dropped} of "
                    f"{pairs} .*capacity_factor \\(now 0.5\\)"):
    rate = hm.check_drops(aux, config, threshold=0.0, where="layer 3")
  assert rate == dropped / pairs
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # at or below the threshold: silent
    hm.check_drops(aux, config, threshold=rate)


def test_dropless_never_drops_and_a_drop_would_be_an_error():
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup")  # dropless
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert hm.check_drops(_aux(config, mesh), config, threshold=0.0) == 0.0
  with pytest.raises(DroplessViolation, match="dropless dispatch dropped 3 of 100"):
    check_drop_counts(3, 100, dropless=True, capacity_factor=1.0, threshold=0.5)
