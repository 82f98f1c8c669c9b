"""One process of the multi-host test: a few train steps on a fixed global batch, then a save.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
  python tests/multihost_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Every process builds the same global batches from a fixed seed and hands JAX only its own rows,
as the input pipeline does; the step runs sharded over the devices of all processes.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from poolformer_jax import checkpointing, defaults, sharding, train  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS, BATCH = 3, 16


def main(out_dir, num_processes, process_id, port):
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  config = defaults.default_config()
  config.model_overrides.depths, config.model_overrides.widths = (1, 1, 1, 1), (8, 16, 24, 32)
  config.model_overrides.drop_path_rate = 0.2
  config.dtype, config.batch_size, config.base_lr, config.lr_base_batch_size = "float32", BATCH, 1e-3, BATCH
  config.data.image_size = 32
  trainer = train.Trainer(config, sharding.make_mesh(1), 10, steps_per_epoch=2, total_steps=4)
  state = trainer.init_state(0)
  step = trainer.compile_train_step()
  rng = np.random.default_rng(0)
  rows = slice(process_id * BATCH // num_processes, (process_id + 1) * BATCH // num_processes)
  for _ in range(STEPS):
    batch = {"image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, BATCH).astype(np.int32)}
    local = {k: v[rows] for k, v in batch.items()}
    state, metrics = step(state, sharding.global_batch(local, trainer.batch_sharding))
  ckpt = checkpointing.Checkpointer(out_dir)
  ckpt.save(STEPS, state.checkpoint_items())
  ckpt.wait_until_finished()
  ckpt.close()
  print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
        f"loss {float(metrics['loss']):.6f}")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
