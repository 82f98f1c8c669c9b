"""The GPU benchmark (benchmarks/gpu_benchmark.py, benchmarks/gpu_run.sh), proved on the CPU.

A GPU machine may have no TensorFlow and no network: the prepared call must run there at the
first try. The dry run goes through the same shell script and the same code at tiny sizes, with
TensorFlow made unimportable; the rest checks the pieces a tiny run cannot: the FLOP count at
224 against the paper's MACs, the time budget, and the targets' arithmetic.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A sitecustomize that makes TensorFlow look not installed: the path finder no longer finds it,
# so `import tensorflow` fails and `importlib.util.find_spec` (how libraries probe) says None.
NO_TENSORFLOW = """
import importlib.machinery
import sys


class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in ("tensorflow", "tensorflow_datasets"):
      return None
    return super().find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = PathFinderWithoutTensorFlow
"""


def load_gpu_benchmark():
  spec = importlib.util.spec_from_file_location(
      "gpu_benchmark", os.path.join(REPO, "benchmarks", "gpu_benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def gb():
  return load_gpu_benchmark()


@pytest.fixture
def no_tensorflow_env(tmp_path):
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(NO_TENSORFLOW)
  env = cpu_env(1, PYTHONPATH=f"{site}{os.pathsep}{REPO}", PYTHON=sys.executable,
                JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  probe = ("import importlib.util, sys; assert importlib.util.find_spec('tensorflow') is None; "
           "import tensorflow")
  blocked = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, timeout=60)
  assert "No module named 'tensorflow'" in blocked.stderr, blocked.stderr  # In force.
  return env


# --------------------------------------------------------------------------- the dry run

CONTENDER_FIELDS = {"images_per_s", "median_s_per_call", "samples_s", "first_call_s", "mfu",
                    "fraction_of_bandwidth_bound", "memory"}
RUN_FIELDS = {"variant", "mode", "batch", "image_size", "num_blocks", "num_params",
              "contenders", "flops_per_image", "flops_source", "compiled_flops_per_image",
              "bytes_per_image", "lowered_bytes_per_image", "calls_per_sample",
              "compute_bound_images_per_s", "bandwidth_bound_images_per_s", "ratios",
              "elapsed_s"}


@pytest.mark.slow
def test_gpu_run_dry_run_writes_every_field_without_tensorflow(tmp_path, no_tensorflow_env):
  out = tmp_path / "out"
  # One variant: the second would only repeat the same code (and its compiles).
  proc = subprocess.run(
      ["bash", "benchmarks/gpu_run.sh", "--tiny", "--variants", "poolformer_s12"], cwd=REPO,
      env=dict(no_tensorflow_env, OUT=str(out)), capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  log = (out / "gpu_benchmark.log").read_text()
  assert "== Python" in log and "== benchmark: time budget 420 s" in log  # The script's steps.
  assert (out / "gpu_benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  r = json.loads((out / "gpu_benchmark.json").read_text())
  assert r["complete"] and r["tensorflow_modules"] == []
  assert r["devices"]["jax_platform"] == "cpu" and r["devices"]["torch_device"] == "cpu"
  assert r["versions"]["jax"] and r["versions"]["torch"] and r["versions"]["transformers"]
  assert r["ceilings"]["copy_bandwidth_bytes_per_s"] > 0
  assert r["ceilings"]["matmul"]["xla_flops_per_s"] > 0
  assert r["ceilings"]["matmul"]["torch_flops_per_s"] > 0
  # Both modes, both inference batch sizes, in the planned order.
  assert [(x["variant"], x["mode"], x["batch"]) for x in r["runs"]] == [
      ("poolformer_s12", "inference", 4), ("poolformer_s12", "training", 4),
      ("poolformer_s12", "inference", 8)]
  for run in r["runs"]:
    assert RUN_FIELDS <= set(run), (run["variant"], run["mode"], RUN_FIELDS - set(run))
    assert "error" not in run and "skipped" not in run
    assert set(run["contenders"]) == {"ours", "torch_eager", "torch_compile"}
    for name, c in run["contenders"].items():
      assert CONTENDER_FIELDS <= set(c), (name, CONTENDER_FIELDS - set(c))
      assert c["images_per_s"] > 0 and c["first_call_s"] > 0 and c["mfu"] > 0
      assert len(c["samples_s"]) == r["config"]["repeats"]
    assert run["contenders"]["ours"]["memory"]["xla"]["total_mb"] > 0
    assert run["flops_source"] == "lowered" and run["flops_per_image"] > 0
    assert run["bytes_per_image"] > 0 and run["bandwidth_bound_images_per_s"] > 0
    assert set(run["ratios"]) == {"ours/torch_eager", "ours/torch_compile"}
    if run["mode"] == "inference":
      # bf16 against PyTorch's float32 on the same random weights: a tensor copied wrongly
      # would put the relative error near 1.
      for name in ("ours", "torch_eager", "torch_compile", "ours_vs_torch_eager"):
        assert run["logits"][name]["rel_l2"] < 0.05, (name, run["logits"][name])
    else:
      assert run["compute_bound_images_per_s"] > 0
  assert [t["met"] in (True, False) for t in r["targets"]] == [True] * 3


def test_part_skipped_by_the_time_budget_is_recorded(gb, tmp_path, monkeypatch):
  """A budget that is already spent skips every part; the JSON says so and stays valid."""
  for var in ("XLA_PYTHON_CLIENT_PREALLOCATE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
    monkeypatch.delenv(var, raising=False)  # main() sets them; monkeypatch restores them.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  budget = gb.harness.Budget
  monkeypatch.setattr(gb.harness, "Budget", lambda seconds: budget(seconds, clock=FakeClock(10.0)))
  out = tmp_path / "r.json"
  gb.main(["--tiny", "--variants", "poolformer_s12", "--modes", "training",
           "--time-budget-s", "5", "--out", str(out)])
  r = json.loads(out.read_text())
  assert r["complete"] and len(r["runs"]) == 1
  assert r["runs"][0]["skipped"].startswith("time budget:")
  assert [(t["value"], t["met"]) for t in r["targets"]] == [(None, None), (None, None)]
  assert "skipped: time budget" in gb.harness.table(r)
  assert (tmp_path / "r.png").exists()


class FakeClock:
  """Each reading `step` seconds after the last."""

  def __init__(self, step):
    self.now, self.step = 0.0, step

  def __call__(self):
    self.now += self.step
    return self.now


# --------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("variant, paper_gmacs", [("poolformer_s12", 1.8),
                                                  ("poolformer_m36", 8.8)])
def test_flops_per_image_at_224_are_twice_the_papers_macs(gb, variant, paper_gmacs):
  """The numerator of MFU: XLA's count of our lowered forward against the paper's MACs."""
  import jax  # pylint: disable=g-import-not-at-top
  forward, state = gb.harness.make_forward(gb.harness.random_ours(variant, "bfloat16", {}))
  lowered = forward.lower(state, jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32))
  work = gb.harness.work_per_image(lowered, None, batch=2)
  assert work["flops_source"] == "lowered"
  # The paper rounds to 0.1 GMACs; norms, pooling and GELU add about 1% on top.
  assert work["flops_per_image"] / (2e9 * paper_gmacs) == pytest.approx(1.0, abs=0.03)


def test_budget_scales_what_was_measured_by_depth(gb):
  clock = FakeClock(0.0)
  budget = gb.harness.Budget(100, clock=clock)
  assert budget.estimate("torch_compile_training", 36) == 0.0  # Never measured: no estimate.
  budget.record("torch_compile_training", 30.0, blocks=12)
  assert budget.estimate("torch_compile_training", 36) == pytest.approx(90.0)
  assert budget.fits(80.0) == (True, pytest.approx(80.0 * gb.harness.SAFETY))
  clock.now = 20.0
  assert budget.fits(80.0)[0] is False  # 20 + 88 > 100
  assert budget.left() == pytest.approx(80.0)
  assert gb.harness.Budget(0, clock=clock).fits(1e9)[0] is True  # 0: no limit.


def test_an_expired_budget_skips_torch_compile_and_keeps_the_others(gb):
  args = gb.parse_args(["--tiny", "--out", os.devnull])
  budget = gb.harness.Budget(1, clock=FakeClock(10.0))
  run, steps = {"mode": "inference", "contenders": {}}, {"ours": object()}
  variant = type("V", (), {"blocks": 12})()
  gb.harness.add_torch_compile(None, None, None, variant, args, budget, run, steps)
  assert run["contenders"]["torch_compile"]["skipped"].startswith("time budget: about 0 s")
  assert list(steps) == ["ours"]


def test_plan_runs_what_the_targets_need_first(gb):
  args = gb.parse_args(["--out", os.devnull])
  assert gb.harness.plan(args) == [
      ("poolformer_s12", "inference", 256), ("poolformer_s12", "training", 256),
      ("poolformer_m36", "inference", 256), ("poolformer_m36", "training", 256),
      ("poolformer_s12", "inference", 1024), ("poolformer_m36", "inference", 1024)]
  tiny = gb.parse_args(["--tiny", "--batch-sizes", "8", "--out", os.devnull])
  assert (tiny.batch_sizes, tiny.image_size) == ([8], 32)  # --tiny: defaults, not overrides.


def test_summary_derives_mfu_bounds_ratios_and_targets(gb):
  args = gb.parse_args(["--out", os.devnull, "--variants", "poolformer_s12"])

  def run(mode, batch, ours, compiled):
    return {"variant": "poolformer_s12", "mode": mode, "batch": batch,
            "flops_per_image": 1e10, "bytes_per_image": 1e8,
            "contenders": {"ours": {"images_per_s": ours}, "torch_eager": {"images_per_s": 100.0},
                           "torch_compile": {"images_per_s": compiled}}}

  results = {"config": vars(args), "peak_flops": 1e15,
             "ceilings": {"copy_bandwidth_bytes_per_s": 4e12},
             "runs": [run("inference", 256, 30000.0, 40000.0),
                      run("training", 256, 12000.0, 8000.0),
                      {"variant": "poolformer_s12", "mode": "inference", "batch": 1024,
                       "skipped": "time budget", "contenders": {}}]}
  gb.summarize(results)
  infer, train, skipped = results["runs"]
  assert infer["compute_bound_images_per_s"] == pytest.approx(1e5)
  assert infer["bandwidth_bound_images_per_s"] == pytest.approx(4e4)
  assert infer["contenders"]["ours"]["mfu"] == pytest.approx(0.3)
  assert infer["contenders"]["ours"]["fraction_of_bandwidth_bound"] == pytest.approx(0.75)
  assert train["ratios"] == {"ours/torch_eager": pytest.approx(120.0),
                             "ours/torch_compile": pytest.approx(1.5)}
  assert skipped["ratios"] == {}
  assert [(t["value"], t["met"]) for t in results["targets"]] == [
      (pytest.approx(1.5), True),        # training >= 1.3x torch.compile
      (pytest.approx(0.75), False),      # inference >= 1.0x torch.compile at batch 256
      (pytest.approx(12000.0), True)]    # S12 training >= 10k images/s


# --------------------------------------------------------------------------- the CPU script

CPU_ROW_FIELDS = {"batch", "gflop_per_image", "ours_compile_s", "ours_images_per_s", "ours_raw_s",
                  "torch_eager_images_per_s", "torch_eager_raw_s"}
CPU_INFERENCE_FIELDS = CPU_ROW_FIELDS | {"ours_first_call_s", "ours_trace_s",
                                         "max_abs_logit_diff_vs_torch"}
CPU_MEMORY_FIELDS = {"contender", "mode", "batch", "rss_after_warmup_mb", "rss_after_trim_mb",
                     "peak_rss_mb"}


@pytest.mark.slow
def test_cpu_benchmark_writes_the_fields_of_its_committed_results(tmp_path):
  """benchmarks/benchmark.py at a tiny size: the JSON has every field of the committed CPU
  results (benchmarks/results/cpu_2core_s12_f32.json), through the same harness as the GPU's."""
  out = tmp_path / "cpu.json"
  env = cpu_env(1, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "benchmarks/benchmark.py", "--variant", "poolformer_s12", "--tiny",
       "--batch-sizes", "2", "--train-batch-size", "2", "--image-size", "32", "--repeats", "2",
       "--warmup", "1", "--no-torch-compile", "--system-malloc", "--out", str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  r = json.loads(out.read_text())
  committed = json.loads(open(os.path.join(REPO, "benchmarks", "results",
                                           "cpu_2core_s12_f32.json")).read())
  for key in set(committed) - {"input_pipeline"}:  # The pipeline has its own benchmark now.
    assert key in r, key
  for key in ("devices", "versions"):
    assert set(committed[key]) <= set(r[key]), key
  assert set(r["matmul_peak_gflops"]) == {"xla", "torch"}
  (infer,), train = r["inference"], r["training"]
  assert CPU_INFERENCE_FIELDS <= set(infer) and CPU_ROW_FIELDS <= set(train)
  assert infer["gflop_per_image"] > 0 and train["gflop_per_image"] > infer["gflop_per_image"]
  assert infer["max_abs_logit_diff_vs_torch"] < 1e-3  # float32, the same weights.
  assert len(infer["ours_raw_s"]) == len(train["torch_eager_raw_s"]) == 2
  assert [(m["contender"], m["mode"]) for m in r["memory"]] == [
      ("ours", "infer"), ("torch_eager", "infer"), ("ours", "train"), ("torch_eager", "train")]
  for m in r["memory"]:
    assert CPU_MEMORY_FIELDS <= set(m) and m["peak_rss_mb"] > 0, m
    if m["contender"] == "ours":
      assert set(m["xla_memory_analysis_mb"]) == set(
          committed["memory"][0]["xla_memory_analysis_mb"]) and m["xla_total_mb"] > 0
  assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "poolformer_s12 infer b2 img/s" in proc.stdout  # The table.
