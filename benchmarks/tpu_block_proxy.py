"""A fast proxy for the TPU train step: a few real MetaFormer blocks, compiled for one TPU chip.

  python benchmarks/tpu_block_proxy.py --stages 1 3 [--model caformer_s18] [--part mix|mlp]
                                       [--eval] [--remat full|dots_saveable] [--topology v5e-8]

Builds `--blocks` real `MetaFormerBlock`s of `--model` at one stage's shapes (224 px input:
stage 1 is 56x56 at the variant's first width ... stage 4 is 7x7), bfloat16 compute (`--dtype`),
and compiles their forward and backward (or forward only with --eval) for one chip of
`--topology` (default a v4) at `--batch` images, in seconds instead of the minutes of the whole
step. `--part` keeps one half of each block: `mix` (norm, token mixer, scales, residual) or
`mlp` (norm, MLP, scales, residual); where the bytes of a block go. It lowers them under a
one-chip TPU mesh, as the trainer does, so the blocks take their TPU kernels
(`poolformer_jax/mlp_kernel.py`, `attention_kernel.py`) where those fit. Prints XLA's bytes
accessed per image and block, also in units of one bfloat16 copy of the block's input map
(u). This is how each change to `poolformer_jax/ops.py` and the kernels was tried
(benchmarks/results/tpu_ablations.md). Needs libtpu, no TPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from poolformer_jax import measure as measure_lib  # pylint: disable=wrong-import-position
from poolformer_jax import tpu_compile  # pylint: disable=wrong-import-position

STAGES = (1, 2, 3, 4)
PARTS = {"block": "__call__", "mix": "mix", "mlp": "channel_mlp"}  # MetaFormerBlock's methods


def measure(stage: int, *, blocks: int, batch: int, train: bool, remat: str | None,
            hlo_dir: str | None = None, dtype: str = "bfloat16", model: str = "poolformer_s12",
            part: str = "block", topology: str = "v4-8") -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from poolformer_jax import mlp_kernel  # pylint: disable=g-import-not-at-top
  from poolformer_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from poolformer_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  device = tpu_compile.topology_devices(tpu_compile.parse_topology(topology))[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  mesh = sharding_lib.make_mesh(1, [device])
  kernels = mlp_kernel.for_mesh(mesh, sharding_lib.BATCH_AXES)  # as the trainer chooses them
  cfg = model_lib.get_config(model)
  width, res = cfg.widths[stage - 1], 224 // 2 ** (stage + 1)
  compute = jnp.dtype(dtype)
  layers = nnx.List([model_lib.MetaFormerBlock(width, cfg, stage - 1, 0.05, dtype=compute,
                                               param_dtype=jnp.float32, rngs=nnx.Rngs(i),
                                               kernels=kernels)
                     for i in range(blocks)])
  graphdef, params = nnx.split(layers)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  params = jax.tree.map(lambda p: spec(p.shape, p.dtype), params)
  x = spec((batch, res, res, width), compute)

  def forward(params, x, key):
    run = lambda block, x, k: getattr(block, PARTS[part])(x, k)
    if remat:
      policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
      run = nnx.remat(run, policy=policy)
    for i, block in enumerate(nnx.merge(graphdef, params)):
      x = run(block, x, None if key is None else jax.random.fold_in(key, i))
    return x

  if train:
    def step(params, x, cotangent, key):
      _, vjp = jax.vjp(lambda p, x: forward(p, x, key), params, x)
      return vjp(cotangent)
    key = spec((), jax.random.key(0).dtype)
    lowered = jax.jit(step).lower(params, x, x, key)
  else:
    lowered = jax.jit(lambda p, x: forward(p, x, None)).lower(params, x)
  compiled, compile_s = measure_lib.stopwatch(lowered.compile)
  cost = measure_lib.program_cost(compiled).per(batch * blocks)
  per_block_image = cost.bytes_accessed
  result = {
      "model": model, "topology": topology, "part": part,
      "mixer": cfg.stage_token_mixers[stage - 1], "stage": stage, "blocks": blocks,
      "batch": batch, "train": train, "remat": remat,
      "dtype": dtype, "kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
      "compile_s": round(compile_s, 1),
      "MB_per_image_block": round(per_block_image / 1e6, 3),
      "u_per_block": round(per_block_image / (res * res * width * 2), 1),
      "GFLOP_per_image_block": round(cost.flops / 1e9, 4),
      "peak_MB_per_image": round(compiled.memory_analysis().peak_memory_in_bytes / batch / 1e6, 2),
  }
  if hlo_dir:
    path = pathlib.Path(hlo_dir) / (f"{model}_{part}_stage{stage}_"
                                    f"{'train' if train else 'eval'}.hlo.txt")
    path.write_text(compiled.as_text())
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages", type=int, nargs="+", default=[1, 3], choices=STAGES)
  parser.add_argument("--model", default="poolformer_s12", help="any registered variant")
  parser.add_argument("--part", default="block", choices=sorted(PARTS),
                      help="the whole block, or one half of it")
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--eval", action="store_true", help="forward only")
  parser.add_argument("--remat", help="'full' or a jax.checkpoint_policies name")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (bfloat16, float32)")
  parser.add_argument("--topology", default="v4-8", help="a chip of this slice")
  parser.add_argument("--hlo-dir", help="also write the optimized HLO of each program here")
  args = parser.parse_args()
  tpu_compile.prepare_environment(tpu_compile.parse_topology(args.topology))
  for stage in args.stages:
    print(json.dumps(measure(stage, blocks=args.blocks, batch=args.batch, train=not args.eval,
                             remat=args.remat, hlo_dir=args.hlo_dir, dtype=args.dtype,
                             model=args.model, part=args.part, topology=args.topology)),
          flush=True)


if __name__ == "__main__":
  main()
