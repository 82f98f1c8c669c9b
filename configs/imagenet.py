"""PoolFormer on ImageNet-1k with the release's recipe: `configs/imagenet.py:VARIANT`.

VARIANT is s12, s24, s36, m36 or m48. On a TPU VM (here a v4-32, 4 hosts: run on all workers):

  python main.py --config=configs/imagenet.py:s12 --workdir=gs://BUCKET/runs/s12 \\
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Recipe (the release, via timm): 300 epochs (5 warmup) + 10 cooldown at batch 4096, AdamW lr 4e-3
(1e-3 * batch / 1024), weight decay 0.05 on weights only, label smoothing 0.1, Mixup 0.8 / CutMix
1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, stochastic depth 0.1/0.1/0.2/0.3/0.4,
bfloat16 compute with float32 weights. With fewer chips keep batch 4096 with
--config.grad_accum_steps=K (same updates, K micro-batches per step).

Expected ImageNet top-1 (the released checkpoints, center crop 224 at crop_pct 0.9 for S and
0.95 for M): s12 77.2, s24 80.3, s36 81.4, m36 82.1, m48 82.5.

Expected time, an ESTIMATE (not measured): training costs ~3x the forward
FLOPs, i.e. 1.28M images x 310 epochs x 3 x (2 x MACs) = 4.3e18 FLOPs for S12 (1.8 GMACs) up to
2.8e19 for M48 (11.6 GMACs). PoolFormer is memory-bound (pooling, GroupNorm, GELU); at 15-25% MFU
a v4-32 (16 chips x 275 TFLOP/s) needs ~1-2 h for S12, 2-3.5 h S24, 3-5 h S36, 5.5-9 h M36,
7-12 h M48. S12 then needs ~60-100k images/s from the hosts' input pipelines (JPEG decode +
RandAugment, ~100-200 images/s per core), so it is likely input-bound there. The trainer logs
images/s/chip, MFU and an ETA: trust those over this paragraph.
"""

from poolformer_jax import train

_VARIANTS = {  # variant: eval crop_pct of the release
    "s12": 0.9, "s24": 0.9, "s36": 0.9, "m36": 0.95, "m48": 0.95,
}


def get_config(variant: str = "s12"):
  if variant not in _VARIANTS:
    raise ValueError(f"configs/imagenet.py takes one of {', '.join(_VARIANTS)}; got {variant!r}")
  c = train.default_config()  # The defaults ARE the release's recipe.
  c.model = f"poolformer_{variant}"
  c.data.crop_pct = _VARIANTS[variant]
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  # Short of memory (M variants, small chips)? Shard parameters and optimizer state over N chips
  # with --config.fsdp=N, and/or split each step with --config.grad_accum_steps=K.
  return c
