"""The TPU training kernels of a block's MLP half (`mlp_kernel`), run by Pallas' interpreter on
CPU against the plain formula: the same MetaFormerBlock's norm2, the MLP's one reference
(`ops.mlp_reference`), layer scale, drop path and residual add, differentiated by autodiff.
And the choice of the kernels: explicit, never from an ambient mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from poolformer_jax import mlp_kernel, ops, sharding, train
from poolformer_jax import model as model_lib

N = mlp_kernel._LANES  # one lane block of samples  # pylint: disable=protected-access


def block_and_inputs(width=16, res=4, dtype=jnp.float32, seed=0):
  cfg = model_lib.get_config("poolformer_s12")
  block = model_lib.MetaFormerBlock(width, cfg, 0, 0.2, dtype=dtype, param_dtype=jnp.float32,
                                    rngs=nnx.Rngs(seed))
  keys = jax.random.split(jax.random.key(seed), 8)
  # Parameters away from their init (ones / zeros / 1e-5) so every term matters.
  for i, p in enumerate((block.norm2.scale, block.norm2.bias, block.layer_scale2.scale,
                         block.mlp.fc1.bias, block.mlp.fc2.bias)):
    p[...] = p[...] + 0.3 * jax.random.normal(keys[i], p.shape)
  x = (2 * jax.random.normal(keys[5], (N, res, res, width)) + 0.5).astype(dtype)
  cotangent = jax.random.normal(keys[6], x.shape).astype(dtype)
  keep = model_lib.drop_path_factor(x.shape, 0.2, keys[7]).reshape(-1)
  return block, x, cotangent, keep


INTERPRETED = mlp_kernel.TpuKernels(mesh=None, interpret=True)  # one device, Pallas' interpreter


def xla_path(block, x, keep):
  """The MLP half's formula: x + keep * ls * mlp(norm2(x)), the MLP as its reference."""
  h = block.norm2(x)
  ls = block.layer_scale2.scale[...].astype(h.dtype)  # the compute dtype, as Mlp does
  branch = ops.mlp_reference(h, *block.mlp.weights(h.dtype), ls)
  return x + branch * keep[:, None, None, None].astype(branch.dtype)


def kernel_path(block, x, keep, kernels=INTERPRETED):
  return kernels.mlp_residual(
      x, keep, block.norm2.scale[...], block.norm2.bias[...], *block.mlp.weights(block.mlp.dtype),
      block.layer_scale2.scale[...], block.norm2.eps)


def value_and_grads(path, block, x, cotangent, keep):
  graphdef, params = nnx.split(block)

  def loss(params, x):
    out = path(nnx.merge(graphdef, params), x, keep)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, grads


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_kernels_match_the_reference_values_and_every_gradient(dtype, tol):
  """Against the formula in float32 on the same inputs and parameters (in bfloat16 the
  kernels round once per stored value; the tolerance is bfloat16's)."""
  block, x, cotangent, keep = block_and_inputs(dtype=dtype)
  exact = block_and_inputs(dtype=jnp.float32)[0]  # the same parameters, float32 compute
  assert 0 < int((keep == 0).sum()) < N  # some samples dropped, some kept
  out_k, (params_k, dx_k) = value_and_grads(kernel_path, block, x, cotangent, keep)
  f32 = lambda v: v.astype(jnp.float32)
  out_x, (params_x, dx_x) = value_and_grads(xla_path, exact, f32(x), f32(cotangent), keep)
  assert out_k.dtype == dx_k.dtype == dtype and out_k.shape == out_x.shape
  assert mlp_kernel.relative_difference(out_k, out_x) < tol
  assert mlp_kernel.relative_difference(dx_k, dx_x) < tol
  flat_k, flat_x = nnx.to_flat_state(params_k), nnx.to_flat_state(params_x)
  compared = 0
  for (path, gk), (_, gx) in zip(flat_k, flat_x):
    if path[0] in ("norm2", "mlp", "layer_scale2"):
      assert gk.get_value().dtype == gx.get_value().dtype, path
      assert mlp_kernel.relative_difference(gk.get_value(), gx.get_value()) < tol, path
      compared += 1
  assert compared == 7  # norm2 scale/bias, fc1 and fc2 kernel/bias, layer scale


def test_on_a_mesh_each_device_runs_its_samples_and_weight_gradients_are_summed():
  """On a mesh that splits the batch, the kernels run per device (shard_map) and the weight
  gradients are the sums over all devices: the same numbers as on one device."""
  mesh = sharding.make_mesh(1, jax.devices()[:2])
  kernels = mlp_kernel.for_mesh(mesh, sharding.BATCH_AXES, interpret=True)
  assert kernels.batch_axes and kernels.mesh is mesh
  block, x, cotangent, keep = block_and_inputs()
  x, cotangent, keep = (jnp.concatenate([v, v[::-1]]) for v in (x, cotangent, keep))
  single = value_and_grads(kernel_path, block, x, cotangent, keep)
  path = lambda block, x, keep: kernel_path(block, x, keep, kernels)
  sharded = value_and_grads(path, block, x, cotangent, keep)
  text = jax.jit(jax.grad(lambda x: jnp.sum(path(block, x, keep)))).lower(x).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    assert mlp_kernel.relative_difference(a, b) < 2e-6


def test_the_kernels_are_chosen_once_by_the_caller_never_by_an_ambient_mesh():
  """None of a CPU mesh, 'xla', or a mesh set around the call makes a block take the kernels;
  a block built with them takes them in training, for a shape that fits, and only then."""
  cpu_mesh = sharding.make_mesh(1, jax.devices()[:1])
  assert mlp_kernel.for_mesh(cpu_mesh, sharding.BATCH_AXES) is None
  assert mlp_kernel.for_mesh(cpu_mesh, sharding.BATCH_AXES, "xla", interpret=True) is None
  with pytest.raises(ValueError, match="kernels='pallas'; use one of"):
    mlp_kernel.for_mesh(cpu_mesh, sharding.BATCH_AXES, "pallas")
  cfg = model_lib.get_config("poolformer_s12")
  x = jnp.ones((N, 4, 4, 16), jnp.float32)
  key = jax.random.key(0)

  def runs_kernels(kernels, train=True, config=cfg, shape=x.shape):
    block = model_lib.MetaFormerBlock(16, config, 0, 0.1, dtype=jnp.float32,
                                      param_dtype=jnp.float32, rngs=nnx.Rngs(0), kernels=kernels)
    jaxpr = jax.make_jaxpr(lambda x: block(x, key if train else None))(jnp.ones(shape))
    return "pallas_call" in str(jaxpr)

  with jax.set_mesh(cpu_mesh):
    assert not runs_kernels(None)
  assert runs_kernels(INTERPRETED)
  assert not runs_kernels(INTERPRETED, train=False)  # eval keeps XLA's fused forward
  assert not runs_kernels(INTERPRETED, shape=(N // 2, 4, 4, 16))  # not a whole lane block
  assert not runs_kernels(INTERPRETED, config=model_lib.get_config("poolformerv2_s12"))

  def fused_pooling(name, stage):
    return model_lib.MetaFormerBlock(64, model_lib.get_config(name), stage, 0.0,
                                     dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=nnx.Rngs(0)).fused_pooling
  assert fused_pooling("poolformer_s12", 3) and fused_pooling("poolformerv2_s12", 1)
  assert not fused_pooling("poolformerv2_s12", 2)  # a res-scaled skip
  assert not fused_pooling("convformer_s18", 0) and not fused_pooling("identityformer_s12", 0)


# --------------------------------------------------------------------------- the self-check


def interpreted_everywhere(monkeypatch):
  """The trainer's kernels on this CPU, through Pallas' interpreter, as on a TPU."""
  real = mlp_kernel.for_mesh
  monkeypatch.setattr(mlp_kernel, "for_mesh",
                      lambda mesh, axes, option="auto", **kw: real(mesh, axes, option,
                                                                   interpret=True))


def break_the_forward_kernel(monkeypatch):
  """A deliberately wrong kernel: the block's output off by half the residual branch."""
  real = mlp_kernel._forward_kernel  # pylint: disable=protected-access

  def wrong(x_ref, *refs, chunk):
    real(x_ref, *refs, chunk=chunk)
    out_ref = refs[6]
    out_ref[...] = out_ref[...] + 0.5 * (out_ref[...] - x_ref[...])

  monkeypatch.setattr(mlp_kernel, "_forward_kernel", wrong)


def smoke_trainer(config):
  mesh = sharding.make_mesh(1, jax.devices()[:1])
  return train.Trainer(config, mesh, 10, steps_per_epoch=1, total_steps=1)


def test_the_trainer_measures_its_kernels_against_the_xla_path(monkeypatch):
  """`kernel_difference` on a slice of a batch: ~1e-6 for the real kernels (float32), far
  beyond the tolerance for a wrong one; the XLA-only trainer has none to check."""
  interpreted_everywhere(monkeypatch)
  config = load_config("demo.py:smoke")
  trainer = smoke_trainer(config)
  assert trainer.kernels is not None and trainer.kernels.interpret
  params = trainer.init_state(0).params
  images = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), np.uint8)
  assert trainer.kernel_difference(params, images) < 1e-4
  assert train._checked_kernels(trainer, params, images) is trainer  # pylint: disable=protected-access
  break_the_forward_kernel(monkeypatch)
  assert trainer.kernel_difference(params, images) > 2 * train.KERNEL_TOLERANCE
  assert trainer.without_kernels().kernels is None
  config.kernels = "xla"
  assert smoke_trainer(config).kernels is None


@pytest.mark.slow
def test_a_run_whose_kernels_disagree_warns_once_and_trains_on_xla(
    monkeypatch, digits_data_dir, tmp_path, caplog):
  """The first batch checks the kernels before the run relies on them: a wrong kernel gives
  one warning line with the difference, the run goes on on the XLA path, and metrics.jsonl
  says which path ran."""
  interpreted_everywhere(monkeypatch)
  break_the_forward_kernel(monkeypatch)
  config = load_config("demo.py:smoke")
  config.data.data_dir = str(digits_data_dir)
  config.batch_size = N * jax.device_count()  # one lane block of samples per device
  config.total_steps, config.eval_every_steps = 2, 2
  with caplog.at_level("INFO"):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
              and "TPU kernels" in r.getMessage()]
  assert len(warnings) == 1 and "continues on the XLA path" in warnings[0], warnings
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert records[0] == {"step": 0, "kernels": "xla"}
  assert [r["step"] for r in records if "loss" in r] == [2]
