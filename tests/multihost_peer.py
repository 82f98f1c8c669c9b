"""One process of a job that loses a peer: it joins through `poolformer_jax.multihost` (the
parent/child pair main.py uses), then sums an array sharded over all processes' devices, step
after step, until told to stop or until it loses a peer.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
  python tests/multihost_peer.py PORT PROCESS_ID HEARTBEAT_TIMEOUT_S STEP_FILE
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from poolformer_jax import multihost  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(port, process_id, heartbeat_timeout_s, step_file):
  address = f"127.0.0.1:{port}"
  if not multihost.supervised():
    multihost.supervise(coordinator_address=address, initialization_timeout_s=60)  # No return.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  multihost.initialize(address, 2, process_id, initialization_timeout_s=60,
                       heartbeat_timeout_s=heartbeat_timeout_s, shutdown_timeout_s=60)
  sharding = jax.sharding.NamedSharding(jax.make_mesh((jax.device_count(),), ("d",)),
                                        jax.sharding.PartitionSpec("d"))
  x = jax.make_array_from_callback((64,), sharding, lambda idx: np.ones(64, np.float32)[idx])
  total = jax.jit(lambda x: x.sum())
  for step in range(1, 10**6):
    multihost.report_step(step)
    assert float(total(x)) == 64.0  # Needs every process: blocks if one is gone.
    with open(step_file, "w") as f:
      f.write(str(step))
    time.sleep(0.1)
  return 0


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
