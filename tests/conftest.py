"""Every test process sees 8 simulated CPU devices (set before JAX starts) and compiles
without LLVM's expensive optimization passes; all tests (and the subprocesses that
take `cache_dir`) share one persistent compilation cache, so a program that several
tests build is compiled once (777 tests: 824 s without it, 774 s with it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# CPU devices only: with the CUDA plugin installed (the gpu-aot extra) and no local
# CUDA, JAX registers the plugin for compile-only devices only when cuda is excluded.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is mostly XLA compiling tiny programs for the CPU; LLVM's expensive
# passes are ~40% of it. The HLO passes (fusion, sharding, buffer assignment, the GPU
# scheduler) are unchanged: the same programs, slower machine code. Subprocesses that
# set their own XLA_FLAGS keep it through helpers.xla_flags.
FAST_COMPILE_FLAG = "--xla_llvm_disable_expensive_passes=true"
if "xla_llvm_disable_expensive_passes" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAG

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  import jax
  from helpers import shared_dir
  path = shared_dir(tmp_path_factory) / "hiermoe_jax_cache"
  path.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield path
  jax.config.update("jax_compilation_cache_dir", None)


# Deprecations are errors when our code triggers them, so the code stays ready for the
# next JAX releases (which remove what the current one deprecates). A warning's module
# is where `stacklevel` attributes it: JAX's own deprecation warnings (module-level
# `_deprecations`, `jax._src.deprecations.warn`) point at the caller, i.e. at the
# modules below, or inside jax itself; JAX's "will be an error" FutureWarnings (unsafe
# scatter casts, raw PRNG keys) point inside jax. Third-party code that calls a
# deprecated API (flax, optax, orbax, transformers) is attributed to itself and left
# alone.
DEPRECATION_ERROR_MODULES = ("jax", "hiermoe_jax", "models", "pallas_kernels", "scripts",
                             "test_", "helpers", "bruteforce", "conftest", "mp_worker_")


def pytest_configure(config):
  for module in DEPRECATION_ERROR_MODULES:
    config.addinivalue_line("filterwarnings", f"error::DeprecationWarning:{module}")
    config.addinivalue_line("filterwarnings", f"error::FutureWarning:{module}")
