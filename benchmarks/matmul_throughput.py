"""GFLOP/s of XLA:CPU vs PyTorch on PoolFormer-S12's MLP matmuls (why the CPU targets are missed).

  python benchmarks/matmul_throughput.py [--batch 8] [--repeats 30]

The 1x1-conv MLPs are dense layers over B*H*W tokens: per stage, tokens x C -> 4C and back.
Each shape is timed for both frameworks, one after the other, median of `repeats`, float32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

WIDTHS = (64, 128, 320, 512)
GRIDS = (56, 28, 14, 7)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  matmul = jax.jit(lambda a, b: a @ b)
  print(f"{'M x K x N':>22} {'XLA GFLOP/s':>12} {'torch GFLOP/s':>14} {'ratio':>6}")
  for width, grid in zip(WIDTHS, GRIDS):
    m = args.batch * grid * grid
    for k, n in ((width, 4 * width), (4 * width, width)):
      a = np.random.default_rng(0).normal(size=(m, k)).astype(np.float32)
      b = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
      ja, jb = jax.device_put(a), jax.device_put(b)
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      runs = {"xla": lambda: matmul(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
      # One framework at a time (A A A ... B B B), not interleaved: PyTorch's OpenMP workers
      # spin for a while after each op and would take cores from an XLA call right after it.
      times = {name: [] for name in runs}
      for name, fn in runs.items():
        for i in range(args.repeats + 3):
          t0 = time.perf_counter()
          fn()
          if i >= 3:  # Warm-up.
            times[name].append(time.perf_counter() - t0)
      gflops = {name: 2 * m * k * n / np.median(t) / 1e9 for name, t in times.items()}
      print(f"{f'{m} x {k} x {n}':>22} {gflops['xla']:12.0f} {gflops['torch']:14.0f} "
            f"{gflops['xla'] / gflops['torch']:6.2f}")


if __name__ == "__main__":
  main()
