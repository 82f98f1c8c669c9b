"""The TPU training kernels of a block's MLP half (`mlp_kernel`), run by Pallas' interpreter on
CPU against the plain formula: the same MetaFormerBlock's norm2, the MLP's one reference
(`ops.mlp_reference`), layer scale, drop path and residual add, differentiated by autodiff.
And the choice of the kernels: explicit, never from an ambient mesh."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from poolformer_jax import chips, mlp_kernel, ops, sharding, train
from poolformer_jax import model as model_lib

N = mlp_kernel._LANES  # one lane block of samples  # pylint: disable=protected-access


def block_and_inputs(width=16, res=4, dtype=jnp.float32, seed=0, variant="poolformer_s12",
                     stage=0, shape=None, **overrides):
  """A block of `variant`'s `stage` (its norm, MLP and scales; config `overrides`) at a small
  width, an input (`shape`, default [N, res, res, width]), a cotangent and a drop-path key that
  drops some samples."""
  shape = shape or (N, res, res, width)
  width = shape[-1]
  cfg = dataclasses.replace(model_lib.get_config(variant), **overrides)
  block = model_lib.MetaFormerBlock(width, cfg, stage, 0.2, dtype=dtype,
                                    param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  keys = jax.random.split(jax.random.key(seed), 4)
  # Every norm gain, bias, scale and StarReLU scalar away from its init (ones / zeros / 1e-5)
  # so every term matters.
  graphdef, state = nnx.split(block)
  leaves, tree = jax.tree.flatten(state)
  noise = jax.random.split(keys[0], len(leaves))
  state = jax.tree.unflatten(tree, [
      v + 0.3 * jax.random.normal(k, v.shape) if v.ndim == 1 else v
      for v, k in zip(leaves, noise)])
  block = nnx.merge(graphdef, state)
  x = (2 * jax.random.normal(keys[1], shape) + 0.5).astype(dtype)
  cotangent = jax.random.normal(keys[2], x.shape).astype(dtype)
  return block, x, cotangent, keys[3]


INTERPRETED = mlp_kernel.TpuKernels(mesh=None, interpret=True)  # one device, Pallas' interpreter


def xla_path(block, x, key):
  """The MLP half's formula, x + keep * ls * mlp(norm2(x)): v1's MLP as its one reference,
  the baselines' as the block's own XLA path (norm2, StarReLU MLP, res-scaled skip)."""
  if not isinstance(block.mlp, model_lib.Mlp):
    block.kernels = None
    return block.channel_mlp(x, key)
  keep = model_lib.drop_path_factor(x.shape, block.drop_rate, key).reshape(-1)
  h = block.norm2(x)
  ls = block.layer_scale2.scale[...].astype(h.dtype)  # the compute dtype, as Mlp does
  branch = ops.mlp_reference(h, *block.mlp.weights(h.dtype), ls)
  return x + branch * keep[:, None, None, None].astype(branch.dtype)


def kernel_path(block, x, key, kernels=INTERPRETED):
  block.kernels = kernels
  assert "channel_mlp" in block.kernel_halves(x)
  return block.channel_mlp(x, key)


def value_and_grads(path, block, x, cotangent, key):
  graphdef, params = nnx.split(block)

  def loss(params, x):
    out = path(nnx.merge(graphdef, params), x, key)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, grads


# (variant, stage): what the MLP half has there, and how many parameters it has.
FORMS = {("poolformer_s12", 0): 7,  # one-group norm with bias, GELU MLP with biases, layer scale
         ("poolformerv2_s12", 2): 6,  # one-group norm, StarReLU MLP, res-scaled skip
         ("convformer_s18", 0): 5,  # channel LayerNorm, StarReLU MLP, plain skip
         ("convformer_s18", 2): 6}  # channel LayerNorm, StarReLU MLP, res-scaled skip


# Every form in float32; bfloat16 (the same code with one rounding per stored value) for the
# two norms.
CASES = ([(*form, jnp.float32, 2e-6) for form in FORMS]
         + [(*form, jnp.bfloat16, 2e-2) for form in (("poolformer_s12", 0), ("convformer_s18", 2))])


@pytest.mark.parametrize("variant,stage,dtype,tol", CASES)
def test_kernels_match_the_reference_values_and_every_gradient(variant, stage, dtype, tol):
  """Against the formula in float32 on the same inputs and parameters, for each form of MLP
  half the MetaFormers have. In bfloat16 the kernels round once per stored value: each tensor
  within bfloat16's tolerance, or (a sum with cancellation, like StarReLU's scalar gradients)
  no further than twice the XLA path's own bfloat16 result."""
  block, x, cotangent, key = block_and_inputs(dtype=dtype, variant=variant, stage=stage)
  exact = block_and_inputs(dtype=jnp.float32, variant=variant, stage=stage)[0]
  keep = model_lib.drop_path_factor(x.shape, block.drop_rate, key)
  assert 0 < int((keep == 0).sum()) < N  # some samples dropped, some kept
  f32 = lambda v: v.astype(jnp.float32)
  kernel = value_and_grads(kernel_path, block, x, cotangent, key)
  reference = value_and_grads(xla_path, exact, f32(x), f32(cotangent), key)
  xla = value_and_grads(xla_path, block, x, cotangent, key)
  assert kernel[0].dtype == kernel[1][1].dtype == dtype and kernel[0].shape == x.shape

  def tensors(result):  # the output, dx and the MLP half's parameter gradients
    out, (params, dx) = result
    grads = [(path, g.get_value()) for path, g in nnx.to_flat_state(params)
             if path[0] in ("norm2", "mlp", "layer_scale2", "res_scale2")]
    return [("out", out), ("dx", dx)] + grads

  compared = 0
  for (name, k), (_, r), (_, same) in zip(tensors(kernel), tensors(reference), tensors(xla)):
    assert k.dtype == same.dtype, name  # the XLA path's dtypes, in the same compute dtype
    bound = max(tol, 2 * mlp_kernel.relative_difference(same, r))
    assert mlp_kernel.relative_difference(k, r) < bound, name
    compared += 1
  assert compared == 2 + FORMS[variant, stage]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_kernels_match_xla_values_and_gradients(dtype, tol):
  """CAFormer's attention mixer (3 heads of 32 over 7x7 tokens) with its core as the two
  kernels, against `jax.nn.dot_product_attention` on the same parameters: the output and the
  gradients of the input and both projections, float32 exactly, bfloat16 within its tolerance
  or no further than twice XLA's own bfloat16 result."""
  def grads(dtype, kernels):
    mixer = model_lib.Attention(96, 32, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mixer)
    x = jax.random.normal(jax.random.key(1), (4, 7, 7, 96)).astype(dtype)
    cot = jax.random.normal(jax.random.key(2), x.shape).astype(jnp.float32)

    def loss(params, x):
      out = nnx.merge(graphdef, params)(x, kernels)
      return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), (dp, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return [out, dx] + [g.get_value() for _, g in nnx.to_flat_state(dp)]

  kernel, same, exact = grads(dtype, INTERPRETED), grads(dtype, None), grads(jnp.float32, None)
  assert len(kernel) == 4  # the output, dx, the qkv and output projections
  for k, s, r in zip(kernel, same, exact):
    assert k.dtype == s.dtype
    bound = max(tol, 2 * mlp_kernel.relative_difference(s, r))
    assert mlp_kernel.relative_difference(k, r) < bound


def pallas_outputs(fn, *args) -> list[int]:
  """The number of outputs of each Pallas kernel that `fn` calls."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(len(eqn.outvars))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_in_evaluation_the_mlp_half_is_one_kernel_that_writes_only_its_output():
  """The eval step (no drop-path key, no gradient) runs the forward kernel alone after a
  channel LayerNorm, which then writes the output only (training's also stores fc1's output for
  the backward): the same values as the XLA path. After a one-group norm it keeps XLA's."""
  v2 = block_and_inputs(variant="poolformerv2_s12", stage=2)[0]
  v2.kernels = INTERPRETED
  assert v2.kernel_halves(jnp.ones((N, 4, 4, 16)), training=False) == ()
  block, x, _, _ = block_and_inputs(variant="convformer_s18", stage=2)
  block.kernels = INTERPRETED
  assert block.kernel_halves(x, training=False) == ("mix", "channel_mlp")  # and the SepConv
  assert pallas_outputs(lambda x: block.channel_mlp(x, None), x) == [1]
  train_forward = lambda x: jax.vjp(lambda x: block.channel_mlp(x, jax.random.key(0)), x)[0]
  assert pallas_outputs(train_forward, x) == [2]
  kernel = jax.jit(lambda x: block.channel_mlp(x, None))(x)
  block.kernels = None
  reference = jax.jit(lambda x: block.channel_mlp(x, None))(x)
  assert mlp_kernel.relative_difference(kernel, reference) < 2e-6


def half_tensors(result, half: str):
  """The output, dx and the gradients of one half's parameters, from `value_and_grads`."""
  modules = {"mix": ("norm1", "token_mixer", "layer_scale1", "res_scale1"),
             "channel_mlp": ("norm2", "mlp", "layer_scale2", "res_scale2")}[half]
  out, (params, dx) = result
  return [("out", out), ("dx", dx)] + [(path, g.get_value()) for path, g in
                                        nnx.to_flat_state(params) if path[0] in modules]


def sepconv_path(kernels):
  def path(block, x, key):
    block.kernels = kernels
    assert ("mix" in block.kernel_halves(x)) == (kernels is not None)
    return block.mix(x, key)
  return path


# (stage, map, layer scale): one chunk of 35 pixels (no aligned divisor); a loop over aligned
# chunks of 40 pixels that start mid-row (rows of 12), before a res-scaled skip (stage 3); a
# layer scale on the branch (none of the releases has one there).
SEPCONV_CASES = [(0, (4, 5, 7, 16), None, jnp.float32, 1e-5),
                 (2, (2, 10, 12, 8), None, jnp.float32, 1e-5),
                 (1, (2, 6, 6, 8), 1e-5, jnp.float32, 1e-5),
                 (2, (2, 10, 12, 8), None, jnp.bfloat16, 2e-2)]


@pytest.mark.parametrize("stage,shape,layer_scale,dtype,tol", SEPCONV_CASES)
def test_sepconv_kernels_match_the_xla_path_values_and_every_gradient(stage, shape, layer_scale,
                                                                      dtype, tol):
  """ConvFormer's token-mixing half (channel LayerNorm, pointwise, StarReLU, 7x7 depthwise,
  pointwise, scales, drop path) as its two kernels, against the block's XLA path in float32
  on the same parameters: the output, dx and the gradients of the norm, both pointwise convs,
  the taps, StarReLU's scalars and the res or layer scale; bfloat16 within its tolerance or no
  further than twice XLA's own bfloat16 result."""
  kw = dict(variant="convformer_s18", stage=stage, shape=shape, layer_scale_init=layer_scale)
  block, x, cotangent, key = block_and_inputs(dtype=dtype, **kw)
  exact = block_and_inputs(dtype=jnp.float32, **kw)[0]
  f32 = lambda v: v.astype(jnp.float32)
  kernel = half_tensors(value_and_grads(sepconv_path(INTERPRETED), block, x, cotangent, key),
                        "mix")
  reference = half_tensors(value_and_grads(sepconv_path(None), exact, f32(x), f32(cotangent),
                                           key), "mix")
  xla = half_tensors(value_and_grads(sepconv_path(None), block, x, cotangent, key), "mix")
  # norm, 2 pointwise, taps, s, b (+ res scale, + layer scale)
  assert len(kernel) == 2 + 6 + (stage >= 2) + (layer_scale is not None)
  for (name, k), (_, r), (_, same) in zip(kernel, reference, xla):
    assert k.dtype == same.dtype and k.shape == same.shape, name
    bound = max(tol, 2 * mlp_kernel.relative_difference(same, r))
    assert mlp_kernel.relative_difference(k, r) < bound, name


def test_on_a_mesh_each_device_runs_its_samples_and_weight_gradients_are_summed():
  """On a mesh that splits the batch, the kernels run per device (shard_map) and the weight
  gradients are the sums over all devices: the same numbers as on one device."""
  mesh = sharding.make_mesh(1, jax.devices()[:2])
  kernels = mlp_kernel.for_mesh(mesh, sharding.BATCH_AXES, interpret=True)
  assert kernels.batch_axes and kernels.mesh is mesh
  block, x, cotangent, key = block_and_inputs(variant="convformer_s18", stage=2)
  x, cotangent = (jnp.concatenate([v, v[::-1]]) for v in (x, cotangent))
  single = value_and_grads(kernel_path, block, x, cotangent, key)
  path = lambda block, x, key: kernel_path(block, x, key, kernels)
  sharded = value_and_grads(path, block, x, cotangent, key)
  block.kernels = kernels
  text = jax.jit(jax.grad(lambda x: jnp.sum(block.channel_mlp(x, key)))).lower(x).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    assert mlp_kernel.relative_difference(a, b) < 2e-6
  # SepConv: each device its own samples, the parameters' gradients summed.
  block, x, cotangent, key = block_and_inputs(variant="convformer_s18", stage=2,
                                              shape=(4, 6, 6, 8))
  single = value_and_grads(sepconv_path(INTERPRETED), block, x, cotangent, key)
  sharded = value_and_grads(sepconv_path(kernels), block, x, cotangent, key)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    assert mlp_kernel.relative_difference(a, b) < 2e-6
  # Attention: each device its own samples.
  qkv = jax.random.normal(jax.random.key(0), (4, 49, 192))
  attention = lambda kernels: jax.jit(jax.value_and_grad(
      lambda q: jnp.sum(kernels.attention(q, 2) ** 2)))(qkv)
  for a, b in zip(attention(kernels), attention(INTERPRETED)):
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
  assert not runs_kernels(INTERPRETED, train=False)  # eval: only after a LayerNorm (below)
  assert not runs_kernels(INTERPRETED, shape=(N // 2, 4, 4, 16))  # not a whole lane block
  for name in ("poolformerv2_s12", "convformer_s18", "caformer_s18"):  # every MLP half
    assert runs_kernels(INTERPRETED, config=model_lib.get_config(name))

  def attention_kernels(kernels, train):
    block = model_lib.MetaFormerBlock(64, model_lib.get_config("caformer_s18"), 2, 0.1,
                                      dtype=jnp.float32, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0), kernels=kernels)
    jaxpr = jax.make_jaxpr(lambda x: block.mix(x, key if train else None))(
        jnp.ones((2, 7, 7, 64)))
    return str(jaxpr).count("pallas_call")
  # Attention's core takes its kernels in training and evaluation, at any batch size.
  assert attention_kernels(INTERPRETED, True) == attention_kernels(INTERPRETED, False) == 1
  assert attention_kernels(None, True) == 0
  sepconv = model_lib.MetaFormerBlock(16, model_lib.get_config("convformer_s18"), 0, 0.1,
                                      dtype=jnp.float32, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0), kernels=INTERPRETED)
  for k in (key, None):  # ConvFormer's token-mixing half too, at any even batch size
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: sepconv.mix(x, k))(x[:2]))
  # Blocks sized by the core's VMEM: a 512-wide stage 4 fits a v5e or v6e core, not a v4's.
  stage4 = ((256, 7, 7, 512), 2048, jnp.bfloat16)
  assert not mlp_kernel.TpuKernels(None, vmem=chips.CHIPS["v4"].vmem_bytes).fits(*stage4)
  assert mlp_kernel.TpuKernels(None, vmem=chips.CHIPS["v5e"].vmem_bytes).fits(*stage4)

  def fused_pooling(name, stage):
    return model_lib.MetaFormerBlock(64, model_lib.get_config(name), stage, 0.0,
                                     dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=nnx.Rngs(0)).fused_pooling
  assert fused_pooling("poolformer_s12", 3) and fused_pooling("poolformerv2_s12", 1)
  assert fused_pooling("poolformerv2_s12", 2)  # a res-scaled skip
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

  def wrong(x_ref, *refs, **static):
    real(x_ref, *refs, **static)
    out_ref = refs[6]
    out_ref[...] = out_ref[...] + 0.5 * (out_ref[...] - x_ref[...])

  monkeypatch.setattr(mlp_kernel, "_forward_kernel", wrong)


def smoke_trainer(config):
  mesh = sharding.make_mesh(1, jax.devices()[:1])
  return train.Trainer(config, mesh, 10, steps_per_epoch=1, total_steps=1)


def test_the_trainer_measures_its_kernels_against_the_xla_path(monkeypatch):
  """`kernel_difference` on a slice of a batch, for a CAFormer (MLP kernels after a channel
  LayerNorm, SepConv kernels in stages 1-2, attention kernels in 3-4): float32 rounding for the
  real kernels, far beyond the tolerance for a wrong MLP kernel, a wrong attention kernel
  and a wrong SepConv kernel; the XLA-only trainer has none to check. (PoolFormer v1's wrong
  MLP kernel: the end-to-end run below.)"""
  interpreted_everywhere(monkeypatch)
  config = load_config("demo.py:smoke")
  config.model = "caformer_s18"
  trainer = smoke_trainer(config)
  assert trainer.kernels is not None and trainer.kernels.interpret
  params = trainer.init_state(0).params
  images = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), np.uint8)
  few = images[:16]  # the per-sample kernels only (too few samples for the MLP's): quicker
  # float32 rounding, relative to the smallest increments (stage 1's, ~6e-4 at init): 2e-4.
  assert trainer.kernel_difference(params, few) < 1e-3
  assert train._checked_kernels(trainer, params, few) is trainer  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as patch:  # the MLP kernels alone, on a whole lane block
    for name in ("fits_sepconv", "fits_attention"):
      patch.setattr(mlp_kernel.TpuKernels, name, lambda *args: False)
    assert trainer.kernel_difference(params, images) < 1e-3
    break_the_forward_kernel(patch)
    assert trainer.kernel_difference(params, images) > 2 * train.KERNEL_TOLERANCE
  from poolformer_jax import attention_kernel  # pylint: disable=g-import-not-at-top
  real = attention_kernel._forward_kernel  # pylint: disable=protected-access

  def wrong(qkv_ref, o_ref, **static):
    real(qkv_ref, o_ref, **static)
    o_ref[...] = 1.5 * o_ref[...]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(attention_kernel, "_forward_kernel", wrong)
    assert trainer.kernel_difference(params, few) > 2 * train.KERNEL_TOLERANCE
  from poolformer_jax import sepconv_kernel  # pylint: disable=g-import-not-at-top
  real_sepconv = sepconv_kernel._forward_kernel  # pylint: disable=protected-access

  def wrong_sepconv(x_ref, *refs, **static):
    real_sepconv(x_ref, *refs, **static)
    out_ref = refs[5]
    out_ref[...] = out_ref[...] + 0.5 * (out_ref[...] - x_ref[...])

  monkeypatch.setattr(sepconv_kernel, "_forward_kernel", wrong_sepconv)
  assert trainer.kernel_difference(params, few) > 2 * train.KERNEL_TOLERANCE
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
