"""Inference: preprocessing parity with HF's processor, odd inputs, predictions vs HF PyTorch."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from poolformer_jax import inference

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def photos_rgb():
  images = [getattr(skimage_data, n)() for n in PHOTOS]
  return [np.repeat(i[..., None], 3, -1) if i.ndim == 2 else i[..., :3] for i in images]


# The reference and we both resize with PIL's bicubic; what remains is float32 rounding in
# rescale/normalise (measured 7e-7). 1e-5 leaves room for other PIL builds, and is ~200x
# below one 8-bit grey level after normalisation (1/255/0.225 = 0.017).
PREPROCESS_ATOL = 1e-5


def crop_offset(margin: int) -> int:
  """torchvision's CenterCrop offset (the release's eval transform), written out here."""
  return int(round(margin / 2))


@pytest.mark.parametrize("crop_pct", [0.9, 0.95])
def test_preprocess_matches_hf_resize_and_release_crop(crop_pct):
  """HF's processor does the resize (PIL bicubic, same sizes); the crop is the release's.

  HF's own crop floors the offset; where a margin is 3 mod 4 (the 'rocket' photo's long side)
  it is one pixel off the release's, and we follow the release.
  """
  transformers = pytest.importorskip("transformers")
  images = photos_rgb()
  hf = transformers.PoolFormerImageProcessorPil(crop_pct=crop_pct)
  ours = inference.preprocess(images, {"crop_pct": crop_pct})
  assert ours.shape == (len(images), 224, 224, 3)
  floor_differs = 0
  for image, got in zip(images, ours):
    resized = hf(images=[image], do_center_crop=False,
                 return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    h, w = resized.shape[:2]
    top, left = crop_offset(h - 224), crop_offset(w - 224)
    np.testing.assert_allclose(got, resized[top:top + 224, left:left + 224],
                               atol=PREPROCESS_ATOL, rtol=0)
    floor_differs += (top, left) != ((h - 224) // 2, (w - 224) // 2)
  full = hf(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  same = [np.abs(a - b).max() <= PREPROCESS_ATOL for a, b in zip(ours, full)]
  assert sum(not s for s in same) == floor_differs  # only the 3-mod-4 margins differ from HF
  assert floor_differs >= 1  # and the photo set does exercise that case
  # reference="hf" is HF's processor exactly, those photos included.
  np.testing.assert_allclose(inference.preprocess(images, {"crop_pct": crop_pct}, reference="hf"),
                             full, atol=PREPROCESS_ATOL, rtol=0)


def test_grayscale_rgba_and_16bit_inputs(tmp_path):
  rgb = skimage_data.astronaut()
  gray = skimage_data.camera()
  expected_rgb = inference.preprocess(rgb)
  # Grayscale arrays and files become three equal channels.
  expected_gray = inference.preprocess(np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(inference.preprocess(gray), expected_gray)
  Image.fromarray(gray).save(tmp_path / "gray.png")
  np.testing.assert_array_equal(inference.preprocess(str(tmp_path / "gray.png")), expected_gray)
  # RGBA: alpha is dropped, as HF's and timm's loaders do.
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
  np.testing.assert_array_equal(inference.preprocess(rgba), expected_rgb)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(inference.preprocess(str(tmp_path / "rgba.png")), expected_rgb)
  # 16-bit data is rescaled to 8 bits, not clipped: x * 257 maps back to x exactly.
  np.testing.assert_array_equal(inference.preprocess(rgb.astype(np.uint16) * 257), expected_rgb)
  Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
  assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
  np.testing.assert_array_equal(inference.preprocess(str(tmp_path / "gray16.png")),
                                expected_gray)


def test_exif_orientation_is_applied(tmp_path):
  upright = skimage_data.chelsea()
  stored = np.rot90(upright)  # stored rotated 90 deg counter-clockwise ...
  exif = Image.Exif()
  exif[0x0112] = 6  # ... and tagged "rotate 90 deg clockwise to display"
  Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
  np.testing.assert_array_equal(inference.load_image(str(tmp_path / "rotated.png")), upright)
  assert inference.preprocess(str(tmp_path / "rotated.png")).shape == (1, 224, 224, 3)


def test_corrupt_and_non_image_files_give_clear_errors(tmp_path):
  Image.fromarray(skimage_data.coffee()).save(tmp_path / "ok.jpg")
  data = (tmp_path / "ok.jpg").read_bytes()
  (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
  (tmp_path / "notes.txt").write_text("not an image")
  for name in ("truncated.jpg", "notes.txt", "missing.png"):
    with pytest.raises(inference.ImageError, match=name):
      inference.preprocess(str(tmp_path / name))
  with pytest.raises(inference.ImageError, match="uint8 or uint16"):
    inference.preprocess(np.zeros((8, 8, 3), np.float32))


def test_imagenet_class_names_ship_with_the_package():
  from poolformer_jax import pretrained
  text = (REPO / "poolformer_jax" / "imagenet_classes.txt").read_text()
  classes = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
  assert len(classes) == 1000 and len({w for w, _ in classes}) == 1000
  assert classes[0] == ["n01440764", "tench, Tinca tinca"]
  labels = pretrained.imagenet_labels()
  assert len(labels) == 1000 and labels[:2] == ("tench", "goldfish")
  tfds_labels = pytest.importorskip("tensorflow_datasets.datasets.siscore.labels")
  assert [n for _, n in classes] == list(tfds_labels.IMAGENET_LABELS_LIST)


@pytest.fixture(scope="module")
def converted_random_model(tmp_path_factory):
  """A random-init HF S12 with 1000 classes saved to disk, converted, loaded back."""
  torch = pytest.importorskip("torch")
  import helpers_torch  # tests/ is on sys.path (pytest rootdir-relative import)
  from poolformer_jax import convert, hub, pretrained
  hf = helpers_torch.random_hf_model("poolformer_s12", num_labels=1000, seed=3)
  hf_dir = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(hf_dir)
  out = tmp_path_factory.mktemp("jax") / "s12"
  converted = convert.convert(str(hf_dir))
  pretrained.save_pretrained(str(out), converted.model, variant=converted.info.variant,
                             labels=converted.info.labels,
                             preprocessing=converted.info.preprocessing)
  model, info = hub.load_pretrained(str(out))
  return hf, model, info, torch, out


def test_predict_top5_matches_hf_pytorch_on_photos(converted_random_model):
  hf, model, info, torch, _ = converted_random_model
  images = photos_rgb()
  # Identical inputs for both models (preprocessing parity is tested above on its own).
  pixels = inference.preprocess(images, info.preprocessing).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref = torch.softmax(hf(torch.from_numpy(pixels)).logits, -1).numpy()
  preds = inference.predict(model, images, preprocessing=info.preprocessing,
                            labels=info.labels, top_k=5, batch_size=4)
  assert len(preds) == len(images)
  for pred, row in zip(preds, ref):
    assert list(pred.indices) == list(np.argsort(-row)[:5])
    np.testing.assert_allclose(pred.probs, row[list(pred.indices)], atol=1e-5)
    assert pred.labels == tuple(info.labels[i] for i in pred.indices)


def test_classify_files_skips_and_reports_broken_files(converted_random_model, tmp_path):
  _, model, info, _, _ = converted_random_model
  for name in ("coffee", "chelsea"):
    Image.fromarray(getattr(skimage_data, name)()).save(tmp_path / f"{name}.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  files = inference.list_image_files([str(tmp_path)])
  assert [os.path.basename(f) for f in files] == ["broken.jpg", "chelsea.jpg", "coffee.jpg"]
  results, failed = inference.classify_files(model, files, preprocessing=info.preprocessing,
                                             labels=info.labels, batch_size=2)
  assert list(failed) == [str(tmp_path / "broken.jpg")]
  assert [os.path.basename(p) for p in results] == ["chelsea.jpg", "coffee.jpg"]
  direct = inference.predict(model, [str(tmp_path / "chelsea.jpg")],
                             preprocessing=info.preprocessing, labels=info.labels)
  assert results[str(tmp_path / "chelsea.jpg")].indices == direct[0].indices


def test_release_checkpoints_get_imagenet_names(converted_random_model, tmp_path):
  """Release/timm files hold no class names; a 1000-class one is labelled with ImageNet's."""
  import helpers_torch
  from poolformer_jax import convert, pretrained
  hf, _, _, torch, _ = converted_random_model
  torch.save(helpers_torch.to_release_keys(helpers_torch.hf_state(hf)), tmp_path / "s12.pth.tar")
  info = convert.convert(str(tmp_path / "s12.pth.tar")).info
  assert info.labels == pretrained.imagenet_labels() and info.labels[1] == "goldfish"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "jsonl"])
def test_predict_cli_classifies_a_folder_and_names_the_broken_file(converted_random_model,
                                                                   tmp_path, fmt):
  import json
  import subprocess
  import sys
  _, model, info, _, checkpoint = converted_random_model
  for name in ("coffee", "chelsea", "astronaut"):
    Image.fromarray(getattr(skimage_data, name)()).save(tmp_path / f"{name}.png")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  proc = subprocess.run(
      [sys.executable, "main.py", "--mode=predict", f"--checkpoint={checkpoint}",
       f"--format={fmt}", "--batch_size=2", "--top_k=3", str(tmp_path)],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1  # Some file failed...
  assert "1 of 4 file(s) could not be read" in proc.stderr and "broken.jpg" in proc.stderr
  expected = inference.predict(model, [str(tmp_path / "chelsea.png")],
                               preprocessing=info.preprocessing, labels=info.labels, top_k=3)[0]
  if fmt == "jsonl":  # ...and every other one is classified, in order, machine-readable.
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [os.path.basename(r["path"]) for r in rows] == [
        "astronaut.png", "chelsea.png", "coffee.png", "broken.jpg"]
    assert "error" in rows[-1] and all(len(r["top_k"]) == 3 for r in rows[:3])
    assert [t["index"] for t in rows[1]["top_k"]] == list(expected.indices)
  else:
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith(str(tmp_path / "chelsea.png"))
    assert expected.labels[0] in lines[1]


def tiny_model(num_classes=7):
  from flax import nnx
  from poolformer_jax import model as model_lib
  return model_lib.create_model("poolformer_s12", num_classes=num_classes, rngs=nnx.Rngs(0),
                                depths=(1, 1, 1, 1), widths=(8, 16, 24, 32))


TINY_PREPROCESSING = {"input_size": 32, "crop_pct": 1.0}


def test_predict_compiles_once_for_any_number_of_images(tmp_path):
  """Every batch is padded to batch_size: calls with 3, 1 and 5 images reuse one program."""
  from conftest import count_compiles
  model = tiny_model()
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (40 + i, 48, 3), np.uint8) for i in range(5)]
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{i}.png")
  inference._probabilities_fn.cache_clear()
  with count_compiles() as compiles:
    three = inference.predict(model, images[:3], preprocessing=TINY_PREPROCESSING, batch_size=2)
    one = inference.predict(model, images[:1], preprocessing=TINY_PREPROCESSING, batch_size=2)
    files, failed = inference.classify_files(model, inference.list_image_files([str(tmp_path)]),
                                             preprocessing=TINY_PREPROCESSING, batch_size=2)
    everything = inference.predict(model, images, preprocessing=TINY_PREPROCESSING, batch_size=2)
  assert compiles["probabilities"] == 1, compiles
  assert len(three) == 3 and one[0] == three[0] and not failed
  assert [p.indices for p in files.values()] == [p.indices for p in everything]


def test_fewer_images_than_the_batch_are_one_batch_of_just_them(tmp_path, monkeypatch):
  """One photo is a forward pass of one image, by default and on the command line (padded to
  32 it cost 32: a CAFormer-S18 at 384 on a CPU, ~45 s for one image); a given batch size
  still pads."""
  photo = str(tmp_path / "coffee.png")
  Image.fromarray(skimage_data.coffee()).save(photo)
  batches, real = [], inference._probabilities_fn  # pylint: disable=protected-access
  monkeypatch.setattr(inference, "_probabilities_fn", lambda graphdef: lambda state, x: (
      batches.append(x.shape[0]) or real(graphdef)(state, x)))
  model = tiny_model()
  inference.predict(model, [photo], preprocessing=TINY_PREPROCESSING)
  inference.classify_files(model, [photo], preprocessing=TINY_PREPROCESSING, batch_size=32)
  inference.predict(model, [photo], preprocessing=TINY_PREPROCESSING, batch_size=4)
  assert batches == [1, 1, 4]


def test_predict_command_never_imports_tensorflow(tmp_path):
  """`main.py --mode=predict` (load_pretrained, preprocess, predict) runs without TensorFlow."""
  import re
  import subprocess
  import sys
  from poolformer_jax import pretrained
  checkpoint = pretrained.save_pretrained(tmp_path / "model", tiny_model(), variant="poolformer_s12",
                                          preprocessing=TINY_PREPROCESSING)
  Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
  proc = subprocess.run(
      [sys.executable, "-X", "importtime", "main.py", "--mode=predict",
       f"--checkpoint={checkpoint}", str(tmp_path / "coffee.png")],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith(str(tmp_path / "coffee.png"))
  assert "import time:" in proc.stderr  # -X importtime lists every module imported...
  assert not re.search(r"^import time:.*\|\s+tensorflow\b", proc.stderr, re.M)  # ...none is TF
