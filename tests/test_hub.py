"""Released weights by name: the name table against timm's, and the download -> convert -> cache
path for real, against a local stand-in of the HF hub (tests/local_hub.py) serving
random-weight files that timm itself wrote (the release's .pth layout for IdentityFormer and
RandFormer, transformers' layout for `sail/poolformer_s12`).

Nothing here touches the network: HF_ENDPOINT points at 127.0.0.1, and every test has its own
HF cache and poolformer_jax cache.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")

from conftest import cpu_env, main_flags  # noqa: E402
import helpers_torch as H  # noqa: E402
from local_hub import LocalHub  # noqa: E402
import poolformer_jax as pj  # noqa: E402
from poolformer_jax import errors, hub, inference, pretrained  # noqa: E402

timm = H.import_timm()
from timm.models import save_for_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "poolformerv2_s12.sail_in1k"  # the smallest timm-hosted checkpoint: 12M parameters
WEIGHTS = f"timm/{NAME}/model.safetensors"
PHOTOS = ("chelsea", "coffee")
pytestmark = pytest.mark.xdist_group("hub")  # one worker builds the hub's files once


def write_repo(root, name: str, seed: int = 1) -> torch.nn.Module:
  """`name`'s randomised timm reference, written where the hub holds it: timm's save_for_hf
  (model.safetensors + config.json) for timm's names, the release's .pth in `sail/dl` for
  IdentityFormer and RandFormer. Returns the reference."""
  tag = hub.PRETRAINED[name]
  in_timm = tag.filename is None
  ref = H.randomize_(H.timm_metaformer(tag.model, tag.num_classes,
                                       name.split(".", 1)[1] if in_timm else "").eval(), seed)
  if in_timm:
    save_for_hf(ref, os.path.join(root, tag.repo), safe_serialization=True)
  else:
    path = os.path.join(root, tag.repo, tag.filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(H.timm_to_release(ref.state_dict()), path)
  return ref


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
  """The hub's files: poolformerv2_s12.sail_in1k (timm's layout) and sail/poolformer_s12
  (transformers'); {name: the PyTorch model they hold}."""
  import transformers
  root = tmp_path_factory.mktemp("hub")
  refs = {NAME: write_repo(root, NAME)}
  hf = H.random_hf_model("poolformer_s12", num_labels=1000, seed=2)
  hf.save_pretrained(root / "sail" / "poolformer_s12")
  transformers.PoolFormerImageProcessorPil(crop_pct=0.9).save_pretrained(
      root / "sail" / "poolformer_s12")
  refs["sail/poolformer_s12"] = hf
  return root, refs


@pytest.fixture
def local_hub(hub_files, tmp_path, monkeypatch):
  """The stand-in hub, online, with empty caches for this test."""
  import huggingface_hub
  root, _ = hub_files
  monkeypatch.setenv("POOLFORMER_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, which reads it once.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
  with LocalHub(root) as server:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server


def max_logit_diff(model, info, ref) -> float:
  return H.max_logit_diff(model, info.preprocessing, ref,
                          [getattr(skimage_data, p)() for p in PHOTOS], min_std=0.1)


def params_of(model) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def cache_contents(tmp_path) -> list[str]:
  root = tmp_path / "cache"
  return sorted(p for p in os.listdir(root) if not p.endswith(".lock")) if root.exists() else []


# ---------------------------------------------------------------------------
# The names.
# ---------------------------------------------------------------------------


def test_the_sixty_names_are_timms_fifty_and_the_releases_ten():
  families = ("poolformer_", "poolformerv2_", "convformer_", "caformer_")
  timms = {n: timm.models.get_pretrained_cfg(n) for n in timm.list_pretrained()
           if n.startswith(families)}
  assert len(timms) == 50
  ours = {t.name: t for t in pj.list_pretrained()}
  assert len(ours) == 60
  for name, cfg in timms.items():
    tag = ours[name]
    assert (tag.input_size, tag.crop_pct, tag.num_classes) == (
        cfg.input_size[-1], cfg.crop_pct, cfg.num_classes), name
    assert tag.repo == cfg.hf_hub_id == f"timm/{name}" and tag.filename is None, name
    assert (tag.top1 is None) == (cfg.num_classes == 21841), name
  release = {n: t for n, t in ours.items() if n not in timms}
  assert sorted(release) == sorted(f"{f}_{s}.sail_in1k" for f in ("identityformer", "randformer")
                                   for s in ("s12", "s24", "s36", "m36", "m48"))
  for name, tag in release.items():  # the release's URL pattern: sail/dl/<family>/<model>.pth
    assert tag.url == (f"https://huggingface.co/sail/dl/resolve/main/{tag.model.split('_')[0]}/"
                       f"{tag.model}.pth") and tag.top1 > 70
  assert [t.name for t in pj.list_pretrained("caformer_s18*")] == [
      "caformer_s18.sail_in1k", "caformer_s18.sail_in1k_384", "caformer_s18.sail_in22k_ft_in1k",
      "caformer_s18.sail_in22k_ft_in1k_384", "caformer_s18.sail_in22k"]


def test_21k_class_names_are_timms():
  from timm.data import ImageNetInfo
  info = ImageNetInfo("imagenet-22k")
  wnids, names = pretrained.imagenet_wnids(21841), pretrained.imagenet_labels(21841)
  assert len(wnids) == len(names) == info.num_classes() == 21841
  for i in (0, 1, 12345, 21840):
    assert wnids[i] == info.index_to_label_name(i)
    assert names[i] == info.index_to_description(i).split(",")[0]


def test_a_name_without_pretrained_is_its_architecture_randomly_initialised():
  model = pj.create_model("poolformerv2_s12.sail_in1k", rngs=nnx.Rngs(0))
  assert model.cfg == pj.get_config("poolformerv2_s12")
  with pytest.raises(ValueError, match="pretrained=True"):
    pj.create_model("hf-hub:sail/poolformer_s12", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rngs"):
    pj.create_model("poolformerv2_s12")


def test_a_wrong_name_lists_the_closest(capsys):
  with pytest.raises(errors.ConfigError, match="closest: caformer_s18.sail_in1k_384"):
    pj.load_pretrained("caformer_s18.sail_in1k_385")
  with pytest.raises(errors.ConfigError, match="closest: caformer_s18"):
    pj.create_model("cafromer_s18", pretrained=True)
  with main_flags("--mode=predict", "--checkpoint=convformer_s18.sail_in22k_ft") as main:
    assert main.main(["main.py", "photo.jpg"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
  assert "convformer_s18.sail_in22k_ft_in1k" in err, err


# ---------------------------------------------------------------------------
# Download, convert, cache.
# ---------------------------------------------------------------------------


def test_download_converts_once_then_loads_from_the_cache(local_hub, hub_files, tmp_path):
  _, refs = hub_files
  model, info = pj.load_pretrained(NAME)
  assert local_hub.requests[("GET", WEIGHTS)] == 1
  assert info.variant == "poolformerv2_s12" and info.labels == pretrained.imagenet_labels(1000)
  assert (info.preprocessing["input_size"], info.preprocessing["crop_pct"]) == (224, 1.0)
  assert max_logit_diff(model, info, refs[NAME]) <= 1e-4
  assert cache_contents(tmp_path) == [NAME]  # nothing else: no temporary directories left
  before = local_hub.count()
  # The same entry, by any of its names: no request at all, no conversion.
  with pytest.MonkeyPatch.context() as m:
    m.setattr("poolformer_jax.convert.convert", lambda *a, **k: pytest.fail("converted again"))
    again, _ = pj.load_pretrained(f"hf-hub:timm/{NAME}")
    same = pj.create_model("poolformerv2_s12", pretrained=True)
  assert local_hub.count() == before
  for a, b, c in zip(params_of(model).values(), params_of(again).values(),
                     params_of(same).values()):
    assert np.array_equal(a, b) and np.array_equal(a, c)
  # A new head for fine-tuning: every other tensor is the checkpoint's.
  tuned = pj.create_model(NAME, pretrained=True, num_classes=10, rngs=nnx.Rngs(0),
                          drop_path_rate=0.2)
  assert tuned.cfg.num_classes == 10 and tuned.cfg.drop_path_rate == 0.2
  loaded, new = params_of(model), params_of(tuned)
  assert new["['head']['kernel']"].shape == (512, 10)
  assert all(np.array_equal(v, new[k]) for k, v in loaded.items() if not k.startswith("['head']"))
  with pytest.raises(errors.ConfigError, match="widths"):
    pj.create_model(NAME, pretrained=True, widths=(32, 64, 128, 256))


def test_transformers_repos_load_by_hf_hub_name(local_hub, hub_files):
  _, refs = hub_files
  model, info = pj.load_pretrained("hf-hub:sail/poolformer_s12")
  assert info.variant == "poolformer_s12" and info.preprocessing["crop_pct"] == 0.9
  assert local_hub.requests[("GET", "sail/poolformer_s12/preprocessor_config.json")] == 1
  assert max_logit_diff(model, info, refs["sail/poolformer_s12"]) <= 1e-4


def test_offline_a_cached_name_loads_and_an_uncached_one_says_what_to_do(local_hub, tmp_path,
                                                                       monkeypatch):
  pj.load_pretrained(NAME)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  before = local_hub.count()
  pj.load_pretrained(NAME)
  with pytest.raises(errors.DownloadError) as e:
    pj.load_pretrained("caformer_s18.sail_in1k_384")
  assert local_hub.count() == before
  message = str(e.value)
  entry = str(tmp_path / "cache" / "caformer_s18.sail_in1k_384")
  assert "\n" not in message and "HF_HUB_OFFLINE" in message and entry in message
  assert "https://huggingface.co/timm/caformer_s18.sail_in1k_384" in message
  assert "convert_torch_weights.py" in message
  assert cache_contents(tmp_path) == [NAME]


def test_a_damaged_cache_entry_is_rebuilt_not_loaded(local_hub, tmp_path, caplog):
  model, _ = pj.load_pretrained(NAME)
  entry = tmp_path / "cache" / NAME
  files = sorted((p for p in (entry / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  data = bytearray(files[-1].read_bytes())  # the largest array file: flip bytes mid-way
  data[len(data) // 2:len(data) // 2 + 8] = bytes(255 - b for b in data[len(data) // 2:][:8])
  files[-1].write_bytes(bytes(data))
  with pytest.raises(errors.CheckpointError, match="corrupt|cannot be read"):
    pretrained.load_params(str(entry))  # what a plain load of the directory says
  rebuilt, _ = pj.load_pretrained(NAME)
  assert "damaged" in caplog.text and "rebuilding" in caplog.text
  for a, b in zip(params_of(model).values(), params_of(rebuilt).values()):
    assert np.array_equal(a, b)
  assert local_hub.requests[("GET", WEIGHTS)] == 1  # rebuilt from huggingface_hub's cache
  (entry / "config.json").write_text("{not json")  # a damaged config: rebuilt as well
  pj.load_pretrained(NAME)
  assert json.loads((entry / "config.json").read_text())["variant"] == "poolformerv2_s12"


def test_a_downloaded_file_that_fails_its_checksum_is_fetched_again(local_hub, tmp_path,
                                                                    caplog):
  import shutil
  pj.load_pretrained(NAME)
  blobs = [p for p in (tmp_path / "hf").rglob("blobs/*") if len(p.name) == 64]
  assert len(blobs) == 1  # model.safetensors, stored under its SHA-256 (the hub's ETag)
  data = bytearray(blobs[0].read_bytes())
  data[-1] ^= 0xFF  # the last weight's last byte: a file that still parses
  blobs[0].chmod(0o644)
  blobs[0].write_bytes(bytes(data))
  shutil.rmtree(tmp_path / "cache" / NAME)
  model, info = pj.load_pretrained(NAME)
  assert "does not hash to its hub checksum" in caplog.text
  assert local_hub.requests[("GET", WEIGHTS)] == 2
  assert blobs[0].read_bytes() != bytes(data)


def test_a_dropped_connection_resumes_and_a_dead_one_fails_cleanly(local_hub, tmp_path):
  local_hub.cut[WEIGHTS] = (25 << 20, 1)  # the first GET drops after 25 of 48 MB
  model, info = pj.load_pretrained(NAME)
  # huggingface_hub asked for the rest (it keeps whole 10 MB chunks: 20 MB).
  assert local_hub.requests[("GET", WEIGHTS)] == 2 and local_hub.ranged[WEIGHTS] == 1
  assert (tmp_path / "cache" / NAME / "config.json").is_file()
  other = "hf-hub:sail/poolformer_s12"
  local_hub.cut["sail/poolformer_s12/model.safetensors"] = (0, 100)  # never delivers a byte
  with pytest.raises(errors.DownloadError, match="run the same call again") as e:
    pj.load_pretrained(other)
  assert "\n" not in str(e.value)
  assert cache_contents(tmp_path) == [NAME]  # nothing half-made


def test_a_killed_download_leaves_nothing_and_the_next_call_completes(local_hub, hub_files,
                                                                   tmp_path):
  local_hub.hold.add(WEIGHTS)  # every GET of the weights stops half-way
  env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "JAX_PLATFORMS": "cpu"}
  code = f"import sys; sys.path.insert(0, {REPO!r}); import poolformer_jax as pj; " \
         f"pj.load_pretrained({NAME!r})"
  proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while local_hub.requests[("GET", WEIGHTS)] == 0 and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.2)
  time.sleep(1.0)  # half the file is on disk by now
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  assert cache_contents(tmp_path) == []  # nothing under the name
  local_hub.hold.clear()
  local_hub.release()
  _, refs = hub_files
  model, info = pj.load_pretrained(NAME)
  # huggingface_hub >= 2 downloads into a file of its own per process: the file starts over.
  assert local_hub.requests[("GET", WEIGHTS)] == 2
  assert max_logit_diff(model, info, refs[NAME]) <= 1e-4


def test_a_failed_conversion_leaves_nothing_and_stale_leftovers_are_cleared(local_hub,
                                                                           tmp_path):
  cache = tmp_path / "cache"
  (cache / f".{NAME}.tmp-0badc0de" / "params").mkdir(parents=True)  # a build killed earlier

  def crash(*args, **kwargs):
    raise KeyboardInterrupt  # e.g. Ctrl-C while the converted model is being written

  with pytest.MonkeyPatch.context() as m:
    m.setattr(pretrained.ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
      pj.load_pretrained(NAME)
  assert cache_contents(tmp_path) == []  # the killed build's leftovers went, no new ones
  pj.load_pretrained(NAME)
  assert cache_contents(tmp_path) == [NAME]


def test_release_pth_names_need_torch_and_say_so(local_hub, monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else find_spec(name, *a))
  with pytest.raises(errors.ConfigError, match="requirements-torch.txt"):
    pj.load_pretrained("identityformer_s12.sail_in1k")
  assert local_hub.count() == 0  # refused before downloading 48 MB it cannot read


# ---------------------------------------------------------------------------
# The cross-check at scale, one name per family: benchmarks/pretrained_parity.py.
# ---------------------------------------------------------------------------

# A 384 name among them: the eval transform follows the name. (21841-class heads get
# ImageNet-21k's names from the converter: test_convert_metaformer.py.)
ONE_PER_FAMILY = ("poolformer_s12.sail_in1k", "poolformerv2_s12.sail_in1k",
                  "identityformer_s12.sail_in1k", "randformer_s12.sail_in1k",
                  "convformer_s18.sail_in1k", "caformer_s18.sail_in1k_384")


@pytest.mark.slow
def test_pretrained_parity_of_one_name_per_family(hub_files, tmp_path):
  """Download, convert, cache and compare with the PyTorch model, as a user runs it; then
  `main.py --mode=predict` by name, offline, from the cache."""
  root, refs = hub_files
  for name in ONE_PER_FAMILY:
    tag = hub.PRETRAINED[name]
    if not os.path.exists(os.path.join(root, tag.repo, tag.filename or "")):
      refs[name] = write_repo(root, name, seed=3)
  out = tmp_path / "parity.json"
  from PIL import Image
  photos = [tmp_path / f"{p}.png" for p in PHOTOS]
  for p, path in zip(PHOTOS, photos):
    Image.fromarray(getattr(skimage_data, p)()).save(path)
  env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
  with LocalHub(root) as server:
    env.update(HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "hf"), JAX_PLATFORMS="cpu",
               POOLFORMER_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "pretrained_parity.py"),
                           *ONE_PER_FAMILY, "--out", str(out), "--images", *map(str, photos)],
                          env=env, capture_output=True,
                          text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  print(proc.stdout)  # per name: logits vs the reference, first and cached load times (-s)
  rows = json.loads(out.read_text())["rows"]
  assert sorted(r["name"] for r in rows) == sorted(ONE_PER_FAMILY)
  for row in rows:
    assert row["max_abs_logit_diff"] <= 1e-4 and row["top5_overlap"] == 1.0, row
    assert not row["first_load_was_cached"] and row["cached_load_s"] < row["first_load_s"], row
  reference = {r["name"]: r["reference"] for r in rows}
  assert reference["poolformer_s12.sail_in1k"].startswith("transformers'")  # timm's v1 differs
  assert reference["caformer_s18.sail_in1k_384"] == "timm (its own hf-hub loader)"
  # The cache entry carries what the name says: 384 crops.
  info_384, _ = pretrained.read_info(str(tmp_path / "cache" / "caformer_s18.sail_in1k_384"))
  assert (info_384.preprocessing["input_size"], info_384.preprocessing["crop_pct"]) == (384, 1.0)
  # predict by name, with no hub at all: the cache is enough.
  photo = photos[0]
  env["HF_HUB_OFFLINE"] = "1"
  proc = subprocess.run([sys.executable, "main.py", "--mode=predict", "--format=jsonl",
                         "--checkpoint=caformer_s18.sail_in1k_384", str(photo)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  predicted = json.loads(proc.stdout.strip().splitlines()[-1])
  pixels = inference.preprocess([getattr(skimage_data, PHOTOS[0])()], info_384.preprocessing)
  assert pixels.shape == (1, 384, 384, 3)
  ref = refs["caformer_s18.sail_in1k_384"]
  with torch.no_grad(), H.head_norm_eps(ref, 1e-5):  # the release's eps, which ours keeps
    logits = ref(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))).numpy()
  assert [p["index"] for p in predicted["top_k"]] == list(np.argsort(-logits[0])[:5]), predicted


@pytest.mark.slow
def test_eval_mode_scores_a_released_name(local_hub, tmp_path):
  """`main.py --mode=eval --config.init_from=NAME` on the real imagenet2012 builder (tiny fake
  tars): the name is downloaded, converted and scored on every validation image."""
  import fake_imagenet
  fake_imagenet.prepare_fake_imagenet(tmp_path / "data", tmp_path / "manual")
  env = cpu_env(1, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path / "hf"))
  proc = subprocess.run([sys.executable, "main.py", "--mode=eval",
                         "--config=configs/imagenet.py:poolformerv2_s12",
                         f"--workdir={tmp_path / 'eval'}", f"--config.init_from={NAME}",
                         f"--config.data.data_dir={tmp_path / 'data'}",
                         "--config.eval_batch_size=8", "--config.dtype=float32"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "was evaluated by its release at" not in proc.stderr  # the recipe's 224, crop 1.0
  records = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").open()]
  assert records[-1]["source"] == NAME and records[-1]["eval/examples"] == 13
  assert (tmp_path / "cache" / NAME / "config.json").is_file()


def test_parity_script_scores_an_imagenet_validation_folder(local_hub, hub_files, tmp_path):
  """benchmarks/pretrained_parity.py's top-1 over `val/<WordNet id>/*`: two photos filed under
  the class timm's model ranks first, one under another class, so top-1 must be 2/3."""
  from PIL import Image
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import pretrained_parity
  _, refs = hub_files
  model, info = pj.load_pretrained(NAME)
  photos = [getattr(skimage_data, p)() for p in ("chelsea", "coffee", "astronaut")]
  pixels = inference.preprocess(photos, info.preprocessing)
  with torch.no_grad():
    ranked = refs[NAME](torch.from_numpy(np.ascontiguousarray(
        pixels.transpose(0, 3, 1, 2)))).numpy().argsort(-1)[:, ::-1]
  wnids = pretrained.imagenet_wnids(1000)
  classes = [ranked[0, 0], ranked[1, 0], ranked[2, 1]]  # the last one: timm's second choice
  for i, (photo, c) in enumerate(zip(photos, classes)):
    os.makedirs(tmp_path / "val" / wnids[c], exist_ok=True)
    Image.fromarray(photo).save(tmp_path / "val" / wnids[c] / f"{i}.png")
  top1, n = pretrained_parity.imagenet_top1(model, info, str(tmp_path / "val"), batch_size=4)
  assert n == 3 and top1 == pytest.approx(2 / 3)
