"""The embedded default: a PoolFormer-S12 on scikit-learn's handwritten digits, on a CPU.

  python main.py                                   # = --config=configs/demo.py --workdir=workdir/demo
  python main.py --config=configs/demo.py:smoke    # a ~1-minute smoke run of the same code

Real data that ships with scikit-learn (1797 8x8 scans of handwritten digits: 1437 train, 360
test), turned into a TFDS dataset offline by poolformer_jax.datasets.digits, upscaled to 32x32,
then exactly the ImageNet code path: TFDS input pipeline with random-resized crop, RandAugment
and stochastic depth, the sharded train step, Orbax checkpoints, evaluation, metrics.jsonl.
Flips are off (a mirrored 2 is not a 2) and so are Mixup/CutMix (8x8 digits are too small).

Expected on a 2-core CPU (float32): about 3 minutes, test top-1 ~0.99 (measured 0.9889 in
3 min 7 s on a 2-core AMD EPYC; tests hold it to >= 0.97).
"""

from poolformer_jax import defaults


def get_config(arg: str = ""):
  c = defaults.default_config()
  c.model = "poolformer_s12"  # The real S12 architecture; 32x32 inputs -> a 1x1 final map.
  c.dtype = "float32"  # bfloat16 is emulated (slow) on CPUs.

  d = c.data
  d.dataset = "digits"
  d.eval_split = "test"
  d.image_size = 32
  d.crop_pct = 1.0  # Eval: the whole (upscaled) digit.
  d.rrc_scale = (0.7, 1.0)
  d.hflip = False
  d.randaugment = "rand-n1-m5-mstd0.5-inc1"  # One op per image: 8x8 digits are fragile.
  d.random_erasing = 0.0
  d.cache = True
  d.shuffle_buffer = 2048

  c.batch_size = 64
  c.eval_batch_size = 120  # 360 test images: 3 full batches.
  c.num_epochs = 20.0  # 22 steps per epoch: 440 steps.
  c.cooldown_epochs = 0.0
  c.warmup_epochs = 1.0
  c.base_lr = 3e-3
  c.lr_base_batch_size = 64
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.log_every_steps = 22
  c.eval_every_steps = 110
  c.checkpoint_every_steps = 110

  if arg == "smoke":  # Same pipeline and model family, tiny: for tests and a first look.
    c.model_overrides.depths = (1, 1, 1, 1)
    c.model_overrides.widths = (16, 32, 48, 64)
    c.total_steps = 40
    c.warmup_epochs = 0.2
    c.log_every_steps = 10
    c.eval_every_steps = 20
    c.checkpoint_every_steps = 20
  elif arg:
    raise ValueError(f"configs/demo.py takes '' or 'smoke', got {arg!r}")
  return c
