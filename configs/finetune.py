"""Fine-tune released (or converted, or trained) weights on your own images: `configs/finetune.py`.

  python main.py --config=configs/finetune.py --workdir=runs/flowers \\
      --config.model=caformer_s18 --config.init_from=caformer_s18.sail_in22k_ft_in1k \\
      --config.data.folder=/data/flowers   # train/<label>/*.jpg, val/...

init_from is a released name (poolformer_jax.list_pretrained(); downloaded and converted once,
then cached), a directory written by convert_torch_weights.py, or a training workdir.

Any TFDS image-classification dataset works too: --config.data.dataset=oxford_flowers102
--config.data.train_split=train --config.data.eval_split=test. The model must match init_from's
architecture (--config.model=poolformer_m36 for M36 weights); a different number of classes gets
a new head, and the run says so.

Recipe (a common ImageNet-to-small-dataset transfer, not the paper's): 30 epochs, batch 256,
lr 1e-4 x batch / 256 with 2 warmup epochs, weight decay 0.05, label smoothing 0.1, the release's
augmentation without Mixup/CutMix. Time and accuracy depend on the dataset (the run logs both,
with an ETA); tests/test_reliability.py fine-tunes a released name on a small folder with it.
"""

from poolformer_jax import defaults


def get_config():
  c = defaults.default_config()
  c.model = "poolformer_s12"
  c.init_from = ""  # Set --config.init_from=NAME_OR_DIR (left empty: trains from scratch).
  c.data.dataset = "folder"
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 30.0
  c.warmup_epochs = 2.0
  c.cooldown_epochs = 0.0
  c.base_lr = 1e-4
  c.lr_base_batch_size = 256
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500
  return c
