r"""Speed and memory of our PoolFormer against HF transformers' PyTorch model.

  python benchmarks/benchmark.py --variant poolformer_s12 --batch-sizes 8 32 \
      --train-batch-size 16 --dtype float32 --image-size 224 --repeats 10 --out results.json

Measures, for one variant, with random weights (the SAME weights in both frameworks, copied
through poolformer_jax.convert, so the logits are compared too):
  * inference images/s: our jitted forward vs PyTorch eager (inference_mode) vs torch.compile;
  * training-step images/s (forward + backward + AdamW, softmax cross-entropy, stochastic depth
    at the variant's rate in both): ours vs PyTorch eager;
  * first-call time (trace + compile + one run) of our jit and of torch.compile (inductor's
    on-disk caches disabled, so it is a cold compile like ours);
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

Timings are taken in ONE process, interleaved (A B C A B C ...) after warm-up, and reported as
medians with ratios, so a noisy neighbour slows every contender alike. The device kind and count
come from jax.devices(); PyTorch runs on CUDA when available, else on the CPU. Writes a JSON file
and a PNG plot next to it, and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

PARTS = ("inference", "training", "memory")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from poolformer_jax import cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------------------
# Models and steps.
# ---------------------------------------------------------------------------


def jax_dtype(name):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_ours(args, num_classes=1000):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from poolformer_jax import model as pf  # pylint: disable=g-import-not-at-top
  return pf.create_model(args.variant, num_classes=num_classes, rngs=nnx.Rngs(0),
                         dtype=jax_dtype(args.dtype))


def build_torch(cfg, device, ours=None):
  """HF's PoolFormerForImageClassification for `cfg`, holding `ours`'s weights if given."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from poolformer_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
  fields = hf_export.hf_config_dict(cfg, None)
  fields.pop("architectures"), fields.pop("model_type")
  fields["drop_path_rate"] = cfg.drop_path_rate  # Same linear schedule as ours in train mode.
  model = transformers.PoolFormerForImageClassification(transformers.PoolFormerConfig(**fields))
  if ours is not None:
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_export.to_torch_state(ours, "hf").items()}
    own = model.state_dict()
    model.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items()}, strict=True)
  return model.to(device).eval()


def make_forward(model):
  """Our inference function: split once, merge inside jit (no graph traversal per call).

  Compiled with the options poolformer_jax.inference and the trainer's eval step use.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x),
                compiler_options=cpu_tuning.forward_compiler_options(jax.devices()[0].platform))
  return fwd, state


def make_trainer(variant, dtype, image_size, batch, model_overrides=None):
  """The trainer of `main.py` (poolformer_jax.train) for one chip: its compiled step is timed.

  The release's recipe (AdamW with its decay mask and schedule, stochastic depth at the
  variant's rate) with Mixup/CutMix and label smoothing off, so PyTorch's loop does the same
  work. `trainer.compile_train_step()` gives the step, `step(state, batch)` -> (state, metrics),
  with the state donated; `trainer.init_state(0)` its state.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from poolformer_jax import defaults, sharding, train  # pylint: disable=g-import-not-at-top
  c = defaults.default_config()
  c.model, c.dtype, c.batch_size = variant, dtype, batch
  c.model_overrides.update(model_overrides or {})
  c.data.image_size = image_size
  c.mixup_alpha = c.cutmix_alpha = c.label_smoothing = 0.0
  c.data.randaugment, c.data.random_erasing = "", 0.0  # On-device augmentation: PyTorch has none.
  return train.Trainer(c, sharding.make_mesh(1, jax.devices()[:1]), 1000,
                       steps_per_epoch=1000, total_steps=10**6)


def torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == "cuda":
    torch.cuda.synchronize()


def torch_autocast(dtype, device):
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device.type, dtype=torch.bfloat16)


def torch_infer_fn(model, x, dtype, device, sync=True):
  """One inference call; with sync=False it only queues the work (time several, then sync)."""
  import torch  # pylint: disable=g-import-not-at-top

  def run():
    with torch.inference_mode(), torch_autocast(dtype, device):
      out = model(x).logits
    if sync:
      torch_sync(device)
    return out

  return run


def torch_adamw(model, device):
  """The recipe's AdamW; on CUDA PyTorch's fused kernel, the fastest it has."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                           **({"fused": True} if device.type == "cuda" else {}))


def torch_train_fn(model, opt, x, y, dtype, device, sync=True):
  """One training step (forward, softmax cross-entropy, backward, `opt`), as torch_infer_fn."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model.train()

  def run():
    opt.zero_grad(set_to_none=True)
    with torch_autocast(dtype, device):
      logits = model(x).logits
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    if sync:
      torch_sync(device)
    return loss

  return run


def inputs(image_size, batch, num_classes=1000, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, size=(batch,)).astype(np.int32)
  return x, y


def trainer_images(x):
  """The trainer's input for images `x`: uint8 pixels (it normalises on the device)."""
  return np.clip(np.round(x * 58 + 120), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
  """Median seconds per call of each function, measured A B C A B C ... after warm-up."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(0.02)  # Let the other framework's spinning worker threads go idle.
      times[name].append(timed(fn))
  return {name: float(np.median(t)) for name, t in times.items()}, times


def gflop_per_image(compiled, batch):
  """XLA's FLOP count of a compiled step, per image (the same work for every contender)."""
  from poolformer_jax import metrics  # pylint: disable=g-import-not-at-top
  flops = metrics.step_flops(compiled)
  return flops / batch / 1e9 if flops else None


def matmul_rates(n, dtype, device, repeats, warmup, calls=1) -> dict[str, float]:
  """FLOP/s of an n x n x n matmul in each framework (median; `calls` back to back per sample).

  Random data: zeros can run faster than real values on some chips.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  ja = jax.device_put(a).astype(jax_dtype(dtype))
  ta = torch.from_numpy(a).to(device).to(getattr(torch, dtype))
  matmul = jax.jit(lambda x: x @ x)

  def xla():
    for _ in range(calls):
      out = matmul(ja)
    out.block_until_ready()

  def torch_matmul():
    for _ in range(calls):
      torch.matmul(ta, ta)
    torch_sync(device)

  med, _ = interleaved({"xla": xla, "torch": torch_matmul}, repeats, warmup)
  return {name: 2 * n**3 * calls / sec for name, sec in med.items()}


def bench_matmul_peak(args, device, results):
  """GFLOP/s of a 2048^3 float32 matmul in each framework: the roofline a model run is read against.

  The faster of the two is the most a model's matmuls reach on this machine; its pooling,
  norms and GELU only add time on top.
  """
  rates = matmul_rates(2048, "float32", device, args.repeats, args.warmup)
  results["matmul_peak_gflops"] = {name: v / 1e9 for name, v in rates.items()}
  print("  2048^3 float32 matmul: " + ", ".join(
      f"{name} {v:.0f} GFLOP/s" for name, v in results["matmul_peak_gflops"].items()), flush=True)


def bench_inference(args, ours, tmodel, device, results):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not args.no_torch_compile:
    import torch._inductor.config as inductor_config  # pylint: disable=g-import-not-at-top
    inductor_config.force_disable_caches = True  # A cold compile, like ours.
  fwd, state = make_forward(ours)
  compiled = None if args.no_torch_compile else torch.compile(tmodel, dynamic=False)
  for batch in args.batch_sizes:
    x, _ = inputs(args.image_size, batch)
    xj = jax.device_put(x)  # float32 in; a bfloat16 model casts inside its first conv.
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    row = {"batch": batch}
    # First calls: trace + compile + one execution.
    t0 = time.perf_counter()
    lowered = fwd.lower(state, xj)
    t1 = time.perf_counter()
    exe = lowered.compile()
    t2 = time.perf_counter()
    logits = np.asarray(exe(state, xj).astype(np.float32))
    row["ours_first_call_s"] = time.perf_counter() - t0
    row["gflop_per_image"] = gflop_per_image(exe, batch)
    row["ours_trace_s"], row["ours_compile_s"] = t1 - t0, t2 - t1
    fns = {"ours": lambda: exe(state, xj).block_until_ready(),
           "torch_eager": torch_infer_fn(tmodel, xt, args.dtype, device)}
    ref = fns["torch_eager"]().float().cpu().numpy()
    row["max_abs_logit_diff_vs_torch"] = float(np.abs(logits - ref).max())
    if compiled is not None:
      fns["torch_compile"] = torch_infer_fn(compiled, xt, args.dtype, device)
      row["torch_compile_first_call_s"] = timed(fns["torch_compile"])
    med, raw = interleaved(fns, args.repeats, args.warmup)
    for name, sec in med.items():
      row[f"{name}_images_per_s"] = batch / sec
      row[f"{name}_raw_s"] = raw[name]
    results["inference"].append(row)
    print(f"  inference batch {batch}: " + ", ".join(
        f"{n} {batch / s:.1f} img/s" for n, s in med.items()), flush=True)


def bench_training(args, ours, tmodel, device, results):
  del ours  # The trainer builds its own state.
  import torch  # pylint: disable=g-import-not-at-top
  batch = args.train_batch_size
  from poolformer_jax import sharding  # pylint: disable=g-import-not-at-top
  x, y = inputs(args.image_size, batch)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  t0 = time.perf_counter()
  trainer = make_trainer(args.variant, args.dtype, args.image_size, batch)
  exe, state = trainer.compile_train_step(), trainer.init_state(0)
  compile_s = time.perf_counter() - t0
  data = sharding.global_batch({"image": trainer_images(x), "label": y}, trainer.batch_sharding)
  carry = {"state": state}

  def ours_step():
    carry["state"], metrics = exe(carry["state"], data)
    metrics["loss"].block_until_ready()

  fns = {"ours": ours_step, "torch_eager": torch_train_fn(
      tmodel, torch_adamw(tmodel, device), xt, yt, args.dtype, device)}
  med, raw = interleaved(fns, args.repeats, args.warmup)
  row = {"batch": batch, "ours_compile_s": compile_s, "gflop_per_image": gflop_per_image(exe, batch)}
  for name, sec in med.items():
    row[f"{name}_images_per_s"] = batch / sec
    row[f"{name}_raw_s"] = raw[name]
  results["training"] = row
  print(f"  training batch {batch}: " + ", ".join(
      f"{n} {batch / s:.1f} img/s" for n, s in med.items()), flush=True)


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
  x, y = inputs(args.image_size, batch)
  out = {"contender": what, "mode": mode, "batch": batch}
  if what == "ours":
    import jax  # pylint: disable=g-import-not-at-top
    # Imported before the baseline (TensorFlow comes with the trainer's input pipeline).
    importlib.import_module("poolformer_jax.train")
    from poolformer_jax import sharding  # pylint: disable=g-import-not-at-top
    on_cpu = jax.devices()[0].platform == "cpu"
    xj = jax.device_put(x)  # Initialises the runtime before rss0.
    rss0 = _rss_kb("VmRSS")
    if mode == "train":
      trainer = make_trainer(args.variant, args.dtype, args.image_size, batch)
      exe, state = trainer.compile_train_step(), trainer.init_state(0)
      data = sharding.global_batch({"image": trainer_images(x), "label": y},
                                   trainer.batch_sharding)
      carry = [state]

      def run(i):
        del i
        carry[0], metrics = exe(carry[0], data)
        metrics["loss"].block_until_ready()
    else:
      fwd, state = make_forward(build_ours(args))
      exe = fwd.lower(state, xj).compile()

      def run(i):
        del i
        exe(state, xj).block_until_ready()
    ma = exe.memory_analysis()
    if ma is not None:
      out["xla_memory_analysis_mb"] = {
          k: getattr(ma, k) / 2**20 for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                               "output_size_in_bytes", "alias_size_in_bytes")}
      out["xla_total_mb"] = (ma.temp_size_in_bytes + ma.argument_size_in_bytes +
                             ma.output_size_in_bytes - ma.alias_size_in_bytes) / 2**20
    device_peak = (lambda: jax.devices()[0].memory_stats()["peak_bytes_in_use"]) \
        if not on_cpu else None
  else:
    import torch  # pylint: disable=g-import-not-at-top
    from poolformer_jax import model as pf  # pylint: disable=g-import-not-at-top
    device = torch_device()
    on_cpu = device.type == "cpu"
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    rss0 = _rss_kb("VmRSS")
    tmodel = build_torch(pf.get_config(args.variant), device)  # HF's own random init.
    if mode == "train":
      fn = torch_train_fn(tmodel, torch_adamw(tmodel, device), xt,
                          torch.from_numpy(y.astype(np.int64)).to(device), args.dtype, device)
    else:
      if what == "torch_compile":
        tmodel = torch.compile(tmodel, dynamic=False)
      fn = torch_infer_fn(tmodel, xt, args.dtype, device)

    def run(i):
      del i
      fn()
    device_peak = torch.cuda.max_memory_allocated if not on_cpu else None
  for i in range(2):  # Warm-up: compile, optimizer state, allocator pools.
    run(i)
  out["rss_after_warmup_mb"] = (_rss_kb("VmRSS") - rss0) / 1024
  # Give freed heap back to the OS (for JAX mostly the compiler's, for PyTorch its freed
  # activations), the same call for every contender, so the peak below is what one step needs.
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  out["rss_after_trim_mb"] = (_rss_kb("VmRSS") - rss0) / 1024
  _reset_peak_rss()
  for i in range(3):
    run(10 + i)
  out["peak_rss_mb"] = (_rss_kb("VmHWM") - rss0) / 1024
  if device_peak is not None:
    out["device_peak_mb"] = device_peak() / 2**20
  print("MEMORY_JSON " + json.dumps(out), flush=True)


def bench_memory(args, results):
  contenders = [("ours", "infer"), ("torch_eager", "infer")]
  if not args.no_torch_compile:
    contenders.append(("torch_compile", "infer"))
  contenders += [("ours", "train"), ("torch_eager", "train")]
  for what, mode in contenders:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", f"{what}:{mode}",
           "--variant", args.variant, "--dtype", args.dtype, "--image-size", str(args.image_size),
           "--train-batch-size", str(args.train_batch_size), "--batch-sizes",
           *map(str, args.batch_sizes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON ")]
    if proc.returncode or not line:
      print(f"  memory {what}:{mode} failed:\n{proc.stderr[-2000:]}", flush=True)
      continue
    rec = json.loads(line[0].split(" ", 1)[1])
    results["memory"].append(rec)
    print(f"  memory {what} {mode} batch {rec['batch']}: peak RSS +{rec['peak_rss_mb']:.0f} MB"
          + (f", XLA buffers {rec['xla_total_mb']:.0f} MB" if "xla_total_mb" in rec else ""),
          flush=True)


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def table(results) -> str:
  lines = []
  names = [("ours", "ours"), ("torch_eager", "torch eager"), ("torch_compile", "torch.compile")]
  lines.append(f"{'':24}" + "".join(f"{label:>15}" for _, label in names)
               + f"{'ours/eager':>12}{'ours/compile':>14}")
  rows = [(f"infer b={r['batch']} img/s", r) for r in results["inference"]]
  if results.get("training"):
    rows.append((f"train b={results['training']['batch']} img/s", results["training"]))
  for label, r in rows:
    vals = [r.get(f"{n}_images_per_s") for n, _ in names]
    cells = "".join(f"{v:15.1f}" if v else f"{'-':>15}" for v in vals)
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
    lines.append(f"{label:24}{cells}{ratio(vals[0], vals[1]):>12}{ratio(vals[0], vals[2]):>14}")
  peak = max((results.get("matmul_peak_gflops") or {}).values(), default=None)
  for label, r in rows:
    if not r.get("gflop_per_image"):
      continue
    vals = [r.get(f"{n}_images_per_s") for n, _ in names]
    lines.append(f"{label.replace('img/s', 'GFLOP/s'):24}" + "".join(
        f"{v * r['gflop_per_image']:9.0f}" + (f" ({v * r['gflop_per_image'] / peak:3.0%})"
                                              if peak else " " * 6) if v else f"{'-':>15}"
        for v in vals))
  if peak:
    lines.append(f"(percentages: of the best 2048^3 float32 matmul here, {peak:.0f} GFLOP/s)")
  for r in results["inference"][:1]:
    lines.append(f"{'first call s (b=' + str(r['batch']) + ')':24}{r['ours_first_call_s']:15.1f}"
                 f"{'-':>15}" + (f"{r['torch_compile_first_call_s']:15.1f}"
                                 if "torch_compile_first_call_s" in r else f"{'-':>15}"))
  if results.get("training"):
    lines.append(f"{'train compile s':24}{results['training']['ours_compile_s']:15.1f}")
  for mode in ("infer", "train"):
    recs = {m["contender"]: m for m in results["memory"] if m["mode"] == mode}
    if recs:
      key = "device_peak_mb" if any("device_peak_mb" in m for m in recs.values()) else "peak_rss_mb"
      vals = [recs.get(n, {}).get(key) for n, _ in names]
      cells = "".join(f"{v:15.0f}" if v is not None else f"{'-':>15}" for v in vals)
      batch = next(iter(recs.values()))["batch"]
      lines.append(f"{mode + ' peak MB b=' + str(batch):24}{cells}"
                   + (f"{vals[0] / vals[1]:11.2f}x" if vals[0] and vals[1] else ""))
  return "\n".join(lines)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = ["ours", "torch_eager", "torch_compile"]
  rows = [(f"infer b={r['batch']}", r) for r in results["inference"]]
  if results.get("training"):
    rows.append((f"train b={results['training']['batch']}", results["training"]))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / len(names)
  for k, name in enumerate(names):
    vals = [r.get(f"{name}_images_per_s", 0.0) for _, r in rows]
    axes[0].bar(np.arange(len(rows)) + k * width, vals, width, label=name)
  axes[0].set_xticks(np.arange(len(rows)) + width, [label for label, _ in rows])
  axes[0].set_ylabel("images / s (median)")
  axes[0].set_title(f"{results['variant']} {results['dtype']} {results['image_size']}px on "
                    f"{results['devices']['jax_device_kind']}")
  axes[0].legend()
  mem = results["memory"]
  if mem:
    labels = [f"{m['contender']}\n{m['mode']} b={m['batch']}" for m in mem]
    key = "device_peak_mb" if any("device_peak_mb" in m for m in mem) else "peak_rss_mb"
    axes[1].bar(range(len(mem)), [m.get(key, 0.0) for m in mem],
                color=["C0" if m["contender"] == "ours" else "C1" for m in mem])
    axes[1].set_xticks(range(len(mem)), labels, fontsize=8)
    axes[1].set_ylabel(f"peak memory MB ({key})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="poolformer_s12")
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
  p.add_argument("--train-batch-size", type=int, default=16)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=10, help="timed calls per contender (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
  p.add_argument("--out", default="results.json", help="JSON path; the plot goes next to it")
  p.add_argument("--no-torch-compile", action="store_true")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                 help="what to measure (default: all)")
  p.add_argument("--system-malloc", action="store_true",
                 help="do not re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  p.add_argument("--memory-worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if not args.system_malloc:
    cpu_tuning.reexec_with_malloc_hugepages()
  out_dir = os.path.dirname(os.path.abspath(args.out))
  try:  # Fail now, not after the measurements, if the result cannot be written.
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    p.error(f"cannot create the directory of --out ({out_dir}): {e}")
  if args.memory_worker:
    return memory_worker(args)

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  device = torch_device()
  results = {
      "variant": args.variant, "dtype": args.dtype, "image_size": args.image_size,
      "repeats": args.repeats, "warmup": args.warmup,
      "devices": {"jax_platform": devices[0].platform, "jax_device_kind": devices[0].device_kind,
                  "jax_device_count": len(devices), "torch_device": str(device),
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "cpu": platform.processor() or platform.machine()},
      "versions": {"jax": jax.__version__, "torch": torch.__version__},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "matmul_peak_gflops": None, "inference": [], "training": None, "memory": [],
  }
  print(f"jax: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
        f"torch: {device}, {torch.get_num_threads()} threads", flush=True)
  ours = build_ours(args)
  tmodel = build_torch(ours.cfg, device, ours)
  if "inference" in args.parts or "training" in args.parts:
    bench_matmul_peak(args, device, results)
  if "inference" in args.parts:
    bench_inference(args, ours, tmodel, device, results)
  if "training" in args.parts:
    bench_training(args, ours, tmodel, device, results)
  del tmodel
  if "memory" in args.parts:
    bench_memory(args, results)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  png = os.path.splitext(args.out)[0] + ".png"
  plot(results, png)
  print(f"\nwrote {args.out} and {png}\n")
  print(table(results))


if __name__ == "__main__":
  main()
