"""hiermoe_jax.cost: profiles (validation, JSON), prediction arithmetic, fitting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermoe_jax import cost
from hiermoe_jax.mesh import MeshShape

PROFILE = cost.CostProfile(flat=cost.StageCost(1.0, 2e-6), inter=cost.StageCost(0.5, 4e-6),
                           intra=cost.StageCost(0.25, 1e-6), name="test")


def test_json_round_trip(tmp_path):
  assert cost.CostProfile.from_json(PROFILE.to_json()) == PROFILE
  path = tmp_path / "p.json"
  PROFILE.save(path)
  assert cost.CostProfile.load(path) == PROFILE
  assert cost.load_profile(str(path)) == PROFILE


def test_shipped_profiles_load():
  assert {"default", "paper_a6000"} <= set(cost.shipped_profiles())
  paper = cost.load_profile("paper_a6000")
  assert paper.flat == cost.StageCost(7.22e-1, 5.70e-7)
  assert paper.inter == cost.StageCost(4.97e-1, 5.29e-7)
  assert paper.intra == cost.StageCost(5.71e-1, 1.27e-7)
  cost.load_profile("default")
  with pytest.raises(ValueError, match="neither a shipped profile"):
    cost.load_profile("no_such_profile")


@pytest.mark.parametrize("alpha, beta, field", [(-1.0, 1e-6, "alpha_ms"),
                                                (1.0, float("nan"), "beta_ms_per_byte"),
                                                ("1", 1e-6, "alpha_ms")])
def test_stage_cost_validation(alpha, beta, field):
  with pytest.raises(ValueError, match=f"StageCost.{field}="):
    cost.StageCost(alpha, beta)


def test_profile_needs_stage_costs():
  with pytest.raises(ValueError, match="CostProfile.inter="):
    cost.CostProfile(flat=PROFILE.flat, inter=(0.5, 4e-6), intra=PROFILE.intra)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"flat": {"alpha_ms": 1, "beta_ms_per_byte": 0}, "inter": {"alpha_ms": 1}}',
     r"inter\.beta_ms_per_byte is missing"),
    ('{"flat": {"alpha_ms": 1, "beta_ms_per_byte": 0},'
     ' "inter": {"alpha_ms": 1, "beta_ms_per_byte": 0}}', "field 'intra' is missing"),
    ('{"flat": {"alpha_ms": 1, "beta_ms_per_byte": -2e-6},'
     ' "inter": {"alpha_ms": 1, "beta_ms_per_byte": 0},'
     ' "intra": {"alpha_ms": 1, "beta_ms_per_byte": 0}}', r"flat\.beta_ms_per_byte=-2e-06"),
])
def test_bad_profile_file_names_file_and_field(tmp_path, text, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=message) as info:
    cost.load_profile(str(path))
  assert str(path) in str(info.value)


def test_missing_profile_file(tmp_path):
  with pytest.raises(ValueError, match="cannot be read"):
    cost.CostProfile.load(tmp_path / "absent.json")


def test_predict_hand_computed():
  shape = MeshShape(2, 4)
  d, bpe = 16, 4
  # flat: group 8, 10 rows/peer -> 8*10*16*4 = 5120 B; 2 * (1 + 2e-6 * 5120).
  assert cost.predict("flat", [10], PROFILE, mesh_shape=(2, 4), d_model=d,
                      bytes_per_elem=bpe) == pytest.approx(2 * (1.0 + 2e-6 * 5120))
  # hier_dedup: inter group 2, 7 rows -> 896 B; intra group 4, 9 rows -> 2304 B.
  expected = 2 * (0.5 + 4e-6 * 896) + 2 * (0.25 + 1e-6 * 2304)
  assert cost.predict("hier_dedup", (7, 9), PROFILE, mesh_shape=shape, d_model=d,
                      bytes_per_elem=bpe) == pytest.approx(expected)
  # A traffic.stats entry: flat takes max(inter, intra), hier takes each.
  entry = {"max_rows_per_peer": {"inter": 7, "intra": 9}}
  assert cost.predict("flat_dedup", entry, PROFILE, mesh_shape=shape, d_model=d,
                      bytes_per_elem=bpe) == pytest.approx(2 * (1.0 + 2e-6 * 8 * 9 * 64))
  assert cost.predict("hier", entry, PROFILE, mesh_shape=shape, d_model=d,
                      bytes_per_elem=bpe) == pytest.approx(expected)
  with pytest.raises(ValueError, match="has 2 stages"):
    cost.predict("hier", [3], PROFILE, mesh_shape=shape, d_model=d, bytes_per_elem=bpe)


def test_predict_from_peak_rows_under_jit():
  shape = MeshShape(2, 4)

  @jax.jit
  def pick(peaks):
    times = jnp.stack([
        cost.predict_from_peak_rows("flat", (peaks[0],), PROFILE, shape, 16, 4),
        cost.predict_from_peak_rows("hier_dedup", (peaks[1], peaks[2]), PROFILE, shape, 16, 4)])
    return times, jnp.argmin(times)

  times, best = pick(jnp.array([10, 7, 9], jnp.int32))
  np.testing.assert_allclose(times, [2 * (1.0 + 2e-6 * 5120),
                                     2 * (0.5 + 4e-6 * 896) + 2 * (0.25 + 1e-6 * 2304)],
                             rtol=1e-6)
  assert int(best) == 1


def test_fit_recovers_known_alpha_beta():
  rng = np.random.default_rng(0)
  nbytes = np.geomspace(1e4, 1e8, 12)
  alpha, beta = 0.8, 3.2e-7
  times = (alpha + beta * nbytes) * (1 + 0.01 * rng.standard_normal(nbytes.shape))
  fitted, r2 = cost.fit_stage(nbytes, times)
  assert fitted.alpha_ms == pytest.approx(alpha, rel=0.1)
  assert fitted.beta_ms_per_byte == pytest.approx(beta, rel=0.02)
  assert r2 > 0.99


def test_fit_clamps_negative_intercept():
  nbytes = np.array([1e6, 2e6, 4e6])
  fitted, _ = cost.fit_stage(nbytes, 1e-6 * nbytes - 0.5)
  assert fitted.alpha_ms == 0.0 and fitted.beta_ms_per_byte > 0
  with pytest.raises(ValueError, match="two distinct"):
    cost.fit_stage([1e6, 1e6], [1.0, 1.1])


def test_stage_over_one_device_is_priced_as_its_local_hop():
  # On a 1x8 mesh the inter hop of hier_dedup stays on the device, but it still
  # gathers and scatters its 100 rows: priced with the profile's inter entry.
  local_hop = 2 * (0.5 + 4e-6 * 1 * 100 * 64)
  intra = 2 * (0.25 + 1e-6 * 8 * 9 * 64)
  assert cost.predict("hier_dedup", (100, 9), PROFILE, mesh_shape=(1, 8), d_model=16,
                      bytes_per_elem=4) == pytest.approx(local_hop + intra)
