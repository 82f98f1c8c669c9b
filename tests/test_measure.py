"""The one cost reader, stopwatch and duration format, and the one chip table."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import REPO
from poolformer_jax import chips
from poolformer_jax import measure
from poolformer_jax import metrics
from poolformer_jax import tpu_compile
from poolformer_jax import train


class Stage:
  """Stands in for a Lowered or Compiled stage with a given cost_analysis() answer."""

  def __init__(self, answer):
    self.answer = answer

  def cost_analysis(self):
    if isinstance(self.answer, Exception):
      raise self.answer
    return self.answer


@pytest.mark.parametrize("answer", [
    {"flops": 6.0, "bytes accessed": 10.0},
    [{"flops": 6.0, "bytes accessed": 10.0}],  # Some versions: one dict per program.
    ({"flops": 6.0, "bytes accessed": 10.0},),
])
def test_cost_reads_the_dict_and_the_list_forms(answer):
  assert measure.program_cost(Stage(answer)) == measure.Cost(flops=6.0, bytes_accessed=10.0)
  # A loop that runs its body 3 times: XLA counted the body once.
  assert measure.program_cost(Stage(answer), loop_trips=3) == measure.Cost(18.0, 30.0)
  assert measure.program_cost(Stage(answer)).per(2) == measure.Cost(3.0, 5.0)


@pytest.mark.parametrize("answer", [None, [], {}, {"flops": -1.0}, NotImplementedError("no")])
def test_cost_is_none_where_the_backend_has_none(answer):
  assert measure.program_cost(Stage(answer), loop_trips=4) == measure.Cost(None, None)
  assert measure.program_cost(Stage(answer)).per(8) == measure.Cost(None, None)


def test_cost_of_a_real_program_lowered_and_compiled():
  f = jax.jit(lambda a, b: a @ b)
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  y = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  lowered = f.lower(x, y)
  for stage in (lowered, lowered.compile()):
    cost = measure.program_cost(stage)
    assert cost.flops == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
    assert cost.bytes_accessed > 0


def test_stopwatch_and_duration():
  out, seconds = measure.stopwatch(lambda: 7)
  assert out == 7 and 0 <= seconds < 1
  assert measure.duration(25.7) == "0m25s"  # The trainer's ETA, as the README shows it.
  assert measure.duration(3 * 3600 + 7 * 60 + 5) == "3h07m"
  assert measure.duration(100 * 3600) == "100h00m"
  assert metrics.format_progress(10, 20, {"img/s/chip": 5.0, "step_time": 0.2, "eta_s": 125,
                                          "mfu": None}).endswith("ETA 2m05s")


class Device:
  def __init__(self, kind):
    self.device_kind = kind


def test_collective_bytes_are_read_from_the_compiled_program():
  """A sum over a sharded axis is one all-reduce of the result; a replicated copy of a
  sharded array one all-gather of the whole array (the 8 fake CPU devices)."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:8])
  x = jax.ShapeDtypeStruct((8, 1024), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.P("d")))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  compiled = lambda fn: jax.jit(fn, out_shardings=replicated).lower(x).compile()
  assert measure.collective_bytes(compiled(lambda x: x.sum(0))) == {"all-reduce": 4 * 1024}
  assert measure.collective_bytes(compiled(lambda x: 2 * x)) == {"all-gather": 4 * 8 * 1024}
  assert measure.collective_bytes(jax.jit(lambda x: 2 * x).lower(x).compile()) == {}


def test_one_chip_table_for_mfu_compile_mode_and_the_benchmarks():
  # No second table left beside it.
  assert not hasattr(metrics, "PEAK_FLOPS") and not hasattr(metrics, "peak_flops")
  assert not hasattr(tpu_compile, "CHIPS") and not hasattr(tpu_compile, "Chip")
  for generation in ("v4", "v5e", "v5p", "v6e"):
    topology = tpu_compile.parse_topology(f"{generation}-8")
    chip = topology.chip
    assert chip is chips.CHIPS[generation]  # Compile mode's roofline.
    assert chips.chip_of(Device(chip.device_kind)) is chip  # MFU, as the trainer looks it up.
    assert chips.peak_flops(Device(chip.device_kind)) == chip.peak_flops
    assert chip.vcpus_per_chip > 0 and chip.source.startswith("https://")
    # Each TensorCore's VMEM (what the Pallas kernels' blocks are sized by), as JAX's own
    # hardware table gives it.
    version = pltpu.ChipVersion(generation)
    assert chip.vmem_bytes == pltpu.get_tpu_info_for_chip(version, 1).vmem_capacity_bytes
  # The longest prefix wins: "TPU v5 lite" is a v5e, "TPU v5" a v5p.
  assert chips.chip_of(Device("TPU v5 lite")) is chips.CHIPS["v5e"]
  assert chips.chip_of(Device("TPU v5")) is chips.CHIPS["v5p"]
  h100 = chips.chip_of(Device("NVIDIA H100 80GB HBM3"))
  assert (h100.peak_flops, h100.hbm_bandwidth, h100.hbm_bytes) == (989e12, 3.35e12, 80e9)
  h200 = chips.chip_of(Device("NVIDIA H200"))
  assert (h200.hbm_bandwidth, h200.hbm_bytes) == (4.8e12, 141e9)
  assert chips.chip_of(Device("NVIDIA A100-SXM4-80GB")).hbm_bandwidth == 2.039e12
  assert chips.chip_of(Device("cpu")) is None and chips.peak_flops(Device("cpu")) is None
  assert chips.chip_of(Device("NVIDIA H100")).vcpus_per_chip is None


def test_the_trainer_counts_every_micro_batch_through_the_one_reader(monkeypatch):
  seen = []

  def fake_cost(stage, loop_trips=1):
    seen.append(loop_trips)
    return measure.Cost(flops=10.0 * loop_trips, bytes_accessed=None)

  monkeypatch.setattr(measure, "program_cost", fake_cost)
  trainer = type("T", (), {"config": type("C", (), {"grad_accum_steps": 4})()})()
  assert train.Trainer.step_flops(trainer, object()) == 40.0 and seen == [4]


@pytest.mark.slow
def test_the_small_benchmark_scripts_run_as_the_readme_runs_them(tmp_path):
  """Four scripts no other test runs, small, side by side, as the README runs them
  (`python benchmarks/X.py`: benchmarks/ first on sys.path, not the repository; three of them
  once failed to import the package there). Each prints its figures: macs.py its committed
  count, and the preprocessing comparison what the README says (the release's crop to float
  rounding; HF's floored offset a pixel off)."""
  commands = {"macs.py": ["--models", "poolformer_s12"],
              "folder_scan.py": ["--files", "40"],
              "matmul_throughput.py": ["--batch", "1", "--repeats", "1"],
              "preprocess_parity.py": []}
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  procs = {name: subprocess.Popen([sys.executable, str(REPO / "benchmarks" / name), *args],
                                  cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, args in commands.items()}
  out = {}
  for name, proc in procs.items():
    out[name], err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{name}:\n{err[-2000:]}"
  committed = json.loads((REPO / "benchmarks" / "results" / "macs_224.json").read_text())
  s12 = committed["models"]["poolformer_s12"]
  assert out["macs.py"].splitlines()[-1] == (
      f"| `poolformer_s12` | {s12['params']:,} | {s12['macs'] / 1e9:.2f} |")
  scan, reuse = out["folder_scan.py"].splitlines()[-2:]
  assert scan.startswith("scan") and reuse.startswith("reuse") and " 40 files " in scan
  rows = out["matmul_throughput.py"].splitlines()[1:]
  assert len(rows) == 8 and all(float(r.split()[-1]) > 0 for r in rows)  # 4 stages x 2 matmuls.
  cells = out["preprocess_parity.py"].splitlines()[-1].split()[4:]  # After "all (max / mean)".
  maxima = [float(c) for c in cells[::3]]  # PIL vs HF, vs release crop; TF vs HF, vs release.
  assert maxima[0] > 1 and maxima[2] > 1 and maxima[1] < 1e-5 and maxima[3] < 1e-5, cells


def test_the_readme_fit_table_is_the_one_its_script_writes(tmp_path):
  """The README's "will it fit" table is `benchmarks/tpu_fit_table.py --table-only`'s output from
  the committed JSON, every row of the script's list included (no row edited by hand)."""
  json_path = tmp_path / "tpu_fit.json"
  shutil.copy(REPO / "benchmarks" / "results" / "tpu_fit.json", json_path)
  subprocess.run([sys.executable, "benchmarks/tpu_fit_table.py", "--table-only",
                  "--out", str(json_path)], cwd=REPO, check=True, timeout=300)
  table = json_path.with_suffix(".md").read_text().strip()
  assert table in (REPO / "README.md").read_text()
  rows = [line.strip("| ").split(" | ")[:2] for line in table.splitlines()[2:]]
  spec = importlib.util.spec_from_file_location("tpu_fit_table",
                                                REPO / "benchmarks" / "tpu_fit_table.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert len(rows) == len(script.ROWS)
  for (model, topology), (variant, slice_) in zip(rows, script.ROWS):
    assert model.endswith(variant) and topology == slice_, (model, topology)
