"""Converting the MetaFormer baselines: logits against timm through the real converter, both
layouts, timm round trips, 21k heads, and bad inputs.

The reference is timm's PyTorch model with every parameter randomised to O(1)
(helpers_torch.randomize_). timm files are written by timm itself (`state_dict`,
`save_for_hf`); release files by a key table written from the release's module names
(helpers_torch.timm_to_release), which timm's own `checkpoint_filter_fn` must map back exactly. IdentityFormer and RandFormer
exist only in the release layout: their references are timm's MetaFormer skeleton holding them.
Our converted model keeps the release's MLP-head LayerNorm eps (1e-5); the reference gets the
same for the comparison (timm's own 1e-6 is a known difference, see test_metaformer_timm.py).
"""

import contextlib
import functools
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")

import convert_torch_weights  # noqa: E402
import helpers_torch as H  # noqa: E402
from poolformer_jax import convert as cv  # noqa: E402
from poolformer_jax import create_model, inference, load_pretrained  # noqa: E402
from poolformer_jax import errors, pretrained  # noqa: E402
from poolformer_jax import model as model_lib  # noqa: E402
from poolformer_jax.convert import hf_export, keys  # noqa: E402

timm = H.import_timm()  # before the converter's --check imports timm
from timm.models import metaformer as timm_metaformer  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

TOL = 1e-4
PHOTOS = ("chelsea", "coffee")


@functools.lru_cache(maxsize=None)
def reference(name: str, num_classes: int = 1000, tag: str = ""):
  """timm's model for `name` with every parameter randomised (built once per worker)."""
  return H.randomize_(H.timm_metaformer(name, num_classes, tag).eval(), seed=1)


def same_worker(name):
  """Tests sharing a randomised reference (or the files written from it) stay on one worker."""
  return pytest.mark.xdist_group(f"convert_{name}")


def family_marks(name):
  """same_worker, and slow for the 21841-class ConvFormer (69M parameters, 280 MB files)."""
  return [same_worker(name)] + ([pytest.mark.slow] if name == "convformer_s18" else [])


def run_cli(*argv) -> int:
  return convert_torch_weights.main([str(a) for a in argv])


def fails(capsys, *argv, match):
  """The CLI exits 1 with one clear error line (no traceback) containing every `match`."""
  assert run_cli(*argv) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err
  for m in [match] if isinstance(match, str) else match:
    assert m in err, err
  return err


def params_of(model) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_same_params(a, b):
  a, b = params_of(a), params_of(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def max_logit_diff(model, info, ref) -> float:
  """Max |logit| difference on real photos, preprocessed as the converted directory says."""
  return H.max_logit_diff(model, info.preprocessing, ref,
                          [getattr(skimage_data, p)() for p in PHOTOS])


# ---------------------------------------------------------------------------
# Source files, written by timm (its layout) or by helpers_torch.timm_to_release (the release's).
# ---------------------------------------------------------------------------


def write_source(name, fmt, directory, *, num_classes=1000, tag="", filename=None):
  """`name`'s randomised reference saved as `fmt`: 'release' (.pth), 'timm-pth',
  'timm-safetensors' (a bare state-dict file) or 'timm-hub' (save_for_hf's directory)."""
  ref = reference(name, num_classes, tag)
  os.makedirs(directory, exist_ok=True)
  stem = filename or name
  if fmt == "release":
    path = os.path.join(directory, f"{stem}.pth")
    torch.save(H.timm_to_release(ref.state_dict()), path)
  elif fmt == "timm-pth":
    path = os.path.join(directory, f"{stem}.pth")
    torch.save(ref.state_dict(), path)
  elif fmt == "timm-safetensors":
    from safetensors.torch import save_file
    path = os.path.join(directory, f"{stem}.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  elif fmt == "timm-hub":
    path = os.path.join(directory, stem)
    save_for_hf(ref, path, safe_serialization=True)
  else:
    raise ValueError(fmt)
  return path


_CONVERTED = {}


def converted(tmp_path_factory, name, fmt, filename, num_classes=1000, tag=""):
  """(source path, converted directory, the CLI's output) of `write_source(...)` converted by
  the CLI; once per worker for each set of arguments (tests that share one share a worker)."""
  args = (name, fmt, filename, num_classes, tag)
  if args not in _CONVERTED:
    root = tmp_path_factory.mktemp(name)
    src = write_source(name, fmt, root / "src", num_classes=num_classes, tag=tag,
                       filename=filename)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert run_cli(src, root / "converted") == 0
    _CONVERTED[args] = (src, root / "converted", out.getvalue())
  return _CONVERTED[args]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=same_worker(n)) for n in
    ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18",
     "caformer_s18")])
def test_release_layout_table_is_what_timm_reads(name):
  """The test-side release layout (helpers_torch.timm_to_release) is the one timm's own loader
  converts from: timm's checkpoint_filter_fn maps it back to timm's keys, shapes and values."""
  ref = reference(name)
  want = ref.state_dict()
  release = H.timm_to_release(want)
  assert not any(k.startswith(("stem.", "head.fc.")) or ".blocks." in k for k in release)
  back = timm_metaformer.checkpoint_filter_fn(release, ref)
  assert list(back) == list(want)
  for k, v in want.items():
    assert back[k].shape == v.shape and torch.equal(back[k], v), k


# ---------------------------------------------------------------------------
# Logits through the converter, one family each.
# ---------------------------------------------------------------------------

# name, source format, file name, classes, timm tag: the file name tells IdentityFormer from
# PoolFormerV2 (their tensors are the same); the hub directories say 384 and 21841 classes in
# their config.json.
FAMILIES = {
    "identityformer_s12": ("identityformer_s12", "release", "identityformer_s12"),
    "randformer_s12": ("randformer_s12", "release", "randformer_s12"),
    "poolformerv2_s12": ("poolformerv2_s12", "timm-safetensors", "poolformerv2_s12"),
    "convformer_s18": ("convformer_s18", "timm-hub", "convformer_s18.sail_in22k", 21841,
                       "sail_in22k"),
    "caformer_s18": ("caformer_s18", "timm-hub", "caformer_s18.sail_in1k_384", 1000,
                     "sail_in1k_384"),
}


@pytest.mark.parametrize("family", [pytest.param(n, marks=family_marks(n)) for n in FAMILIES])
def test_converted_logits_match_timm(family, tmp_path_factory):
  name, fmt, _, num_classes, tag = (FAMILIES[family] + (1000, ""))[:5]
  _, out, printed = converted(tmp_path_factory, *FAMILIES[family])
  layout = "release_v2" if fmt == "release" else "timm"
  assert f"{layout} layout, {name}, {num_classes} classes" in printed
  model, info = load_pretrained(out)
  assert info.variant == name and info.num_classes == num_classes
  assert model.cfg == model_lib.get_config(name, num_classes=num_classes)  # head eps 1e-5
  size = 384 if tag.endswith("384") else 224
  assert info.preprocessing["input_size"] == size and info.preprocessing["crop_pct"] == 1.0
  assert info.labels == pretrained.imagenet_labels(num_classes)  # 1k or 21k names
  assert len(info.labels) == num_classes
  err = max_logit_diff(model, info, reference(name, num_classes, tag))
  print(f"{name} ({fmt}, {num_classes} classes, {size}px): max |logit - timm| = {err:.2e}")
  assert err <= TOL, err


@same_worker("poolformerv2_s12")
def test_check_flag_compares_with_timm(tmp_path, capsys):
  src = write_source("poolformerv2_s12", "timm-safetensors", tmp_path / "src")
  assert run_cli(src, tmp_path / "out", "--check") == 0
  out = capsys.readouterr().out
  assert "check vs timm's PyTorch model, 4 images" in out and "top-1 agreement 100%" in out
  # Without timm, the check says what to install; nothing is written.
  with pytest.MonkeyPatch.context() as m:
    m.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    fails(capsys, src, tmp_path / "nope", "--check", match=["timm", "pip install timm"])
  assert not os.path.exists(tmp_path / "nope")


@same_worker("caformer_s18")
def test_predict_uses_the_converted_preprocessing(tmp_path_factory):
  """`predict` on a converted 384 CAFormer: 384 crops at crop_pct 1.0, timm's top-5."""
  _, out, _ = converted(tmp_path_factory, *FAMILIES["caformer_s18"])
  model, info = load_pretrained(out)
  images = [getattr(skimage_data, p)() for p in PHOTOS]
  preds = inference.predict(model, images, preprocessing=info.preprocessing, labels=info.labels,
                            batch_size=2)
  pixels = inference.preprocess(images, info.preprocessing)
  assert pixels.shape == (2, 384, 384, 3)
  ref = reference("caformer_s18", 1000, "sail_in1k_384")
  with torch.no_grad(), H.head_norm_eps(ref, model.cfg.head_norm_eps):
    probs = torch.softmax(ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())), -1)
  for pred, row in zip(preds, probs.numpy()):
    assert list(pred.indices) == list(np.argsort(-row)[:5])
    np.testing.assert_allclose(pred.probs, row[list(pred.indices)], atol=1e-5)


# ---------------------------------------------------------------------------
# Layouts and round trips (no forward pass: parameters compared bit for bit).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=same_worker(n)) for n in
                                  ("poolformerv2_s12", "convformer_s18", "caformer_s18")])
def test_release_and_timm_layouts_give_identical_parameters(name, tmp_path):
  release = cv.convert(write_source(name, "release", tmp_path / "r"))
  timm_file = cv.convert(write_source(name, "timm-safetensors", tmp_path / "t"))
  assert (release.layout, timm_file.layout) == ("release_v2", "timm")
  assert release.info == timm_file.info
  assert_same_params(release.model, timm_file.model)


ROUND_TRIPS = {
    "poolformerv2_s12": ("poolformerv2_s12", "timm-hub", "poolformerv2_s12.sail_in1k", 1000,
                         "sail_in1k"),
    "caformer_s18": FAMILIES["caformer_s18"],
    "convformer_s18": FAMILIES["convformer_s18"],  # 21841 classes
}


@pytest.mark.parametrize("family", [pytest.param(n, marks=family_marks(n)) for n in ROUND_TRIPS])
def test_timm_round_trip_is_bit_exact(family, tmp_path, tmp_path_factory, capsys):
  """timm's directory -> ours -> --to-timm: every tensor identical (key, shape, dtype, bytes),
  the same preprocessing, and timm's own loader reads the result."""
  from safetensors.numpy import load_file
  name, _, _, num_classes, tag = ROUND_TRIPS[family]
  src, jax_dir, _ = converted(tmp_path_factory, *ROUND_TRIPS[family])
  assert run_cli("--to-timm", jax_dir, tmp_path / "back") == 0
  assert "timm.create_model('local-dir:" in capsys.readouterr().out
  want, got = load_file(os.path.join(src, "model.safetensors")), load_file(
      tmp_path / "back" / "model.safetensors")
  assert list(got) == list(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  original = json.loads(open(os.path.join(src, "config.json")).read())
  assert config["architecture"] == original["architecture"] == name
  assert config["num_classes"] == num_classes
  for field in ("input_size", "crop_pct", "interpolation", "mean", "std", "classifier"):
    assert config["pretrained_cfg"][field] == original["pretrained_cfg"][field], field
  loaded = timm.create_model(f"local-dir:{tmp_path / 'back'}", pretrained=True)
  want_size = tuple(original["pretrained_cfg"]["input_size"])
  assert tuple(loaded.pretrained_cfg["input_size"]) == want_size
  for k, v in reference(name, num_classes, tag).state_dict().items():
    assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("name", [pytest.param(n, marks=same_worker(n)) for n in FAMILIES])
def test_tables_give_timms_and_the_releases_names_and_shapes(name):
  """Every parameter of ours has exactly timm's key and shape (1x1 convs in channels-first
  stages, (out, in) in CAFormer's attention stages) and the release's; both map back."""
  abstract = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0)))
  canonical = {keys.lookup(path, "jax")[0]: shape
               for path, shape in params_of_abstract(abstract).items()}
  state = reference(name).state_dict()
  timm_shapes = {k: tuple(v.shape) for k, v in state.items()}
  release_shapes = {k: tuple(v.shape) for k, v in H.timm_to_release(state).items()}
  mixers = abstract.cfg.stage_token_mixers
  for layout, want in (("timm", timm_shapes), ("release_v2", release_shapes)):
    got = {}
    for canon, shape in canonical.items():
      _, entry = keys.lookup(canon, "canonical")
      torch_form = entry.transform.to_torch(np.empty(shape, np.float32))
      key, value = keys.to_source(canon, torch_form, layout, mixers)
      got[key] = tuple(value.shape)
      back, squeezed = keys.from_source(key, value, layout)
      assert back == canon and squeezed.shape == torch_form.shape, (layout, key)
    assert got == want, layout
    assert keys.detect_layout(got) == layout


def params_of_abstract(abstract):
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {jax.tree_util.keystr(k, simple=True, separator="."): v.shape for k, v in flat[0]}


# ---------------------------------------------------------------------------
# Bad inputs and refused exports: one clear error, nothing written.
# ---------------------------------------------------------------------------


@same_worker("poolformerv2_s12")
def test_identityformer_or_poolformerv2_needs_a_name_or_model_flag(tmp_path, capsys):
  src = write_source("poolformerv2_s12", "timm-safetensors", tmp_path, filename="weights")
  fails(capsys, src, tmp_path / "out", match=[
      "identityformer_s12 and poolformerv2_s12", "--model identityformer_s12 or --model "
      "poolformerv2_s12"])
  assert not os.path.exists(tmp_path / "out")
  fails(capsys, src, tmp_path / "out", "--model", "caformer_s18",
        match=["--model caformer_s18", "contradicts the weights",
               "identityformer_s12 or poolformerv2_s12"])
  assert run_cli(src, tmp_path / "id", "--model", "identityformer_s12") == 0
  model, info = load_pretrained(tmp_path / "id")
  assert info.variant == "identityformer_s12" and model.cfg.stage_token_mixers[0] == "identity"


@same_worker("caformer_s18")
def test_unknown_variant_and_misshaped_tensors_are_reported(tmp_path, capsys):
  state = reference("caformer_s18").state_dict()
  truncated = {k: v for k, v in state.items() if not k.startswith("stages.3.blocks.2.")}
  torch.save(truncated, tmp_path / "short.pth")
  fails(capsys, tmp_path / "short.pth", tmp_path / "out",
        match=["depths [3, 3, 9, 2]", "token mixers [sepconv, sepconv, attention, attention]",
               "match no known variant"])
  bad = dict(state)
  bad["stages.0.blocks.0.mlp.fc1.weight"] = torch.zeros(256, 32, 1, 1)
  bad["stages.3.blocks.0.mlp.fc1.weight"] = torch.zeros(2048, 256)
  del bad["stages.2.blocks.4.token_mixer.qkv.weight"]
  torch.save(bad, tmp_path / "bad.pth")
  fails(capsys, tmp_path / "bad.pth", tmp_path / "out", match=[
      "3 problem(s)", "(timm layout, caformer_s18)",
      "wrong shape stages.0.blocks.0.mlp.fc1.weight: [256, 32, 1, 1], expected [256, 64, 1, 1]",
      "wrong shape stages.3.blocks.0.mlp.fc1.weight: [2048, 256], expected [2048, 512]",
      "missing tensor stages.2.blocks.4.token_mixer.qkv.weight [960, 320]"])
  assert not os.path.exists(tmp_path / "out")


@same_worker("randformer_s12")
def test_randformer_release_file_missing_a_matrix(tmp_path, capsys):
  state = H.timm_to_release(reference("randformer_s12").state_dict())
  del state["stages.3.1.token_mixer.random_matrix"]
  torch.save(state, tmp_path / "randformer_s12.pth")
  fails(capsys, tmp_path / "randformer_s12.pth", tmp_path / "out",
        match=["(release_v2 layout, randformer_s12)",
               "missing tensor stages.3.1.token_mixer.random_matrix [49, 49]"])


def test_timm_directory_of_another_architecture(tmp_path, capsys):
  d = tmp_path / "resnet50.a1_in1k"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))
  (d / "model.safetensors").write_bytes(b"")
  fails(capsys, d, tmp_path / "out", match="describes timm's 'resnet50', not one of this "
        "package's models")


@pytest.mark.parametrize("name", ["caformer_s18", "identityformer_s12", "randformer_s12",
                                  "poolformer_s12"])
def test_exports_that_the_target_cannot_hold_are_refused(name, tmp_path, capsys):
  # Zeros of the right shapes: only the architecture matters here.
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: create_model(name, num_classes=3, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
  jax_dir = pretrained.save_pretrained(tmp_path / "jax", model, variant=name)
  if name == "caformer_s18":  # no transformers counterpart; timm's is fine
    fails(capsys, "--to-hf", jax_dir, tmp_path / "hf", match=["transformers has PoolFormer v1 "
                                                              "only", "--to-timm"])
    with pytest.raises(errors.ConversionError, match="holds no version-2 models"):
      hf_export.to_torch_state(model, "hf")
  elif name == "poolformer_s12":  # timm's v1 computes another function of these weights
    fails(capsys, "--to-timm", jax_dir, tmp_path / "timm", match=["--to-hf"])
  else:
    fails(capsys, "--to-timm", jax_dir, tmp_path / "timm",
          match=[f"timm has no {name.split('_')[0]}", "release's .pth"])
  assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "timm")
