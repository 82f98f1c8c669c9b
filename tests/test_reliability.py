"""What happens when things go wrong: preemption, hard kills, corrupt checkpoints, NaNs, bad input.

Most tests run the real `main.py` in a subprocess on the demo's smoke config (real digits, a tiny
PoolFormer, one CPU device) and compare with an uninterrupted run of the same command.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cpu_env, load_config
from poolformer_jax import checkpointing
from poolformer_jax import defaults
from poolformer_jax import errors
from poolformer_jax import pretrained
from poolformer_jax import sharding
from poolformer_jax import train

TOTAL = 40


def main_env(devices: int = 1, fast_compile: bool = True, **extra) -> dict:
  return cpu_env(devices, fast_compile=fast_compile, PYTHONUNBUFFERED="1", **extra)


def smoke_args(workdir, data_dir, *extra):
  return ["main.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.total_steps={TOTAL}",
          "--config.log_every_steps=1", *extra]


def run_main(args, timeout=600, devices=1, fast_compile=True, **env):
  return subprocess.run([sys.executable, *args], cwd=REPO,
                        env=main_env(devices, fast_compile, **env),
                        capture_output=True, text=True, timeout=timeout)


def start_main(args, devices=1):
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=main_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def logged_step(workdir) -> int:
  return max((r["step"] for r in read_metrics(workdir) if "loss" in r), default=0)


def deterministic_records(workdir):
  """What must not depend on interruptions: losses, lrs, grad norms, evals (not timings)."""
  keys = ("step", "loss", "lr", "grad_norm", "eval/top1", "eval/top5", "eval/loss")
  return [{k: r[k] for k in keys if k in r} for r in read_metrics(workdir)]


def final_params(workdir):
  params, _, _ = pretrained.load_params(str(workdir))
  return params


def assert_same_params(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def wait_for(predicate, proc, timeout=300, what=""):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}")


# Tests that share `reference_run` stay on one xdist worker, so it is computed once.
SHARES_REFERENCE = pytest.mark.xdist_group("reference_run")


@pytest.fixture(scope="session")  # Session: xdist may interleave other modules.
def reference_run(digits_data_dir, tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce exactly."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run_main(smoke_args(workdir, digits_data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


# --------------------------------------------------------------------------- 1. preemption


@pytest.mark.slow
@SHARES_REFERENCE
def test_sigterm_saves_exits_and_resumes_exactly(reference_run, digits_data_dir, tmp_path):
  """SIGTERM at a random step: checkpoint, clean exit (code 75) within seconds, exact resume."""
  workdir = tmp_path / "run"
  at = random.Random().randint(3, TOTAL - 8)  # Any step must work; the message names it.
  proc = start_main(smoke_args(workdir, digits_data_dir, "--config.checkpoint_every_steps=1000"))
  wait_for(lambda: logged_step(workdir) >= at, proc, what=f"step {at}")
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  _, err = proc.communicate(timeout=120)
  assert time.time() - sent < 60, "did not exit within a bounded time"
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
  assert "Traceback" not in err
  saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and at <= saved[0] < TOTAL, (at, saved)
  assert f"preempted at step {saved[0]}: checkpoint saved" in err

  proc = run_main(smoke_args(workdir, digits_data_dir, "--config.checkpoint_every_steps=1000"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from checkpoint step {saved[0]}" in proc.stderr
  assert_same_params(final_params(workdir), final_params(reference_run))
  assert deterministic_records(workdir) == deterministic_records(reference_run)


@pytest.mark.parametrize("when", ["importing", "compiling"])
def test_sigterm_during_start_up_exits_75_with_one_line(digits_data_dir, tmp_path, when):
  """A preemption notice before the first step (while Python imports, or once the run is set
  up and compiles): exit 75, one line saying so, no traceback or C++ dump, nothing written
  half (no checkpoint, no metrics; what was written is complete)."""
  workdir = tmp_path / "run"
  proc = start_main(smoke_args(workdir, digits_data_dir))
  if when == "importing":
    time.sleep(1.0)
  else:  # config.json is written after the setup, before the state and the compiled steps.
    wait_for(lambda: (workdir / "config.json").exists(), proc, what="the set-up")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
  said = [line for line in err.splitlines() if "preempted" in line.lower()]
  assert len(said) == 1 and "before the first training step" in said[0], err[-3000:]
  assert "Traceback" not in err and "Stack trace" not in err and "*** " not in err, err[-3000:]
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  assert read_metrics(workdir) == []
  for name in ("config.json", "train_config.json"):
    if (workdir / name).exists():
      json.loads((workdir / name).read_text())


# --------------------------------------------------------------------------- 2. hard kills


@pytest.mark.slow
@SHARES_REFERENCE
def test_sigkill_during_async_checkpoint_writes(reference_run, digits_data_dir, tmp_path):
  """SIGKILL while a checkpoint is being written, twice (the second time in a resumed run):
  each restart ignores the partial step, restores the last complete one, says so, and the run
  still ends exactly as uninterrupted."""
  workdir = tmp_path / "run"
  args = smoke_args(workdir, digits_data_dir, "--config.checkpoint_every_steps=1",
                    "--config.keep_checkpoints=2")
  ckpt_dir = workdir / "checkpoints"

  def writing_after(step):
    """A save of a step later than `step` is in flight (Orbax's temporary directory exists)."""
    if not ckpt_dir.exists():
      return False
    return any(int(n.split(".")[0]) > step for n in os.listdir(ckpt_dir)
               if ".orbax-checkpoint-tmp" in n)

  kills = []  # (newest complete step, partial directories) after each kill.
  for _ in range(2):
    last = kills[-1][0] if kills else 0
    proc = start_main(args)
    after = last + random.Random().randint(1, 6)
    wait_for(lambda: writing_after(after), proc, what=f"a checkpoint write after step {after}")
    proc.kill()
    _, err = proc.communicate()
    if kills and kills[-1][1]:
      assert f"Ignoring {len(kills[-1][1])} incomplete checkpoint" in err, err[-3000:]
    if kills and kills[-1][0]:
      assert f"Resumed from checkpoint step {kills[-1][0]}" in err, err[-3000:]
    complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    partial = [n for n in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in n]
    kills.append((max(complete, default=0), partial))
  assert any(partial for _, partial in kills), kills  # At least one kill hit a write.

  proc = run_main(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  if kills[-1][1]:
    assert f"Ignoring {len(kills[-1][1])} incomplete checkpoint" in proc.stderr
  if kills[-1][0]:
    assert f"Resumed from checkpoint step {kills[-1][0]}" in proc.stderr
  assert_same_params(final_params(workdir), final_params(reference_run))
  assert deterministic_records(workdir) == deterministic_records(reference_run)


# --------------------------------------------------------------------------- 3. corruption


def _largest_array_file(step_dir):
  """The biggest data file of the step's params (OCDBT keeps array chunks under .../d/)."""
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "params")
           for f in names if os.path.basename(root) == "d"]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
@SHARES_REFERENCE
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_detected_and_fallback_restores_the_previous(
    reference_run, digits_data_dir, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run, workdir)
  victim = _largest_array_file(workdir / "checkpoints" / str(TOTAL))
  data = bytearray(open(victim, "rb").read())
  if damage == "flip":  # Silent for Orbax: only the fingerprint catches it.
    data[len(data) // 2] ^= 0x5A
  else:
    data = data[:len(data) // 3]
  open(victim, "wb").write(bytes(data))

  proc = run_main(smoke_args(workdir, digits_data_dir, "--mode=eval"))
  assert proc.returncode == 1
  error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1, proc.stderr[-3000:]
  assert f"checkpoint step {TOTAL}" in error[0] and "array '" in error[0]
  assert os.path.join("checkpoints", str(TOTAL)) in error[0]
  assert "checkpoint_fallback=True" in error[0] and "(20)" in error[0]

  # With the fallback a resumed run restores step 20, moves the bad step aside, trains to 40.
  proc = run_main(smoke_args(workdir, digits_data_dir, "--config.checkpoint_fallback=True"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "falling back" in proc.stderr and "Resumed from checkpoint step 20" in proc.stderr
  assert os.path.isdir(f"{workdir}/checkpoints_corrupt/{TOTAL}")
  assert_same_params(final_params(workdir), final_params(reference_run))


# --------------------------------------------------------------------------- 4. topologies


def test_checkpoint_restores_across_device_counts(tmp_path):
  """Saved on 8 devices, restored on 1 and 4 (and 1 -> 8), the values are identical."""
  config = defaults.default_config()
  config.model_overrides.depths, config.model_overrides.widths = (1, 1, 1, 1), (16, 32, 64, 128)
  config.dtype = "float32"

  def trainer(n, fsdp=1):
    config.fsdp = fsdp
    mesh = sharding.make_mesh(fsdp, jax.devices()[:n])
    return train.Trainer(config, mesh, 10, steps_per_epoch=1, total_steps=1)

  for saved_on, restore_on in (((8, 4), [(1, 1), (4, 1), (4, 2)]), ((1, 1), [(8, 1), (8, 8)])):
    source = trainer(*saved_on)
    state = source.init_state(seed=saved_on[0])
    ckpt = checkpointing.Checkpointer(str(tmp_path / f"from{saved_on[0]}"))
    ckpt.save(1, state.checkpoint_items())
    ckpt.wait_until_finished()
    expected = jax.device_get(state.checkpoint_items())
    for n, fsdp in restore_on:
      target = trainer(n, fsdp)
      items, meta = ckpt.restore(1, target.abstract_state.checkpoint_items())
      assert meta["step"] == 1
      kernel = items["params"]["stages"][3]["blocks"][0]["mlp"]["fc1"]["kernel"]
      assert kernel.sharding.mesh.devices.size == n
      assert_same_params(jax.device_get(items), expected)
    ckpt.close()


def test_a_save_cuts_only_large_replicated_arrays_into_one_slice_per_replica(tmp_path, caplog):
  """Orbax's replica-parallel save cuts a replicated array into one slice per device, each an
  eager op with a program of its own. Only arrays whose slices reach MIN_REPLICA_SLICE_BYTES
  are cut; the small ones (most of a model's arrays) are written whole. Both restore exactly."""
  replicated = jax.sharding.NamedSharding(jax.make_mesh((8,), ("data",)),
                                          jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  small = {f"scale{i}": rng.normal(size=(8 * (97 + i),)).astype(np.float32) for i in range(20)}
  large = {"kernel": rng.normal(size=(8, checkpointing.MIN_REPLICA_SLICE_BYTES // 4))
           .astype(np.float32)}  # 8 slices of exactly MIN_REPLICA_SLICE_BYTES.
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  for step, (params, cut) in enumerate([(small, False), (large, True)]):
    items = {"params": jax.device_put(params, replicated),
             "train": {"step": jax.device_put(np.int32(step), replicated)}}
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
      ckpt.save(step, items)
      ckpt.wait_until_finished()
    slices = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(slice)")]
    assert (len(slices) > 0) == cut, [r.getMessage()[:80] for r in slices]
    restored, _ = ckpt.restore(step, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), items))
    assert_same_params(jax.device_get(restored), jax.device_get(items))
  ckpt.close()


# --------------------------------------------------------------------------- 5. NaN / inf


def test_nan_stops_naming_the_step_and_never_saves_a_poisoned_checkpoint(
    digits_data_dir, tmp_path, monkeypatch):
  """A NaN in step 15's input (a checkpoint step): stop, say where, keep step 10 as the last.

  The host hands over uint8, which holds no NaN: the batch of step 15 carries a marker (a white
  first image) that the device-side preprocessing turns into NaN."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from poolformer_jax import augment, input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.Dataset.train_iterator
  real_augment = augment.augment_batch

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
      if i == 15:
        batch = {**batch, "image": batch["image"].copy()}
        batch["image"][0] = 255
      yield batch

  def augment_with_nan(key, images, data_config):
    out = real_augment(key, images, data_config)
    return jnp.where(jnp.all(images[0] == 255), jnp.nan, out)

  monkeypatch.setattr(input_pipeline.Dataset, "train_iterator", poisoned)
  monkeypatch.setattr(augment, "augment_batch", augment_with_nan)
  config = load_config("demo.py:smoke")
  config.data.data_dir = digits_data_dir
  config.checkpoint_every_steps = 5
  workdir = str(tmp_path)
  with pytest.raises(train.TrainingDivergedError,
                     match=r"loss = nan.*at step 15: stopped without saving\. The last good "
                           r"checkpoint is step 10"):
    train.train_and_evaluate(config, workdir)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [5, 10]
  params = final_params(workdir)
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
  last = read_metrics(workdir)[-1]
  assert last["step"] == 15 and last["diverged"] is True


# --------------------------------------------------------------------------- 6. bad configs


def test_bad_configs_fail_fast_with_one_clear_line(digits_data_dir, tmp_path):
  other_arch = tmp_path / "other"
  other_arch.mkdir()
  from poolformer_jax import model as model_lib
  pretrained.write_config(str(other_arch), model_lib.get_config("poolformer_m36"),
                          variant="poolformer_m36")
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  (readonly / "file").write_text("x")  # A workdir under a regular file cannot be created.
  cases = {
      "unknown model": (["--config.model=poolformer_xl"], "unknown model 'poolformer_xl'"),
      "batch": (["--config.batch_size=60"], "divisible by the data-parallel size"),
      "image size": (["--config.data.image_size=48"], "multiple of 32"),
      "dataset": (["--config.data.dataset=imagenet2012", f"--config.data.data_dir={tmp_path}/nd"],
                  "'imagenet2012' is not prepared"),  # Then the steps to prepare it:
      "workdir": ([f"--workdir={readonly}/file/sub"], "is not writable"),
      "init_from": ([f"--config.init_from={other_arch}"], "another architecture"),
  }
  procs = {}
  for name, (extra, _) in cases.items():
    workdir = tmp_path / name.replace(" ", "_")
    args = ["main.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
            f"--config.data.data_dir={digits_data_dir}", *extra]
    procs[name] = (start_main(args, devices=8), workdir)
  stderr = {}
  for name, (proc, workdir) in procs.items():
    _, err = stderr[name] = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, (name, err[-2000:])
    assert len(errors) == 1 and cases[name][1] in errors[0], (name, err[-2000:])
    assert "Traceback" not in err, name
    assert not (workdir / "checkpoints").exists(), name  # Nothing was started.
  assert "tfds build imagenet2012" in stderr["dataset"][1]
  assert "ILSVRC2012_img_train.tar" in stderr["dataset"][1]


def test_only_our_own_errors_become_one_line(tmp_path, monkeypatch, capsys):
  """main.py prints the project's errors as one `error:` line; any other exception is a bug
  and keeps its traceback."""
  from conftest import main_flags
  from poolformer_jax import hub
  image = tmp_path / "x.png"
  with main_flags("--mode=predict", f"--checkpoint={tmp_path / 'missing'}") as main:
    assert main.main(["main.py", str(image)]) == 1  # Ours: no such model directory.
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err

    def bug(*args, **kwargs):
      raise ValueError("an internal bug")

    monkeypatch.setattr(hub, "load_pretrained", bug)
    with pytest.raises(ValueError, match="an internal bug"):
      main.main(["main.py", str(image)])


# --------------------------------------------------------------------------- 7. garbage input


def test_converter_and_preprocess_survive_garbage(tmp_path, capsys):
  """Random bytes, truncated files and junk configs: only our own errors, nothing written."""
  import convert_torch_weights
  from poolformer_jax import inference
  rng = np.random.default_rng(0)
  skimage_data = pytest.importorskip("skimage.data")
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(skimage_data.astronaut()).save(buf, format="JPEG")
  jpeg = buf.getvalue()
  samples = []
  for i in range(12):
    samples.append(rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes())
  samples += [jpeg[:int(n)] for n in rng.integers(0, len(jpeg) // 2, 6)]  # Truncated JPEGs.
  samples += [b"PK\x03\x04" + samples[0], b"\x80\x02}q\x00" + samples[1]]  # Zip / pickle heads.
  for i, data in enumerate(samples):
    for ext in (".pth", ".safetensors", ".bin", ".pth.tar"):
      src = tmp_path / f"g{i}{ext}"
      src.write_bytes(data)
      out = tmp_path / f"out{i}{ext}"
      assert convert_torch_weights.main([str(src), str(out)]) == 1
      assert not out.exists()
      err = capsys.readouterr().err
      assert err.startswith("error: ") and "Traceback" not in err
      # Never the advice to unpickle with weights_only=False, which runs the file's code.
      assert "weights_only" not in err and "trusted" not in err, err
      if ext != ".safetensors" and len(data) >= 8 and not data.startswith((b"PK", b"\x80")):
        assert "is not a PyTorch checkpoint" in err, err
    with pytest.raises(inference.ImageError):
      inference.preprocess([data])
  hf = tmp_path / "hf"
  hf.mkdir()
  for junk in ("{", "[]", '{"model_type": "poolformer"}', "\x00\xff"):
    (hf / "config.json").write_text(junk)
    (hf / "model.safetensors").write_bytes(samples[3])
    assert convert_torch_weights.main([str(hf), str(tmp_path / "out_hf")]) == 1
    assert not (tmp_path / "out_hf").exists()
    assert capsys.readouterr().err.startswith("error: ")


# --------------------------------------------------------------------------- 8. bad images


@pytest.mark.slow
def test_bad_images_are_found_before_training_and_odd_ones_train(tmp_path):
  """An image folder with a truncated JPEG and an empty file among CMYK, 16-bit, 1x1 and
  PNG-named-.jpg images. Default threshold: one clear error naming both, before any
  compilation. Raised threshold: they are left out, every odd image trains and evaluates."""
  sys.path.insert(0, os.path.dirname(__file__))
  import odd_images  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "data"
  odd = odd_images.make_folder(folder, np.random.default_rng(0),
                               per_class={"train": 9, "val": 2}, odd_in=("train", "val"))
  # 27 plain + 5 odd train images = 2 batches of 16 per epoch: every one is read each epoch.
  args = ["main.py", "--config=configs/demo.py:smoke", f"--workdir={tmp_path / 'run'}",
          "--config.data.dataset=folder", f"--config.data.folder={folder}",
          "--config.data.eval_split=val", "--config.batch_size=16", "--config.eval_batch_size=8",
          "--config.total_steps=6", "--config.log_every_steps=1"]
  proc = run_main(args)
  assert proc.returncode == 1, proc.stderr[-3000:]
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "2 of 34 files" in error_lines[0], proc.stderr[-3000:]
  assert "truncated.jpg" in proc.stderr and "empty.jpg: empty file" in proc.stderr
  assert "Compiled the train step" not in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()

  proc = run_main(args + ["--config.data.max_bad_train_fraction=0.1"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 of 34 files cannot be decoded and are left out" in proc.stderr
  manifest = json.loads((tmp_path / "run" / "data_manifest" / "train.json").read_text())
  kept = {f for f, _ in manifest["files"]}
  assert len(kept) == 32 and {p for p, e in odd["train"] if e is not None} <= kept
  assert {p for p, _ in manifest["excluded"]} == {p for p, e in odd["train"] if e is None}
  records = read_metrics(tmp_path / "run")
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  evals = [r for r in records if "eval/top1" in r]
  assert evals[-1]["eval/examples"] == 6 + 5  # Every val image, the odd ones included.


# --------------------------------------------------------------------------- 9. full disk


def _state(megabytes: float, seed: int):
  rng = np.random.default_rng(seed)  # Random bits: no compression makes them smaller.
  n = int(megabytes * 2**20 / 4 / 2)
  return {"params": {"w": jax.numpy.asarray(rng.normal(size=n).astype(np.float32))},
          "train": {"step": jax.numpy.int32(seed), "mu": jax.numpy.asarray(
              rng.normal(size=n).astype(np.float32))}}


def test_disk_full_during_an_async_save_names_directory_and_bytes(small_filesystem, monkeypatch):
  """The disk fills while Orbax writes in the background: the error (raised at the next wait)
  names the step, the directory, the bytes needed and the root cause; the partial step is
  removed; the previous checkpoint restores and verifies; after freeing space a save works."""
  fs = small_filesystem(4 * 2**20)
  ckpt = checkpointing.Checkpointer(str(fs.path / "checkpoints"), max_to_keep=5)
  first = _state(1.5, seed=1)
  ckpt.save(1, first)
  ckpt.wait_until_finished()
  (fs.path / "other_writer").write_bytes(b"\0" * (2 * 2**20))  # Someone else fills the disk.
  # As on filesystems that report no free space (gs://): only Orbax's write can fail.
  monkeypatch.setattr(checkpointing, "free_bytes", lambda directory: None)
  ckpt.save(2, _state(1.5, seed=2))  # Returns while the write goes on in the background.
  with pytest.raises(errors.DiskFullError) as e:
    ckpt.wait_until_finished()
  msg = str(e.value)
  assert msg.startswith(f"checkpoint step 2 could not be written to {fs.path / 'checkpoints'}: "
                        "no space left on device (writing "), msg  # TensorStore names the file.
  assert "It needs about 1.5 MiB (1,572,868 bytes) (the state's size)" in msg, msg
  assert "step 1, is intact" in msg and "rerun the same command" in msg
  ckpt.wait_until_finished()  # Raised once; the trainer's cleanup goes on.
  ckpt.close()
  assert sorted(os.listdir(fs.path / "checkpoints")) == ["1"]  # Partial step 2 removed.
  monkeypatch.undo()

  restored = checkpointing.Checkpointer(str(fs.path / "checkpoints"), read_only=True)
  items, _ = restored.restore(1, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first))
  assert_same_params(jax.device_get(items), jax.device_get(first))
  restored.close()
  # With the free-space check: refused before writing a byte, same facts in the message.
  ckpt = checkpointing.Checkpointer(str(fs.path / "checkpoints"), max_to_keep=5)
  with pytest.raises(errors.DiskFullError,
                     match=r"not enough disk space to save checkpoint step 2 in .*checkpoints: it "
                           r"needs about 1\.5 MiB \(1,572,868 bytes\).* MiB .* are free\. The "
                           r"last complete checkpoint, step 1, is intact"):
    ckpt.save(2, _state(1.5, seed=2))
  (fs.path / "other_writer").unlink()
  ckpt.save(2, _state(1.5, seed=2))
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.slow
@SHARES_REFERENCE
def test_disk_full_stops_cleanly_and_the_rerun_resumes_exactly(
    reference_run, digits_data_dir, small_filesystem):
  """The workdir on a 3.5 MiB filesystem, a checkpoint (1.3 MiB) every 5 steps: the third save
  does not fit and stops the run with one error line naming the directory and the bytes;
  earlier checkpoints and metrics.jsonl are intact; after the disk grows, the same command
  resumes and ends exactly like an uninterrupted run."""
  fs = small_filesystem(7 * 2**19)
  workdir = fs.path / "run"
  args = smoke_args(workdir, digits_data_dir, "--config.checkpoint_every_steps=5",
                    "--config.keep_checkpoints=10")
  proc = run_main(args)
  assert proc.returncode == 1, proc.stderr[-3000:]
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert saved and saved == list(range(5, saved[-1] + 1, 5)), saved
  failed = saved[-1] + 5
  assert (f"not enough disk space to save checkpoint step {failed} in "
          f"{workdir / 'checkpoints'}: it needs about 1.3 MiB") in error_lines[0], error_lines[0]
  assert f"step {saved[-1]}, is intact" in error_lines[0]
  records = read_metrics(workdir)  # Every line parses, in order, up to the failed step.
  assert [r["step"] for r in records if "loss" in r] == list(range(1, failed + 1))

  fs.resize(64 * 2**20)
  proc = run_main(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resumed from checkpoint step {saved[-1]}" in proc.stderr
  assert_same_params(final_params(workdir), final_params(reference_run))
  assert deterministic_records(workdir) == deterministic_records(reference_run)


# --------------------------------------------------------------------------- 10. soak


@pytest.mark.slow
def test_soak_hundreds_of_steps_memory_flat_no_retrace(digits_data_dir, tmp_path):
  """400 steps, an eval every 50 and a checkpoint every 25: host memory flat, each step
  compiled once (JAX logs every compilation)."""
  workdir = tmp_path / "soak"
  proc = run_main(["main.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
                   f"--config.data.data_dir={digits_data_dir}", "--config.total_steps=400",
                   "--config.log_every_steps=25", "--config.eval_every_steps=50",
                   "--config.checkpoint_every_steps=25"], timeout=900, JAX_LOG_COMPILES="1",
                  fast_compile=False)  # 400 steps: run-bound, not compile-bound.
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = read_metrics(workdir)
  train_records = [r for r in records if "loss" in r]
  assert len(train_records) == 16 and len([r for r in records if "eval/top1" in r]) == 8
  memory = [r["host_memory_mb"] for r in train_records]
  # After warm-up (first quarter), resident memory may wobble (allocator, tf.data buffers) but
  # must not grow with steps: a leak of one batch per step would add ~0.8 MB/step = 240 MB here.
  settled = memory[len(memory) // 4:]
  assert max(settled) - settled[0] < 100, memory
  assert proc.stderr.count("Compiling jit(train_step)") == 1
  assert proc.stderr.count("Compiling jit(eval_step)") == 1
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [350, 375, 400]


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_finetune_config_from_a_released_name_on_an_image_folder(tmp_path):
  """configs/finetune.py from `hf-hub:sail/poolformer_s12` (a random-init HF S12 with 1000
  classes, served by a local stand-in of the hub), fine-tuned on a 3-class folder of real
  photos: downloaded and converted once, a new head, the rest loaded, training and eval run."""
  pytest.importorskip("torch")
  import helpers_torch
  from local_hub import LocalHub
  from PIL import Image
  skimage_data = pytest.importorskip("skimage.data")
  helpers_torch.random_hf_model("poolformer_s12", num_labels=1000, seed=0).save_pretrained(
      tmp_path / "hub" / "sail" / "poolformer_s12")
  photos = {"astronaut": skimage_data.astronaut(), "coffee": skimage_data.coffee(),
            "chelsea": skimage_data.chelsea()}
  for split, count in (("train", 8), ("val", 2)):
    for label, photo in photos.items():
      os.makedirs(tmp_path / "folder" / split / label)
      for i in range(count):
        crop = photo[i * 10:, i * 12:]
        Image.fromarray(crop).save(tmp_path / "folder" / split / label / f"{i}.jpg")
  with LocalHub(tmp_path / "hub") as hub:
    proc = run_main(["main.py", "--config=configs/finetune.py", f"--workdir={tmp_path / 'ft'}",
                     "--config.init_from=hf-hub:sail/poolformer_s12",
                     f"--config.data.folder={tmp_path / 'folder'}",
                     "--config.batch_size=8", "--config.eval_batch_size=8",
                     "--config.total_steps=4", "--config.data.image_size=64",
                     "--config.dtype=float32"], HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0",
                    HF_HUB_CACHE=str(tmp_path / "hf"),
                    POOLFORMER_JAX_CACHE=str(tmp_path / "cache"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert hub.requests[("GET", "sail/poolformer_s12/model.safetensors")] == 1  # once, not per use
  assert "it has 1000 classes, this run 3; the head is newly initialised" in proc.stderr
  evals = [r for r in read_metrics(tmp_path / "ft") if "eval/top1" in r]
  assert evals and evals[-1]["eval/examples"] == 6
