"""The MetaFormer-baselines family (version 2): the release's hyperparameters, input sizes,
features, RandFormer's fixed matrices, head dropout, dtypes. Numerics against timm are in
test_metaformer_timm.py; parameter counts in test_model.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poolformer_jax import model as pf
from poolformer_jax import hub, pretrained

# Small members of each family for tests about behaviour, not size (head_dim 16: 2-4 heads).
TINY = dict(depths=(1, 1, 2, 1), widths=(16, 32, 48, 64), head_dim=16)
FAMILIES = ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18",
            "caformer_s18")


def tiny(name, **overrides):
  return pf.create_model(name, num_classes=10, rngs=nnx.Rngs(0), **{**TINY, **overrides})


@nnx.jit(static_argnames="train")
def run(model, x, train=False, key=None):
  return model(x, train=train, key=key)


def images(n, h, w, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


def test_variants_carry_the_releases_hyperparameters():
  """Spot checks against the reference tables (drop path, head dropout, eps, crop, widths)."""
  expect = {  # name: (drop_path_rate, head_dropout, last width, head)
      "identityformer_m48": (0.4, 0.0, 768, "linear"),
      "randformer_m48": (0.3, 0.0, 768, "linear"),
      "poolformerv2_s36": (0.2, 0.0, 512, "linear"),
      "convformer_m36": (0.4, 0.0, 576, "mlp"),
      "convformer_b36": (0.6, 0.0, 768, "mlp"),
      "caformer_s18": (0.15, 0.0, 512, "mlp"),
      "caformer_s36": (0.3, 0.4, 512, "mlp"),
      "caformer_b36": (0.6, 0.5, 768, "mlp"),
  }
  for name, (dpr, head_drop, width, head) in expect.items():
    cfg = pf.get_config(name)
    assert (cfg.drop_path_rate, cfg.head_dropout, cfg.widths[-1], cfg.head) == (
        dpr, head_drop, width, head), name
  for name in pf.list_models():
    cfg = pf.get_config(name)
    if name.startswith("poolformer_"):
      assert cfg.version == 1 and cfg.norm_eps == 1e-5 and cfg.crop_pct in (0.9, 0.95)
    else:
      assert cfg.version == 2 and cfg.norm_eps == 1e-6 and cfg.crop_pct == 1.0
      assert cfg.layer_scale_init is None and cfg.res_scale_init == (None, None, 1.0, 1.0)
      assert cfg.head_norm_eps == 1e-5  # the release's MLP-head LayerNorm (timm: 1e-6)
  assert pf.get_config("caformer_m36").stage_token_mixers == (
      "sepconv", "sepconv", "attention", "attention")
  assert pf.get_config("randformer_s24").stage_token_mixers == (
      "identity", "identity", "random", "random")


@pytest.mark.parametrize("name", [n for n in FAMILIES if not n.startswith("randformer")])
def test_any_input_size_divisible_by_32_and_features_only(name):
  x = images(2, 96, 160)
  logits = run(tiny(name), x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  backbone = tiny(name, features_only=True)
  assert not hasattr(backbone, "head") and not hasattr(backbone, "feature_norms")
  feats = run(backbone, x)  # the stage outputs as they are (as timm's features_only)
  assert [f.shape for f in feats] == [(2, 96 // s, 160 // s, c) for s, c in
                                      zip((4, 8, 16, 32), TINY["widths"])]


def test_randformer_runs_at_224_only_with_a_clear_error_otherwise():
  m = tiny("randformer_s12")
  assert run(m, images(1, 224, 224)).shape == (1, 10)
  assert [f.shape[1] for f in run(tiny("randformer_s12", features_only=True),
                                  images(1, 224, 224))] == [56, 28, 14, 7]
  for h, w in ((256, 256), (224, 192)):
    with pytest.raises(ValueError, match=r"224x224.*resize or crop"):
      run(m, images(1, h, w))


def test_randformer_matrices_are_row_stochastic_per_block_and_get_no_gradient():
  m = tiny("randformer_s12")
  mats = [b.token_mixer.random_matrix[...] for s in m.stages[2:] for b in s.blocks]
  assert [r.shape for r in mats] == [(196, 196), (196, 196), (49, 49)]
  np.testing.assert_allclose(np.sum(mats[0], axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(mats[0], mats[1])  # each block draws its own
  graphdef, params = nnx.split(m, nnx.Param)
  x = images(2, 224, 224)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  frozen = pf.frozen_mask(grads)
  n_frozen = 0
  for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(frozen)):
    if f:
      np.testing.assert_array_equal(g, 0.0)
      n_frozen += 1
  assert n_frozen == 3
  # The zero is the stop, not disuse: other matrices give other logits.
  other = tiny("randformer_s12")
  nnx.update(other, nnx.state(m, nnx.Param))
  other.stages[2].blocks[0].token_mixer.random_matrix[...] = mats[1]
  assert not np.allclose(run(other, x), run(m, x))


def test_randformer_matrices_are_saved_and_loaded_with_the_parameters(tmp_path):
  m = tiny("randformer_s12")
  path = pretrained.save_pretrained(str(tmp_path / "rand"), m, variant="randformer_s12")
  loaded, _ = hub.load_pretrained(path, rngs=nnx.Rngs(123))  # other seed: other draws
  assert loaded.cfg == m.cfg
  for s in (2, 3):
    np.testing.assert_array_equal(loaded.stages[s].blocks[0].token_mixer.random_matrix[...],
                                  m.stages[s].blocks[0].token_mixer.random_matrix[...])
  x = images(1, 224, 224)
  np.testing.assert_array_equal(run(loaded, x), run(m, x))


def test_head_dropout_and_drop_path_need_a_key_and_only_act_in_training():
  """Called eagerly on the head and one block (a tiny model per rate would compile each)."""
  m = tiny("caformer_s18", drop_path_rate=0.5, head_dropout=0.5)
  with pytest.raises(ValueError, match="key"):
    m(images(2, 64, 64), train=True)
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 64)), jnp.float32)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  for model in (m, tiny("poolformerv2_s12", head_dropout=0.5)):  # MLP head, linear head
    evaluated = model.forward_head(feats)
    np.testing.assert_array_equal(model.forward_head(feats, k1), model.forward_head(feats, k1))
    assert not np.allclose(model.forward_head(feats, k1), evaluated)
    assert not np.allclose(model.forward_head(feats, k1), model.forward_head(feats, k2))
  no_dropout = tiny("caformer_s18", head_dropout=0.0)
  np.testing.assert_array_equal(no_dropout.forward_head(feats, k1), no_dropout.forward_head(feats))
  # Drop path on a v2 residual (res scale on the skip): each sample keeps or drops the whole
  # branch, and a kept one is rescaled by 1 / (1 - rate).
  block = m.stages[3].blocks[-1]
  assert block.drop_rate == 0.5 and block.res_scale1 is not None
  block.res_scale1.scale[...] = jnp.linspace(0.5, 1.5, 64)
  rng = np.random.default_rng(1)
  x, branch = (jnp.asarray(rng.normal(size=(64, 2, 2, 64)), jnp.float32) for _ in range(2))
  residual = block._residual  # pylint: disable=protected-access
  out = np.asarray(residual(x, branch, None, block.res_scale1, 0.5, k1))
  skip = np.asarray(block.res_scale1(x))
  dropped = np.all(np.isclose(out, skip, atol=1e-6), axis=(1, 2, 3))
  kept = np.all(np.isclose(out, skip + 2 * np.asarray(branch), atol=1e-5), axis=(1, 2, 3))
  assert np.all(dropped ^ kept) and 16 < dropped.sum() < 48


def test_bfloat16_compute_is_close_to_float32():
  """bf16 through attention, SepConv and the MLP head: within 5% of the logit scale (as v1)."""
  x = images(2, 64, 64)
  f32 = tiny("caformer_s18")
  bf16 = tiny("caformer_s18", dtype=jnp.bfloat16)
  ref = np.asarray(run(f32, x))
  out = run(bf16, x)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.all(np.isfinite(out)) and np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("overrides,match", [
    (dict(token_mixer=("pooling", "attention")), "one per stage"),
    (dict(token_mixer=("pooling",) * 3 + ("self_attention",)), "unknown token_mixer"),
    (dict(norm="batch"), "norm="),
    (dict(head="conv"), "head="),
    (dict(version=3), "version="),
    (dict(res_scale_init=(1.0,)), "res_scale_init"),
    (dict(head_dropout=1.0), "head_dropout"),
])
def test_bad_configs_are_rejected_with_the_field_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    pf.get_config("caformer_s18", **overrides)
