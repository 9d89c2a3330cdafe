"""Every test process sees 8 simulated CPU devices (set before JAX starts)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
