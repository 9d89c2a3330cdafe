"""Runs a command as N processes of one multi-process JAX job (see hiermoe_jax.cluster.launcher).

  python scripts/launch.py --processes 2 --local-devices 4 [--inter-node-rate 1gbit] \
      [--port P] [--timeout S] [--dead-host-timeout S] [--keep-going] -- python my_script.py
"""

import sys

from hiermoe_jax.cluster.launcher import main

if __name__ == "__main__":
  sys.exit(main())
