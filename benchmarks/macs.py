"""Parameters and multiply-accumulates of every registered model, as the README's table gives them.

  python benchmarks/macs.py [--image-size 224] [--models caformer_s18 ...] [--json out.json]

MACs are XLA's count, not a hand count: the HLO cost analysis of the jitted forward pass
(batch 1, float32, before XLA's optimisations; nothing is compiled or run), FLOPs / 2. It counts
every operation (norms, activations, pooling, softmax), not only convolutions and matmuls, so it
runs slightly above the papers' counts: PoolFormer-S12 1.82G here, 1.8G in its paper.
Parameters are `count_params` (RandFormer's frozen matrices included, as in the release).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import poolformer_jax as pj  # pylint: disable=g-import-not-at-top,wrong-import-position
from poolformer_jax import measure  # pylint: disable=g-import-not-at-top,wrong-import-position


def macs(name: str, image_size: int) -> tuple[int, float]:
  """(parameters, MACs) of `name`'s forward pass on one image_size x image_size image."""
  model = nnx.eval_shape(lambda: pj.create_model(name, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  lowered = forward.lower(state, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  return pj.count_params(model), measure.program_cost(lowered).flops / 2


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--models", nargs="+", default=pj.list_models())
  p.add_argument("--json", default=None, help="also write {model: {params, macs}} here")
  args = p.parse_args(argv)
  results = {}
  print(f"| model | params | GMACs @{args.image_size} |\n|---|---|---|")
  for name in args.models:
    params, count = macs(name, args.image_size)
    results[name] = {"params": params, "macs": count}
    print(f"| `{name}` | {params:,} | {count / 1e9:.2f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"image_size": args.image_size, "models": results}, f, indent=2)


if __name__ == "__main__":
  main()
