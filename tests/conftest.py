"""Every test process sees 8 simulated CPU devices (set before JAX starts); the
trainer tests share one persistent compilation cache (`cache_dir`)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  import jax
  from helpers import shared_dir
  path = shared_dir(tmp_path_factory) / "hiermoe_jax_cache"
  path.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
