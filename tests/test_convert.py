"""Weight converter: parity with HF's PyTorch model in every layout, round trips, bad inputs.

The reference is always HF transformers' PoolFormer with every parameter randomised
(tests/helpers_torch.py), written to disk in the release, HF or timm layout by renames that
are independent of poolformer_jax.convert. Inputs are real photos (scikit-image's samples),
preprocessed once and fed identically to both models.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

import convert_torch_weights  # noqa: E402
import helpers_torch as H  # noqa: E402
from flax import nnx  # noqa: E402
from poolformer_jax import convert as cv  # noqa: E402
from poolformer_jax import create_model, load_pretrained  # noqa: E402
from poolformer_jax import errors  # noqa: E402
from poolformer_jax import pretrained  # noqa: E402
from poolformer_jax.convert import hf_export, keys  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TOL = 1e-4


def photos(size: int, crop_pct: float, n: int = 4) -> np.ndarray:
  """NCHW float32 pixels from HF's own PoolFormer image processor (PIL backend)."""
  proc = transformers.PoolFormerImageProcessorPil(
      crop_pct=crop_pct, size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  images = [getattr(skimage_data, name)() for name in PHOTOS[:n]]
  return np.asarray(proc(images=images, return_tensors="np")["pixel_values"], np.float32)


@nnx.jit  # compiled: several times faster than op-by-op on CPU
def _forward(model, x):
  return model(x)


def jax_logits(model, pixels_nchw):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(model, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))))


def run_cli(*argv) -> int:
  return convert_torch_weights.main([str(a) for a in argv])


def params_of(model) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_nothing_written(path):
  """Neither the output nor a temporary sibling of it exists."""
  path = os.path.abspath(path)
  assert not os.path.exists(path)
  parent, name = os.path.split(path)
  leftovers = [n for n in os.listdir(parent) if n.startswith(f".{name}.")]
  assert not leftovers, leftovers


@pytest.fixture(scope="module")
def s12():
  return H.random_hf_model("poolformer_s12", num_labels=10, seed=1)


@pytest.fixture(scope="module")
def m36():  # 56M random parameters: made once for the three layouts
  return H.random_hf_model("poolformer_m36", num_labels=7, seed=2)


@pytest.fixture(scope="module")
def s12_release(s12, tmp_path_factory):
  return H.write_layout(s12, "release", tmp_path_factory.mktemp("release"), fmt="pth")


# ---------------------------------------------------------------------------
# Parity in each layout.
# ---------------------------------------------------------------------------


def _convert_and_compare(hf_model, layout, fmt, tmp_path, *, size, crop_pct, n_photos):
  src = H.write_layout(hf_model, layout, tmp_path / "src", fmt=fmt)
  out = tmp_path / "converted"
  assert run_cli(src, out) == 0
  model, info = load_pretrained(out)
  cfg = hf_model.config
  assert info.num_classes == cfg.num_labels
  assert tuple(model.cfg.depths) == tuple(cfg.depths)
  assert tuple(model.cfg.widths) == tuple(cfg.hidden_sizes)
  if layout == "hf":  # labels come from config.json
    assert info.labels == tuple(cfg.id2label[i] for i in range(cfg.num_labels))
  pixels = photos(size, crop_pct, n_photos)
  ref = H.hf_logits(hf_model, pixels)
  out_logits = jax_logits(model, pixels)
  assert ref.std() > 0.1  # the logits are informative, not all ~0
  np.testing.assert_array_less(np.abs(out_logits - ref).max(), TOL)
  return info


@pytest.mark.parametrize("layout,fmt", [("release", "pth"), ("hf", "safetensors"),
                                        ("hf", "bin"), ("timm", "safetensors")])
def test_layout_parity_s12(s12, layout, fmt, tmp_path):
  info = _convert_and_compare(s12, layout, fmt, tmp_path, size=224, crop_pct=0.9, n_photos=3)
  assert info.variant == "poolformer_s12"
  assert info.preprocessing["crop_pct"] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("layout,fmt", [("release", "pth"), ("hf", "safetensors"),
                                        ("timm", "safetensors")])
def test_layout_parity_m36_small_input(m36, layout, fmt, tmp_path):
  info = _convert_and_compare(m36, layout, fmt, tmp_path, size=64, crop_pct=0.95,
                              n_photos=2)
  assert info.variant == "poolformer_m36"
  assert info.preprocessing["crop_pct"] == 0.95


def test_tables_name_every_parameter_once_in_every_layout():
  """Each JAX parameter has one name per PoolFormer v1 layout, and that name maps back to it.
  (The MetaFormer baselines' layouts: tests/test_convert_metaformer.py.)"""
  abstract = nnx.eval_shape(lambda: create_model("poolformer_m48", rngs=nnx.Rngs(0)))
  paths = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract)))[0]]
  assert len(paths) == 2 + 2 * 3 + 10 * sum((8, 8, 24, 8)) + 4  # stem, downs, blocks, norm+head
  layouts = [layout for layout in keys.LAYOUTS if 1 in keys.LAYOUT_VERSIONS[layout]]
  assert layouts == ["release", "hf", "timm"]
  for layout in layouts:
    names = set()
    for path in paths:
      canon, _ = keys.lookup(path, "jax")
      name = keys.source_key(canon, layout)
      names.add(name)
      back = keys.canonical_key(name, layout)
      assert keys.lookup(back, "canonical")[0] == path, (layout, name)
    assert len(names) == len(paths)
    assert keys.detect_layout(names) == layout


# ---------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------


def _random_jax_model(seed=0, num_classes=7):
  """A JAX S12 with every parameter random (filled with numpy: eager init is slow on CPU)."""
  abstract = nnx.eval_shape(
      lambda: create_model("poolformer_s12", num_classes=num_classes, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return rng.normal(0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape).astype(np.float32)
    if "layer_scale" in name:
      return (rng.choice([-1, 1], x.shape) * rng.uniform(0.1, 1, x.shape)).astype(np.float32)
    if "scale" in name:
      return rng.normal(1, 0.2, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def test_roundtrip_jax_hf_safetensors_jax_is_bit_exact(tmp_path):
  model = _random_jax_model()
  info = pretrained.PretrainedInfo("poolformer_s12", 7, labels=tuple("abcdefg"),
                                   preprocessing=pretrained.default_preprocessing(0.9))
  hf_dir = hf_export.export_hf_safetensors(model, info, str(tmp_path / "hf"))
  back = cv.convert(hf_dir)
  assert back.layout == "hf" and back.info.labels == info.labels
  a, b = params_of(model), params_of(back.model)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k

  # HF itself loads the export and computes the same function.
  hf_model = transformers.PoolFormerForImageClassification.from_pretrained(hf_dir).eval()
  assert hf_model.config.id2label[6] == "g"
  pixels = photos(64, 0.9, 2)
  np.testing.assert_array_less(
      np.abs(H.hf_logits(hf_model, pixels) - jax_logits(model, pixels)).max(), TOL)


def test_cli_jax_to_hf_and_back_is_bit_exact(tmp_path, capsys):
  model = _random_jax_model(seed=5, num_classes=4)
  jax_dir = pretrained.save_pretrained(tmp_path / "jax", model, variant="poolformer_s12",
                                       labels=["w", "x", "y", "z"])
  # The JAX directory is not a PyTorch source; the message says how to export it.
  assert run_cli(jax_dir, tmp_path / "nope") == 1
  assert "--to-hf" in capsys.readouterr().err
  assert run_cli("--to-hf", jax_dir, tmp_path / "hf", "--check") == 0
  assert "top-1 agreement 100%" in capsys.readouterr().out
  assert run_cli(tmp_path / "hf", tmp_path / "back") == 0
  back, info = load_pretrained(tmp_path / "back")
  assert info.labels == ("w", "x", "y", "z")
  a, b = params_of(model), params_of(back)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_load_pretrained_is_bit_exact(tmp_path):
  model = _random_jax_model(seed=3, num_classes=5)
  path = pretrained.save_pretrained(tmp_path / "m", model, variant="poolformer_s12",
                                    labels=list("vwxyz"))
  loaded, info = load_pretrained(path)
  assert info == pretrained.PretrainedInfo("poolformer_s12", 5, tuple("vwxyz"),
                                           pretrained.default_preprocessing(0.9))
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(errors.CheckpointError, match="overwrite"):
    pretrained.save_pretrained(path, model, variant="poolformer_s12")


def test_save_and_load_pretrained_with_a_relative_path(tmp_path, monkeypatch):
  """README commands pass relative directories (--checkpoint=checkpoints/poolformer_s12);
  Orbax itself accepts only absolute ones."""
  model = _random_jax_model(seed=4, num_classes=3)
  monkeypatch.chdir(tmp_path)
  pretrained.save_pretrained("checkpoints/m", model, variant="poolformer_s12")
  loaded, _ = load_pretrained("checkpoints/m")
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_is_atomic_when_writing_crashes(tmp_path, monkeypatch):
  model = _random_jax_model(num_classes=3)

  def crash(*a, **k):
    raise KeyboardInterrupt("simulated crash while writing config.json")

  monkeypatch.setattr(pretrained.json, "dumps", crash)
  with pytest.raises(KeyboardInterrupt):
    pretrained.save_pretrained(tmp_path / "out", model, variant="poolformer_s12")
  assert_nothing_written(tmp_path / "out")


def test_overwrite_replaces_existing_output(s12_release, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  assert run_cli(s12_release, out, "--overwrite") == 0
  assert not (out / "stale.txt").exists()
  _, info = load_pretrained(out)
  assert info.variant == "poolformer_s12"


# ---------------------------------------------------------------------------
# Bad inputs: a clear message each, and nothing written.
# ---------------------------------------------------------------------------


def _fails(capsys, tmp_path, *argv, match):
  out = tmp_path / "out"
  assert run_cli(argv[0], out, *argv[1:]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err
  for m in [match] if isinstance(match, str) else match:
    assert m in err, err
  assert_nothing_written(out)
  return err


def test_not_a_checkpoint(tmp_path, capsys):
  bad = tmp_path / "notes.pth"
  bad.write_text("these are not weights\n" * 10)
  _fails(capsys, tmp_path, bad, match="is not a PyTorch checkpoint")


class _RunsCode:
  """A pickle payload that would create a file when unpickled by plain pickle/torch.load."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(s12, tmp_path, capsys):
  marker = tmp_path / "pwned"
  state = H.to_release_keys(H.hf_state(s12))
  state["payload"] = _RunsCode(str(marker))
  path = tmp_path / "evil.pth"
  torch.save(state, path)
  _fails(capsys, tmp_path, path, match=["refused to load", "would run code"])
  assert not marker.exists()


@pytest.mark.parametrize("arch", ["convnet", "vit"])
def test_other_architecture(tmp_path, capsys, arch):
  if arch == "convnet":
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2))
    state = net.state_dict()
  else:  # a ViT shares `norm.*` and `head.*` with the release layout, but has no PoolFormer block
    state = {"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "cls_token": torch.zeros(8),
             "blocks.0.attn.qkv.weight": torch.zeros(24, 8), "norm.weight": torch.ones(8),
             "head.weight": torch.zeros(10, 8), "head.bias": torch.zeros(10)}
  path = tmp_path / f"{arch}.pth"
  torch.save(state, path)
  _fails(capsys, tmp_path, path, match="not a PoolFormer / MetaFormer checkpoint")


def test_other_architecture_hf_directory(tmp_path, capsys):
  d = tmp_path / "vit"
  d.mkdir()
  (d / "config.json").write_text('{"model_type": "vit"}')
  (d / "model.safetensors").write_bytes(b"")
  _fails(capsys, tmp_path, d, match="'vit' model, not a PoolFormer")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_truncated_file(s12, tmp_path, capsys, fmt):
  path = H.write_layout(s12, "timm" if fmt == "safetensors" else "release", tmp_path / "src",
                        fmt=fmt)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  _fails(capsys, tmp_path, path, match="truncated")


def test_missing_unexpected_and_misshaped_are_reported_together(s12, tmp_path, capsys):
  state = H.to_release_keys(H.hf_state(s12))
  del state["network.4.3.mlp.fc2.bias"]
  state["network.2.0.mlp.fc1.weight"] = torch.zeros(256, 64, 1, 1)
  state["network.0.1.extra.weight"] = torch.zeros(2)
  path = tmp_path / "bad.pth.tar"
  torch.save(state, path)
  _fails(capsys, tmp_path, path, match=[
      "3 problem(s)",
      "missing tensor network.4.3.mlp.fc2.bias [320]",
      "wrong shape network.2.0.mlp.fc1.weight: [256, 64, 1, 1], expected [512, 128, 1, 1]",
      "unexpected tensor network.0.1.extra.weight [2]"])


def test_missing_key_alone(s12, tmp_path, capsys):
  state = H.to_timm_keys(H.hf_state(s12))
  del state["stages.3.blocks.1.layer_scale2.scale"]
  from safetensors.torch import save_file
  path = tmp_path / "timm.safetensors"
  save_file(state, str(path))
  _fails(capsys, tmp_path, path, match="missing tensor stages.3.blocks.1.layer_scale2.scale [512]")


def test_variant_flag_contradicts_weights(s12_release, tmp_path, capsys):
  _fails(capsys, tmp_path, s12_release, "--model", "poolformer_m36",
         match=["poolformer_m36", "poolformer_s12", "contradicts"])
  # A flag that agrees is accepted.
  assert run_cli(s12_release, tmp_path / "ok", "--model", "poolformer_s12") == 0


def test_output_exists(s12_release, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert run_cli(s12_release, out) == 1
  assert "already exists" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "mine"


def test_safetensors_needs_no_torch_and_pth_says_so(s12, s12_release, tmp_path, monkeypatch,
                                                    capsys):
  path = H.write_layout(s12, "timm", tmp_path / "src", fmt="safetensors")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  assert run_cli(path, tmp_path / "ok") == 0
  _fails(capsys, tmp_path, s12_release, match="needs PyTorch")


# ---------------------------------------------------------------------------
# --check.
# ---------------------------------------------------------------------------


def test_check_passes_then_fails_when_a_weight_is_perturbed(s12_release, tmp_path, capsys,
                                                             monkeypatch):
  assert run_cli(s12_release, tmp_path / "good", "--check") == 0
  assert "top-1 agreement" in capsys.readouterr().out

  # A converter bug: one transform nudges the head bias. --check must catch it.
  def nudged(entry):
    if entry.canonical != "head.bias":
      return entry
    t = dataclasses.replace(entry.transform, to_jax=lambda x: x + np.float32(1e-3))
    return dataclasses.replace(entry, transform=t)

  monkeypatch.setattr(keys, "TABLE", tuple(nudged(e) for e in keys.TABLE))
  photo = tmp_path / "coffee.png"
  from PIL import Image
  Image.fromarray(skimage_data.coffee()).save(photo)
  _fails(capsys, tmp_path, s12_release, "--check", "--images", photo,
         match=["exceeds --tolerance 0.0001", "nothing was written"])
