r"""bf16 speed of PoolFormer S12 and M36 on one GPU against PyTorch, side by side in one process.

  python benchmarks/gpu_benchmark.py --out results/gpu.json --time-budget-s 420
  JAX_PLATFORMS=cpu python benchmarks/gpu_benchmark.py --tiny --out /tmp/dry.json  # CPU dry run

`benchmarks/gpu_run.sh` wraps it for a machine with one GPU (wheels, environment, log).

For each variant (default S12 and M36, 224x224, bfloat16 compute, float32 weights):
  * training images/s of the trainer's own compiled step (poolformer_jax.train.Trainer with the
    recipe of defaults.default_config(): forward + backward + AdamW, stochastic depth, state
    donated; Mixup/CutMix and label smoothing off so both frameworks do the same work),
    batch 256 on one chip;
  * inference images/s at batch 256 and 1024;
against HF transformers' PoolFormerForImageClassification (the faithful PyTorch v1) on the same
device, channels_last + bf16 autocast, eager and under torch.compile (PyTorch's fused AdamW on
CUDA, cuDNN autotuning on). The weights are the same (ours, every parameter random so no block
is near the identity, copied to PyTorch through poolformer_jax.convert); each contender's logits
are compared with PyTorch's float32 (TF32 off) on the same batch.

Timings: after warm-up, medians of interleaved samples (A B C A B C ...), each sample a few
calls back to back then one wait for the device, so launches overlap as in a real loop. Also
recorded per contender: first-call / compile time, peak device memory (ours: the compiled
executable's memory_analysis() and the device's peak bytes in use, a process-wide high-water
mark; PyTorch: torch.cuda.max_memory_allocated, reset per contender), MFU against the chip's
dense bf16 peak (poolformer_jax.metrics.PEAK_FLOPS) with FLOPs from XLA's cost analysis of the
lowered program (the same count for every contender), and XLA's bytes accessed per image
against the device-to-device copy bandwidth measured in the same run (a bandwidth-bound
images/s). The targets (training >= 1.3x torch.compile, inference >= 1.0x torch.compile at the
first batch size, S12 training >= 10k images/s) are reported as met or not.

Order: for each variant inference at the first batch size then training, then the other batch
sizes, so the comparisons the targets need come first. With --time-budget-s, a part whose
estimated time (from what the same kind of work took so far, scaled by the number of blocks)
would pass the budget is skipped and recorded as such. The JSON and the PNG plot are rewritten
after every part, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as common  # pylint: disable=g-import-not-at-top,wrong-import-position

CONTENDERS = ("ours", "torch_eager", "torch_compile")
# Dry-run shapes (--tiny): M36 keeps more blocks than S12 so budget scaling is exercised too.
TINY_OVERRIDES = {"poolformer_m36": {"depths": (1, 1, 2, 1), "widths": (8, 16, 24, 32)}}
TINY_DEFAULT = {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)}
TINY_ARGS = dict(image_size=32, batch_sizes=[4, 8], train_batch_size=4, repeats=2, warmup=1,
                 sample_s=0.01, copy_mib=8, matmul_size=128, torch_compile_backend="aot_eager")
TARGETS = {"training_vs_torch_compile": 1.3, "inference_vs_torch_compile": 1.0,
           "s12_training_images_per_s": 10_000.0}
NOTES = {
    "images_per_s": "batch / median seconds per call; a sample is calls_per_sample calls "
                    "back to back and one wait; contenders interleaved after warm-up",
    "flops_per_image": "XLA's cost analysis of our lowered program (before optimisation), "
                       "applied to every contender; mfu = images_per_s * flops_per_image / "
                       "peak_flops",
    "bytes_per_image": "XLA's bytes accessed of our compiled program (its fused kernels; "
                       "library calls such as cuBLAS may count as nothing), per image; "
                       "bandwidth_bound_images_per_s = measured copy bandwidth / bytes_per_image",
    "memory": "ours: memory.xla = the compiled program's buffers (total_mb = temp + arguments "
              "+ outputs - aliased), memory.device = the device allocator's counters, whose "
              "peak is a high-water mark of the whole process so far; PyTorch: "
              "torch.cuda.max_memory_allocated over two calls of that contender alone, "
              "peak reset first (allocated_before_mb: what was already allocated)",
    "first_call_s": "one call from cold: trace + compile (+ autotuning) + run",
}
SAFETY = 1.1  # Estimates of the time a part takes are scaled by this before the budget check.


# ---------------------------------------------------------------------------
# Time budget.
# ---------------------------------------------------------------------------


class Budget:
  """Says whether work fits before a deadline, estimating it from similar work done so far.

  Compile times grow with the number of blocks, so each measurement is kept per block and
  scaled to the next model; that over-estimates a deeper model (the fixed part is scaled too),
  which errs on the side of finishing.
  """

  def __init__(self, seconds: float | None, clock=time.monotonic):
    self.clock = clock
    self.start = clock()
    self.deadline = self.start + seconds if seconds else None
    self._per_block: dict[str, float] = {}

  def elapsed(self) -> float:
    return self.clock() - self.start

  def left(self) -> float | None:
    return None if self.deadline is None else self.deadline - self.clock()

  def record(self, kind: str, seconds: float, blocks: int = 1) -> None:
    """What `kind` of work took, on a model of `blocks` blocks (1: not scaled by depth)."""
    self._per_block[kind] = seconds / blocks

  def estimate(self, kind: str, blocks: int = 1) -> float:
    """Seconds for `kind` on a model of `blocks` blocks; 0 if never measured."""
    return self._per_block.get(kind, 0.0) * blocks

  def fits(self, seconds: float) -> tuple[bool, float]:
    """(whether `seconds` of estimated work, with a margin, ends before the deadline, those
    seconds with the margin)."""
    seconds *= SAFETY
    return self.deadline is None or self.clock() + seconds <= self.deadline, seconds


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


def random_ours(variant, dtype, overrides, seed=0):
  """Our model with every parameter random, so no block is near the identity.

  Layer scales +-[0.1, 1], norm gains 1 +- 0.2, biases +-0.1, weights N(0, 1/fan_in): the
  activations stay O(1) through every block and a wrongly copied tensor shows in the logits.
  Drawn on the host and put on the device as they are: nothing is compiled to initialise.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from poolformer_jax import model as pf  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: pf.create_model(variant, rngs=nnx.Rngs(0),
                                                    dtype=common.jax_dtype(dtype), **overrides))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path, simple=True, separator="."), leaf.shape
    if "layer_scale" in name:
      value = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 1.0, shape)
    elif name.endswith("scale"):
      value = rng.normal(1.0, 0.2, shape)
    elif name.endswith("bias"):
      value = rng.normal(0.0, 0.1, shape)
    else:
      value = rng.normal(0.0, 1.0 / math.sqrt(int(np.prod(shape[:-1]))), shape)
    return jnp.asarray(np.asarray(value, leaf.dtype))  # Cast on the host: no device program.

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


class Variant:
  """One variant's models, built once and kept for its later parts."""

  def __init__(self, name, args, device):
    import torch  # pylint: disable=g-import-not-at-top
    self.name = name
    self.overrides = tiny_overrides(name) if args.tiny else {}
    self.ours = random_ours(name, args.dtype, self.overrides)
    self.blocks = self.ours.cfg.num_blocks
    self.forward, self.state = common.make_forward(self.ours)
    # HF's model with our weights, through poolformer_jax.convert.hf_export.
    self.torch = common.build_torch(self.ours.cfg, device, self.ours).to(
        memory_format=torch.channels_last)


def tiny_overrides(variant):
  return dict(TINY_OVERRIDES.get(variant, TINY_DEFAULT))


def torch_compile(model, args):
  import torch  # pylint: disable=g-import-not-at-top
  mode = None if args.torch_compile_mode == "default" else args.torch_compile_mode
  return torch.compile(model, mode=mode, backend=args.torch_compile_backend, dynamic=False)


# ---------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------


def stopwatch(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def xla_cost(stage) -> dict:
  """XLA's cost analysis of a Lowered or Compiled stage ({} where the backend has none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # Not every backend or version implements it.  pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  return dict(cost or {})


def work_per_image(lowered, compiled, batch) -> dict:
  """FLOPs and bytes per image from XLA's cost analysis.

  FLOPs from the lowered program: before optimisation its matmuls and convolutions are plain
  HLO ops, which every backend counts (after it, GPU library calls may count as nothing).
  Bytes from the compiled program: what its fused kernels read and write, the traffic a
  bandwidth bound is about.
  """
  low, comp = xla_cost(lowered), xla_cost(compiled)
  flops, source = low.get("flops"), "lowered"
  if not flops or flops <= 0:
    flops, source = comp.get("flops"), "compiled"
  nbytes = comp.get("bytes accessed")
  per = lambda v: float(v) / batch if v and v > 0 else None
  return {"flops_per_image": per(flops), "flops_source": source if per(flops) else None,
          "compiled_flops_per_image": per(comp.get("flops")),
          "bytes_per_image": per(nbytes), "lowered_bytes_per_image": per(low.get("bytes accessed"))}


def xla_memory(compiled) -> dict | None:
  """The compiled program's buffers (MB): what one call needs on the device."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {k.replace("_size_in_bytes", "_mb"): getattr(ma, k, 0) / 2**20 for k in fields}
  out["total_mb"] = out["temp_mb"] + out["argument_mb"] + out["output_mb"] - out["alias_mb"]
  return out


def jax_device_memory(device) -> dict | None:
  """The device allocator's counters (MB); the peak is a high-water mark of the whole process."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return {k.replace("bytes", "mb"): stats[k] / 2**20
          for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def torch_peak_memory(fn, device) -> dict | None:
  """torch.cuda.max_memory_allocated over two calls of `fn` alone, peak reset first (MB)."""
  import torch  # pylint: disable=g-import-not-at-top
  if device.type != "cuda":
    return None
  torch.cuda.synchronize()
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()
  before = torch.cuda.memory_allocated()
  for _ in range(2):
    fn()
  torch.cuda.synchronize()
  return {"max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
          "allocated_before_mb": before / 2**20}


def time_interleaved(steps: dict, args) -> tuple[dict, int]:
  """Median seconds per call of each (step, wait) pair, interleaved, after warm-up.

  Each sample runs `calls` steps back to back and waits once: `calls` is chosen from one
  call of the slowest contender so a sample lasts about --sample-s.
  """
  slowest = 0.0
  for step, wait in steps.values():
    wait(step())  # Warm (first calls were made before).
    slowest = max(slowest, stopwatch(lambda: wait(step()))[1])  # pylint: disable=cell-var-from-loop
  calls = int(min(100, max(1, round(args.sample_s / max(slowest, 1e-6)))))

  def sample(step, wait):
    def run():
      out = None
      for _ in range(calls):
        out = step()
      wait(out)
    return run

  med, raw = common.interleaved({n: sample(*sw) for n, sw in steps.items()}, args.repeats,
                                args.warmup)
  return ({n: {"median_s_per_call": s / calls, "samples_s": raw[n]} for n, s in med.items()},
          calls)


def logit_error(logits, ref) -> dict:
  a, r = np.asarray(logits, np.float64), np.asarray(ref, np.float64)
  return {"max_abs": float(np.abs(a - r).max()),
          "rel_l2": float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30)),
          "top1_agreement": float(np.mean(a.argmax(-1) == r.argmax(-1)))}


def torch_float32_logits(model, xt) -> tuple[np.ndarray, str]:
  """The PyTorch model in float32 with TF32 off: the reference every contender is read against.

  Returns the logits and how they were computed (TF32 is switched through PyTorch's
  long-standing flags; should a version refuse them, the reference says so).
  """
  import torch  # pylint: disable=g-import-not-at-top
  flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
  saved, how = [], "PyTorch float32 (TF32 off), same weights and batch"
  try:
    for obj, name in flags:
      saved.append((obj, name, getattr(obj, name)))
      setattr(obj, name, False)
  except Exception as e:  # pylint: disable=broad-except
    how = f"PyTorch float32 (TF32 flags not switched: {type(e).__name__}: {e}), same weights"
  try:
    with torch.inference_mode():
      return model(xt).logits.float().cpu().numpy(), how
  finally:
    for obj, name, value in saved:
      setattr(obj, name, value)


def to_torch_images(x, device):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device).to(
      memory_format=torch.channels_last)


# ---------------------------------------------------------------------------
# The parts.
# ---------------------------------------------------------------------------


def measure_ceilings(args, device, results):
  """Device-to-device copy bandwidth (bytes read + written) and the matmul rate, both here."""
  import torch  # pylint: disable=g-import-not-at-top
  src = torch.randn(args.copy_mib * 2**20 // 4, device=device)  # Random data, not zeros.
  dst = torch.empty_like(src)
  copies = 20

  def copy_sample():
    for _ in range(copies):
      dst.copy_(src)
    common.torch_sync(device)

  med, _ = common.interleaved({"copy": copy_sample}, args.repeats, args.warmup)
  bandwidth = 2 * src.numel() * src.element_size() * copies / med["copy"]
  del src, dst
  rates = common.matmul_rates(args.matmul_size, args.dtype, device, args.repeats, args.warmup,
                              calls=20)
  results["ceilings"] = {
      "copy_bandwidth_bytes_per_s": bandwidth, "copy_mib": args.copy_mib,
      "matmul": {"n": args.matmul_size, "dtype": args.dtype,
                 **{f"{k}_flops_per_s": v for k, v in rates.items()}}}
  log(f"copy {bandwidth / 1e9:.0f} GB/s (read + write); {args.matmul_size}^3 {args.dtype} "
      "matmul " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()))


def first_call(step, wait) -> float:
  """Seconds of one call and the wait for its result: compiles, autotunes, runs."""
  return stopwatch(lambda: wait(step()))[1]


def add_torch_compile(module, make_step, wait, v, args, budget, run, steps):
  """torch.compile of `module` as a contender, unless off or it would pass the time budget."""
  mode, contenders = run["mode"], run["contenders"]
  if args.no_torch_compile:
    contenders["torch_compile"] = {"skipped": "--no-torch-compile"}
    return
  estimate = (budget.estimate(f"torch_compile_{mode}", v.blocks)
              + budget.estimate(f"rest_{mode}"))
  fits, estimate = budget.fits(estimate)
  if not fits:
    contenders["torch_compile"] = {
        "skipped": f"time budget: about {estimate:.0f} s needed, {budget.left():.0f} s left"}
    return
  try:
    step = make_step(torch_compile(module, args))
    first = first_call(step, wait)
  except Exception as e:  # Keep ours and eager; say why.  pylint: disable=broad-except
    contenders["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    log(f"torch.compile failed: {type(e).__name__}: {e}")
    return
  budget.record(f"torch_compile_{mode}", first, v.blocks)
  contenders["torch_compile"] = {"first_call_s": first}
  steps["torch_compile"] = (step, wait)


def inference_part(v, batch, args, device, budget, run):
  """Ours (jit of the model), PyTorch eager and torch.compile at one batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  x, _ = common.inputs(args.image_size, batch)
  xj, xt = jax.device_put(x), to_torch_images(x, device)
  c = run["contenders"]
  t0 = time.perf_counter()
  lowered, trace_s = stopwatch(lambda: v.forward.lower(v.state, xj))
  exe, compile_s = stopwatch(lowered.compile)
  logits, run_s = stopwatch(lambda: np.asarray(exe(v.state, xj).astype(np.float32)))
  c["ours"] = {"trace_lower_s": trace_s, "compile_s": compile_s,
               "first_call_s": trace_s + compile_s + run_s, "setup_s": time.perf_counter() - t0,
               "memory": {"xla": xla_memory(exe)}}
  budget.record("ours_inference", c["ours"]["setup_s"], v.blocks)
  run.update(work_per_image(lowered, exe, batch))
  steps = {"ours": (lambda: exe(v.state, xj), lambda out: out.block_until_ready())}
  wait = lambda _: common.torch_sync(device)
  eager = common.torch_infer_fn(v.torch, xt, args.dtype, device, sync=False)
  c["torch_eager"] = {"first_call_s": first_call(eager, wait)}
  steps["torch_eager"] = (eager, wait)
  add_torch_compile(v.torch, lambda m: common.torch_infer_fn(m, xt, args.dtype, device,
                                                              sync=False),
                    wait, v, args, budget, run, steps)
  reference, how = torch_float32_logits(v.torch, xt)
  host = lambda t: t.float().cpu().numpy()
  run["logits"] = {"reference": how, "ours": logit_error(logits, reference)}
  for name in ("torch_eager", "torch_compile"):
    if name in steps:
      run["logits"][name] = logit_error(host(steps[name][0]()), reference)
  run["logits"]["ours_vs_torch_eager"] = logit_error(logits, host(eager()))
  time_part(steps, run, batch, args)
  c["ours"]["memory"]["device"] = jax_device_memory(jax.devices()[0])
  for name in ("torch_eager", "torch_compile"):
    if name in steps:
      c[name]["memory"] = torch_peak_memory(steps[name][0], device)


def training_part(v, batch, args, device, budget, run):
  """The trainer's compiled step vs PyTorch eager and torch.compile (forward, backward, AdamW)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from poolformer_jax import sharding  # pylint: disable=g-import-not-at-top
  x, y = common.inputs(args.image_size, batch)
  c = run["contenders"]
  t0 = time.perf_counter()
  trainer, build_s = stopwatch(lambda: common.make_trainer(v.name, args.dtype, args.image_size,
                                                           batch, v.overrides))
  exe, compile_s = stopwatch(trainer.compile_train_step)
  state, init_s = stopwatch(lambda: jax.block_until_ready(trainer.init_state(0)))
  data = sharding.global_batch({"image": common.trainer_images(x), "label": y},
                               trainer.batch_sharding)
  carry = {"state": state}

  def ours_step():
    carry["state"], metrics = exe(carry["state"], data)
    return metrics

  ours_wait = lambda metrics: metrics["loss"].block_until_ready()
  first = first_call(ours_step, ours_wait)
  c["ours"] = {"trainer_build_s": build_s, "compile_s": compile_s, "init_s": init_s,
               "first_call_s": first, "setup_s": time.perf_counter() - t0,
               "memory": {"xla": xla_memory(exe)}}
  budget.record("ours_training", c["ours"]["setup_s"], v.blocks)
  # The FLOPs of the same step, counted before optimisation (see work_per_image).
  lowered, run["flop_count_lowering_s"] = stopwatch(lambda: jax.jit(trainer.train_step).lower(
      trainer.abstract_state, trainer.abstract_batch(batch, train=True)))
  run.update(work_per_image(lowered, exe, batch))
  steps = {"ours": (ours_step, ours_wait)}
  # A copy of the model (the inference parts keep theirs); eager and compiled share it, and
  # so one optimizer.
  tmodel = copy.deepcopy(v.torch)
  opt = common.torch_adamw(tmodel, device)
  xt, yt = to_torch_images(x, device), torch.from_numpy(y.astype(np.int64)).to(device)
  wait = lambda _: common.torch_sync(device)
  make_step = lambda m: common.torch_train_fn(m, opt, xt, yt, args.dtype, device, sync=False)
  eager = make_step(tmodel)
  c["torch_eager"] = {"first_call_s": first_call(eager, wait)}
  steps["torch_eager"] = (eager, wait)
  add_torch_compile(tmodel, make_step, wait, v, args, budget, run, steps)
  time_part(steps, run, batch, args)
  c["ours"]["memory"]["device"] = jax_device_memory(jax.devices()[0])
  for name in ("torch_eager", "torch_compile"):
    if name in steps:
      c[name]["memory"] = torch_peak_memory(steps[name][0], device)


def time_part(steps, run, batch, args):
  stats, calls = time_interleaved(steps, args)
  run["calls_per_sample"] = calls
  for name, st in stats.items():
    run["contenders"][name].update(st, images_per_s=batch / st["median_s_per_call"])
  log(f"{run['variant']} {run['mode']} batch {batch}: " + ", ".join(
      f"{n} {run['contenders'][n]['images_per_s']:.0f} img/s" for n in stats))


PARTS = {"inference": inference_part, "training": training_part}


def plan(args) -> list[tuple[str, str, int]]:
  """(variant, mode, batch) in the order they run: what the targets need first."""
  first, rest = [], []
  for variant in args.variants:
    if "inference" in args.modes:
      first.append((variant, "inference", args.batch_sizes[0]))
      rest += [(variant, "inference", b) for b in args.batch_sizes[1:]]
    if "training" in args.modes:
      first.append((variant, "training", args.train_batch_size))
  return first + rest


# ---------------------------------------------------------------------------
# Derived numbers, report, plot.
# ---------------------------------------------------------------------------


def summarize(results) -> None:
  """Fills in what follows from the measurements: bounds, MFU, ratios, targets."""
  peak = results["peak_flops"]
  bandwidth = (results.get("ceilings") or {}).get("copy_bandwidth_bytes_per_s")
  for run in results["runs"]:
    flops, nbytes = run.get("flops_per_image"), run.get("bytes_per_image")
    run["compute_bound_images_per_s"] = peak / flops if peak and flops else None
    run["bandwidth_bound_images_per_s"] = bandwidth / nbytes if bandwidth and nbytes else None
    contenders = run.get("contenders", {})
    for c in contenders.values():
      ips = c.get("images_per_s")
      if ips:
        c["mfu"] = ips * flops / peak if flops and peak else None
        bound = run["bandwidth_bound_images_per_s"]
        c["fraction_of_bandwidth_bound"] = ips / bound if bound else None
    ours = contenders.get("ours", {}).get("images_per_s")
    run["ratios"] = {f"ours/{n}": ours / contenders[n]["images_per_s"]
                     for n in CONTENDERS[1:] if ours and contenders.get(n, {}).get("images_per_s")}
  results["targets"] = targets(results)


def targets(results) -> list[dict]:
  cfg = results["config"]

  def find(variant, mode, batch):
    return next((r for r in results["runs"] if (r["variant"], r["mode"], r["batch"]) ==
                 (variant, mode, batch)), {})

  def target(name, value, threshold):
    return {"name": name, "value": value, "threshold": threshold,
            "met": None if value is None else bool(value >= threshold)}

  out = []
  train_b, infer_b = cfg["train_batch_size"], cfg["batch_sizes"][0]
  for variant in cfg["variants"]:
    if "training" in cfg["modes"]:
      out.append(target(f"{variant} training batch {train_b}: ours / torch.compile",
                        find(variant, "training", train_b).get("ratios", {}).get(
                            "ours/torch_compile"), TARGETS["training_vs_torch_compile"]))
    if "inference" in cfg["modes"]:
      out.append(target(f"{variant} inference batch {infer_b}: ours / torch.compile",
                        find(variant, "inference", infer_b).get("ratios", {}).get(
                            "ours/torch_compile"), TARGETS["inference_vs_torch_compile"]))
  if "poolformer_s12" in cfg["variants"] and "training" in cfg["modes"]:
    ours = find("poolformer_s12", "training", train_b).get("contenders", {}).get("ours", {})
    out.append(target(f"poolformer_s12 training batch {train_b}: ours images/s",
                      ours.get("images_per_s"), TARGETS["s12_training_images_per_s"]))
  return out


def peak_memory_mb(name, contender) -> float | None:
  """One comparable number: ours' program buffers, PyTorch's allocator peak."""
  memory = contender.get("memory") or {}
  if name == "ours":
    return (memory.get("xla") or {}).get("total_mb")
  return (memory or {}).get("max_memory_allocated_mb")


def table(results) -> str:
  def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"

  lines = [f"{'':32}{'ours':>9}{'eager':>9}{'compile':>9}{'/eager':>8}{'/compile':>9}"
           f"{'MFU':>6}{'BW-bound':>10}{'mem MB ours/eager/compile':>28}"]
  for run in results["runs"]:
    label = f"{run['variant']} {run['mode'][:5]} b{run['batch']} img/s"
    if "skipped" in run or "error" in run:
      lines.append(f"{label:32}{'skipped' if 'skipped' in run else 'error'}: "
                   f"{(run.get('skipped') or run.get('error')).splitlines()[-1][:80]}")
      continue
    c = run["contenders"]
    ips = [c.get(n, {}).get("images_per_s") for n in CONTENDERS]
    mem = [peak_memory_mb(n, c.get(n, {})) for n in CONTENDERS]
    mfu = (c.get("ours") or {}).get("mfu")
    lines.append(f"{label:32}" + "".join(fmt(v, "9.0f") for v in ips)
                 + fmt(run["ratios"].get("ours/torch_eager"), "7.2f") + "x"
                 + fmt(run["ratios"].get("ours/torch_compile"), "8.2f") + "x"
                 + (f"{100 * mfu:5.0f}%" if mfu is not None else f"{'-':>6}")
                 + fmt(run.get("bandwidth_bound_images_per_s"), "10.0f")
                 + f"{'/'.join(fmt(m, '.0f') for m in mem):>28}")
  for t in results["targets"]:
    state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    lines.append(f"target {t['name']} >= {t['threshold']:g}: {fmt(t['value'], '.2f')} ({state})")
  return "\n".join(lines)


def plot(results, path):
  """Images/s (top) and peak memory (bottom) per part and contender, one column per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  variants = results["config"]["variants"]
  fig, axes = plt.subplots(2, len(variants), figsize=(6 * len(variants), 8), squeeze=False)
  width = 0.8 / len(CONTENDERS)
  for col, variant in enumerate(variants):
    runs = [r for r in results["runs"] if r["variant"] == variant and "contenders" in r]
    labels = [f"{r['mode']} b{r['batch']}" for r in runs]
    for k, name in enumerate(CONTENDERS):
      xs = np.arange(len(runs)) + k * width
      ips = [r["contenders"].get(name, {}).get("images_per_s") or 0.0 for r in runs]
      mem = [peak_memory_mb(name, r["contenders"].get(name, {})) or 0.0 for r in runs]
      axes[0, col].bar(xs, ips, width, label=name)
      axes[1, col].bar(xs, mem, width, label=name)
      if name == "ours":
        for x, r in zip(xs, runs):
          ratio = r.get("ratios", {}).get("ours/torch_compile")
          if ratio:
            axes[0, col].annotate(f"{ratio:.2f}x vs compile", (x, ips[runs.index(r)]),
                                  ha="center", va="bottom", fontsize=7)
    for ax in axes[:, col]:
      ax.set_xticks(np.arange(len(runs)) + width, labels)
    axes[0, col].set_title(f"{variant} {results['config']['dtype']} "
                           f"{results['config']['image_size']}px")
    axes[0, col].set_ylabel("images / s (median)")
    axes[1, col].set_ylabel("peak device memory MB\n(ours: XLA buffers; PyTorch: allocator)")
    axes[0, col].legend(fontsize=8)
  fig.suptitle(f"{results['devices']['device_name']}: ours (JAX) vs HF PyTorch, eager and "
               "torch.compile")
  fig.tight_layout()
  fig.savefig(path, dpi=100, format="png")
  plt.close(fig)


def save(results, path, budget):
  """JSON and PNG, each written whole then renamed: an interrupted run keeps the last good pair."""
  summarize(results)
  results["elapsed_s"] = budget.elapsed()
  results["tensorflow_modules"] = sorted(
      m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)
  png = os.path.splitext(path)[0] + ".png"
  plot(results, png + ".tmp")
  os.replace(png + ".tmp", png)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------

_T0 = time.monotonic()


def log(message):
  print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def versions() -> dict:
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "numpy",
               "torch", "transformers", "triton"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def device_info(devices, device) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  info = {"jax_platform": devices[0].platform, "jax_device_kind": devices[0].device_kind,
          "jax_device_count": len(devices), "torch_device": str(device),
          "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
  if device.type == "cuda":
    props = torch.cuda.get_device_properties(device)
    info.update(device_name=props.name, device_memory_mb=props.total_memory / 2**20,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
  else:
    info["device_name"] = f"{info['cpu']} CPU ({info['cpu_count']} cores)"
  return info


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", nargs="+", default=["poolformer_s12", "poolformer_m36"])
  p.add_argument("--modes", nargs="+", default=list(PARTS), choices=list(PARTS))
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024],
                 help="inference batch sizes; the first is the one the target is about")
  p.add_argument("--train-batch-size", type=int, default=256)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help="compute dtype (weights stay float32)")
  p.add_argument("--repeats", type=int, default=10, help="timed samples per contender (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed samples per contender first")
  p.add_argument("--sample-s", type=float, default=0.1, help="about how long one sample lasts")
  p.add_argument("--time-budget-s", type=float, default=0,
                 help="skip parts estimated to end later than this (0: no limit)")
  p.add_argument("--no-torch-compile", action="store_true")
  p.add_argument("--torch-compile-mode", default="default",
                 help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
  p.add_argument("--torch-compile-backend", default="inductor")
  p.add_argument("--copy-mib", type=int, default=2048, help="buffer of the bandwidth copy")
  p.add_argument("--matmul-size", type=int, default=8192)
  p.add_argument("--peak-flops", type=float, default=0,
                 help="the chip's dense peak FLOP/s for MFU (default: poolformer_jax.metrics)")
  p.add_argument("--tiny", action="store_true",
                 help="dry run: tiny models, images, batches and ceilings; torch.compile with "
                      "the aot_eager backend (no code generation)")
  p.add_argument("--out", default="gpu_benchmark.json", help="JSON path; the PNG goes next to it")
  args = p.parse_args(argv)
  if args.tiny:  # Other defaults; flags given explicitly still win.
    p.set_defaults(**TINY_ARGS)
    args = p.parse_args(argv)
  if args.image_size <= 0 or args.image_size % 32:
    p.error(f"--image-size {args.image_size} must be a positive multiple of 32, e.g. 224")
  if min(args.batch_sizes + [args.train_batch_size, args.repeats]) < 1 or args.warmup < 0:
    p.error("batch sizes and --repeats must be >= 1, --warmup >= 0")
  from poolformer_jax import model as pf  # pylint: disable=g-import-not-at-top
  v1 = [n for n, c in pf.VARIANTS.items() if c.version == 1 and c.token_mixer == "pooling"]
  unknown = [v for v in args.variants if v not in v1]
  if unknown:
    p.error(f"--variants {' '.join(unknown)}: not a PoolFormer v1 variant (HF's PyTorch model "
            f"is v1 only); choose from {' '.join(v1)}")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  try:  # Fail now, not after the measurements.
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
  except OSError as e:
    p.error(f"cannot write the results next to --out ({out_dir}): {e}")
  return args


def main(argv=None):
  args = parse_args(argv)
  # Both frameworks share the device: JAX takes memory as it needs it instead of 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # A cold torch.compile, as JAX's compile is cold: a fresh inductor / Triton cache.
  cache = tempfile.mkdtemp(prefix="gpu_benchmark_inductor_")
  os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
  os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from poolformer_jax import metrics  # pylint: disable=g-import-not-at-top

  budget = Budget(args.time_budget_s)
  devices = jax.devices()
  device = common.torch_device()
  if (devices[0].platform == "gpu") != (device.type == "cuda"):
    sys.exit(f"error: JAX runs on {devices[0].platform} but PyTorch on {device.type}: the "
             "comparison needs both on the same device. For a CPU dry run hide the GPU from both "
             "(JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=); on a GPU install both with CUDA.")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # Fixed shapes: let cuDNN pick its fastest kernels.
  for name in ("recompile_limit", "cache_size_limit"):  # One wrapper per part: room for all.
    if hasattr(torch._dynamo.config, name):  # pylint: disable=protected-access
      setattr(torch._dynamo.config, name, 64)  # pylint: disable=protected-access
  peak, peak_source = metrics.peak_flops(devices[0]), "poolformer_jax.metrics.PEAK_FLOPS"
  if args.peak_flops:
    peak, peak_source = args.peak_flops, "--peak-flops"
  elif peak is None and args.tiny:
    peak, peak_source = 1e12, "nominal 1e12 (--tiny on a chip without a known peak)"
  results = {
      "what": __doc__.split("\n\n")[0], "config": vars(args),
      "devices": device_info(devices, device), "versions": versions(),
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                             "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")},
      "peak_flops": peak, "peak_flops_source": peak_source,
      "torch_settings": {"channels_last": True, "autocast": args.dtype,
                         "cudnn_benchmark": device.type == "cuda",
                         "adamw_fused": device.type == "cuda",
                         "compile": {"mode": args.torch_compile_mode,
                                     "backend": args.torch_compile_backend, "dynamic": False}},
      "notes": NOTES, "ceilings": None, "runs": [], "targets": [], "complete": False,
  }
  log(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind}; torch "
      f"{torch.__version__}: {results['devices']['device_name']}; peak {peak} FLOP/s "
      f"({peak_source}); time budget "
      + (f"{args.time_budget_s:.0f} s" if args.time_budget_s else "none"))
  measure_ceilings(args, device, results)
  save(results, args.out, budget)
  built = {}
  for variant, mode, batch in plan(args):
    run = {"variant": variant, "mode": mode, "batch": batch, "image_size": args.image_size,
           "contenders": {}}
    results["runs"].append(run)
    t0 = time.perf_counter()
    try:
      if variant not in built:
        built[variant], build_s = stopwatch(
            lambda: Variant(variant, args, device))  # pylint: disable=cell-var-from-loop
        log(f"{variant}: random weights copied to PyTorch in {build_s:.1f} s")
      v = built[variant]
      run.update(num_blocks=v.blocks, num_params=int(sum(
          p.numel() for p in v.torch.parameters())))
      fits, estimate = budget.fits(budget.estimate(f"ours_{mode}", v.blocks)
                                   + budget.estimate(f"rest_{mode}"))
      if not fits:
        run["skipped"] = f"time budget: about {estimate:.0f} s needed, {budget.left():.0f} s left"
        log(f"{variant} {mode} batch {batch}: {run['skipped']}")
        continue
      PARTS[mode](v, batch, args, device, budget, run)
      c = run["contenders"]
      budget.record(f"rest_{mode}", time.perf_counter() - t0 - c["ours"]["setup_s"]
                    - c.get("torch_compile", {}).get("first_call_s", 0.0))
    except Exception:  # One failed part must not lose the others.  pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      run["error"] = traceback.format_exc()[-4000:]
      log(f"{variant} {mode} batch {batch} failed:\n{run['error']}")
    finally:
      run["elapsed_s"] = time.perf_counter() - t0
      gc.collect()
      if device.type == "cuda":
        torch.cuda.empty_cache()
      save(results, args.out, budget)
  results["complete"] = True
  save(results, args.out, budget)
  log(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png\n\n{table(results)}")


if __name__ == "__main__":
  main()
