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


def convex_stage_times(nbytes, alpha=2.0, beta=3e-6, excess=9e-6, knee=16e6, noise=0.02):
  """Times of a stage that gets dearer per byte past `knee` (a CPU cache), 2% noise."""
  rng = np.random.default_rng(1)
  exact = alpha + beta * nbytes + excess * np.maximum(nbytes - knee, 0)
  return exact * (1 + noise * rng.standard_normal(nbytes.shape))


def test_fit_recovers_positive_alpha_and_knee_where_a_line_goes_negative():
  nbytes = np.geomspace(0.125e6, 64e6, 10)  # the --fit-points 10 sweep up to 64 MB
  times = convex_stage_times(nbytes)
  # Why the old fit clamped alpha to 0: a least-squares line's intercept is < 0 here.
  intercept = np.polyfit(nbytes, times, 1)[1]
  assert intercept < 0
  fitted, r2 = cost.fit_stage(nbytes, times)
  assert fitted.alpha_ms == pytest.approx(2.0, rel=0.1)
  assert fitted.beta_ms_per_byte == pytest.approx(3e-6, rel=0.1)
  assert fitted.knee_bytes == pytest.approx(16e6, rel=0.01)  # the sweep point nearest
  assert fitted.excess_ms_per_byte == pytest.approx(9e-6, rel=0.1)
  assert r2 > 0.99
  # Every size, the smallest included, is priced within a few % of its time.
  np.testing.assert_allclose(fitted.time_ms(nbytes), times, rtol=0.06)


def test_fit_drops_a_hiccup():
  # The smallest size timed 3x slow (seen on the shared machine) would drag alpha up.
  nbytes = np.geomspace(0.125e6, 64e6, 10)
  times = convex_stage_times(nbytes)
  times[0] *= 3
  fitted, _ = cost.fit_stage(nbytes, times)
  assert fitted.alpha_ms == pytest.approx(2.0, rel=0.15)
  assert fitted.knee_bytes == pytest.approx(16e6, rel=0.01)
  np.testing.assert_allclose(fitted.time_ms(nbytes[1:]), times[1:], rtol=0.06)


def test_fit_keeps_a_line_when_no_knee_is_needed():
  nbytes = np.geomspace(0.125e6, 64e6, 10)
  times = convex_stage_times(nbytes, excess=0.0)
  fitted, _ = cost.fit_stage(nbytes, times)
  assert fitted.excess_ms_per_byte == 0 and fitted.knee_bytes == 0
  assert fitted.alpha_ms == pytest.approx(2.0, rel=0.1)
  line, _ = cost.fit_stage(nbytes, convex_stage_times(nbytes), knee=False)
  assert line.excess_ms_per_byte == 0 and line.alpha_ms > 0
  with pytest.raises(ValueError, match="positive times"):
    cost.fit_stage([1e6, 2e6], [1.0, 0.0])


OLD_PROFILE = """{"name": "before the knee", "units": {"alpha": "ms", "beta": "ms/byte"},
 "flat": {"alpha_ms": 0.0, "beta_ms_per_byte": 2e-05},
 "inter": {"alpha_ms": 0.5, "beta_ms_per_byte": 3e-05},
 "intra": {"alpha_ms": 0.0, "beta_ms_per_byte": 6e-06}}"""


def test_old_profile_json_loads_as_a_line(tmp_path):
  path = tmp_path / "old.json"
  path.write_text(OLD_PROFILE)
  old = cost.load_profile(str(path))
  assert old.inter == cost.StageCost(0.5, 3e-5)
  assert old.inter.excess_ms_per_byte == 0 and old.inter.knee_bytes == 0
  assert old.inter.time_ms(1e8) == pytest.approx(0.5 + 3e-5 * 1e8)
  assert "knee_bytes" not in json.loads(old.to_json())["inter"]  # a line saves as before
  kneed = cost.CostProfile(flat=old.flat, inter=cost.StageCost(0.5, 3e-5, 1e-5, 4e6),
                           intra=old.intra)
  assert cost.CostProfile.from_json(kneed.to_json()) == kneed


def test_bad_knee_field_names_it(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(OLD_PROFILE.replace('"beta_ms_per_byte": 3e-05',
                                      '"beta_ms_per_byte": 3e-05, "knee_bytes": -1'))
  with pytest.raises(ValueError, match=r"inter\.knee_bytes=-1"):
    cost.load_profile(str(path))


KNEED = cost.CostProfile(flat=cost.StageCost(1.0, 2e-6, 6e-6, 1e6),
                         inter=cost.StageCost(0.5, 4e-6), intra=cost.StageCost(0.25, 1e-6))


def test_small_stage_is_priced_by_its_line_and_large_one_pays_the_excess():
  flat = KNEED.flat
  assert flat.time_ms(0) == 1.0  # alpha: what an empty stage still costs
  assert flat.time_ms(5e5) == pytest.approx(1.0 + 2e-6 * 5e5)  # below the knee
  assert flat.time_ms(1e6) == pytest.approx(1.0 + 2e-6 * 1e6)  # continuous at it
  assert flat.time_ms(3e6) == pytest.approx(1.0 + 2e-6 * 3e6 + 6e-6 * 2e6)
  # Per byte, a small message costs less than a large one: the reason for the knee.
  shape, d, bpe = MeshShape(2, 4), 512, 4
  small, large = (cost.predict("flat", [rows], KNEED, mesh_shape=shape, d_model=d,
                               bytes_per_elem=bpe) for rows in (32, 1024))
  assert small == pytest.approx(2 * (1.0 + 2e-6 * 8 * 32 * d * bpe))  # 0.52 MB
  assert (large - 2) / 1024 > (small - 2) / 32


def test_kneed_profile_prices_the_same_under_jit():
  shape = MeshShape(2, 4)
  rows = jnp.array([64, 700, 1024], jnp.int32)
  traced = jax.jit(jax.vmap(lambda r: cost.predict_from_peak_rows("flat", (r,), KNEED, shape,
                                                                  512, 4)))(rows)
  host = [cost.predict_from_peak_rows("flat", (int(r),), KNEED, shape, 512, 4) for r in rows]
  np.testing.assert_allclose(traced, host, rtol=1e-6)
