"""The MetaFormer-baselines family against timm's PyTorch models, the independent reference.

Every parameter of the timm model is randomised to O(1) (norm gains and biases, res scales,
StarReLU scales and biases, weights ~ N(0, 1/fan_in)), so no block is near the identity and no
term can hide; the weights reach our model through the converter's tables
(poolformer_jax.convert.keys), which these tests therefore check too. IdentityFormer is timm's
PoolFormerV2 with identity mixers, RandFormer timm's skeleton with a random-mixing module
written from the paper (timm has neither). timm's MLP-head LayerNorm uses eps 1e-6 where the
release uses 1e-5: these tests set ours to timm's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import helpers_torch as H  # noqa: E402
from poolformer_jax import model as pf  # noqa: E402

TIMM_HEAD_EPS = 1e-6
TOL = 1e-4

# One variant per family; the block tests take a stage-3 block (res scale on) of each mixer.
FAMILY = {"pooling": "poolformerv2_s12", "identity": "identityformer_s12",
          "random": "randformer_s12", "sepconv": "convformer_s18", "attention": "caformer_s18"}


@functools.lru_cache(maxsize=None)
def reference(name: str):
  """timm's model for `name`, every parameter randomised (built once per worker)."""
  return H.randomize_(H.timm_metaformer(name).eval(), seed=0)


def ours_from_timm(name: str, **overrides):
  return H.load_timm_state(
      lambda: pf.create_model(name, head_norm_eps=TIMM_HEAD_EPS, rngs=nnx.Rngs(0), **overrides),
      reference(name).state_dict())


def same_worker(name):
  """The tests of one family share its randomised reference: keep them on one xdist worker."""
  return pytest.mark.xdist_group(f"timm_{name}")


@pytest.mark.parametrize("name,size", [
    pytest.param(n, s, marks=same_worker(n)) for n, s in
    [("poolformerv2_s12", 224), ("identityformer_s12", 224), ("randformer_s12", 224),
     ("convformer_s18", 224), ("caformer_s18", 224), ("caformer_s18", 384)]])
def test_logits_match_timm(name, size):
  ref = reference(name)
  ours = ours_from_timm(name)
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  graphdef, state = nnx.split(ours)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x)))
  assert want.std() > 0.5  # non-degenerate logits
  err = np.abs(got - want).max()
  print(f"{name}@{size}: max |logit - timm| = {err:.2e}")
  assert err <= TOL, err


@pytest.mark.parametrize("mixer", [pytest.param(m, marks=same_worker(n))
                                   for m, n in FAMILY.items()])
def test_block_values_and_gradients_match_torch_autograd(mixer):
  """One stage-3 block: output, input gradient and every parameter's gradient."""
  name = FAMILY[mixer]
  cfg = pf.get_config(name)
  stage = 2
  dim = cfg.widths[stage]
  ref_block = reference(name).stages[stage].blocks[0]
  root = f"stages.{stage}.blocks.0."  # the block's place in timm's model and in ours
  ours = H.load_timm_state(
      lambda: pf.MetaFormerBlock(dim, cfg, stage, 0.0, dtype=jnp.float32,
                                 param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
      ref_block.state_dict(), timm_root=root, jax_root=root)
  assert type(ours.token_mixer).__name__.lower().startswith(mixer[:4])
  assert ours.res_scale1 is not None and ours.layer_scale1 is None

  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 14, 14, dim)).astype(np.float32)
  cot = rng.normal(size=x.shape).astype(np.float32)
  tokens = mixer == "attention"  # timm runs attention stages as (B, N, C) tokens, others NCHW

  def to_torch(a):
    return torch.from_numpy(a.reshape(2, -1, dim) if tokens else a.transpose(0, 3, 1, 2).copy())

  def from_torch(t):
    a = t.detach().numpy()
    return a.reshape(x.shape) if tokens else a.transpose(0, 2, 3, 1)

  xt = to_torch(x).requires_grad_(True)
  ref_block.zero_grad()
  out_t = ref_block(xt)
  (out_t * to_torch(cot)).sum().backward()

  graphdef, params = nnx.split(ours, nnx.Param)

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x)
    return jnp.sum(out * cot), out

  with jax.default_matmul_precision("highest"):
    (_, out), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, jnp.asarray(x))
  want = from_torch(out_t)
  assert np.abs(want - x).max() > 0.5  # far from the identity
  np.testing.assert_allclose(out, want, atol=TOL * np.abs(want).max())
  np.testing.assert_allclose(g_x, from_torch(xt.grad), atol=TOL * np.abs(g_x).max())

  got = {".".join(map(str, k)): np.asarray(v) for k, v in
         nnx.traversals.flatten_mapping(nnx.to_pure_dict(g_params)).items()}
  checked = set()
  for key, p in ref_block.named_parameters():
    if p.grad is None:  # frozen in torch (requires_grad=False): stopped in ours
      assert key.endswith("random_matrix"), key
      path, _ = H.timm_to_jax(key, p.detach().numpy(), root, root)
      np.testing.assert_array_equal(got[path], 0.0, err_msg=path)
    else:
      path, ref_grad = H.timm_to_jax(key, p.grad.numpy(), root, root)
      np.testing.assert_allclose(got[path], ref_grad, atol=TOL * np.abs(ref_grad).max(),
                                 err_msg=path)
    checked.add(path)
  assert checked == set(got)


@same_worker("caformer_s18")
def test_mlp_head_norm_eps_is_the_releases_and_a_config_field():
  """The MLP head's LayerNorm eps: 1e-5 by default (the release), timm's 1e-6 when set.

  fc1 is scaled down so the head's hidden activations have a variance near eps, where 1e-5 and
  1e-6 give clearly different logits.
  """
  head = reference("caformer_s18").head.fc
  state = {k: v * 0.02 if k.startswith("fc1.") else v for k, v in head.state_dict().items()}
  x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
  default_eps = pf.get_config("caformer_s18").head_norm_eps
  assert default_eps == 1e-5

  def torch_head(eps):
    ref = type(head)(512, 1000)
    ref.norm.eps = eps
    ref.load_state_dict(state)
    with torch.no_grad():
      return ref.eval()(torch.from_numpy(x)).numpy()

  def our_head(eps):
    m = H.load_timm_state(lambda: pf.MlpHead(512, 1000, norm_eps=eps, dropout_rate=0.0,
                                             dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(0)), state,
                          timm_root="head.fc.", jax_root="head.")
    with jax.default_matmul_precision("highest"):
      return np.asarray(m(jnp.asarray(x)))

  for eps in (default_eps, TIMM_HEAD_EPS):
    want = torch_head(eps)
    np.testing.assert_allclose(our_head(eps), want, atol=TOL * np.abs(want).max())
  assert np.abs(torch_head(1e-5) - torch_head(1e-6)).max() > 0.1 * np.abs(torch_head(1e-6)).max()
  model = nnx.eval_shape(lambda: pf.create_model("caformer_s18", rngs=nnx.Rngs(0)))
  assert model.head.norm.eps == 1e-5
