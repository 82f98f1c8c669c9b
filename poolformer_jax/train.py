"""The trainer: one program for a laptop CPU, a GPU, a TPU VM and a TPU pod.

`train_and_evaluate(config, workdir)` reads like a checklist (big_vision style): validate, mesh,
data, model and optimizer, sharded state (restored or initialised), compiled steps, then the loop
with logging, evaluation, checkpoints and preemption. `evaluate(config, workdir)` scores a
checkpoint or a converted model on the eval split.

Design points:
  * The train step is a pure function of (state, batch): stochastic depth and Mixup draw from
    keys folded from (seed, step), the data stream is a pure function of (seed, step), so a
    resumed run reproduces an uninterrupted one exactly.
  * One `jax.jit` per step with explicit in/out shardings and the state donated; compiled ahead
    of time, so it can never retrace (a changed shape is an error, not a silent recompile), and
    its FLOPs come from XLA's cost analysis (for MFU).
  * TensorFlow is the input pipeline's alone: building and compiling the steps, checkpoints and
    metrics need none of it (`input_pipeline` is imported when the first batch is made).
  * The NNX model is split once into a static graph and a plain dict of parameters, and merged
    inside the step (the Flax performance guide's pattern).
  * The host reads step n-1's metrics after dispatching step n, so the accelerator never waits
    on the host, and a NaN/inf stops the run one step later, before anything is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import signal
import threading
import uuid
from typing import Any

from absl import logging
from etils import epath
from etils import epy
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from poolformer_jax import augment
from poolformer_jax import checkpointing
from poolformer_jax import chips
from poolformer_jax import cpu_tuning
from poolformer_jax import dataset_info
from poolformer_jax import defaults
from poolformer_jax import hub
from poolformer_jax import measure
from poolformer_jax import metrics as metrics_lib
from poolformer_jax import mixup
from poolformer_jax import mlp_kernel
from poolformer_jax import model as model_lib
from poolformer_jax import multihost
from poolformer_jax import optimizer as optimizer_lib
from poolformer_jax import pretrained
from poolformer_jax import sharding as sharding_lib
from poolformer_jax.errors import CheckpointError, ConfigError, Error

with epy.lazy_imports():  # TensorFlow: imported at the first use, when batches are made.
  from poolformer_jax import input_pipeline

# Exit code of a run stopped by SIGTERM after saving (BSD's EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75


class TrainingDivergedError(Error):
  """The loss or the gradients became NaN/inf; nothing after the last good step is saved."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM was received; a checkpoint was saved at `step` (None: before the first step,
  nothing new to save)."""

  def __init__(self, step: int | None):
    if step is None:
      message = ("preempted before the first training step: nothing saved; rerun the same "
                 "command")
    else:
      message = f"preempted at step {step}: checkpoint saved; rerun the same command to resume"
    super().__init__(message)
    self.step = step


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def validate_config(config, *, workdir: str | None, num_devices: int,
                    process_count: int) -> None:
  """Every check that needs no data and no compilation; raises ConfigError with the fix."""
  if config.model not in model_lib.VARIANTS:
    raise ConfigError(f"unknown model {config.model!r}; valid: {', '.join(model_lib.list_models())}")
  try:
    model_config = model_lib.get_config(config.model, **config.model_overrides.to_dict())
  except ValueError as e:
    raise ConfigError(f"config.model_overrides: {e}") from None
  stages = len(model_config.depths)
  if not set(config.get("remat_stages", ())) <= set(range(1, stages + 1)):
    raise ConfigError(f"config.remat_stages={tuple(config.remat_stages)}: the model's stages "
                      f"are 1-{stages}, e.g. --config.remat_stages='(1, 2)'")
  optimizer_lib.check_optimizer(config.optimizer)
  if config.data.randaugment:
    augment.parse_randaugment(config.data.randaugment, mean=config.data.mean)
  if config.data.randaugment_on not in ("host", "device"):
    raise ConfigError(f"config.data.randaugment_on={config.data.randaugment_on!r}; use 'host' "
                      "or 'device'")
  if config.kernels not in mlp_kernel.KERNEL_OPTIONS:
    raise ConfigError(f"config.kernels={config.kernels!r}; use 'auto' (the TPU kernels where "
                      "they fit) or 'xla' (XLA only)")
  if config.dtype not in _DTYPES:
    raise ConfigError(f"config.dtype={config.dtype!r}; use one of {sorted(_DTYPES)}")
  size = config.data.image_size
  if size <= 0 or size % 32:
    raise ConfigError(f"config.data.image_size={size} must be a positive multiple of 32 "
                      "(the network downsamples by 32), e.g. 224 or 256")
  crop = config.data.crop_pct
  if crop is not None and not 0 < crop <= 1:
    raise ConfigError(f"config.data.crop_pct={crop} must be in (0, 1] (the eval crop's share of "
                      "the resized short side), e.g. 0.9; unset, it is the model's")
  fixed = model_lib.RANDOM_MIXING_INPUT_SIZE
  if "random" in model_config.stage_token_mixers and size != fixed:
    raise ConfigError(f"config.data.image_size={size}, but {config.model} mixes tokens with "
                      f"fixed random matrices drawn for {fixed}x{fixed} input: set "
                      f"--config.data.image_size={fixed}")
  if config.fsdp < 1 or num_devices % config.fsdp:
    raise ConfigError(f"config.fsdp={config.fsdp} must divide the number of devices "
                      f"({num_devices})")
  b, k = config.batch_size, config.grad_accum_steps
  if k < 1 or b % k:
    raise ConfigError(f"config.batch_size={b} must be divisible by config.grad_accum_steps={k}")
  # Each process feeds its own devices: a batch splits over processes, then over their devices.
  split = (f"the data-parallel size, the number of devices ({num_devices}; processes: "
           f"{process_count})")
  if (b // k) % num_devices or b % process_count:
    raise ConfigError(
        f"config.batch_size={b} (per micro-batch {b // k}) must be divisible by {split}; e.g. "
        f"--config.batch_size={max(num_devices * k, b // (num_devices * k) * num_devices * k)}")
  if (config.mixup_alpha > 0 or config.cutmix_alpha > 0) and (b // k // num_devices) % 2:
    raise ConfigError(f"Mixup/CutMix pairs images on each device: the per-device micro-batch "
                      f"({b // k // num_devices}) must be even")
  e = config.eval_batch_size
  if e % num_devices or e % process_count:
    raise ConfigError(f"config.eval_batch_size={e} must be divisible by {split}; e.g. "
                      f"--config.eval_batch_size={max(num_devices, e // num_devices * num_devices)}")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ConfigError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
  for name in ("log_every_steps", "checkpoint_every_steps"):
    if config[name] < 1:
      raise ConfigError(f"config.{name}={config[name]} must be >= 1")
  if config.init_from:
    _check_init_from(config)
  if workdir is not None:
    _check_writable(workdir)


def _check_writable(workdir: str) -> None:
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir) / f".write-test-{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError locally, others on gs://)
    raise ConfigError(f"workdir {workdir} is not writable ({type(e).__name__}: {e}); choose "
                      "another --workdir") from None


def _check_init_from(config) -> None:
  """init_from must exist (a released name is downloaded and converted now, once) and hold the
  same architecture (the head may differ)."""
  try:
    _, source_cfg = hub.read_info(config.init_from)
  except CheckpointError as e:
    raise ConfigError(f"config.init_from: {e}") from None
  ours = model_lib.get_config(config.model, **config.model_overrides.to_dict())
  diff = [f"{f}: {getattr(source_cfg, f)} there, {getattr(ours, f)} here"
          for f in model_lib.ARCHITECTURE_FIELDS if getattr(source_cfg, f) != getattr(ours, f)]
  if diff:
    raise ConfigError(f"config.init_from={config.init_from} is another architecture than "
                      f"config.model={config.model} ({'; '.join(diff)})")


# ---------------------------------------------------------------------------
# State and steps.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Plain nested dict (nnx.to_pure_dict of the model's nnx.Param state).
  opt_state: Any
  ema: Any  # EMA of params, or None.

  def checkpoint_items(self) -> dict[str, Any]:
    train = {"step": self.step, "opt_state": self.opt_state}
    if self.ema is not None:
      train["ema"] = self.ema
    return {"params": self.params, "train": train}

  @classmethod
  def from_checkpoint_items(cls, items):
    train = items["train"]
    return cls(step=train["step"], params=items["params"], opt_state=train["opt_state"],
               ema=train.get("ema"))


@dataclasses.dataclass
class Trainer:
  """Everything built once from the config: model graph, optimizer, shardings, step functions."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  num_classes: int
  steps_per_epoch: int
  total_steps: int

  def __post_init__(self):
    c = self.config
    self.model_config = model_lib.get_config(c.model, num_classes=self.num_classes,
                                             **c.model_overrides.to_dict())
    self.dtype = _DTYPES[c.dtype]
    # The TPU kernels, chosen once for this mesh (None: XLA only); the model is built with them.
    self.kernels = mlp_kernel.for_mesh(self.mesh, sharding_lib.BATCH_AXES, c.kernels)
    abstract_model = nnx.eval_shape(self._new_model, nnx.Rngs(0))
    self.graphdef, _ = nnx.split(abstract_model)
    self.num_params = model_lib.count_params(abstract_model)
    self.schedule = optimizer_lib.learning_rate_schedule(c, self.steps_per_epoch)
    self.tx = optimizer_lib.make_optimizer(c, self.schedule)
    abstract = jax.eval_shape(self._init, jnp.uint32(0))
    self.state_sharding = sharding_lib.state_shardings(abstract, self.mesh)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.replicated = sharding_lib.replicated(self.mesh)

  def _new_model(self, rngs):
    return model_lib.MetaFormer(self.model_config, dtype=self.dtype, remat=self.config.remat,
                                remat_stages=tuple(self.config.get("remat_stages", ())),
                                kernels=self.kernels, rngs=rngs)

  def _init(self, seed):
    model = self._new_model(nnx.Rngs(jax.random.key(seed)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ema = params if self.config.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), ema=ema)

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, created directly in its sharded layout (no host copy)."""
    return jax.jit(self._init, out_shardings=self.state_sharding)(jnp.uint32(seed))

  # -- train step ----------------------------------------------------------

  def _loss(self, params, images, targets, key):
    model = nnx.merge(self.graphdef, params)
    logits = model(images.astype(self.dtype), train=True, key=key).astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, targets).mean()

  def _gradients(self, params, images, targets, key):
    """Mean loss and gradients over the batch, in `grad_accum_steps` micro-batches."""
    k = self.config.grad_accum_steps
    if k == 1:
      return jax.value_and_grad(self._loss)(params, images, targets, key)
    # Micro-batch i takes rows i, i+k, i+2k, ...: every device keeps its own rows (no
    # resharding); the mean of k equal-sized means is the mean over the batch.
    def split(x):
      x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
      spec = jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES)
      return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

    def body(carry, inputs):
      i, x, t = inputs
      loss, grads = jax.value_and_grad(self._loss)(params, x, t, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), split(images), split(targets)))
    return jax.tree.map(lambda g: g / k, (loss, grads))

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    c = self.config
    key = jax.random.fold_in(jax.random.key(c.seed), state.step)
    mix_key, depth_key = jax.random.split(key)
    # uint8 from the host -> (RandAugment,) normalisation, random erasing: per sample, here.
    images = augment.augment_batch(jax.random.fold_in(key, 2), batch["image"], c.data)
    images, targets = mixup.mix(
        mix_key, images, batch["label"], num_classes=self.num_classes,
        mixup_alpha=c.mixup_alpha, cutmix_alpha=c.cutmix_alpha, prob=c.mixup_prob,
        switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing)
    loss, grads = self._gradients(state.params, images, targets, depth_key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = optax.incremental_update(params, ema, 1.0 - c.ema_decay)
      if self.model_config.has_frozen_params:  # a*w + (1-a)*w can round: keep frozen w exact
        ema = jax.tree.map(lambda frozen, e, p: p if frozen else e,
                           model_lib.frozen_mask(params), ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": self.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  def step_flops(self, compiled_train_step) -> float | None:
    """FLOPs of one train step per device. XLA's cost analysis counts the micro-batch loop's
    body once: a step runs it grad_accum_steps times (the optimizer update, ~1% of a step,
    is then counted that many times too, as compile mode does)."""
    return measure.program_cost(compiled_train_step,
                                loop_trips=self.config.grad_accum_steps).flops

  def kernel_difference(self, params, images) -> float:
    """How far the TPU kernels are from the XLA path, before they are trusted with a run.

    On one device, `images` (a slice of the first batch: one device's lane blocks) go through
    the model on the XLA path; at the first block of each stage, each half that takes kernels
    (attention's core in the token-mixing half, the MLP half) runs both ways with the same
    drop-path draw and its layer scale at 1: its increment (output minus input), and the
    gradients of its input and of every parameter under one random cotangent. Returns the
    largest difference relative to each tensor's largest value (0.0 if no block takes them).
    """
    single = dataclasses.replace(self.kernels, mesh=None, batch_axes=())
    if jax.process_count() > 1:  # FSDP shards may live on other hosts
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      params = multihost_utils.process_allgather(params, tiled=True)
    # One program on one device (eagerly, each of the model's ops would compile on its own:
    # ~1000 small programs for a CAFormer).
    both_ways = jax.jit(functools.partial(self._halves_both_ways, single))
    pairs = both_ways(jax.device_get(params), np.asarray(images))
    return max([0.0, *(mlp_kernel.relative_difference(a, b)
                       for ours, reference in pairs for a, b in zip(ours, reference))])

  def _halves_both_ways(self, single, params, images):
    """[(kernel path's leaves, XLA path's leaves)] for each half that `kernel_difference`
    compares: the increment, then the gradients of the input and of every parameter."""
    model = nnx.merge(self.graphdef, params)
    x = augment.normalize(images, self.config.data.mean, self.config.data.std)
    x = model.stem(x.astype(self.dtype))
    key = jax.random.key(self.config.seed)
    pairs = []
    for stage in model.stages:
      if stage.downsample is not None:
        x = stage.downsample(x)
      for b in stage.blocks:
        b.kernels = None  # the XLA path from here on
      block = stage.blocks[0]
      if block.layer_scale2 is not None:  # 1e-5 at init: it would hide a wrong branch
        block.layer_scale2.scale[...] = jnp.ones_like(block.layer_scale2.scale[...])
      inputs = {"mix": x, "channel_mlp": block.mix(x)}
      graphdef, state = nnx.split(block)
      for name in block.kernel_halves(x, single):
        inp = inputs[name]
        cotangent = jax.random.normal(key, inp.shape, inp.dtype)

        def half(state, inp, kernels, name=name):
          b = nnx.merge(graphdef, state)
          b.kernels = kernels
          return getattr(b, name)(inp, key)

        results = []
        for kernels in (single, None):
          out, vjp = jax.vjp(functools.partial(half, kernels=kernels), state, inp)
          # The half's increment, not its output: a skip that dominates the output (a small
          # branch at init) would hide a wrong branch.
          results.append(jax.tree.leaves((out - inp, vjp(cotangent))))
        pairs.append(tuple(results))
      for b in stage.blocks:
        x = b(x)  # no key, no kernels: the XLA path
    return pairs

  def without_kernels(self) -> "Trainer":
    """The same trainer on the XLA path (config.kernels='xla')."""
    config = self.config.copy_and_resolve_references()
    config.kernels = "xla"
    return Trainer(config, self.mesh, self.num_classes, self.steps_per_epoch, self.total_steps)

  def compile_train_step(self):
    """The AOT-compiled step: (state, batch) -> (state, metrics), state donated."""
    batch = self.abstract_batch(self.config.batch_size, train=True)
    jitted = jax.jit(self.train_step,
                     in_shardings=(self.state_sharding, self.batch_sharding),
                     out_shardings=(self.state_sharding, self.replicated),
                     donate_argnums=0)
    with jax.set_mesh(self.mesh):
      return jitted.lower(self.abstract_state, batch).compile()

  def abstract_batch(self, batch_size: int, *, train: bool):
    size = self.config.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8,
                                      sharding=self.batch_sharding),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.batch_sharding),
    }
    if not train:
      batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32,
                                           sharding=self.batch_sharding)
    return batch

  # -- eval step -----------------------------------------------------------

  def eval_step(self, params, batch) -> dict:
    """Masked sums over the batch: loss, top-1 and top-5 hits, example count."""
    model = nnx.merge(self.graphdef, params)
    images = augment.normalize(batch["image"], self.config.data.mean, self.config.data.std)
    logits = model(images.astype(self.dtype)).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, self.num_classes)
    _, top = jax.lax.top_k(logits, k)
    hits = top == labels[:, None]
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(hits[:, 0] * mask),
            "top5": jnp.sum(jnp.any(hits, axis=1) * mask), "count": jnp.sum(mask)}

  def compile_eval_step(self):
    batch = self.abstract_batch(self.config.eval_batch_size, train=False)
    jitted = jax.jit(self.eval_step, in_shardings=(self.state_sharding.params,
                                                   self.batch_sharding),
                     out_shardings=self.replicated,
                     compiler_options=cpu_tuning.forward_compiler_options(
                         self.mesh.devices.flat[0].platform))
    return jitted.lower(self.abstract_state.params, batch).compile()

  # -- checkpoints ---------------------------------------------------------

  def load_params(self, directory: str, fresh=None):
    """The parameters of a pretrained dir, workdir or released name, laid out on the mesh.

    A head for another number of classes is taken from `fresh` (newly initialised parameters:
    fine-tuning); without `fresh`, every tensor must fit.
    """
    loaded, info, _ = hub.load_params(directory)
    same_head = info.num_classes == self.num_classes
    if not same_head and fresh is None:
      raise ConfigError(f"{directory} has {info.num_classes} classes, the dataset "
                        f"{self.num_classes}: scoring needs a model of the dataset's classes")
    loaded = {jax.tree_util.keystr(p, simple=True, separator="."): v
              for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    kept_new = []

    def pick(path, current, sharding):
      name = jax.tree_util.keystr(path, simple=True, separator=".")
      if name in loaded and (same_head or not name.startswith("head.")):
        value = np.asarray(loaded[name], np.float32)
        if value.shape != current.shape:
          raise ConfigError(f"init_from {directory}: {name} has shape {value.shape}, "
                            f"this model needs {current.shape}")
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
      kept_new.append(name)
      return current

    params = jax.tree_util.tree_map_with_path(
        pick, self.abstract_state.params if fresh is None else fresh, self.state_sharding.params)
    if not same_head:
      metrics_lib.log(f"init_from {directory}: it has {info.num_classes} classes, this run "
                      f"{self.num_classes}; the head is newly initialised "
                      f"({', '.join(kept_new)}), every other tensor is loaded")
    elif kept_new:
      raise ConfigError(f"init_from {directory} lacks {kept_new}")
    return params


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def run_eval(eval_step, params, eval_batches, sharding) -> dict[str, float]:
  """Top-1, top-5 and mean loss over the whole eval split (padding masked out)."""
  totals = None
  for batch in sharding_lib.prefetch_to_device(eval_batches, sharding):
    out = eval_step(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
          "loss": float(totals["loss"]) / count, "examples": int(count)}


def _format_eval(record: dict) -> str:
  """'eval/top1 0.9806, eval/top5 1.0000, eval/loss 0.1673' (example counts left out)."""
  return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if not k.endswith("examples"))


def _eval_record(trainer, eval_step, eval_batches, **param_sets) -> dict:
  """{'eval/top1': ..., 'eval_ema/top1': ...}: each set of parameters that is not None."""
  record = {}
  for prefix, params in param_sets.items():
    if params is not None:
      result = run_eval(eval_step, params, eval_batches, trainer.batch_sharding)
      record.update({f"{prefix}/{k}": v for k, v in result.items()})
  return record


# ---------------------------------------------------------------------------
# Setup shared by train and eval.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run settles before compiling anything."""

  config: ml_collections.ConfigDict  # As the run uses it (a folder's data.manifest_dir set).
  mesh: jax.sharding.Mesh
  info: dataset_info.DatasetInfo
  dataset: input_pipeline.Dataset | None  # None where the data is not read (compile mode).
  steps_per_epoch: int
  total_steps: int


def setup(config, workdir: str | None, splits: tuple[str, ...], *, devices=None,
          process_count: int | None = None,
          info: dataset_info.DatasetInfo | None = None) -> Setup:
  """Validation, data checks, matmul precision, mesh, dataset sizes and the run's length: all
  that comes before compiling, for training, evaluation and compile mode alike.

  `devices` and `process_count` (default: this run's) and `info` (default: the dataset's,
  opened here) let compile mode set up a slice it does not have, from known dataset sizes.
  """
  devices = jax.devices() if devices is None else list(devices)
  process_count = jax.process_count() if process_count is None else process_count
  validate_config(config, workdir=workdir, num_devices=len(devices), process_count=process_count)
  config = defaults.with_model_defaults(config)
  dataset = None
  if info is None:
    config = _with_checked_folder(config, workdir, splits)
    dataset = input_pipeline.Dataset(config.data)
    info = dataset.info
  if config.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
  mesh = sharding_lib.make_mesh(config.fsdp, devices)
  if config.num_classes and config.num_classes != info.num_classes:
    raise ConfigError(f"config.num_classes={config.num_classes} but dataset "
                      f"{config.data.dataset!r} has {info.num_classes} classes")
  steps_per_epoch = info.batches_per_epoch(config.batch_size, process_count)
  return Setup(config, mesh, info, dataset, steps_per_epoch,
               optimizer_lib.total_steps(config, steps_per_epoch))


def _with_checked_folder(config, workdir: str | None, splits: tuple[str, ...]):
  """Folder datasets: every file of `splits` is decoded once, up front, and the run reads the
  checked file lists kept in data.manifest_dir (default WORKDIR/data_manifest; see folder_scan)."""
  if config.data.dataset != "folder" or not (workdir or config.data.manifest_dir):
    return config
  config = config.copy_and_resolve_references()
  if not config.data.manifest_dir:
    config.data.manifest_dir = os.path.join(workdir, "data_manifest")
  input_pipeline.check_folder(config.data, splits)
  return config


def _write_run_files(workdir, config, trainer, info) -> None:
  """WORKDIR/config.json (what load_pretrained needs) and the full run config."""
  if jax.process_index() != 0:
    return
  labels = list(info.label_names) if info.label_names else None
  pre = pretrained.default_preprocessing(config.data.crop_pct, config.data.image_size)
  pre.update(interpolation=config.data.interpolation, mean=list(config.data.mean),
             std=list(config.data.std))
  pretrained.write_config(workdir, trainer.model_config, variant=config.model, labels=labels,
                          preprocessing=pre)
  (epath.Path(workdir) / "train_config.json").write_text(config.to_json_best_effort(indent=2))


class _SigtermFlag:
  """Set by SIGTERM (single process); multi-host runs use JAX's preemption sync point.

  `event`: set by a handler the caller installed earlier (main.py, from its first line on);
  None: a handler is installed here, for the duration of the run.
  """

  def __init__(self, event: threading.Event | None = None):
    self.event = event or threading.Event()
    self.install = event is None
    self.previous = None

  def __enter__(self):
    if (self.install and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
    return self

  def stop_if_set(self) -> None:
    """During start-up: stop now (Preempted, nothing to save) if a SIGTERM came."""
    if jax.process_count() == 1 and self.event.is_set():
      raise Preempted(None)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self.event.is_set()

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


# The kernels against the XLA path, both in bfloat16: relative to each tensor's largest value.
# (Pallas' interpreter measures up to 2e-2 against float32 maths; a wrong kernel is off by ~1.)
KERNEL_TOLERANCE = 5e-2


def _checked_kernels(trainer: Trainer, params, images) -> Trainer:
  """`trainer` if its TPU kernels agree with the XLA path on `images`, else the same trainer
  on the XLA path, with one warning line: a run never trusts kernels that disagree."""
  difference = trainer.kernel_difference(params, images)
  if jax.process_count() > 1:  # every process must take the same path: the worst one decides
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    difference = float(np.max(multihost_utils.process_allgather(np.float32(difference))))
  if difference <= KERNEL_TOLERANCE:
    metrics_lib.log(f"TPU kernels match the XLA path (largest relative difference "
                    f"{difference:.2g}): training with them")
    return trainer
  logging.warning("The TPU kernels differ from the XLA path by up to %.3g (relative; tolerance "
                  "%g): this run continues on the XLA path", difference, KERNEL_TOLERANCE)
  return trainer.without_kernels()


class _Readback:
  """The train step's metrics, read back one step late: step n-1's are fetched while step n
  runs, so the device never waits on the host. A NaN/inf calls `diverged(step, host, bad)`
  (which raises) at the read-back, before that step is logged, scored or saved."""

  def __init__(self, diverged):
    self.diverged = diverged
    self.pending = None  # (step, device metrics) not read back yet.
    self.history = []  # Host copies since the last mean().

  def add(self, step: int, device_metrics) -> None:
    self.sync()
    self.pending = (step, device_metrics)

  def sync(self) -> None:
    """Reads back the pending step (waiting for it to finish)."""
    if self.pending is None:
      return
    (step, device_metrics), self.pending = self.pending, None
    host = jax.device_get(device_metrics)
    bad = {k: float(v) for k, v in host.items() if not np.isfinite(v)}
    if bad:
      self.diverged(step, host, bad)
    self.history.append(host)

  def mean(self) -> dict[str, float]:
    """The mean of every metric over the steps read back since the last call."""
    record = {k: float(np.mean([h[k] for h in self.history])) for k in self.history[0]}
    self.history.clear()
    return record


# ---------------------------------------------------------------------------
# The main loop.
# ---------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       sigterm: threading.Event | None = None) -> dict:
  """Trains (resuming from WORKDIR/checkpoints if present), evaluates, checkpoints.

  Returns the final record (the step and the eval metrics at the last step). Raises
  ConfigError / DatasetError before any expensive work, TrainingDivergedError on NaN/inf,
  Preempted on SIGTERM: before the first step at once, later after saving. `sigterm`: see
  _SigtermFlag.
  """
  with _SigtermFlag(sigterm) as flag:
    flag.stop_if_set()
    return _train_and_evaluate(config, workdir, flag)


def _train_and_evaluate(config, workdir: str, sigterm: _SigtermFlag) -> dict:
  # --- Validate, mesh, data sizes -----------------------------------------
  run = setup(config, workdir, (config.data.train_split, config.data.eval_split))
  config, mesh, info, num_classes = run.config, run.mesh, run.info, run.info.num_classes
  steps_per_epoch, total = run.steps_per_epoch, run.total_steps
  eval_every = config.eval_every_steps or steps_per_epoch
  trainer = Trainer(config, mesh, num_classes, steps_per_epoch, total)
  sigterm.stop_if_set()
  _write_run_files(workdir, config, trainer, info)
  metrics_lib.log(
      f"{config.model} ({trainer.num_params:,} params, {num_classes} classes) on "
      f"{jax.device_count()} {jax.devices()[0].device_kind} device(s) in "
      f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; {total} steps of batch "
      f"{config.batch_size} ({steps_per_epoch} per epoch)")

  # --- State: restore the latest checkpoint, or initialise ----------------
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoints)
  restored = ckpt.restore_latest(trainer.abstract_state.checkpoint_items(),
                                 fallback=config.checkpoint_fallback)
  if restored is not None:
    state = TrainState.from_checkpoint_items(restored[0])
    metrics_lib.log(f"Resumed from checkpoint step {int(state.step)} in {ckpt.directory}")
  else:
    state = trainer.init_state(config.seed)
    if config.init_from:
      params = trainer.load_params(config.init_from, state.params)
      # The EMA starts as a copy: the step donates the state, each buffer may appear once.
      state = state.replace(params=params,
                            ema=None if state.ema is None else jax.tree.map(jnp.copy, params))
      metrics_lib.log(f"Initialised from {config.init_from}")
  start = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)

  # --- Data and compiled steps ---------------------------------------------
  eval_batches, _ = run.dataset.eval_iterator(global_batch_size=config.eval_batch_size)
  eval_step = trainer.compile_eval_step()
  if start >= total:
    ckpt.close()
    writer.close()
    record = _eval_record(trainer, eval_step, eval_batches, eval=state.params, eval_ema=state.ema)
    metrics_lib.log(f"Training was already complete at step {start}: {_format_eval(record)}")
    return {"step": start, **record}
  train_batches = sharding_lib.prefetch_to_device(
      run.dataset.train_iterator(global_batch_size=config.batch_size, seed=config.seed,
                                 start_step=start),
      trainer.batch_sharding)
  if trainer.kernels is not None:  # Checked on the first batch before the run relies on them.
    first = next(train_batches)
    train_batches = itertools.chain([first], train_batches)
    trainer = _checked_kernels(trainer, state.params, first["image"].addressable_shards[0].data)
    writer.write(start, {"kernels": "tpu" if trainer.kernels is not None else "xla"})
  train_step, compile_s = measure.stopwatch(trainer.compile_train_step)
  flops = trainer.step_flops(train_step)
  metrics_lib.log(f"Compiled the train step in {compile_s:.1f} s"
                  + (f" ({flops / 1e9:.1f} GFLOP per step per device)" if flops else ""))
  throughput = metrics_lib.Throughput(
      batch_size=config.batch_size, num_devices=jax.device_count(), total_steps=total,
      flops_per_step=flops, peak=chips.peak_flops(jax.devices()[0]))

  def save(step):
    ckpt.save(step, state.checkpoint_items(),
              meta={"epoch": step / steps_per_epoch, "data_position": step,
                    "config": config.model})

  def diverged(step, host, bad):
    ckpt.wait_until_finished()
    writer.write(step, {**{k: float(v) for k, v in host.items()}, "diverged": True})
    last = ckpt.latest_step()
    raise TrainingDivergedError(
        f"{', '.join(f'{k} = {v}' for k, v in bad.items())} at step {step}: stopped without "
        f"saving. The last good checkpoint is "
        f"{f'step {last} in {ckpt.directory}' if last is not None else 'none (no checkpoint yet)'}"
        ". Lower the learning rate, set --config.grad_clip_norm, or check the input data.")

  def due(step, every):
    return step % every == 0 or step == total

  # --- Loop ------------------------------------------------------------------
  final = {}
  readback = _Readback(diverged)
  try:
    sigterm.stop_if_set()  # Compiling took a while.
    throughput.reset(start)
    for step in range(start + 1, total + 1):
      multihost.report_step(step)  # Named if a peer is lost during this step.
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, next(train_batches))
      readback.add(step, step_metrics)  # Reads step n-1's while step n runs.
      preempted = sigterm.reached(step)
      log_now = due(step, config.log_every_steps) or preempted
      eval_now = due(step, eval_every)
      save_now = due(step, config.checkpoint_every_steps) or preempted
      if log_now or eval_now or save_now:
        readback.sync()  # Nothing is logged, scored or saved after a NaN/inf step.
      if log_now:
        record = {**readback.mean(), **throughput.report(step)}
        writer.write(step, record)
        metrics_lib.log(metrics_lib.format_progress(step, total, record))
      if eval_now:
        record = _eval_record(trainer, eval_step, eval_batches, eval=state.params,
                              eval_ema=state.ema)
        writer.write(step, record)
        metrics_lib.log(f"step {step}: {_format_eval(record)}")
        final.update(record)
        throughput.reset(step)  # Eval time is not training time.
      if save_now:
        save(step)
        throughput.reset(step)  # Nor is the (blocking part of the) save.
      if preempted and step < total:
        ckpt.wait_until_finished()
        raise Preempted(step)
  finally:
    try:
      ckpt.wait_until_finished()  # May raise a failed save's error (e.g. a full disk).
    finally:
      ckpt.close()
      writer.close()
  return {"step": total, **final}


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             sigterm: threading.Event | None = None) -> dict:
  """Scores the parameters of `config.init_from` (e.g. converted release weights), else of
  WORKDIR's newest checkpoint (its EMA is scored during training). Only parameters are read.

  This is how ImageNet accuracy parity of converted weights is checked: the release's eval
  transform on `imagenet2012`'s validation split, every image counted once. A SIGTERM before
  the scoring starts raises Preempted (see _SigtermFlag).
  """
  with _SigtermFlag(sigterm) as flag:
    flag.stop_if_set()
    run = setup(config, workdir, (config.data.eval_split,))
    flag.stop_if_set()
  config = run.config
  trainer = Trainer(config, run.mesh, run.info.num_classes, steps_per_epoch=1, total_steps=1)
  if config.init_from:
    params, source, step = trainer.load_params(config.init_from), config.init_from, 0
    pre = hub.read_info(config.init_from)[0].preprocessing
    if (pre["input_size"], pre["crop_pct"]) != (config.data.image_size, config.data.crop_pct):
      logging.warning("%s was evaluated by its release at %dx%d, crop_pct %s; this eval runs at "
                      "%dx%d, crop_pct %s: for the release's figure pass "
                      "--config.data.image_size=%d --config.data.crop_pct=%s", source,
                      pre["input_size"], pre["input_size"], pre["crop_pct"],
                      config.data.image_size, config.data.image_size, config.data.crop_pct,
                      pre["input_size"], pre["crop_pct"])
  else:
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    restored = ckpt.restore_latest({"params": trainer.abstract_state.params},
                                   fallback=config.checkpoint_fallback)
    ckpt.close()
    if restored is None:
      raise ConfigError(f"nothing to evaluate: no checkpoint in {workdir}/checkpoints and no "
                        "--config.init_from")
    params, step = restored[0]["params"], restored[1]["step"]
    source = f"{workdir} step {step}"
  eval_batches, _ = run.dataset.eval_iterator(global_batch_size=config.eval_batch_size)
  record = _eval_record(trainer, trainer.compile_eval_step(), eval_batches, eval=params)
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, {**record, "source": source})
  writer.close()
  metrics_lib.log(f"{source}: {_format_eval(record)}")
  return record
