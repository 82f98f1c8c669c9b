"""ImageNet-1k with the releases' recipes: `configs/imagenet.py:MODEL`.

MODEL is a model name (`poolformer_s12` ... `caformer_b36`, as `poolformer_jax.list_models()`
lists them); PoolFormer v1 also answers to its size alone (`s12` ... `m48`). `MODEL,smoke` is
the same recipe on a tiny version of MODEL's architecture on the digits dataset, for a
few-step run of the whole code path (the tests run one per family). On a TPU VM (here a v4-32,
4 hosts: run on all workers):

  python main.py --config=configs/imagenet.py:caformer_s18 \\
      --workdir=gs://BUCKET/runs/caformer_s18 --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Recipes (the releases', trained with timm): 300 epochs + 10 cooldown at batch 4096, weight decay
0.05 on weights only, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, stochastic depth rising linearly to the last block's
rate, bfloat16 compute with float32 weights. With fewer chips keep batch 4096 with
--config.grad_accum_steps=K (same updates, K micro-batches per step). Per family:

  family                                    optimizer  peak lr  warmup epochs
  PoolFormer (v1)                           AdamW      4e-3     5
  IdentityFormer, RandFormer, PoolFormerV2  AdamW      4e-3     5
  ConvFormer                                AdamW      4e-3     20
  CAFormer                                  LAMB       8e-3     20

LAMB is timm's (what CAFormer was trained with): eps 1e-6, the global gradient norm clipped to 1,
the trust ratio on decayed weights only. RandFormer trains at 224 only (its random matrices are
fixed for 14x14 and 7x7 maps).

Per model, the variant's own settings come from `poolformer_jax.model.VARIANTS`, the one table
of the architectures: the drop-path rate of the last block, the head dropout and the eval
crop_pct (resize to image_size / crop_pct, center crop). The README's variant table shows them
with each model's parameters, GMACs and released top-1 (tests/test_recipes.py holds it to
VARIANTS, benchmarks/results/macs_224.json and the released names' table).

Training time, an ESTIMATE: training costs ~3x the forward, 1.28M images x 310 epochs x 3 x 2
x MACs (4.3e18 FLOPs for S12 up to 5.5e19 for CAFormer-B36), on a v4-32 (16 chips x 275
TFLOP/s) at an assumed 15-25% MFU, i.e. ~0.6-1 h per GMAC. `--mode=compile` gives a better
bound from the compiled step (bytes, FLOPs and the hosts' input rate); the trainer logs
images/s/chip, MFU and an ETA: trust those over this estimate.
"""

from poolformer_jax import defaults
from poolformer_jax.model import VARIANTS

# family: (optimizer, peak lr at batch 4096, warmup epochs); the releases' training scripts.
_RECIPES = {
    "poolformer": ("adamw", 4e-3, 5.0),
    "identityformer": ("adamw", 4e-3, 5.0),
    "randformer": ("adamw", 4e-3, 5.0),
    "poolformerv2": ("adamw", 4e-3, 5.0),
    "convformer": ("adamw", 4e-3, 20.0),
    "caformer": ("lamb", 8e-3, 20.0),
}
_V1_SIZES = ("s12", "s24", "s36", "m36", "m48")


def _smoke(c, model_config) -> None:
  """The same recipe on a tiny version of the architecture, on digits, for a few steps."""
  c.model_overrides.depths = (1, 1, 1, 1)
  c.model_overrides.widths = (16, 32, 64, 64)  # 64: two attention heads of 32 (CAFormer)
  c.dtype = "float32"  # bfloat16 is emulated (slow) on CPUs.
  d = c.data
  d.dataset = "digits"
  d.eval_split = "test"
  # RandFormer's random matrices fix its input at 224; everything else runs on 32x32 digits.
  d.image_size = 224 if model_config.has_frozen_params else 32
  d.hflip = False
  d.cache = True
  d.shuffle_buffer = 2048
  c.batch_size = 16
  c.eval_batch_size = 120  # 360 test images: 3 full batches.
  c.total_steps = 4
  c.warmup_epochs = 0.05
  c.cooldown_epochs = 0.0
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 4


def get_config(arg: str = "poolformer_s12"):
  name, _, mode = arg.partition(",")
  name = f"poolformer_{name}" if name in _V1_SIZES else name
  if name not in VARIANTS or mode not in ("", "smoke"):
    raise ValueError(f"configs/imagenet.py takes MODEL or MODEL,smoke with MODEL one of "
                     f"{', '.join(sorted(VARIANTS))} (or s12 ... m48 for PoolFormer v1); "
                     f"got {arg!r}")
  model_config = VARIANTS[name]
  optimizer, lr, warmup = _RECIPES[name.split("_")[0]]
  c = defaults.default_config()  # The defaults are PoolFormer-S12's recipe; the rest is here.
  c.model = name
  # Stochastic depth and head dropout are the variant's (the releases' scripts): set here so
  # that the command line can change them (--config.model_overrides.drop_path_rate=0.2).
  c.model_overrides.drop_path_rate = model_config.drop_path_rate
  c.model_overrides.head_dropout = model_config.head_dropout
  c.optimizer = optimizer
  c.base_lr = lr  # at batch 4096; scaled linearly with --config.batch_size
  c.lr_base_batch_size = 4096
  c.warmup_epochs = warmup
  if optimizer == "lamb":  # timm's Lamb: eps 1e-6 and its built-in global-norm clip at 1.
    c.adam_eps = 1e-6
    c.grad_clip_norm = 1.0
  if model_config.has_frozen_params:
    c.data.image_size = 224
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  # Short of memory (M and B variants, small chips)? Shard parameters and optimizer state over N
  # chips with --config.fsdp=N, and/or split each step with --config.grad_accum_steps=K.
  if mode == "smoke":
    _smoke(c, model_config)
  return c
