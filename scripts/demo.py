"""A short demo: one MoE block on 8 simulated CPU devices as a 2x4 mesh.

Runs every dispatch strategy on the same tokens, checks each against the dense
float32 reference and prints what crossed each tier.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hiermoe_jax as hm  # noqa: E402
import hiermoe_jax.config  # noqa: E402


def main():
  mesh = hm.make_mesh(nodes=2, local=4)
  print(f"mesh: {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices")
  base = hm.MoEConfig(d_model=64, d_ff=128, num_experts=32, top_k=8, dropless=True)
  params = hm.init_params(jax.random.key(0), base, mesh)
  x = jax.random.normal(jax.random.key(1), (8, 64, base.d_model))  # 64 tokens per device
  ref = hm.reference_moe(params, x, base)
  print(f"{'strategy':<16}{'max |y-ref|':>12}{'inter rows':>12}{'intra rows':>12}{'dropped':>9}")
  for name in hm.config.DISPATCH:
    config = base.replace(dispatch=name)
    y, aux = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh))(params, x)
    err = float(jnp.max(jnp.abs(y - ref)))
    label = name if name != "auto" else f"auto:{aux.strategy_ran()}"
    print(f"{label:<16}{err:>12.2e}{int(aux.rows['inter']):>12}{int(aux.rows['intra']):>12}"
          f"{int(aux.dropped):>9}")
  print(f"dedup rate: node {float(aux.dedup_rate['node']):.3f}, "
        f"device {float(aux.dedup_rate['device']):.3f}")


if __name__ == "__main__":
  main()
