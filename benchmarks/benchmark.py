r"""Speed and memory of our PoolFormer against HF transformers' PyTorch model.

  python benchmarks/benchmark.py --variant poolformer_s12 --batch-sizes 8 32 \
      --train-batch-size 16 --dtype float32 --image-size 224 --repeats 10 --out results.json

Measures, for one variant, with random weights (the SAME weights in both frameworks, copied
through poolformer_jax.convert, so the logits are compared too; every parameter random, so no
block is near the identity):
  * inference images/s: our jitted forward vs PyTorch eager (inference_mode) vs torch.compile;
  * training-step images/s (forward + backward + AdamW, softmax cross-entropy, stochastic depth
    at the variant's rate in both): ours vs PyTorch eager;
  * first-call time (trace + compile + one run) of our jit and of torch.compile (a fresh
    inductor cache, so it is a cold compile like ours);
  * peak memory, measured the same way for every framework in a fresh subprocess each: on CPU
    the process's resident-set high-water mark over three steps (VmHWM, reset through
    /proc/self/clear_refs after two warm-up steps and a malloc_trim) minus its RSS before the
    model was built; on GPU the allocator's peak. For ours the compiled executable's
    memory_analysis() (temp + argument + output - aliased bytes) is reported as well;
  * the FLOPs of the work (XLA's cost analysis) as GFLOP/s per contender, read against a
    2048^3 float32 matmul timed in both frameworks (the most a model's matmuls can reach).
The input pipeline has its own benchmark, benchmarks/pipeline.py.

The process runs with glibc's malloc huge-page tunable, as main.py does (both frameworks
share the process, so both get it; see poolformer_jax.cpu_tuning); --system-malloc runs
without it.

Timings (benchmarks/harness.py, as the GPU benchmark's): one process, interleaved, medians
with ratios. The device kind and count come from jax.devices(); PyTorch runs on CUDA when
available, else on the CPU. Writes a JSON file and a PNG plot next to it, and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from poolformer_jax import cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = harness.MODES + ("memory",)
XLA_MEMORY = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes")


# ---------------------------------------------------------------------------
# Memory: one fresh subprocess per (framework, mode), measured the same way.
# ---------------------------------------------------------------------------


def _rss_kb(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(field)


def _reset_peak_rss():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS (Linux >= 4.0).


def memory_worker(args):
  """Runs in a subprocess: prints one JSON line with the peak memory of one contender."""
  what, mode = args.memory_worker.split(":")
  batch = args.train_batch_size if mode == "train" else max(args.batch_sizes)
  x, y = harness.inputs(args.image_size, batch)
  overrides = harness.model_overrides(args.variant, args.tiny)  # As the timed parts' model.
  out = {"contender": what, "mode": mode, "batch": batch}
  if what == "ours":
    import jax  # pylint: disable=g-import-not-at-top
    # Imported before the baseline (TensorFlow comes with the trainer's input pipeline).
    importlib.import_module("poolformer_jax.train")
    xj = jax.device_put(x)  # Initialises the runtime before rss0.
    rss0 = _rss_kb("VmRSS")
    if mode == "train":
      trainer = harness.make_trainer(args.variant, args.dtype, args.image_size, batch, overrides)
      exe = trainer.compile_train_step()
      step, wait = harness.ours_training_step(trainer, exe, trainer.init_state(0), x, y)
    else:
      fwd, state = harness.make_forward(harness.random_ours(args.variant, args.dtype, overrides))
      exe = fwd.lower(state, xj).compile()
      step, wait = (lambda: exe(state, xj)), (lambda out: out.block_until_ready())
    ma = harness.xla_memory(exe)
    if ma is not None:
      out["xla_memory_analysis_mb"] = {k: ma[k.replace("_size_in_bytes", "_mb")]
                                       for k in XLA_MEMORY}
      out["xla_total_mb"] = ma["total_mb"]
    device_peak = (lambda: jax.devices()[0].memory_stats()["peak_bytes_in_use"]) \
        if jax.devices()[0].platform != "cpu" else None
  else:
    import torch  # pylint: disable=g-import-not-at-top
    from poolformer_jax import model as pf  # pylint: disable=g-import-not-at-top
    device = harness.torch_device()
    xt = harness.torch_images(x, device, channels_last=False)
    rss0 = _rss_kb("VmRSS")
    tmodel = harness.build_torch(pf.get_config(args.variant, **overrides),  # HF's random init.
                                 device)
    if mode == "train":
      yt = torch.from_numpy(y.astype(np.int64)).to(device)
      step = harness.torch_train_step(tmodel, harness.torch_adamw(tmodel, device), xt, yt,
                                      args.dtype, device)
    else:
      if what == "torch_compile":
        tmodel = harness.torch_compile(tmodel, args)
      step = harness.torch_infer_step(tmodel, xt, args.dtype, device)
    wait = lambda _: harness.torch_sync(device)
    device_peak = torch.cuda.max_memory_allocated if device.type != "cpu" else None
  for _ in range(2):  # Warm-up: compile, optimizer state, allocator pools.
    wait(step())
  out["rss_after_warmup_mb"] = (_rss_kb("VmRSS") - rss0) / 1024
  # Give freed heap back to the OS (for JAX mostly the compiler's, for PyTorch its freed
  # activations), the same call for every contender, so the peak below is what one step needs.
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  out["rss_after_trim_mb"] = (_rss_kb("VmRSS") - rss0) / 1024
  _reset_peak_rss()
  for _ in range(3):
    wait(step())
  out["peak_rss_mb"] = (_rss_kb("VmHWM") - rss0) / 1024
  if device_peak is not None:
    out["device_peak_mb"] = device_peak() / 2**20
  print("MEMORY_JSON " + json.dumps(out), flush=True)


def bench_memory(args, results):
  """Each contender's peak memory in a subprocess of its own; also shown in the table."""
  contenders = [("ours", "infer"), ("torch_eager", "infer")]
  if not args.no_torch_compile:
    contenders.append(("torch_compile", "infer"))
  contenders += [("ours", "train"), ("torch_eager", "train")]
  for what, mode in contenders:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", f"{what}:{mode}",
           "--variant", args.variant, "--dtype", args.dtype, "--image-size", str(args.image_size),
           "--train-batch-size", str(args.train_batch_size), "--batch-sizes",
           *map(str, args.batch_sizes), *(["--system-malloc"] if args.system_malloc else []),
           *(["--tiny"] if args.tiny else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON ")]
    if proc.returncode or not line:
      print(f"  memory {what}:{mode} failed:\n{proc.stderr[-2000:]}", flush=True)
      continue
    rec = json.loads(line[0].split(" ", 1)[1])
    results["memory"].append(rec)
    for run in results["runs"]:
      c = run["contenders"].get(what)
      if (run["mode"][:5], run["batch"]) == (mode, rec["batch"]) and c is not None:
        c["memory"] = {**(c.get("memory") or {}), "peak_rss_mb": rec["peak_rss_mb"]}
    print(f"  memory {what} {mode} batch {rec['batch']}: peak RSS +{rec['peak_rss_mb']:.0f} MB"
          + (f", XLA buffers {rec['xla_total_mb']:.0f} MB" if "xla_total_mb" in rec else ""),
          flush=True)


# ---------------------------------------------------------------------------
# This script's JSON: one row per part, a column per contender.
# ---------------------------------------------------------------------------


def row(run) -> dict:
  """A part in this script's layout: `<contender>_images_per_s`, `<contender>_raw_s`, ..."""
  c, ours = run["contenders"], run["contenders"]["ours"]
  flops = run.get("compiled_flops_per_image")  # The work itself, as XLA compiled it.
  out = {"batch": run["batch"]}
  if run["mode"] == "inference":
    out.update(ours_first_call_s=ours["first_call_s"], gflop_per_image=flops and flops / 1e9,
               ours_trace_s=ours["trace_lower_s"], ours_compile_s=ours["compile_s"],
               max_abs_logit_diff_vs_torch=run["logits"]["ours_vs_torch_eager"]["max_abs"])
    if "first_call_s" in c.get("torch_compile", {}):
      out["torch_compile_first_call_s"] = c["torch_compile"]["first_call_s"]
  else:
    out.update(ours_compile_s=ours["trainer_build_s"] + ours["compile_s"] + ours["init_s"],
               gflop_per_image=flops and flops / 1e9)
  for name in harness.CONTENDERS:
    if c.get(name, {}).get("images_per_s"):
      out[f"{name}_images_per_s"] = c[name]["images_per_s"]
      out[f"{name}_raw_s"] = [s / run["calls_per_sample"] for s in c[name]["samples_s"]]
  return out


def layout(results) -> dict:
  cfg, devices = results["config"], results["devices"]
  done = [r for r in results["runs"] if r.get("contenders", {}).get("ours", {}).get("images_per_s")]
  training = [row(r) for r in done if r["mode"] == "training"]
  return {
      **{k: cfg[k] for k in ("variant", "dtype", "image_size", "repeats", "warmup")},
      "devices": {k: devices[k] for k in ("jax_platform", "jax_device_kind", "jax_device_count",
                                          "torch_device", "torch_threads", "cpu_count", "cpu")},
      "versions": {k: results["versions"][k] for k in ("jax", "torch")},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "matmul_peak_gflops": results["matmul_peak_gflops"],
      "inference": sorted((row(r) for r in done if r["mode"] == "inference"),
                          key=lambda r: r["batch"]),
      "training": training[0] if training else None, "memory": results["memory"],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="poolformer_s12")
  harness.add_flags(p, batch_sizes=[8, 32], train_batch_size=16, dtype="float32")
  p.add_argument("--out", default="results.json", help="JSON path; the plot goes next to it")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                 help="what to measure (default: all)")
  p.add_argument("--system-malloc", action="store_true",
                 help="do not re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  p.add_argument("--tiny", action="store_true", help="dry run: the variant with one block per "
                 "stage and widths 8-32 (every part, field and check, in seconds)")
  p.add_argument("--memory-worker", help=argparse.SUPPRESS)
  # One call per sample, HF's model as it comes, torch.compile for inference only.
  p.set_defaults(sample_s=0.0, channels_last=False, torch_compile_mode="default",
                 torch_compile_backend="inductor", torch_compile_modes=("inference",))
  args = p.parse_args()
  args.variants, args.modes = [args.variant], [m for m in harness.MODES if m in args.parts]
  if not args.system_malloc:
    cpu_tuning.reexec_with_malloc_hugepages()
  harness.check_out_dir(p, args.out)
  if args.memory_worker:
    return memory_worker(args)

  device, results = harness.start(args, __doc__.split("\n\n")[0])
  results.update(matmul_peak_gflops=None, memory=[])
  if args.modes:
    # The roofline a model run is read against: the faster framework's 2048^3 float32 matmul
    # is the most a model's matmuls reach here; pooling, norms and GELU only add time.
    rates = harness.matmul_rates(2048, "float32", device, args.repeats, args.warmup)
    results["matmul_peak_gflops"] = {name: v / 1e9 for name, v in rates.items()}
    print("  2048^3 float32 matmul: " + ", ".join(
        f"{name} {v:.0f} GFLOP/s" for name, v in results["matmul_peak_gflops"].items()),
          flush=True)
    if results["peak_flops"] is None:
      results.update(peak_flops=max(rates.values()),
                     peak_flops_source="the best 2048^3 float32 matmul here")
  save = lambda r: harness.summarize(r) or harness.write(r, args.out, layout)
  harness.run_parts(args, device, harness.Budget(0), results, save)
  if "memory" in args.parts:
    bench_memory(args, results)
  png = save(results)
  print(f"\nwrote {args.out} and {png}\n")
  print(harness.table(results))


if __name__ == "__main__":
  main()
