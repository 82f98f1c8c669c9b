"""Compile mode: the real steps compiled for Cloud TPU slices on this CPU-only machine.

These need libtpu (requirements-tpu.txt, part of requirements-test.txt), not a TPU. Where
it is missing they skip; CI (.ci/run) installs it and fails if it cannot be imported.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from poolformer_jax import tpu_compile

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed "
                                  "(pip install -r requirements-tpu.txt)")
# One libtpu-loading worker: the compiles share it, and it runs them one at a time.
pytestmark = pytest.mark.xdist_group("libtpu")


def smoke(topology: str, **overrides):
  """The smoke model (the demo's tiny MetaFormer) at a small batch, for `topology`."""
  c = load_config("demo.py:smoke")
  c.topology = topology
  c.batch_size = 64
  c.eval_batch_size = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def main_py(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=env or dict(os.environ))


# --------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("name,chips,hosts,shape", [
    ("v4-8", 4, 1, (2, 2, 1)), ("v4-16", 8, 2, (2, 2, 2)), ("v4-32", 16, 4, (2, 2, 4)),
    ("v5p-8", 4, 1, (2, 2, 1)), ("v5e-8", 8, 1, (2, 4)), ("v5litepod-16", 16, 2, (4, 4)),
    ("v5e-256", 256, 32, (16, 16)), ("v6e-8", 8, 1, (2, 4)), ("v5e-1", 1, 1, (1, 1))])
def test_topology_names_are_cloud_accelerator_types(name, chips, hosts, shape):
  t = tpu_compile.parse_topology(name)
  assert (t.num_chips, t.num_hosts, t.shape) == (chips, hosts, shape)


@pytest.mark.parametrize("bad", ["v4-6", "v4-7", "v5e-3", "v9-8", "v4", "tpu", ""])
def test_unknown_topologies_are_refused_with_the_valid_names(bad):
  with pytest.raises(ValueError, match="v4-8.*v5e-8"):
    tpu_compile.parse_topology(bad)


@needs_libtpu
def test_every_known_topology_is_what_libtpu_builds():
  """Our table of slice shapes and hosts agrees with libtpu's devices, for every name."""
  tpu_compile.prepare_environment(tpu_compile.parse_topology("v4-8"))
  for name in tpu_compile.known_topologies():
    t = tpu_compile.parse_topology(name)
    for slices in (1, 2) if t.num_chips <= 64 else (1,):
      devices = tpu_compile.topology_devices(t, slices)
      assert len(devices) == t.num_chips * slices, name
      assert len({d.process_index for d in devices}) == t.num_hosts * slices, name
      assert {d.platform for d in devices} == {"tpu"}
      assert {d.device_kind for d in devices} == {t.chip.device_kind}, name


@needs_libtpu
def test_multislice_mesh_keeps_fsdp_groups_inside_a_slice():
  from poolformer_jax import sharding  # pylint: disable=g-import-not-at-top
  topology = tpu_compile.parse_topology("v4-16")
  tpu_compile.prepare_environment(topology)
  devices = tpu_compile.topology_devices(topology, num_slices=2)
  mesh = sharding.make_mesh(4, devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 4}
  assert len(set(mesh.devices.flat)) == 16
  for group in mesh.devices:  # One row per FSDP group.
    assert len({d.slice_index for d in group}) == 1
  assert {d.slice_index for d in mesh.devices[:, 0]} == {0, 1}
  with pytest.raises(ValueError, match="must divide the devices of one slice"):
    sharding.make_mesh(16, devices)


# --------------------------------------------------------------------------- compiling


@pytest.fixture(scope="module")
def v4_16_report():
  config = smoke("v4-16")
  tpu_compile.prepare_environment(tpu_compile.parse_topology("v4-16"))
  return tpu_compile.compile_report(config)


@needs_libtpu
def test_multi_host_slice_compiles_over_every_device_and_process(v4_16_report):
  r = v4_16_report
  assert (r["chips"], r["hosts"]) == (8, 2)
  # The mesh the Trainer compiled over spans all 8 chips of both hosts.
  assert r["mesh"] == {"data": 8, "fsdp": 1}
  assert (r["mesh_devices"], r["mesh_processes"]) == (8, 2)
  train, ev = r["steps"]["train"], r["steps"]["eval"]
  assert train["images_per_chip"] == 8 and ev["images_per_chip"] == 8
  for step in (train, ev):
    assert 0 < step["peak_hbm_bytes"] < r["hbm_bytes"]
    assert step["flops"] > 0 and step["bytes_accessed"] > 0
    assert step["img_per_s_per_chip_bound"] == pytest.approx(
        step["images_per_chip"] / max(step["flops"] / r["chip"]["peak_flops"],
                                      step["bytes_accessed"] / r["chip"]["hbm_bandwidth"]))
  # Training costs about 3x the forward pass (forward + two backward matmuls per layer).
  assert 2 < train["flops_per_image"] / ev["flops_per_image"] < 4.5
  assert r["fits"]
  assert r["recipe"]["steps"] == 40 and r["recipe"]["hours_bound"] > 0
  # The on-device augmentation is part of the step: counted in it, and reported on its own.
  aug = train["augmentation"]
  assert 0 < aug["bytes_per_image"] < train["bytes_per_image"]
  assert 0 < aug["flops_per_image"] < train["flops_per_image"]
  # The host: a v4 TPU VM has 240 vCPUs for 4 chips.
  host = r["host"]
  assert (host["vcpus_per_host"], host["chips_per_host"]) == (240, 4)
  assert host["images_per_s_per_vcpu_needed"] == pytest.approx(
      train["img_per_s_per_chip_bound"] / 60)
  assert host["input_bound_images_per_s_per_chip"] == pytest.approx(
      60 * host["pipeline_images_per_s_per_vcpu"])
  assert host["input_bound"] == (host["images_per_s_per_vcpu_needed"]
                                 > host["pipeline_images_per_s_per_vcpu"])


@needs_libtpu
def test_tpu_program_has_no_cpu_only_conditional():
  """The XLA:CPU barriers (a `conditional` per backward recomputation) stay out of a TPU
  program compiled on a CPU host; the same step compiled for the CPU has them."""
  import jax  # pylint: disable=g-import-not-at-top
  from poolformer_jax import sharding, train  # pylint: disable=g-import-not-at-top
  config = smoke("v4-8", batch_size=16, eval_batch_size=16)
  topology = tpu_compile.parse_topology("v4-8")
  tpu_compile.prepare_environment(topology)
  texts = {}
  for platform, devices in (("tpu", tpu_compile.topology_devices(topology)),
                            ("cpu", jax.devices("cpu")[:4])):
    trainer = train.Trainer(config, sharding.make_mesh(1, devices), 10, 10, 40)
    texts[platform] = trainer.compile_train_step().as_text()
  assert "conditional(" in texts["cpu"]
  assert "conditional(" not in texts["tpu"]


@needs_libtpu
def test_compile_mode_prints_the_table_and_writes_json(tmp_path):
  """Also what the host must deliver: a pipeline of 2 images/s per vCPU makes it input-bound,
  and the recipe's time is then the hosts' (40 steps of 64 images at 2 x 60 per chip). A
  persistent compilation cache in the environment stays empty: these programs are for devices
  this process does not have, and JAX could not load them back."""
  cache = tmp_path / "xla_cache"
  out = main_py("--mode=compile", "--config=configs/demo.py:smoke", "--config.topology=v4-8",
                f"--workdir={tmp_path}", "--config.host_images_per_s_per_vcpu=2",
                env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
                         JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert not cache.exists() or not os.listdir(cache), os.listdir(cache)
  assert "on v4-8: 4 TPU v4 chips, 1 host(s)" in out.stdout
  assert "| train | 16 |" in out.stdout and "| eval | 30 |" in out.stdout
  assert "https://cloud.google.com/tpu/docs/v4" in out.stdout
  assert "a TPU VM has 240 vCPUs for 4 chips" in out.stdout
  assert "INPUT-BOUND: the hosts feed at most 120 images/s per chip" in out.stdout
  report = json.loads((tmp_path / "compile_v4-8.json").read_text())
  assert report["topology"] == "v4-8" and report["chips"] == 4 and report["fits"]
  assert report["steps"]["train"]["bytes_per_image"] > 0
  assert report["host"]["input_bound"]
  assert report["recipe"]["train_hours_bound"] == pytest.approx(40 * 64 / (120 * 4) / 3600)
  # Data parallel: every parameter's gradient is all-reduced across the 4 chips.
  assert ("collectives of the train step per chip (the arrays they produce): all-reduce"
          in out.stdout)
  assert report["steps"]["train"]["collective_bytes"]["all-reduce"] >= 2 * report["params"]


@needs_libtpu
def test_config_that_does_not_fit_gets_one_clear_error(tmp_path):
  """The smoke model at 224x224 and a huge per-chip batch on one 16 GB v5e chip."""
  out = main_py("--mode=compile", "--config=configs/demo.py:smoke", "--config.topology=v5e-1",
                "--config.data.image_size=224", "--config.batch_size=16384",
                "--config.eval_batch_size=64", f"--workdir={tmp_path}")
  assert out.returncode == 1, out.stdout + out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert re.search(r"does not fit on v5e-1: it needs (more than )?[\d.]+ GiB of HBM per chip.*, "
                   r"a TPU v5e has [\d.]+ GiB", errors[0]), errors[0]
  for knob in ("16384 images per chip", "--config.batch_size=16384",
               "--config.grad_accum_steps=1", "--config.fsdp=1", "--config.remat=False",
               "grad_accum_steps", "fsdp > 1", "remat=True"):
    assert knob in errors[0]
  assert not list(tmp_path.glob("compile_*.json"))


def test_without_libtpu_compile_mode_says_what_to_install(tmp_path):
  """libtpu hidden from a fresh process: one error line naming the requirements file."""
  code = ("import runpy, sys; sys.modules['libtpu'] = None; "
          f"sys.argv = ['main.py', '--mode=compile', '--config=configs/demo.py:smoke', "
          f"'--config.topology=v4-8', '--workdir={tmp_path}']; "
          "runpy.run_path('main.py', run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
  env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"  # No re-exec: keep the hidden module.
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode == 1, out.stdout + out.stderr[-3000:]
  assert "error: compile mode needs libtpu" in out.stderr
  assert "pip install -r requirements-tpu.txt" in out.stderr


@needs_libtpu
def test_other_modes_leave_libtpu_alone_on_a_machine_without_a_tpu(digits_data_dir, tmp_path):
  """With libtpu installed (for compile mode), eval on a machine without a TPU must not start
  the TPU backend: libtpu would print its initialisation error dump first."""
  if tpu_compile.machine_has_tpu():
    pytest.skip("this machine has a TPU")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = main_py("--mode=eval", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                f"--config.data.data_dir={digits_data_dir}", env=env)
  assert out.returncode == 1 and "error: nothing to evaluate" in out.stderr, out.stderr[-3000:]
  for libtpu_says in ("TPU_WORKER_HOSTNAMES", "TPU accelerator type", "libtpu_init"):
    assert libtpu_says not in out.stderr, out.stderr[-3000:]


def test_compile_mode_needs_a_topology(tmp_path):
  out = main_py("--mode=compile", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert "error: --mode=compile needs --config.topology" in out.stderr
  out = main_py("--mode=compile", "--config=configs/demo.py:smoke", "--config.topology=v4-6",
                f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert "error: config.topology: unknown TPU topology 'v4-6'" in out.stderr


# --------------------------------------------------------------------------- MLP kernels


@needs_libtpu
def test_mlp_kernels_are_chosen_where_they_fit_on_a_tpu_mesh():
  import jax  # pylint: disable=g-import-not-at-top
  from poolformer_jax import mlp_kernel, sharding  # pylint: disable=g-import-not-at-top
  topology = tpu_compile.parse_topology("v4-8")
  tpu_compile.prepare_environment(topology)
  mesh = sharding.make_mesh(1, tpu_compile.topology_devices(topology))
  assert mlp_kernel.for_mesh(mesh, sharding.BATCH_AXES, "xla") is None
  kernels = mlp_kernel.for_mesh(mesh, sharding.BATCH_AXES)
  assert kernels.cores == 2 and kernels.mesh.shape[kernels.batch_axes[0]] == 4  # megacore v4
  bf16 = jax.numpy.bfloat16
  assert kernels.fits((4 * 256, 56, 56, 64), 256, bf16)  # S12's stage 1, 256 per chip
  assert kernels.fits((4 * 1024, 14, 14, 320), 1280, bf16)  # stage 3, the recipe's batch
  assert not kernels.fits((4 * 128, 56, 56, 64), 256, bf16)  # one lane block: a core idle
  assert not kernels.fits((4 * 192, 56, 56, 64), 256, bf16)  # not whole lane blocks
  assert not kernels.fits((4 * 256, 7, 7, 512), 2048, bf16)  # stage 4: over VMEM
  # SepConv: per sample, so any even batch per chip; VMEM as Mosaic allocates it (measured:
  # ConvFormer-M36's stage 3 compiles in a v4 core's 16 MiB, its stage 4 needs 16.3 MiB).
  assert kernels.fits_sepconv((4 * 2, 56, 56, 64), 128, 7, bf16)
  assert kernels.fits_sepconv((4 * 1024, 7, 7, 512), 1024, 7, bf16)
  assert kernels.fits_sepconv((4 * 2, 14, 14, 384), 768, 7, bf16)
  assert not kernels.fits_sepconv((4 * 2, 7, 7, 576), 1152, 7, bf16)
  assert not kernels.fits_sepconv((4 * 3, 56, 56, 64), 128, 7, bf16)  # one core idle


@needs_libtpu
def test_float32_training_sizes_the_kernel_blocks_for_float32():
  """float32 maps take twice bfloat16's VMEM: S12's stage-3 blocks at 256 per v4 chip compile
  with both kernels (sized for bfloat16, Mosaic ran out of VMEM: 'Used 19.21M of 16.00M')."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import tpu_block_proxy  # pylint: disable=g-import-not-at-top
  tpu_compile.prepare_environment(tpu_compile.parse_topology("v4-8"))
  result = tpu_block_proxy.measure(3, blocks=1, batch=256, train=True, remat=None,
                                   dtype="float32")
  assert result["kernels"] == 2, result


@needs_libtpu
@pytest.mark.parametrize("model,stage,topology,part", [
    ("convformer_s18", 1, "v4-8", "mlp"), ("poolformerv2_s12", 3, "v4-8", "mlp"),
    ("caformer_s18", 4, "v5e-8", "mlp"), ("convformer_s18", 1, "v4-8", "mix"),
    ("convformer_s18", 4, "v4-8", "mix")])
def test_every_metaformer_half_compiles_to_the_kernels(model, stage, topology, part):
  """Mosaic compiles both kernels for each form of MLP half: a channel LayerNorm before a
  StarReLU MLP (ConvFormer, CAFormer), a bias-free one-group norm with a res-scaled skip
  (PoolFormerV2), and a 512-wide stage 4 in a v5e core's 128 MiB of VMEM; and for ConvFormer's
  token-mixing half on a v4 core, its 56x56 stage 1 (a loop over chunks of pixels) and its
  512-wide stage 4 (one chunk)."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import tpu_block_proxy  # pylint: disable=g-import-not-at-top
  tpu_compile.prepare_environment(tpu_compile.parse_topology(topology))
  result = tpu_block_proxy.measure(stage, blocks=1, batch=256, train=True, remat=None,
                                   model=model, part=part, topology=topology)
  if part == "mlp":
    assert result["kernels"] == 2, result
    return
  # The proxy's step returns the gradients only, and the SepConv backward kernel recomputes
  # the forward: the forward kernel is dead code there. The eval step compiles it.
  assert result["kernels"] == 1, result
  result = tpu_block_proxy.measure(stage, blocks=1, batch=256, train=False, remat=None,
                                   model=model, part=part, topology=topology)
  assert result["kernels"] == 1, result


@needs_libtpu
def test_bfloat16_one_group_norm_statistics_read_the_map_once_on_a_tpu():
  """A one-group norm's statistics outside the kernels stream the map from HBM: in bfloat16
  one pass (E[x^2] - mean^2) reads it once; the two-pass form read it 6 times (XLA also wrote
  and read a float32 copy)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from poolformer_jax import measure, ops  # pylint: disable=g-import-not-at-top
  topology = tpu_compile.parse_topology("v4-8")
  tpu_compile.prepare_environment(topology)
  device = tpu_compile.topology_devices(topology)[0]
  x = jax.ShapeDtypeStruct((256, 56, 56, 64), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  compiled = jax.jit(lambda x: ops.moments(x, (1, 2, 3), 1e-6)).lower(x).compile()
  reads = measure.program_cost(compiled).bytes_accessed / (x.size * 2)
  assert reads < 1.5, reads


@needs_libtpu
def test_block_proxy_measures_any_variant_and_each_half_of_its_blocks():
  """The proxy that found where the baselines' bytes go: CAFormer's stage-4 attention block and
  its two halves compile for a v4 chip, attention's core as its two kernels (16 images: too
  few for the MLP kernels' lane blocks); each half moves less than the block and the two
  together about as much (the halves each read and write the map once more)."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  import tpu_block_proxy  # pylint: disable=g-import-not-at-top
  tpu_compile.prepare_environment(tpu_compile.parse_topology("v4-8"))
  mb = {}
  for part in ("block", "mix", "mlp"):
    result = tpu_block_proxy.measure(4, blocks=1, batch=16, train=True, remat=None,
                                     model="caformer_s18", part=part)
    assert result["mixer"] == "attention", result
    assert result["kernels"] == (0 if part == "mlp" else 2), result
    mb[part] = result["MB_per_image_block"]
  # With its kernels, attention over 49 tokens moves less than the MLP half (5.0 against 5.9
  # MB per image; 16.1 against 2.9 at 256 images before them).
  assert mb["mlp"] > mb["mix"] > 0, mb
  assert max(mb["mix"], mb["mlp"]) < mb["block"] < 1.3 * (mb["mix"] + mb["mlp"]), mb


@needs_libtpu
@pytest.mark.parametrize("topology,batch,fsdp,accum", [
    ("v4-8", 1024, 1, 1), ("v4-8", 2048, 2, 2), ("v4-16", 2048, 1, 1), ("v5e-8", 1024, 1, 1)])
def test_tpu_train_step_runs_the_mlp_kernels(topology, batch, fsdp, accum):
  """With whole lane blocks of samples for every TensorCore (256 per v4 chip, 128 per v5e
  chip), every block's MLP half is the two Pallas kernels in the compiled train step (data
  parallel, FSDP with gradient accumulation, two hosts, a single-core chip); the eval step of
  this PoolFormer keeps XLA's fused forward, and a small batch falls back to XLA."""
  from poolformer_jax import sharding, train  # pylint: disable=g-import-not-at-top
  t = tpu_compile.parse_topology(topology)
  tpu_compile.prepare_environment(t)
  devices = tpu_compile.topology_devices(t)
  blocks = 4  # the smoke model: one block per stage
  count = lambda step: len(re.findall(r"custom_call_target=\"tpu_custom_call\"", step.as_text()))
  for per_chip, kernels in ((batch // t.num_chips, 2 * blocks), (8, 0)):
    config = smoke(topology, batch_size=per_chip * t.num_chips, eval_batch_size=64,
                   fsdp=fsdp if per_chip > 8 else 1, grad_accum_steps=accum if per_chip > 8 else 1)
    trainer = train.Trainer(config, sharding.make_mesh(config.fsdp, devices), 10, 10, 40)
    assert count(trainer.compile_train_step()) == kernels
  assert count(trainer.compile_eval_step()) == 0
  if topology == "v4-8" and accum == 1:  # --config.kernels=xla: the same step without them
    config = smoke(topology, batch_size=batch, eval_batch_size=64, kernels="xla")
    trainer = train.Trainer(config, sharding.make_mesh(1, devices), 10, 10, 40)
    assert "tpu_custom_call" not in trainer.compile_train_step().as_text()
