"""One process of the dead-host test (run through `scripts/launch.py --keep-going`).

  python scripts/launch.py --processes 3 --local-devices 1 --keep-going \
      --dead-host-timeout S -- python tests/mp_worker_dead_host.py

Once all processes are up, the last one SIGKILLs itself. Process 0 then runs
collectives over all devices (the first one fails or blocks); the others wait
between steps. Nobody stops the survivors but `hiermoe_jax.cluster.distributed`'s watchdog.
"""

import os
import signal
import time


def main() -> None:
  from hiermoe_jax.cluster import distributed
  distributed.initialize()

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  me, last = jax.process_index(), jax.process_count() - 1
  multihost_utils.sync_global_devices("all up")
  if me == last:
    os.kill(os.getpid(), signal.SIGKILL)
  print(f"process {me}: {'in collectives' if me == 0 else 'between steps'}", flush=True)
  step = 0
  while True:
    if me == 0:
      multihost_utils.process_allgather(np.full(2, step), tiled=True)
    else:
      time.sleep(1)
    step += 1


if __name__ == "__main__":
  main()
