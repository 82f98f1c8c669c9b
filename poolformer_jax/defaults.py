"""The defaults every run starts from: PoolFormer-S12's ImageNet-1k recipe of the release.

The experiment configs in configs/ start from `default_config()` and change what their
experiment needs; they import this module, not the trainer. What a config leaves to the model
(the eval crop) is filled in from the model's variant by `with_model_defaults`, so that it is
written once, in `model.VARIANTS`.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from poolformer_jax import model as model_lib
from poolformer_jax import pretrained


def default_config() -> ml_collections.ConfigDict:
  """The PoolFormer-S12 ImageNet-1k recipe of the release; configs/ override it.

  Numeric options use 0 / '' for "off" (not None) so that every field can be overridden from
  the command line (`--config.ema_decay=0.9999`).
  """
  c = ml_collections.ConfigDict()
  c.model = "poolformer_s12"
  c.model_overrides = ml_collections.ConfigDict()  # MetaFormerConfig fields, e.g. token_mixer.
  c.num_classes = 0  # 0: from the dataset.
  c.dtype = "bfloat16"  # Compute dtype; parameters and optimizer state stay float32.
  # 'auto': the TPU training kernels (poolformer_jax/mlp_kernel.py) where they fit; 'xla': none.
  c.kernels = "auto"
  c.remat = False  # Recompute each block's activations in the backward pass: less memory.
  c.remat_stages = ()  # With remat: only these stages (1-4), e.g. (1, 2); (): every stage.
  c.matmul_precision = "default"  # 'highest' for float32-exact matmuls (parity checks).

  # Data (poolformer_jax.input_pipeline): ImageNet-1k with timm's train/eval transforms.
  c.data = d = ml_collections.ConfigDict()
  d.dataset = "imagenet2012"  # 'imagenet2012' | 'digits' | any TFDS name | 'folder'.
  # Optional strings are typed placeholders (None until set), settable from the command line.
  d.data_dir = placeholder(str)  # TFDS data dir (None: TFDS default, ~/tensorflow_datasets).
  d.manual_dir = placeholder(str)  # ILSVRC2012_img_{train,val}.tar (None: <data_dir>/downloads/manual).
  d.prepare = False  # Run download_and_prepare for a TFDS dataset that is not prepared yet.
  d.folder = placeholder(str)  # Root of <split>/<label>/*.jpg when dataset == 'folder'.
  # Folder datasets: every file is decoded once before training (poolformer_jax.folder_scan)
  # and the run reads the checked list from here (None: WORKDIR/data_manifest).
  d.manifest_dir = placeholder(str)
  d.max_bad_train_fraction = 0.001  # Undecodable train files left out; more is an error.
  d.max_bad_eval_fraction = 0.0  # Eval: any undecodable file is an error (every image counts).
  d.image_key = placeholder(str)  # Feature names; None: the dataset's supervised_keys.
  d.label_key = placeholder(str)
  d.train_split = "train"
  d.eval_split = "validation"
  d.image_size = 224
  # Eval: resize the short side to floor(image_size / crop_pct), then center-crop image_size.
  # None: the release's crop for config.model (its variant's crop_pct; see with_model_defaults).
  d.crop_pct = placeholder(float)
  d.interpolation = "bicubic"  # Eval resize.
  d.train_interpolation = "random"  # 'random' (bilinear or bicubic per image, as timm), 'bilinear', 'bicubic'.
  d.mean = pretrained.IMAGENET_MEAN  # In 0..1 pixel scale.
  d.std = pretrained.IMAGENET_STD
  d.rrc_scale = placeholder(tuple)  # Random-resized-crop area range; None: no crop, resize whole.
  d.rrc_scale = (0.08, 1.0)
  d.rrc_ratio = (3.0 / 4.0, 4.0 / 3.0)
  d.hflip = True
  d.randaugment = "rand-m9-mstd0.5-inc1"  # timm policy string; None or '' disables.
  # 'host' (tf.data, poolformer_jax.tf_augment) or 'device' (the train step, poolformer_jax.augment:
  # frees the host, but its per-sample warps are costly gathers on TPUs; see augment.py).
  d.randaugment_on = "host"
  d.random_erasing = 0.25  # Probability (pixel mode, after normalisation; on the device); 0 disables.
  d.shuffle_buffer = 16_384  # Encoded images; ImageNet JPEGs average ~110 KB.
  d.prefetch = 2  # Batches prefetched by tf.data.
  d.cache = False  # Keep the encoded split in host memory (small datasets).
  d.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE.

  c.seed = 0
  c.batch_size = 4096  # Global: split over all chips and processes.
  c.grad_accum_steps = 1  # Micro-batches per step: batch 4096 on fewer chips, same update.
  c.eval_batch_size = 1024
  c.num_epochs = 300.0  # Cosine part (warmup included)...
  c.cooldown_epochs = 10.0  # ...then this many epochs at min_lr.
  c.total_steps = 0  # > 0 overrides the epoch count (smoke runs).
  c.warmup_epochs = 5.0
  c.base_lr = 1e-3  # lr = base_lr * batch_size / lr_base_batch_size.
  c.lr_base_batch_size = 1024
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  c.optimizer = "adamw"  # 'adamw' | 'lamb' (timm's LAMB: the CAFormer recipe).
  c.weight_decay = 0.05  # Weights only: no decay on norms, layer scales, biases.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 0.0  # 0: no clipping (the release clips nothing).
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.ema_decay = 0.0  # > 0: also keep and evaluate an EMA of the weights.

  c.fsdp = 1  # Chips per parameter shard (1: pure data parallelism).
  c.topology = ""  # --mode=compile: the Cloud TPU slice to compile for, e.g. 'v4-8'.
  c.num_slices = 1  # --mode=compile: that many slices (multislice over the data-center network).
  # --mode=compile: the input pipeline's training images/s on one host vCPU (benchmarks/
  # pipeline.py on the TPU VM); 0: the figure measured here (tpu_compile).
  c.host_images_per_s_per_vcpu = 0.0
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: once per epoch (and always at the end).
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.checkpoint_fallback = False  # Restore the newest step that verifies if the latest is corrupt.
  # Start from: a converted model / pretrained dir, a training workdir, or released weights by
  # name ('caformer_s18.sail_in1k', 'hf-hub:sail/poolformer_s12'; downloaded once, cached).
  c.init_from = ""
  return c


def with_model_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, or a copy of it with data.crop_pct (None) set to the release's eval crop for
  config.model. The trainer calls it after validation; so does any script that hands a
  config's data part to the input pipeline itself."""
  if config.data.crop_pct is not None:
    return config
  config = config.copy_and_resolve_references()
  config.data.crop_pct = model_lib.VARIANTS[config.model].crop_pct
  return config
