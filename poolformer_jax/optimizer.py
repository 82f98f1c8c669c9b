"""The release's optimizer: AdamW with a weight-decay mask, warmup + cosine + cooldown, from optax.

Recipe (PoolFormer v1, via timm): AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.05 on weights
only (no decay on parameters with ndim <= 1: norms, layer scales, biases); lr = base_lr * batch /
1024; linear warmup from warmup_lr, cosine down to min_lr, then a constant cooldown at min_lr.
The schedule is per step (timm's default steps per epoch); the shape is the same.

Frozen parameters (RandFormer's random mixing matrices) are in the parameter tree, so they are
checkpointed and loaded with the rest, but get no update, no optimizer state and no weight decay.
"""

from __future__ import annotations

import jax
import optax

from poolformer_jax import model as model_lib


def decay_mask(params):
  """True where weight decay applies: conv kernels and dense weights (ndim > 1) only."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def peak_learning_rate(config) -> float:
  """`base_lr` scaled linearly with the global batch (the release's lr = 1e-3 * batch / 1024)."""
  return config.base_lr * config.batch_size / config.lr_base_batch_size


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """Warmup from `warmup_lr` to the peak, cosine to `min_lr`, then `cooldown_epochs` at `min_lr`."""
  total = total_steps(config, steps_per_epoch)
  warmup = round(config.warmup_epochs * steps_per_epoch)
  cooldown = round(config.cooldown_epochs * steps_per_epoch)
  decay_end = max(total - cooldown, warmup + 1)
  main = optax.warmup_cosine_decay_schedule(
      init_value=config.warmup_lr, peak_value=peak_learning_rate(config),
      warmup_steps=warmup, decay_steps=decay_end, end_value=config.min_lr)
  return optax.join_schedules([main, optax.constant_schedule(config.min_lr)], [decay_end])


def total_steps(config, steps_per_epoch: int) -> int:
  """Optimizer steps of the whole run: `total_steps` if set, else epochs (cooldown included)."""
  if config.get("total_steps"):
    return int(config.total_steps)
  return round((config.num_epochs + config.cooldown_epochs) * steps_per_epoch)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with the decay mask, optionally after global-norm gradient clipping.

  For a model with frozen parameters (`config.model` with `config.model_overrides`) the whole
  chain sees only the trainable ones; the frozen ones get `set_to_zero` (no state).
  """
  tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  model_config = model_lib.get_config(config.model, **config.model_overrides.to_dict())
  if model_config.has_frozen_params:
    tx = skip_frozen(tx)
  return tx


def skip_frozen(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the trainable parameters; zero updates and no state for the frozen ones."""
  def labels(params):
    return jax.tree.map(lambda frozen: "frozen" if frozen else "trainable",
                        model_lib.frozen_mask(params))

  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
