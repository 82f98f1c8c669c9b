"""The model: parameter counts, mixers, shapes, stochastic depth, dtypes, tracing, and parity with HF."""

import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from flax import nnx

from poolformer_jax import model as pf
from poolformer_jax import ops

# Exact parameter counts of the releases (1000 classes), RandFormer's frozen matrices included.
EXPECTED_PARAMS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
    "identityformer_s12": 11_891_712,
    "identityformer_s24": 21_341_464,
    "identityformer_s36": 30_791_216,
    "identityformer_m36": 56_077_168,
    "identityformer_m48": 73_346_056,
    "randformer_s12": 12_127_010,
    "randformer_s24": 21_812_060,
    "randformer_s36": 31_497_110,
    "randformer_m36": 56_783_062,
    "randformer_m48": 74_287_248,
    "poolformerv2_s12": 11_891_712,
    "poolformerv2_s24": 21_341_464,
    "poolformerv2_s36": 30_791_216,
    "poolformerv2_m36": 56_077_168,
    "poolformerv2_m48": 73_346_056,
    "convformer_s18": 26_774_448,
    "convformer_s36": 40_012_152,
    "convformer_m36": 57_051_640,
    "convformer_b36": 99_882_616,
    "caformer_s18": 26_341_656,
    "caformer_s36": 39_297_102,
    "caformer_m36": 56_204_878,
    "caformer_b36": 98_753_614,
}
# RandFormer's frozen matrices: 196^2 per stage-3 block, 49^2 per stage-4 block.
EXPECTED_FROZEN = {"randformer_s12": 235_298, "randformer_s24": 470_596,
                   "randformer_s36": 705_894, "randformer_m36": 705_894,
                   "randformer_m48": 941_192}

# A small member of the family for tests that are about behaviour, not size.
TINY = dict(depths=(1, 1, 2, 1), widths=(8, 16, 24, 32))


@nnx.jit(static_argnames="train")
def run(model, x, train=False, key=None):
  """One jitted forward: eager NNX dispatches op by op and is ~10x slower on CPU."""
  return model(x, train=train, key=key)


def tiny_model(**overrides):
  return pf.create_model("poolformer_s12", num_classes=10, rngs=nnx.Rngs(0),
                         **{**TINY, **overrides})


# --------------------------------------------------------------------------- registry / sizes


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count_matches_release(name):
  """Built abstractly (shapes only: no memory or time for the 100M-parameter variants)."""
  abstract = nnx.eval_shape(lambda: pf.create_model(name, rngs=nnx.Rngs(0)))
  assert pf.count_params(abstract) == EXPECTED_PARAMS[name]
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  frozen = sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(pf.frozen_mask(params))) if f)
  assert frozen == EXPECTED_FROZEN.get(name, 0)


def test_registry_lists_variants_and_rejects_unknown_names():
  assert pf.list_models() == sorted(EXPECTED_PARAMS)
  with pytest.raises(ValueError, match="poolformer_s12.*poolformer_s24"):
    pf.create_model("poolformer_xl", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown override"):
    pf.create_model("poolformer_s12", rngs=nnx.Rngs(0), depth=3)
  with pytest.raises(ValueError, match="token_mixer"):
    pf.create_model("poolformer_s12", rngs=nnx.Rngs(0), token_mixer="transformer")


def test_variant_hyperparameters_are_the_releases():
  cfg = pf.get_config("poolformer_m36")
  assert cfg.layer_scale_init == 1e-6 and cfg.drop_path_rate == 0.3 and cfg.crop_pct == 0.95
  m = tiny_model(layer_scale_init=0.25)
  block = m.stages[0].blocks[0]
  np.testing.assert_array_equal(block.layer_scale1.scale[...], np.full((8,), 0.25, np.float32))


# --------------------------------------------------------------------------- token mixers


def naive_pool_minus_x(x: np.ndarray) -> np.ndarray:
  """3x3 average over the cells that exist (4 at corners, 6 on edges, 9 inside), minus x."""
  n, h, w, c = x.shape
  out = np.empty_like(x, dtype=np.float64)
  for i in range(h):
    for j in range(w):
      window = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, :]
      out[:, i, j, :] = window.reshape(n, -1, c).mean(axis=1)
  return out - x


def test_pooling_mixer_matches_naive_numpy_including_border_divisors():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  got = np.asarray(pf.Pooling(3)(jnp.asarray(x)))
  np.testing.assert_allclose(got, naive_pool_minus_x(x), atol=1e-6)
  # The divisors themselves: pooling a constant image returns the constant everywhere
  # only if padding cells are excluded; with ones, pool(x) - x must be exactly 0.
  ones = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(np.asarray(pf.Pooling(3)(ones)), 0.0, atol=1e-7)
  # A single 1 in the corner: its 2x2 neighbourhood sees 1/4, edges 1/6, the centre 1/9.
  delta = np.zeros((1, 3, 3, 1), np.float32)
  delta[0, 1, 1, 0] = 1.0
  pooled = np.asarray(pf.Pooling(3)(jnp.asarray(delta)))[0, :, :, 0] + delta[0, :, :, 0]
  np.testing.assert_allclose(pooled, [[1 / 4, 1 / 6, 1 / 4], [1 / 6, 1 / 9, 1 / 6],
                                      [1 / 4, 1 / 6, 1 / 4]], rtol=1e-6)


def test_mixers_are_pluggable_into_the_same_skeleton():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
  counts = {}
  for mixer in ("pooling", "identity", "dwconv"):
    m = tiny_model(token_mixer=mixer, layer_scale_init=1.0)
    assert run(m, x).shape == (2, 10)
    counts[mixer] = pf.count_params(m)
  # Pooling and identity have no parameters; a depthwise 3x3 conv adds (9 + 1) * C per block.
  assert counts["pooling"] == counts["identity"]
  extra = sum(10 * w * d for w, d in zip(TINY["widths"], TINY["depths"]))
  assert counts["dwconv"] - counts["pooling"] == extra
  # Identity mixing really mixes nothing: logits differ from pooling's.
  assert not np.allclose(run(tiny_model(token_mixer="identity", layer_scale_init=1.0), x),
                         run(tiny_model(token_mixer="pooling", layer_scale_init=1.0), x))


# --------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def s12():
  return pf.create_model("poolformer_s12", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("hw", [(224, 224), (160, 160), (128, 192)])
def test_output_shapes(s12, hw):
  x = jnp.zeros((2, *hw, 3))
  assert run(s12, x).shape == (2, 1000)


@pytest.mark.parametrize("hw", [(224, 224), (96, 160)])
def test_features_mode_returns_four_normed_maps_at_strides_4_to_32(hw):
  m = pf.create_model("poolformer_s12", rngs=nnx.Rngs(0), features_only=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *hw, 3)), jnp.float32)
  feats = run(m, x)
  h, w = hw
  assert [f.shape for f in feats] == [(1, h // s, w // s, c) for s, c in
                                      zip((4, 8, 16, 32), (64, 128, 320, 512))]
  # Each map has its own one-group norm (fresh init: zero mean, unit variance per sample).
  for f in feats:
    np.testing.assert_allclose(float(jnp.mean(f)), 0.0, atol=1e-4)
    np.testing.assert_allclose(float(jnp.std(f)), 1.0, atol=1e-2)
  assert not hasattr(m, "head")
  assert len(m.feature_norms) == 4


def test_rejects_non_nhwc_input():
  with pytest.raises(ValueError, match="NHWC"):
    tiny_model()(jnp.zeros((1, 3, 64, 64)))


# --------------------------------------------------------------------------- stochastic depth


def test_eval_is_deterministic_and_train_needs_a_key():
  m = tiny_model(drop_path_rate=0.5, layer_scale_init=1.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, 64, 3)), jnp.float32)
  np.testing.assert_array_equal(run(m, x), run(m, x))
  np.testing.assert_array_equal(run(m, x), run(m, x, train=False, key=jax.random.key(3)))
  with pytest.raises(ValueError, match="key"):
    m(x, train=True)


def test_same_key_same_result_other_key_other_result():
  m = tiny_model(drop_path_rate=0.5, layer_scale_init=1.0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 64, 3)), jnp.float32)
  a = run(m, x, train=True, key=jax.random.key(1))
  b = run(m, x, train=True, key=jax.random.key(1))
  c = run(m, x, train=True, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_drop_path_schedule_is_linear_in_block_index():
  m = tiny_model(drop_path_rate=0.4)
  rates = [b.drop_rate for s in m.stages for b in s.blocks]
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4])


def test_stochastic_depth_drops_whole_samples_at_each_blocks_rate():
  """Statistical test (fixed seed): per block, the fraction of samples whose branch is dropped.

  The MLP branch is zeroed so the block's output is x + mask/(1-p) * ls1 * mixer(norm1(x));
  a sample is 'dropped' iff its output equals x exactly. With n samples the observed rate is
  within 5 binomial standard deviations of the schedule's rate.
  """
  m = tiny_model(drop_path_rate=0.4, layer_scale_init=1.0)
  n = 2000
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  for k, block in enumerate(b for s in m.stages for b in s.blocks):
    p = block.drop_rate
    block.mlp.fc2.kernel[...] = 0.0
    block.mlp.fc2.bias[...] = 0.0
    dim = block.norm1.scale.shape[0]
    x = jnp.asarray(rng.normal(size=(n, 4, 4, dim)), jnp.float32)
    out = np.asarray(block(x, jax.random.fold_in(key, k)))
    eval_out = np.asarray(block(x, None))
    dropped = np.all(out == np.asarray(x), axis=(1, 2, 3))
    sigma = np.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(dropped.mean() - p) <= 5 * sigma + 1e-9, (k, p, dropped.mean())
    # Kept samples carry the whole branch, rescaled by 1/(1-p): nothing partial.
    kept = ~dropped
    np.testing.assert_allclose(out[kept] - np.asarray(x)[kept],
                               (eval_out[kept] - np.asarray(x)[kept]) / (1 - p),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- dtypes and tracing


def randomize_params(model: nnx.Module, seed: int, scale_jitter: float = 0.3):
  """Moves every parameter away from its init so blocks are far from the identity."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for k, leaf in zip(keys, leaves):
    if leaf.ndim == 1:  # norms, layer scales, biases: around 1 (scales) or 0 (biases) +- jitter
      new.append(leaf + 0.5 + scale_jitter * jax.random.normal(k, leaf.shape, leaf.dtype))
    else:
      new.append(leaf + 0.5 * jnp.std(leaf) * jax.random.normal(k, leaf.shape, leaf.dtype))
  nnx.update(model, jax.tree.unflatten(treedef, new))


def test_bfloat16_compute_is_finite_and_close_to_float32():
  """bf16 has an 8-bit significand (relative step 2^-8 = 0.4%); over 12 blocks of norm, pool
  and MLP the rounding errors add up to about 1% of the logit scale. We allow 5%: enough for
  accumulation, far below what a wrong op would give (a sign or scale error is O(100%)).
  """
  f32 = pf.create_model("poolformer_s12", num_classes=100, rngs=nnx.Rngs(0))
  randomize_params(f32, seed=1)
  bf16 = pf.create_model("poolformer_s12", num_classes=100, rngs=nnx.Rngs(0),
                         dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 224, 224, 3)), jnp.float32)
  ref = np.asarray(run(f32, x))
  out = run(bf16, x)
  assert out.dtype == jnp.bfloat16
  assert jax.tree.leaves(nnx.state(bf16, nnx.Param))[0].dtype == jnp.float32
  out = np.asarray(out.astype(jnp.float32))
  assert np.all(np.isfinite(out))
  scale = np.abs(ref).max()
  assert scale > 1.0  # the randomised model produces non-trivial logits
  assert np.abs(out - ref).max() <= 0.05 * scale


def test_jitted_forward_traces_once_per_shape():
  m = tiny_model()
  graphdef, state = nnx.split(m)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  rng = np.random.default_rng(0)
  for _ in range(3):
    forward(state, jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32))
  with pytest.raises(AssertionError):  # a new shape must retrace, and the guard sees it
    forward(state, jnp.zeros((2, 96, 96, 3)))
  chex.clear_trace_counter()


# --------------------------------------------------------------------------- parity with HF


def hf_to_jax_state(hf_model, jax_model):
  """Copies an HF `PoolFormerForImageClassification`'s weights into our model, by hand.

  Written out independently of the converter on purpose: this test is the first proof that
  our architecture is the release's, so it must not share code with what it checks.
  """
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  enc = "poolformer.encoder."

  def conv(prefix):  # OIHW -> HWIO
    return {"kernel": sd[prefix + ".weight"].transpose(2, 3, 1, 0), "bias": sd[prefix + ".bias"]}

  def dense_1x1(prefix):  # [out, in, 1, 1] -> [in, out]
    return {"kernel": sd[prefix + ".weight"][:, :, 0, 0].T, "bias": sd[prefix + ".bias"]}

  def norm(prefix):
    return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

  state = nnx.state(jax_model, nnx.Param)
  target = {"stem": {"conv": conv(enc + "patch_embeddings.0.projection")}, "stages": {}}
  for i, stage in enumerate(jax_model.stages):
    st = {"blocks": {}}
    if i > 0:
      st["downsample"] = {"conv": conv(f"{enc}patch_embeddings.{i}.projection")}
    for j in range(len(stage.blocks)):
      p = f"{enc}block.{i}.{j}."
      st["blocks"][j] = {
          "norm1": norm(p + "before_norm"), "norm2": norm(p + "after_norm"),
          "layer_scale1": {"scale": sd[p + "layer_scale_1"]},
          "layer_scale2": {"scale": sd[p + "layer_scale_2"]},
          "mlp": {"fc1": dense_1x1(p + "output.conv1"), "fc2": dense_1x1(p + "output.conv2")},
      }
    target["stages"][i] = st
  target["norm"] = norm("norm")
  target["head"] = {"kernel": sd["classifier.weight"].T, "bias": sd["classifier.bias"]}
  flat_target = nnx.traversals.flatten_mapping(target)
  flat_state = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
  assert set(flat_target) == set(flat_state), set(flat_target) ^ set(flat_state)
  for key, value in flat_target.items():
    assert flat_state[key].shape == value.shape, (key, flat_state[key].shape, value.shape)
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(
      {k: jnp.asarray(v) for k, v in flat_target.items()}))
  nnx.update(jax_model, state)


def random_hf_poolformer_s12(num_labels=1000, seed=0):
  """HF's PoolFormer S12 with EVERY parameter randomised (layer scales and norms included)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.PoolFormerConfig(
      depths=[2, 2, 6, 2], hidden_sizes=[64, 128, 320, 512], layer_scale_init_value=1e-5,
      num_labels=num_labels)
  torch.manual_seed(seed)
  model = transformers.PoolFormerForImageClassification(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "layer_scale" in name):
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else
                0.2 + 0.5 * torch.rand_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn_like(p) / fan_in ** 0.5)
  return model


def test_one_block_matches_hf_with_random_weights():
  torch = pytest.importorskip("torch")
  hf = random_hf_poolformer_s12()
  ours = pf.create_model("poolformer_s12", rngs=nnx.Rngs(0))
  hf_to_jax_state(hf, ours)
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 128)).astype(np.float32)
  with torch.no_grad():
    ref = hf.poolformer.encoder.block[1][0](torch.from_numpy(x.transpose(0, 3, 1, 2)))[0]
  ref = ref.numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours.stages[1].blocks[0](jnp.asarray(x)))
  assert np.abs(ref - x).max() > 0.1  # the block is far from the identity
  assert np.abs(got - ref).max() <= 1e-4


def test_s12_logits_match_hf_with_random_weights():
  torch = pytest.importorskip("torch")
  skimage_data = pytest.importorskip("skimage.data")
  hf = random_hf_poolformer_s12()
  ours = pf.create_model("poolformer_s12", rngs=nnx.Rngs(0))
  hf_to_jax_state(hf, ours)
  # A real photo (scaled to [-2, 2]-ish like normalised input) and a random one.
  photo = skimage_data.chelsea()[:224, :224].astype(np.float32) / 255.0
  photo = (photo - 0.45) / 0.225
  noise = np.random.default_rng(0).normal(size=(224, 224, 3)).astype(np.float32)
  x = np.stack([photo, noise])
  with torch.no_grad():
    ref = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(run(ours, jnp.asarray(x)))
  assert ref.std() > 0.1  # logits are not degenerate
  assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------- fast paths


def naive_avg_pool(x: np.ndarray, k: int) -> np.ndarray:
  """k x k stride-1 average over the cells that exist, in float64."""
  n, h, w, c = x.shape
  p = k // 2
  out = np.empty(x.shape, np.float64)
  for i in range(h):
    for j in range(w):
      window = x[:, max(i - p, 0):i + p + 1, max(j - p, 0):j + p + 1, :]
      out[:, i, j, :] = window.reshape(n, -1, c).mean(axis=1)
  return out


@pytest.mark.parametrize("shape,k", [((2, 5, 7, 3), 3), ((1, 1, 1, 2), 3), ((1, 2, 9, 4), 3),
                                     ((2, 6, 4, 3), 5), ((1, 3, 3, 1), 7)])
def test_avg_pool_exclude_pad_matches_naive_numpy(shape, k):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(jax.jit(ops.avg_pool_exclude_pad, static_argnums=1)(jnp.asarray(x), k))
  np.testing.assert_allclose(got, naive_avg_pool(x, k), rtol=1e-6, atol=1e-6)
  # Border divisors: a constant map stays exactly constant.
  const = np.asarray(ops.avg_pool_exclude_pad(jnp.full(shape, 3.0), k))
  np.testing.assert_allclose(const, 3.0, rtol=1e-6)


@pytest.mark.parametrize("form", [ops.window_sum_separable, ops.window_sum_taps])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_both_window_sum_forms_match_numpy(form, dtype):
  """The CPU form and the TPU form (each runs only on its platform) against numpy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 3)), dtype)
  weights = rng.uniform(0.1, 1.0, size=(5, 7, 1)).astype(np.float32)
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  for k in (3, 5):
    for w in (None, weights):
      v = xs if w is None else xs * w
      ref = naive_avg_pool(v, k) * np.outer(ops._window_counts(5, k),
                                            ops._window_counts(7, k))[:, :, None]
      got = np.asarray(jax.jit(form, static_argnums=1)(x, k, w) if w is None else form(x, k, w))
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_group_norm_matches_numpy_including_large_means(offset):
  rng = np.random.default_rng(0)
  x = (offset + rng.normal(size=(3, 6, 5, 8)) * rng.uniform(0.1, 2.0, size=(3, 1, 1, 1)))
  norm = pf.GroupNorm1(8, 1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
  norm.scale[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = x.var(axis=(1, 2, 3), keepdims=True)
  ref = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
  got = np.asarray(norm(jnp.asarray(x, jnp.float32)))
  # float32 input: |x| ~ 1e3 carries ~6e-5 of rounding, i.e. a few 1e-4 after dividing by std.
  np.testing.assert_allclose(got, ref, atol=1e-5 if offset == 0 else 2e-3)
  m, rstd = norm.moments(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(rstd), 1 / np.sqrt(var + 1e-5), rtol=1e-3 if offset else 1e-5)


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_bfloat16_statistics_in_one_pass_agree_with_two_passes(offset):
  """A one-group norm of a bfloat16 map takes the one-pass variance; on the same values it
  agrees with the two-pass float32 statistics, values and gradients, for means of several
  standard deviations."""
  axes = (1, 2, 3)
  rng = np.random.default_rng(0)
  spread = rng.uniform(0.5, 2.0, size=(4, 1, 1, 1))
  x = jnp.asarray(offset + rng.normal(size=(4, 6, 5, 32)) * spread, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 1, 1, 1)), jnp.float32)

  def summary(x):
    mean, rstd = ops.moments(x, axes, 1e-6)
    return jnp.sum(w * mean) + jnp.sum(w * rstd)

  # Within 1e-4: bfloat16 itself resolves 4e-3 of a value.
  for got, ref in zip(ops.moments(x, axes, 1e-6), ops.moments(x.astype(jnp.float32), axes, 1e-6)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
  got = jax.grad(summary)(x).astype(jnp.float32)
  ref = jax.grad(summary)(x.astype(jnp.float32))
  ref = ref.astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("axes", [(1, 2, 3), (3,)])  # GroupNorm1's and LayerNorm's
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_normalize_equals_the_plain_norm_values_and_gradients(axes, dtype, tol, with_bias):
  """`ops.normalize`'s written-out backward against autodiff of the plain formula."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(1.0 + rng.normal(size=(3, 5, 6, 16)), dtype)
  scale = jnp.asarray(rng.normal(size=16), jnp.float32)
  bias = jnp.asarray(rng.normal(size=16), jnp.float32) if with_bias else None
  dy = jnp.asarray(rng.normal(size=x.shape), dtype)

  def plain(x, scale, bias):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes, keepdims=True)
    y = (xf - mean) * lax.rsqrt(jnp.var(xf, axes, keepdims=True) + 1e-6) * scale
    return (y if bias is None else y + bias).astype(dtype)

  ours = lambda x, scale, bias: ops.normalize(x, scale, bias, axes, 1e-6, dtype,
                                             recompute_backward=True)
  for fn in (ours, plain):
    assert fn(x, scale, bias).dtype == dtype
  got, ref = (jax.vjp(fn, x, scale, bias) for fn in (ours, plain))
  f32 = lambda t: np.asarray(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(f32(got[0]), f32(ref[0]), rtol=tol, atol=tol)
  for g, r in zip(got[1](dy), ref[1](dy)):
    if r is None:
      assert g is None
      continue
    assert g.dtype == r.dtype
    atol = tol * max(1.0, float(np.abs(f32(r)).max()))
    np.testing.assert_allclose(f32(g), f32(r), rtol=tol, atol=atol)


@pytest.mark.parametrize("drop", [False, True])
def test_pooling_residual_equals_the_unfused_block_half_values_and_gradients(drop):
  """`block.mix` is one op for `x + drop_path(ls1 * (pool(norm1(x)) - norm1(x)))`."""
  block = tiny_model(layer_scale_init=0.7).stages[1].blocks[0]
  block.drop_rate = 0.5
  rng = np.random.default_rng(0)
  block.norm1.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  block.norm1.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  block.layer_scale1.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x = jnp.asarray(3.0 + rng.normal(size=(8, 6, 7, 16)), jnp.float32)
  key = jax.random.key(1) if drop else None

  def reference(x):
    branch = block.layer_scale1(pf.Pooling(16)(block.norm1(x)))
    return x + pf.drop_path(branch, block.drop_rate, key)

  graphdef, params = nnx.split(block, nnx.Param)

  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(block.mix(x, key), reference(x), rtol=1e-5, atol=1e-5)
    fast = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p).mix(x, key) * cot),
                    argnums=(0, 1))(params, x)

    def ref_loss(p, x):
      b = nnx.merge(graphdef, p)
      branch = b.layer_scale1(pf.Pooling(16)(b.norm1(x)))
      return jnp.sum((x + pf.drop_path(branch, b.drop_rate, key)) * cot)

    ref = jax.grad(ref_loss, argnums=(0, 1))(params, x)
  if drop:  # The draw dropped some samples and kept others.
    kept = np.asarray(jnp.any(block.mix(x, key) != x, axis=(1, 2, 3)))
    assert 0 < kept.sum() < len(kept)
  for path, g in nnx.traversals.flatten_mapping(nnx.to_pure_dict(ref[0])).items():
    got = nnx.traversals.flatten_mapping(nnx.to_pure_dict(fast[0]))[path]
    np.testing.assert_allclose(got, g, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(g).max())),
                               err_msg=str(path))
  np.testing.assert_allclose(fast[1], ref[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_pooling_residual_of_the_baselines_equals_their_unfused_block_half(stage):
  """PoolFormerV2's pooling half, a bias-free one-group norm and (stage 3) a res-scaled skip,
  `rs1 * x + drop_path(pool(norm1(x)) - norm1(x))`: the fused op against the block's own
  unfused formula, values and gradients."""
  cfg = pf.get_config("poolformerv2_s12")
  block = pf.MetaFormerBlock(16, cfg, stage, 0.5, dtype=jnp.float32, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  assert block.fused_pooling and (block.res_scale1 is not None) == (stage == 2)
  rng = np.random.default_rng(0)
  block.norm1.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  if block.res_scale1 is not None:
    block.res_scale1.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x = jnp.asarray(3.0 + rng.normal(size=(8, 6, 7, 16)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  key = jax.random.key(1)
  graphdef, params = nnx.split(block, nnx.Param)

  def loss(p, x, fused):
    b = nnx.merge(graphdef, p)
    b.fused_pooling = fused
    out = b.mix(x, key)
    return jnp.sum(out * cot), out

  with jax.default_matmul_precision("highest"):
    (_, fast), fast_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, True)
    (_, ref), ref_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x, False)
  np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
  flat = lambda g: nnx.traversals.flatten_mapping(nnx.to_pure_dict(g))
  assert flat(ref_grads[0]).keys() == flat(fast_grads[0]).keys()
  for path, g in flat(ref_grads[0]).items():
    np.testing.assert_allclose(flat(fast_grads[0])[path], g, rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(g).max())), err_msg=str(path))
  np.testing.assert_allclose(fast_grads[1], ref_grads[1], rtol=1e-4, atol=1e-5)


def test_mlp_apply_gradients_equal_autodiff_of_the_reference():
  """`ops.mlp_reference` is the MLP's one reference (checked here against jax.nn.gelu's own
  formula); `mlp_apply`'s values and written-out backward must equal its autodiff."""
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in [(2, 5, 5, 8), (8, 32), (32,), (32, 8), (8,), (8,)]]
  cot = jnp.asarray(rng.normal(size=(2, 5, 5, 8)), jnp.float32)

  def independent(x, w1, b1, w2, b2, scale):
    return (jax.nn.gelu(x @ w1 + b1, approximate=False) @ w2 + b2) * scale

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(ops.mlp_reference(*args), independent(*args), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(ops.mlp_apply(*args), ops.mlp_reference(*args), rtol=1e-5,
                               atol=1e-5)
    got = jax.grad(lambda *a: jnp.sum(ops.mlp_apply(*a) * cot), argnums=range(6))(*args)
    ref = jax.grad(lambda *a: jnp.sum(ops.mlp_reference(*a) * cot), argnums=range(6))(*args)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4 * float(jnp.abs(r).max()))


def test_s12_gradients_match_hf_with_random_weights():
  """Every parameter's gradient, and the input's, equal PyTorch autograd's through HF's model."""
  torch = pytest.importorskip("torch")
  hf = random_hf_poolformer_s12(num_labels=10)
  ours = pf.create_model("poolformer_s12", num_classes=10, rngs=nnx.Rngs(0))
  hf_to_jax_state(hf, ours)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  cot = rng.normal(size=(2, 10)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  (hf(xt).logits * torch.from_numpy(cot)).sum().backward()
  ref_dx = xt.grad.numpy().transpose(0, 2, 3, 1)
  # Load HF's gradients into a second model with the same (independent) name mapping.
  grads_as_model = pf.create_model("poolformer_s12", num_classes=10, rngs=nnx.Rngs(0))
  with torch.no_grad():
    for p in hf.parameters():
      p.copy_(p.grad)
  hf_to_jax_state(hf, grads_as_model)
  ref = nnx.to_pure_dict(nnx.state(grads_as_model, nnx.Param))

  graphdef, params = nnx.split(ours, nnx.Param)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x) * cot)

  with jax.default_matmul_precision("highest"):
    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
  np.testing.assert_allclose(g_x, ref_dx, atol=1e-4 * np.abs(ref_dx).max())
  got = nnx.traversals.flatten_mapping(nnx.to_pure_dict(g_params))
  for path, r in nnx.traversals.flatten_mapping(ref).items():
    r = np.asarray(r)
    scale = max(np.abs(r).max(), 1e-3)  # norm1.bias: exactly 0 for us, rounding noise in HF
    np.testing.assert_allclose(got[path], r, atol=1e-4 * scale, err_msg=str(path))


def test_remat_recomputes_every_block_and_gives_the_same_loss_and_gradients():
  from jax.extend.core.primitives import remat_p
  from conftest import count_primitive
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  key = jax.random.key(3)
  grads = []
  # No remat, every stage, stages 1 and 3 only: the same loss and gradients.
  for remat, stages in ((False, None), (True, None), (True, (1, 3))):
    m = tiny_model(drop_path_rate=0.3, layer_scale_init=0.5, remat=remat, remat_stages=stages)
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params)(x, train=True, key=key) ** 2)

    # The rematerialisation is in the differentiated program (one per block it covers).
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
    covered = [d for s, d in enumerate(TINY["depths"], 1) if remat and (not stages or s in stages)]
    assert count_primitive(jaxpr, remat_p) == sum(covered)
    grads.append(jax.jit(jax.value_and_grad(loss))(params))
  (l0, g0), *others = grads
  for l1, g1 in others:
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"remat_stages=\(5,\): stages are numbered 1-4"):
    tiny_model(remat=True, remat_stages=(5,))


def test_bfloat16_gradients_are_finite_and_close_to_float32():
  """The MLP's custom backward in bfloat16 (XLA:CPU has no bf16 x bf16 -> f32 dot kernel)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  grads = []
  for dtype in (jnp.float32, jnp.bfloat16):
    m = tiny_model(layer_scale_init=0.5, dtype=dtype)
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2)

    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert b.dtype == jnp.float32 and np.all(np.isfinite(b))
    scale = float(jnp.abs(a).max()) + 1e-6
    assert float(jnp.abs(a - b).max()) <= 0.1 * scale
