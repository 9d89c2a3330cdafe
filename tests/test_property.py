"""Property-based: random valid configs, meshes and routings, every strategy against
the dense float32 reference (outputs and gradients), drops against the brute-force
simulation.

Examples are derandomized so CI is reproducible; each one compiles fresh shapes, so
their number is kept small.
"""

import hypothesis
import hypothesis.strategies as st
import jax

import hiermoe_jax as hm
from hiermoe_jax.config import STRATEGIES
from helpers import MESHES, bruteforce_kept, check_against_reference, mesh_of

SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow],
                               database=None)


@st.composite
def moe_cases(draw):
  """(config, mesh name, tokens per device, seed, router-bias scale)."""
  strategy = draw(st.sampled_from(STRATEGIES))
  mesh_name = draw(st.sampled_from(sorted(MESHES)))
  nodes, local = MESHES[mesh_name]
  devices = nodes * local
  num_experts = devices * draw(st.sampled_from([1, 2, 4]))
  router = draw(st.sampled_from(["softmax", "sigmoid_grouped"]))
  fields = dict(dispatch=strategy, d_model=draw(st.sampled_from([8, 16])), d_ff=draw(st.sampled_from([8, 24])),
                num_experts=num_experts, router=router,
                top_k=draw(st.integers(1, min(num_experts, 6))),
                norm_topk_prob=draw(st.booleans()),
                n_shared_experts=draw(st.integers(0, 1)))
  if router == "sigmoid_grouped":
    n_group = draw(st.sampled_from([g for g in (1, 2, 4) if num_experts % g == 0]))
    topk_group = draw(st.integers(1, n_group))
    fields.update(n_group=n_group, topk_group=topk_group,
                  top_k=min(fields["top_k"], topk_group * num_experts // n_group),
                  routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
  if draw(st.booleans()):
    fields["dropless"] = True
  else:
    fields["capacity_factor"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
  config = hm.MoEConfig(**fields)
  return (config, mesh_name, draw(st.integers(1, 12)), draw(st.integers(0, 2**16)),
          draw(st.sampled_from([0.0, 0.1, 3.0])))


@SETTINGS
@hypothesis.given(case=moe_cases())
def test_random_config_matches_reference(case):
  config, mesh_name, tokens, seed, bias_scale = case
  mesh = mesh_of(mesh_name)
  kept_fn = None
  if not config.dropless:
    brute = bruteforce_kept(config, mesh, tokens)
    kept_fn = lambda *a: brute(*a)[0]  # noqa: E731
  check_against_reference(config, mesh, tokens_per_device=tokens, seed=seed, kept_fn=kept_fn,
                          bias_scale=bias_scale)
  jax.clear_caches()  # every example compiles new shapes; do not let them pile up
