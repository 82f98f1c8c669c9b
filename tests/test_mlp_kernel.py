"""The TPU training kernels of a block's MLP half (`mlp_kernel`), run by Pallas' interpreter on
CPU against the model's own XLA path: the same MetaFormerBlock's norm2, Mlp, layer scale,
drop path and residual add, differentiated by autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poolformer_jax import mlp_kernel, sharding
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


def xla_path(block, x, keep):
  """What MetaFormerBlock computes for the MLP half without the kernels."""
  branch = block.mlp(block.norm2(x), block.layer_scale2.scale[...])
  return x + branch * keep[:, None, None, None].astype(branch.dtype)


def kernel_path(block, x, keep):
  return mlp_kernel.mlp_residual(
      x, keep, block.norm2.scale[...], block.norm2.bias[...], *block.mlp.weights(block.mlp.dtype),
      block.layer_scale2.scale[...], block.norm2.eps, True)


def value_and_grads(path, block, x, cotangent, keep):
  graphdef, params = nnx.split(block)

  def loss(params, x):
    out = path(nnx.merge(graphdef, params), x, keep)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, grads


def max_rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_kernels_match_the_model_values_and_every_gradient(dtype, tol):
  block, x, cotangent, keep = block_and_inputs(dtype=dtype)
  assert 0 < int((keep == 0).sum()) < N  # some samples dropped, some kept
  out_k, (params_k, dx_k) = value_and_grads(kernel_path, block, x, cotangent, keep)
  out_x, (params_x, dx_x) = value_and_grads(xla_path, block, x, cotangent, keep)
  assert out_k.dtype == out_x.dtype and out_k.shape == out_x.shape
  assert max_rel_err(out_k, out_x) < tol
  assert max_rel_err(dx_k, dx_x) < tol
  flat_k, flat_x = nnx.to_flat_state(params_k), nnx.to_flat_state(params_x)
  compared = 0
  for (path, gk), (_, gx) in zip(flat_k, flat_x):
    if path[0] in ("norm2", "mlp", "layer_scale2"):
      assert gk.get_value().dtype == gx.get_value().dtype, path
      assert max_rel_err(gk.get_value(), gx.get_value()) < tol, path
      compared += 1
  assert compared == 7  # norm2 scale/bias, fc1 and fc2 kernel/bias, layer scale


def test_on_a_mesh_each_device_runs_its_samples_and_weight_gradients_are_summed():
  """Under a mesh that splits the batch, the kernels run per device (shard_map) and the
  weight gradients are the sums over all devices: the same numbers as on one device."""
  devices = jax.devices()[:2]
  block, x, cotangent, keep = block_and_inputs()
  x, cotangent, keep = (jnp.concatenate([v, v[::-1]]) for v in (x, cotangent, keep))
  single = value_and_grads(kernel_path, block, x, cotangent, keep)
  with jax.set_mesh(sharding.make_mesh(1, devices)):
    sharded = value_and_grads(kernel_path, block, x, cotangent, keep)
    text = jax.jit(jax.grad(lambda x: jnp.sum(kernel_path(block, x, keep)))).lower(x).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    assert max_rel_err(a, b) < 2e-6


def test_kernels_are_only_chosen_for_tpu_meshes_and_shapes_that_fit():
  assert not mlp_kernel.fits((N, 56, 56, 64), 256, jnp.bfloat16)  # no mesh
  with jax.set_mesh(sharding.make_mesh(1, jax.devices()[:1])):
    assert not mlp_kernel.fits((N, 56, 56, 64), 256, jnp.bfloat16)  # a CPU mesh
