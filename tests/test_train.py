"""The trainer: optimizer, Mixup, the sharded step, accumulation, and whole runs on real data."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO, count_compiles, cpu_env, count_primitive, load_config
from poolformer_jax import defaults
from poolformer_jax import mixup
from poolformer_jax import model as model_lib
from poolformer_jax import optimizer
from poolformer_jax import sharding
from poolformer_jax import train

TINY = dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32))


def tiny_config(**overrides):
  c = defaults.default_config()
  c.model_overrides.depths = TINY["depths"]
  c.model_overrides.widths = TINY["widths"]
  c.dtype = "float32"
  c.data.image_size = 32
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 10
  c.warmup_epochs = 1.0
  c.cooldown_epochs = 0.0
  c.base_lr = 1e-3
  c.lr_base_batch_size = 16
  # On-device RandAugment and erasing add ~15 s to each compile here: on only where tested.
  c.data.randaugment = ""
  c.data.random_erasing = 0.0
  for k, v in overrides.items():
    c[k] = v
  return c


def make_trainer(config, devices, num_classes=10):
  mesh = sharding.make_mesh(config.fsdp, devices)
  return train.Trainer(config, mesh, num_classes, steps_per_epoch=4, total_steps=10)


def random_batches(n, batch_size, size=32, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}
          for _ in range(n)]


def run_steps(trainer, batches):
  """Initial state + the compiled step over `batches`: (host params, host metrics, state).

  The step must compile exactly once, whatever the data: a recompile would be counted here.
  """
  with count_compiles() as compiles:
    state = trainer.init_state(0)
    step = trainer.compile_train_step()
    history = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, trainer.batch_sharding))
      history.append(jax.device_get(metrics))
  assert compiles["train_step"] == 1, compiles
  return jax.device_get(state.params), history, state


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------- optimizer


def test_schedule_warms_up_decays_and_cools_down():
  c = defaults.default_config()
  c.batch_size, c.num_epochs, c.warmup_epochs, c.cooldown_epochs = 2048, 10.0, 2.0, 3.0
  steps_per_epoch = 10
  lr = optimizer.learning_rate_schedule(c, steps_per_epoch)
  peak = 1e-3 * 2048 / 1024  # The release's lr = 1e-3 * batch / 1024.
  assert optimizer.total_steps(c, steps_per_epoch) == 130
  assert float(lr(0)) == pytest.approx(c.warmup_lr, rel=1e-4)  # float32
  assert float(lr(20)) == pytest.approx(peak, rel=1e-6)
  assert float(lr(10)) == pytest.approx((c.warmup_lr + peak) / 2, rel=1e-4)  # linear warmup
  # Cosine from the peak at step 20 to min_lr at step 100, then constant for 30 steps.
  assert float(lr(60)) == pytest.approx((peak + c.min_lr) / 2, rel=1e-4)
  for step in (100, 115, 129):
    assert float(lr(step)) == pytest.approx(c.min_lr, rel=1e-6)
  values = [float(lr(s)) for s in range(20, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_norms_layer_scales_and_biases():
  """With zero gradients AdamW only decays: weights shrink, ndim <= 1 parameters stay put."""
  c = tiny_config(weight_decay=0.5)
  trainer = make_trainer(c, jax.devices()[:1])
  params = jax.device_get(trainer.init_state(0).params)
  tx = optimizer.make_optimizer(c, optax.constant_schedule(0.1))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = jax.device_get(optax.apply_updates(params, updates))
  decayed = unchanged = 0
  for (path, old), new_value in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(new)):
    name = jax.tree_util.keystr(path)
    if old.ndim > 1:
      np.testing.assert_allclose(new_value, old * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=name)
      decayed += 1
    else:
      assert any(k in name for k in ("norm", "layer_scale", "bias")), name
      np.testing.assert_array_equal(new_value, old, err_msg=name)
      unchanged += 1
  assert decayed >= 10 and unchanged >= 20


def test_batch_divisibility_errors_name_devices_and_processes(tmp_path):
  """Batches are split over the processes' devices: the message names both counts."""
  for field, value in (("batch_size", 60), ("eval_batch_size", 12)):
    c = tiny_config(mixup_alpha=0.0, cutmix_alpha=0.0, **{field: value})
    with pytest.raises(train.ConfigError,
                       match=rf"config.{field}={value}.*devices \(8; processes: 2\)"):
      train.validate_config(c, workdir=None, num_devices=8, process_count=2)


def test_frozen_random_matrices_get_no_update_no_state_and_no_decay():
  """RandFormer: the optimizer leaves the random matrices alone even when handed a gradient
  for them (weight decay and clipping on); every other parameter moves."""
  c = tiny_config(model="randformer_s12", weight_decay=0.5, grad_clip_norm=1.0)
  abstract = nnx.eval_shape(lambda: model_lib.create_model(
      c.model, num_classes=10, rngs=nnx.Rngs(0), **c.model_overrides.to_dict()))
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype),
                        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  frozen = jax.tree.leaves(model_lib.frozen_mask(params))
  assert sum(frozen) == 2  # the stage-3 and stage-4 blocks of the tiny model
  tx = optimizer.make_optimizer(c, optax.constant_schedule(0.1))
  opt_state = tx.init(params)
  assert not any(x.shape in {(196, 196), (49, 49)} for x in jax.tree.leaves(opt_state))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  for (path, u), f in zip(jax.tree_util.tree_leaves_with_path(updates), frozen):
    if f:
      np.testing.assert_array_equal(u, 0.0, err_msg=jax.tree_util.keystr(path))
    else:
      assert np.abs(u).max() > 0, jax.tree_util.keystr(path)
  # PoolFormer has nothing frozen: its optimizer (and state layout) is plain AdamW.
  plain = optimizer.make_optimizer(tiny_config(), optax.constant_schedule(0.1))
  assert isinstance(plain.init(params)[0], optax.ScaleByAdamState)


def test_randformer_trains_without_touching_its_random_matrices():
  """Two real train steps (stop_gradient + optimizer): matrices bit-identical, the rest moves.
  The EMA's matrices too (optax.incremental_update's a*w + (1-a)*w would round them)."""
  c = tiny_config(model="randformer_s12", weight_decay=0.05, ema_decay=0.9999)
  c.data.image_size = 224
  c.batch_size = 2
  trainer = make_trainer(c, jax.devices()[:1])
  before = jax.device_get(trainer.init_state(0).params)
  after, history, state = run_steps(trainer, random_batches(2, 2, size=224))
  assert np.isfinite(history[-1]["loss"])
  assert not any(x.shape in {(196, 196), (49, 49)} for x in jax.tree.leaves(state.opt_state))
  frozen = jax.tree.leaves(model_lib.frozen_mask(before))
  assert sum(frozen) == 2
  ema = jax.device_get(state.ema)
  for (path, a), b, e, f in zip(jax.tree_util.tree_leaves_with_path(before),
                                jax.tree.leaves(after), jax.tree.leaves(ema), frozen):
    if f:
      np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
      np.testing.assert_array_equal(e, a, err_msg=jax.tree_util.keystr(path))
    else:
      assert not np.array_equal(b, a), jax.tree_util.keystr(path)


# --------------------------------------------------------------------------- mixup


def test_label_smoothing_matches_timm_formula():
  t = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 5, 0.1))
  np.testing.assert_allclose(t[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets_with_the_same_lambda(mode):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
  labels = jnp.arange(8) % 4
  alphas = dict(mixup_alpha=0.8, cutmix_alpha=0.0) if mode == "mixup" else dict(
      mixup_alpha=0.0, cutmix_alpha=1.0)
  for seed in range(5):
    mixed, targets = mixup.mix(jax.random.key(seed), images, labels, num_classes=4,
                               label_smoothing=0.0, **alphas)
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    partner = np.asarray(mixup.partner(images))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    lam = targets[0, labels[0]]  # Own class weight (row 0's partner has another class).
    if mode == "mixup":
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, atol=1e-5)
    else:  # Each pixel comes from one of the two; the partner's share of pixels is 1 - lam.
      from_partner = np.all(mixed == partner, axis=-1) & ~np.all(mixed == images, axis=-1)
      assert np.all(np.all(mixed == images, -1) | np.all(mixed == partner, -1))
      assert from_partner.mean(axis=(1, 2))[0] == pytest.approx(1 - lam, abs=1e-6)
    # The pairs are neighbours: 0<->1, 2<->3, ...
    np.testing.assert_array_equal(np.asarray(mixup.partner(jnp.arange(6))), [1, 0, 3, 2, 5, 4])


def test_mixup_and_cutmix_lambdas_follow_their_beta_distributions():
  """One draw per batch of each lambda, Beta(alpha, alpha) as timm draws it (numpy's
  beta): a Kolmogorov-Smirnov test against scipy's Beta on 4000 fixed keys; an alpha of 0
  gives exactly 1."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 4000)
  lam_mix, lam_cut = jax.vmap(lambda k: mixup.beta_pair(k, 0.8, 1.0))(keys)
  for lams, alpha in ((lam_mix, 0.8), (lam_cut, 1.0)):
    assert stats.kstest(np.asarray(lams), stats.beta(alpha, alpha).cdf).pvalue > 0.01
  assert abs(stats.pearsonr(np.asarray(lam_mix), np.asarray(lam_cut))[0]) < 0.05  # independent
  assert mixup.beta_pair(keys[0], 0.8, 0.0)[1] == 1.0


def test_mixup_off_returns_images_and_smoothed_targets():
  images = jnp.ones((4, 8, 8, 3))
  mixed, targets = mixup.mix(jax.random.key(0), images, jnp.array([0, 1, 2, 3]), num_classes=4,
                             label_smoothing=0.1)
  assert mixed is images
  np.testing.assert_allclose(np.asarray(targets).max(1), 0.925, rtol=1e-6)


# --------------------------------------------------------------------------- the step


def test_sharded_step_equals_single_device_step():
  """8-way data parallel == 1 device on the same global batch, with the recipe's on-device
  RandAugment, random erasing, Mixup and drop path (each sample's draws do not depend on the
  sharding).

  Tolerance: the 8-way gradient is an all-reduce of partial sums, so float32 sums are added in
  another order (relative error ~1e-7 per op); after Adam's normalisation and 3 steps at lr 1e-3
  parameters agree to 1e-5 absolute (a disagreement of the data or randomness would be ~1e-3).
  """
  assert jax.device_count() == 8
  c = tiny_config(mixup_alpha=0.8, cutmix_alpha=1.0)
  c.data.randaugment = defaults.default_config().data.randaugment
  c.data.randaugment_on = "device"
  c.data.random_erasing = 0.25
  c.model_overrides.drop_path_rate = 0.2
  batches = random_batches(3, 16)
  single = make_trainer(c, jax.devices()[:1])
  sharded = make_trainer(c, jax.devices())
  p1, m1, _ = run_steps(single, batches)
  p8, m8, state = run_steps(sharded, batches)
  assert max_abs_diff(p1, p8) < 1e-5
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  # The state really is laid out over the 8 devices and the batch split 2 per device.
  assert len(state.params["head"]["kernel"].sharding.device_set) == 8
  assert sharded.batch_sharding.shard_shape((16, 32, 32, 3)) == (2, 32, 32, 3)


def test_fsdp_shards_parameters_and_computes_the_same_step():
  c = tiny_config()
  c.model_overrides.widths = (16, 32, 64, 128)  # Big enough for some arrays to be split.
  batches = random_batches(2, 16)
  p_dp, _, _ = run_steps(make_trainer(c, jax.devices()), batches)
  c.fsdp = 4
  fsdp = make_trainer(c, jax.devices())
  p_fsdp, _, state = run_steps(fsdp, batches)
  assert max_abs_diff(p_dp, p_fsdp) < 1e-5
  kernel = state.params["stages"][3]["blocks"][0]["mlp"]["fc1"]["kernel"]  # 128 x 512
  assert kernel.sharding.shard_shape(kernel.shape) == (128, 128)
  mu = state.opt_state[0].mu["stages"][3]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert mu.sharding == kernel.sharding  # Adam's moments live where their parameters do.


def test_gradient_accumulation_equals_one_big_batch():
  """k micro-batches of b == one batch of k*b (drop path off: its masks depend on batch shape)."""
  c = tiny_config(mixup_alpha=0.8, cutmix_alpha=1.0, batch_size=32)
  c.model_overrides.drop_path_rate = 0.0
  batches = random_batches(2, 32)
  p_big, m_big, _ = run_steps(make_trainer(c, jax.devices()), batches)
  c.grad_accum_steps = 4
  p_acc, m_acc, _ = run_steps(make_trainer(c, jax.devices()), batches)
  assert max_abs_diff(p_big, p_acc) < 1e-5
  for a, b in zip(m_big, m_acc):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_remat_is_in_the_step_and_trains_identically():
  from jax.extend.core.primitives import remat_p
  c = tiny_config()
  batches = random_batches(2, 16)
  params = {}
  for remat in (False, True):
    c.remat = remat
    trainer = make_trainer(c, jax.devices()[:1])
    step = jax.make_jaxpr(trainer.train_step)(trainer.abstract_state,
                                              trainer.abstract_batch(16, train=True))
    assert count_primitive(step.jaxpr, remat_p) == (4 if remat else 0)  # One per block.
    params[remat], _, _ = run_steps(trainer, batches)
  assert max_abs_diff(params[False], params[True]) < 1e-6


def test_state_is_donated_and_flops_come_from_xla():
  c = tiny_config()  # One device: compiling for eight only adds time here.
  trainer = make_trainer(c, jax.devices()[:1])
  state = trainer.init_state(0)
  step = trainer.compile_train_step()
  batch = sharding.global_batch(random_batches(1, 16)[0], trainer.batch_sharding)
  old_kernel = state.params["head"]["kernel"]
  state, _ = step(state, batch)
  assert old_kernel.is_deleted()  # Updated in place: no second copy of the state.
  flops = {16: train.measure.program_cost(step).flops}
  for b in (32, 64):
    c.batch_size = b
    flops[b] = train.measure.program_cost(
        make_trainer(c, jax.devices()[:1]).compile_train_step()).flops
  # Affine in the batch: per-image work plus a fixed part (the optimizer update, the weight
  # gradients' epilogues).
  assert flops[16] > 0
  assert flops[64] - flops[32] == pytest.approx(2 * (flops[32] - flops[16]), rel=0.02)
  assert flops[32] - flops[16] > 0.5 * flops[16]
  # The batch of 32 in 2 micro-batches of 16 (what the trainer's MFU is computed from): the
  # work of a step of 32, not half of it (XLA counts the loop body once). The per-parameter
  # work (update, gradient sums) is then counted twice, as in compile mode: large for the tiny
  # model (+15%), ~1% for S12.
  c.batch_size, c.grad_accum_steps = 32, 2
  accum = make_trainer(c, jax.devices()[:1])
  assert flops[32] < accum.step_flops(accum.compile_train_step()) < 1.25 * flops[32]


def test_remat_of_some_stages_is_checked_before_anything_starts():
  c = tiny_config(remat=True, remat_stages=(1, 2))
  train.validate_config(c, workdir=None, num_devices=1, process_count=1)  # S12: stages 1-4
  c.remat_stages = (0, 5)
  with pytest.raises(train.ConfigError, match=r"remat_stages=\(0, 5\): the model's stages "
                     r"are 1-4, e.g. --config.remat_stages='\(1, 2\)'"):
    train.validate_config(c, workdir=None, num_devices=1, process_count=1)


def test_ema_and_gradient_clipping():
  c = tiny_config(ema_decay=0.75, grad_clip_norm=1e-3)
  trainer = make_trainer(c, jax.devices()[:1])
  before = jax.device_get(trainer.init_state(0).params)
  params, history, state = run_steps(trainer, random_batches(1, 16))
  ema = jax.device_get(state.ema)
  for p0, p1, e in zip(jax.tree.leaves(before), jax.tree.leaves(params), jax.tree.leaves(ema)):
    np.testing.assert_allclose(e, 0.75 * p0 + 0.25 * p1, rtol=1e-5, atol=1e-7)
  assert "ema" in state.checkpoint_items()["train"]
  # Adam's first moment after one step is (1 - b1) * the gradient it was given: the clipped one.
  mu = jax.device_get(state.opt_state[1][0].mu)
  assert history[0]["grad_norm"] > 1e-2  # The raw gradient is far above the clip...
  assert float(optax.tree.norm(mu)) == pytest.approx((1 - c.adam_b1) * 1e-3, rel=1e-4)  # ...not used.


def test_the_trainer_builds_compiles_and_checkpoints_without_tensorflow(tmp_path):
  """TensorFlow is the input pipeline's alone: a GPU or TPU machine without it can build the
  Trainer, compile its steps and checkpoint the state."""
  script = f"""
import sys
from poolformer_jax import checkpointing, defaults, sharding, train
c = defaults.default_config()
c.model_overrides.depths, c.model_overrides.widths = (1, 1, 1, 1), (8, 16, 24, 32)
c.dtype, c.data.image_size, c.batch_size, c.eval_batch_size = "float32", 32, 8, 8
trainer = train.Trainer(c, sharding.make_mesh(1), 10, steps_per_epoch=1, total_steps=1)
trainer.compile_train_step(), trainer.compile_eval_step()
ckpt = checkpointing.Checkpointer({str(tmp_path)!r}, async_save=False)
ckpt.save(0, trainer.init_state(0).checkpoint_items())
ckpt.close()
print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""
  env = cpu_env(1)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"  # No TensorFlow module was imported.
  assert os.path.isdir(tmp_path / "0" / "params")


# --------------------------------------------------------------------------- whole runs


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


# Tests that share `smoke_run` stay on one xdist worker, so it is computed once.
SHARES_SMOKE_RUN = pytest.mark.xdist_group("smoke_run")


@pytest.fixture(scope="session")  # Session: xdist may interleave other modules.
def smoke_run(digits_data_dir, tmp_path_factory):
  """The demo's smoke config (real digits, tiny PoolFormer), trained in-process on 8 devices.

  The result also holds the number of compilations of each step over the whole run.
  """
  config = load_config("demo.py:smoke")
  config.data.data_dir = digits_data_dir
  workdir = str(tmp_path_factory.mktemp("smoke"))
  with count_compiles() as compiles:
    result = train.train_and_evaluate(config, workdir)
  return config, workdir, {**result, "compiles": compiles}


@SHARES_SMOKE_RUN
def test_smoke_run_logs_evaluates_and_checkpoints(smoke_run):
  config, workdir, result = smoke_run
  # 40 steps on different batches, 2 evaluations: each step compiled once.
  assert result["step"] == 40
  assert result["compiles"]["train_step"] == 1 and result["compiles"]["eval_step"] == 1
  assert result["eval/examples"] == 360  # Every test image exactly once.
  assert result["eval/top1"] > 0.3  # Learns (10 classes: chance is 0.1) in 40 tiny steps.
  records = read_metrics(workdir)
  train_records = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval/top1" in r]
  assert [r["step"] for r in train_records] == [10, 20, 30, 40]
  assert [r["step"] for r in evals] == [20, 40]
  for r in train_records:
    assert {"lr", "grad_norm", "img/s/chip", "step_time", "eta_s", "mfu"} <= set(r)
    assert r["img/s/chip"] > 0 and np.isfinite(r["loss"])
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  assert evals[-1]["eval/top1"] == pytest.approx(result["eval/top1"])
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [20, 40]


@SHARES_SMOKE_RUN
def test_eval_mode_and_load_pretrained_read_the_run(smoke_run, tmp_path):
  import shutil
  from poolformer_jax import hub
  config, workdir, result = smoke_run
  # Evaluation reads the parameters only: it works without the optimizer state on disk.
  shutil.copytree(workdir, tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "40" / "train")
  record = train.evaluate(config, str(tmp_path / "run"))
  assert record["eval/top1"] == pytest.approx(result["eval/top1"])
  model, info = hub.load_pretrained(workdir)
  assert info.num_classes == 10 and info.labels == tuple(str(i) for i in range(10))
  assert info.preprocessing["input_size"] == 32 and info.preprocessing["crop_pct"] == 1.0
  assert model.cfg.widths == tuple(config.model_overrides.widths)


@SHARES_SMOKE_RUN
def test_rerun_of_a_finished_run_trains_nothing(smoke_run):
  config, workdir, result = smoke_run
  before = read_metrics(workdir)
  with count_compiles() as compiles:
    again = train.train_and_evaluate(config, workdir)
  assert again["eval/top1"] == pytest.approx(result["eval/top1"])
  assert compiles["train_step"] == 0 and compiles["eval_step"] == 1  # Nothing left to train.
  assert [r for r in read_metrics(workdir) if "loss" in r] == [r for r in before if "loss" in r]


@SHARES_SMOKE_RUN
def test_init_from_a_run_with_another_head(smoke_run, tmp_path, caplog):
  """Fine-tuning: a 3-class model starts from the 10-class run; only the head is new."""
  from poolformer_jax import pretrained
  _, workdir, _ = smoke_run
  config = tiny_config(init_from=workdir)
  config.model_overrides.widths = (16, 32, 48, 64)  # The smoke run's.
  trainer = make_trainer(config, jax.devices(), num_classes=3)
  fresh = trainer.init_state(0)
  with caplog.at_level("INFO"):
    params = trainer.load_params(workdir, fresh.params)
  assert "the head is newly initialised" in caplog.text and "10 classes" in caplog.text
  with pytest.raises(train.ConfigError, match="10 classes, the dataset 3"):
    trainer.load_params(workdir)  # Evaluation: no fresh head to fall back on.
  loaded, _, _ = pretrained.load_params(workdir)
  got = jax.device_get(params)
  np.testing.assert_array_equal(got["stages"][2]["blocks"][0]["mlp"]["fc1"]["kernel"],
                                loaded["stages"][2]["blocks"][0]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(got["head"]["kernel"], jax.device_get(fresh.params)["head"]["kernel"])
  assert got["head"]["kernel"].shape == (64, 3)
  # Another architecture is refused before anything is built, naming both.
  other = tiny_config(init_from=workdir)
  other.model_overrides.widths = (16, 32, 48, 80)
  with pytest.raises(train.ConfigError, match=r"another architecture.*widths: \(16, 32, 48, 64\)"
                     r" there, \(16, 32, 48, 80\) here"):
    train.validate_config(other, workdir=str(tmp_path), num_devices=8, process_count=1)


@SHARES_SMOKE_RUN
def test_a_fresh_run_from_init_from_with_an_ema_trains(smoke_run, digits_data_dir, tmp_path):
  """init_from + EMA on a fresh run: the EMA starts as the loaded weights, in buffers of its own
  (the step donates the state, and XLA refuses the same buffer donated twice)."""
  config = load_config("demo.py:smoke")
  config.data.data_dir = digits_data_dir
  config.init_from, config.ema_decay, config.total_steps = smoke_run[1], 0.99, 2
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2 and 0.0 <= result["eval_ema/top1"] <= 1.0


@pytest.mark.slow
def test_fake_imagenet_train_and_masked_eval(tmp_path):
  """The real imagenet2012 builder on tiny fake ILSVRC tars, the release recipe, a few steps.

  13 validation images with eval batch 8: the last batch is padded and masked, every image
  counts once.
  """
  import fake_imagenet
  fake_imagenet.prepare_fake_imagenet(tmp_path / "data", tmp_path / "manual")
  config = tiny_config(batch_size=16, eval_batch_size=8, total_steps=3)
  config.data.data_dir = str(tmp_path / "data")
  config.data.shuffle_buffer = 64
  config.dtype = "bfloat16"  # The ImageNet recipe's mixed precision.
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["eval/examples"] == 13
  assert 0.0 <= result["eval/top1"] <= result["eval/top5"] <= 1.0
  train_records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
  assert train_records and all(np.isfinite(r["loss"]) for r in train_records)


@pytest.mark.slow
def test_embedded_default_reaches_97_percent(digits_data_dir, tmp_path):
  """The README's main job (`python main.py`): S12 on real digits, 1 CPU device, >= 97% top-1.

  Run as the README runs it, with the default workdir: `workdir/demo`, relative to the cwd.
  """
  env = cpu_env(1, fast_compile=False)  # 440 steps of S12: run-bound; the README's program.
  proc = subprocess.run([sys.executable, str(REPO / "main.py"),
                         f"--config.data.data_dir={digits_data_dir}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / "workdir" / "demo"
  evals = [r for r in read_metrics(workdir) if "eval/top1" in r]
  assert evals[-1]["step"] == 440 and evals[-1]["eval/examples"] == 360
  assert evals[-1]["eval/top1"] >= 0.97, evals
  assert f"done: workdir/demo step 440, eval/top1 {evals[-1]['eval/top1']:.4f}" in proc.stdout
  assert os.path.isdir(workdir / "checkpoints" / "440")
