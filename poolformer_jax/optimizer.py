"""The releases' optimizers: AdamW or LAMB with a weight-decay mask, warmup + cosine + cooldown,
from optax.

Recipe (PoolFormer v1 and the MetaFormer baselines, via timm): AdamW betas (0.9, 0.999), eps
1e-8, weight decay 0.05 on weights only (no decay on parameters with ndim <= 1: norms, layer
and res scales, StarReLU scalars, biases); CAFormer uses timm's LAMB instead (`lamb`). lr =
base_lr * batch / lr_base_batch_size; linear warmup from warmup_lr, cosine down to min_lr, then a
constant cooldown at min_lr. The schedule is per step (timm's default steps per epoch); the
shape is the same.

Frozen parameters (RandFormer's random mixing matrices) are in the parameter tree, so they are
checkpointed and loaded with the rest, but get no update, no optimizer state and no weight decay.
"""

from __future__ import annotations

import jax
import optax

from poolformer_jax import model as model_lib
from poolformer_jax.errors import ConfigError


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


def lamb(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, eps: float,
         weight_decay: float, mask) -> optax.GradientTransformation:
  """LAMB as timm's `Lamb` (the release's CAFormer optimizer): Adam's step plus decoupled weight
  decay, rescaled per tensor by the trust ratio |w| / |step|, which timm applies only to the
  tensors that weight decay applies to (`mask`); the others take the plain Adam step.

  Not `optax.lamb`, which applies the trust ratio to every tensor (norm gains and biases too).
  timm's Lamb also clips the global gradient norm to 1 before all this: that is
  `config.grad_clip_norm` (1.0 in the CAFormer recipe).
  """
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask),
      optax.masked(optax.scale_by_trust_ratio(), mask),
      optax.scale_by_learning_rate(learning_rate),
  )


OPTIMIZERS = {"adamw": optax.adamw, "lamb": lamb}


def check_optimizer(name: str) -> None:
  """The one check of `config.optimizer`, at validation and when the optimizer is built."""
  if name not in OPTIMIZERS:
    raise ConfigError(f"config.optimizer={name!r}; use one of {list(OPTIMIZERS)}")


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """`config.optimizer` (AdamW or LAMB) with the decay mask, optionally after global-norm
  gradient clipping.

  For a model with frozen parameters (`config.model` with `config.model_overrides`) the whole
  chain sees only the trainable ones; the frozen ones get `set_to_zero` (no state).
  """
  check_optimizer(config.optimizer)
  make = OPTIMIZERS[config.optimizer]
  tx = make(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
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
