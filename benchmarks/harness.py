"""One benchmark harness for CPU, GPU and TPU: our PoolFormer against HF's PyTorch model.

A contender is a step and a wait: `wait(step())` is one call, finished. For each part (inference
at one batch size, or the trainer's compiled train step) the harness builds the contenders (ours,
PyTorch eager, torch.compile), times them in one process interleaved (A B C A B C ... after
warm-up, medians, so a noisy neighbour slows every contender alike), compares their logits with
PyTorch's float32 output on the same weights, and reads XLA's cost of our program. The entry
points plug in what differs by platform: benchmark.py (CPU: memory in fresh subprocesses, the
legacy JSON layout) and gpu_benchmark.py (GPU: copy bandwidth, targets, a time budget).
"""

from __future__ import annotations

import copy
import dataclasses
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

from poolformer_jax import chips
from poolformer_jax import cpu_tuning
from poolformer_jax.measure import program_cost, stopwatch

CONTENDERS = ("ours", "torch_eager", "torch_compile")
MODES = ("inference", "training")
# Dry-run shapes (--tiny): M36 keeps more blocks than S12 so budget scaling is exercised too.
TINY_OVERRIDES = {"poolformer_m36": {"depths": (1, 1, 2, 1), "widths": (8, 16, 24, 32)}}
TINY_DEFAULT = {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)}
SAFETY = 1.1  # Estimates of the time a part takes are scaled by this before the budget check.
_T0 = time.monotonic()


def log(message):
  print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def add_flags(p, *, batch_sizes, train_batch_size, dtype):
  """The flags both entry points share, with each one's defaults."""
  p.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes,
                 help="inference batch sizes")
  p.add_argument("--train-batch-size", type=int, default=train_batch_size)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=dtype,
                 help="compute dtype (weights stay float32)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=10, help="timed samples per contender (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed samples per contender first")
  p.add_argument("--no-torch-compile", action="store_true")


def check_out_dir(p, out):
  """Fail now, not after the measurements, if the results cannot be written."""
  out_dir = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
  except OSError as e:
    p.error(f"cannot write the results next to --out ({out_dir}): {e}")


def prepare_environment():
  """Before JAX and PyTorch start: a cold torch.compile (as JAX's compile is cold), and JAX
  taking device memory as it needs it (both frameworks share the device)."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  cache = tempfile.mkdtemp(prefix="benchmark_inductor_")
  os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
  os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))


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
                                                    dtype=jnp.dtype(dtype), **overrides))
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
    state = {k: torch.from_numpy(np.array(v))
             for k, v in hf_export.to_torch_state(ours, "hf").items()}
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
  variant's rate) with Mixup/CutMix, label smoothing and augmentation off, so PyTorch's loop
  does the same work.
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


def ours_training_step(trainer, exe, state, x, y):
  """The trainer's compiled step `exe` on one batch, from `state`, as a contender: (step, wait)."""
  from poolformer_jax import sharding  # pylint: disable=g-import-not-at-top
  carry = {"state": state}
  data = sharding.global_batch({"image": trainer_images(x), "label": y}, trainer.batch_sharding)

  def step():
    carry["state"], metrics = exe(carry["state"], data)
    return metrics

  return step, lambda metrics: metrics["loss"].block_until_ready()


def torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == "cuda":
    torch.cuda.synchronize()


def torch_autocast(dtype, device):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != "float32")


def torch_infer_step(model, x, dtype, device):
  """One inference call, queued (the wait syncs)."""
  import torch  # pylint: disable=g-import-not-at-top

  def step():
    with torch.inference_mode(), torch_autocast(dtype, device):
      return model(x).logits

  return step


def torch_adamw(model, device):
  """The recipe's AdamW; on CUDA PyTorch's fused kernel, the fastest it has."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                           **({"fused": True} if device.type == "cuda" else {}))


def torch_train_step(model, opt, x, y, dtype, device):
  """One training step (forward, softmax cross-entropy, backward, `opt`), queued."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    with torch_autocast(dtype, device):
      logits = model(x).logits
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return loss

  return step


def torch_compile(model, args):
  import torch  # pylint: disable=g-import-not-at-top
  mode = None if args.torch_compile_mode == "default" else args.torch_compile_mode
  return torch.compile(model, mode=mode, backend=args.torch_compile_backend, dynamic=False)


def inputs(image_size, batch, num_classes=1000, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, size=(batch,)).astype(np.int32)
  return x, y


def trainer_images(x):
  """The trainer's input for images `x`: uint8 pixels (it normalises on the device)."""
  return np.clip(np.round(x * 58 + 120), 0, 255).astype(np.uint8)


def torch_images(x, device, channels_last):
  import torch  # pylint: disable=g-import-not-at-top
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  return xt.to(memory_format=torch.channels_last) if channels_last else xt


def model_overrides(name: str, tiny: bool) -> dict:
  """The config fields a run changes in variant `name`: the dry-run shapes with --tiny."""
  return dict(TINY_OVERRIDES.get(name, TINY_DEFAULT)) if tiny else {}


class Variant:
  """One variant's models (ours random, HF's holding the same weights), kept for its parts."""

  def __init__(self, name, args, device):
    import torch  # pylint: disable=g-import-not-at-top
    self.name = name
    self.overrides = model_overrides(name, args.tiny)
    self.ours = random_ours(name, args.dtype, self.overrides)
    self.blocks = self.ours.cfg.num_blocks
    self.forward, self.state = make_forward(self.ours)
    self.torch = build_torch(self.ours.cfg, device, self.ours)
    if args.channels_last:
      self.torch = self.torch.to(memory_format=torch.channels_last)


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


def interleaved(fns: dict, repeats: int, warmup: int) -> tuple[dict, dict]:
  """Median seconds of each function, and every sample, measured A B C A B C ... after warm-up."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(0.02)  # Let the other framework's spinning worker threads go idle.
      times[name].append(stopwatch(fn)[1])
  return {name: float(np.median(t)) for name, t in times.items()}, times


def time_interleaved(steps: dict, args) -> tuple[dict, int]:
  """Median seconds per call of each (step, wait) contender, interleaved, after warm-up.

  Each sample runs `calls` steps back to back and waits once, so launches overlap as in a real
  loop: `calls` is chosen from one call of the slowest contender so that a sample lasts about
  --sample-s (0: one call per sample).
  """
  calls = 1
  if args.sample_s > 0:
    slowest = 0.0
    for step, wait in steps.values():
      wait(step())  # Warm (first calls were made before).
      slowest = max(slowest, first_call(step, wait))
    calls = int(min(100, max(1, round(args.sample_s / max(slowest, 1e-6)))))

  def sample(step, wait):
    def run():
      out = None
      for _ in range(calls):
        out = step()
      wait(out)
    return run

  med, raw = interleaved({n: sample(*sw) for n, sw in steps.items()}, args.repeats, args.warmup)
  return ({n: {"median_s_per_call": s / calls, "samples_s": raw[n]} for n, s in med.items()},
          calls)


def matmul_rates(n, dtype, device, repeats, warmup, calls=1) -> dict[str, float]:
  """FLOP/s of an n x n x n matmul in each framework (median; `calls` back to back per sample).

  Random data: zeros can run faster than real values on some chips.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  ja = jax.device_put(a).astype(dtype)
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


def work_per_image(lowered, compiled, batch) -> dict:
  """FLOPs and bytes per image from XLA's cost analysis.

  FLOPs from the lowered program: before optimisation its matmuls and convolutions are plain
  HLO ops, which every backend counts (after it, GPU library calls may count as nothing).
  Bytes from the compiled program: what its fused kernels read and write, the traffic a
  bandwidth bound is about.
  """
  low, comp = program_cost(lowered).per(batch), program_cost(compiled).per(batch)
  flops, source = (low.flops, "lowered") if low.flops else (comp.flops, "compiled")
  return {"flops_per_image": flops, "flops_source": source if flops else None,
          "compiled_flops_per_image": comp.flops, "bytes_per_image": comp.bytes_accessed,
          "lowered_bytes_per_image": low.bytes_accessed}


def xla_memory(compiled) -> dict | None:
  """The compiled program's buffers (MB): what one call needs on the device."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # Not every backend has it.  pylint: disable=broad-except
    ma = None
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
    stats = device.memory_stats() or {}
  except Exception:  # Not every backend counts.  pylint: disable=broad-except
    stats = {}
  return {k.replace("bytes", "mb"): stats[k] / 2**20
          for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats} or None


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


def logit_error(logits, ref) -> dict:
  a, r = np.asarray(logits, np.float64), np.asarray(ref, np.float64)
  return {"max_abs": float(np.abs(a - r).max()),
          "rel_l2": float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30)),
          "top1_agreement": float(np.mean(a.argmax(-1) == r.argmax(-1)))}


def torch_float32_logits(model, xt) -> tuple[np.ndarray, str]:
  """The PyTorch model in float32 with TF32 off: the reference every contender is read against.

  Returns the logits and how they were computed (should a PyTorch version refuse its
  long-standing TF32 flags, the reference says so).
  """
  import torch  # pylint: disable=g-import-not-at-top
  flags, saved = (torch.backends.cuda.matmul, torch.backends.cudnn), []
  how = "PyTorch float32 (TF32 off), same weights and batch"
  try:
    for flag in flags:
      saved.append((flag, flag.allow_tf32))
      flag.allow_tf32 = False
  except Exception as e:  # pylint: disable=broad-except
    how = f"PyTorch float32 (TF32 flags not switched: {type(e).__name__}: {e}), same weights"
  try:
    with torch.inference_mode():
      return model(xt).logits.float().cpu().numpy(), how
  finally:
    for flag, value in saved:
      flag.allow_tf32 = value


def first_call(step, wait) -> float:
  """Seconds of one call and the wait for its result: compiles, autotunes, runs."""
  return stopwatch(lambda: wait(step()))[1]


def add_torch_compile(module, make_step, wait, v, args, budget, run, steps):
  """torch.compile of `module` as a contender, unless off or it would pass the time budget."""
  mode, contenders = run["mode"], run["contenders"]
  if args.no_torch_compile or mode not in args.torch_compile_modes:
    contenders["torch_compile"] = {"skipped": "--no-torch-compile" if args.no_torch_compile
                                   else f"not measured in {mode} on this platform"}
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
  x, _ = inputs(args.image_size, batch)
  xj, xt = jax.device_put(x), torch_images(x, device, args.channels_last)
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
  wait = lambda _: torch_sync(device)
  eager = torch_infer_step(v.torch, xt, args.dtype, device)
  c["torch_eager"] = {"first_call_s": first_call(eager, wait)}
  steps["torch_eager"] = (eager, wait)
  add_torch_compile(v.torch, lambda m: torch_infer_step(m, xt, args.dtype, device),
                    wait, v, args, budget, run, steps)
  reference, how = torch_float32_logits(v.torch, xt)
  host = lambda t: t.float().cpu().numpy()
  run["logits"] = {"reference": how, "ours": logit_error(logits, reference)}
  for name in ("torch_eager", "torch_compile"):
    if name in steps:
      run["logits"][name] = logit_error(host(steps[name][0]()), reference)
  run["logits"]["ours_vs_torch_eager"] = logit_error(logits, host(eager()))
  time_part(steps, run, batch, args, device)


def training_part(v, batch, args, device, budget, run):
  """The trainer's compiled step vs PyTorch eager and torch.compile (forward, backward, AdamW)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  x, y = inputs(args.image_size, batch)
  c = run["contenders"]
  t0 = time.perf_counter()
  trainer, build_s = stopwatch(lambda: make_trainer(v.name, args.dtype, args.image_size, batch,
                                                    v.overrides))
  exe, compile_s = stopwatch(trainer.compile_train_step)
  state, init_s = stopwatch(lambda: jax.block_until_ready(trainer.init_state(0)))
  ours_step, ours_wait = ours_training_step(trainer, exe, state, x, y)
  first = first_call(ours_step, ours_wait)
  c["ours"] = {"trainer_build_s": build_s, "compile_s": compile_s, "init_s": init_s,
               "first_call_s": first,
               "setup_s": time.perf_counter() - t0, "memory": {"xla": xla_memory(exe)}}
  budget.record("ours_training", c["ours"]["setup_s"], v.blocks)
  # The FLOPs of the same step, counted before optimisation (see work_per_image).
  lowered, run["flop_count_lowering_s"] = stopwatch(lambda: jax.jit(trainer.train_step).lower(
      trainer.abstract_state, trainer.abstract_batch(batch, train=True)))
  run.update(work_per_image(lowered, exe, batch))
  steps = {"ours": (ours_step, ours_wait)}
  # A copy of the model (the inference parts keep theirs); eager and compiled share it, and
  # so one optimizer.
  tmodel = copy.deepcopy(v.torch)
  opt = torch_adamw(tmodel, device)
  xt = torch_images(x, device, args.channels_last)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  wait = lambda _: torch_sync(device)
  make_step = lambda m: torch_train_step(m, opt, xt, yt, args.dtype, device)
  eager = make_step(tmodel)
  c["torch_eager"] = {"first_call_s": first_call(eager, wait)}
  steps["torch_eager"] = (eager, wait)
  add_torch_compile(tmodel, make_step, wait, v, args, budget, run, steps)
  time_part(steps, run, batch, args, device)


def time_part(steps, run, batch, args, device):
  """Times the contenders, then reads the device memory each needs (where the device counts)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats, calls = time_interleaved(steps, args)
  run["calls_per_sample"] = calls
  c = run["contenders"]
  for name, st in stats.items():
    c[name].update(st, images_per_s=batch / st["median_s_per_call"])
  log(f"{run['variant']} {run['mode']} batch {batch}: " + ", ".join(
      f"{n} {c[n]['images_per_s']:.0f} img/s" for n in stats))
  c["ours"]["memory"]["device"] = jax_device_memory(jax.devices()[0])
  for name in ("torch_eager", "torch_compile"):
    if name in steps:
      c[name]["memory"] = torch_peak_memory(steps[name][0], device)


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


def run_parts(args, device, budget, results, save):
  """Every planned part, each saved when done; a failed or skipped part is recorded as such."""
  import torch  # pylint: disable=g-import-not-at-top
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
      save(results)


def _version(dist):
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def start(args, what):
  """JAX and PyTorch on the same device, and the results' header: config, devices, versions,
  the chip's peak FLOP/s from poolformer_jax.chips."""
  prepare_environment()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  devices, device = jax.devices(), torch_device()
  chip = chips.chip_of(devices[0])
  if (devices[0].platform == "gpu") != (device.type == "cuda"):
    sys.exit(f"error: JAX runs on {devices[0].platform} but PyTorch on {device.type}: the "
             "comparison needs both on the same device. For a CPU dry run hide the GPU from both "
             "(JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=); on a GPU install both with CUDA.")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # Fixed shapes: let cuDNN pick its fastest kernels.
  for name in ("recompile_limit", "cache_size_limit"):  # One wrapper per part: room for all.
    if hasattr(torch._dynamo.config, name):  # pylint: disable=protected-access
      setattr(torch._dynamo.config, name, 64)  # pylint: disable=protected-access
  info = {"jax_platform": devices[0].platform, "jax_device_kind": devices[0].device_kind,
          "jax_device_count": len(devices), "torch_device": str(device),
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
          "cpu": platform.processor() or platform.machine()}
  if device.type == "cuda":
    props = torch.cuda.get_device_properties(device)
    info.update(device_name=props.name, device_memory_mb=props.total_memory / 2**20,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
  else:
    info["device_name"] = f"{info['cpu']} CPU ({info['cpu_count']} cores)"
  versions = {"python": platform.python_version(), **{d: _version(d) for d in (
      "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "numpy", "torch",
      "transformers", "triton")}}
  results = {
      "what": what, "config": vars(args),
      "devices": info, "versions": versions,
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                             "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")},
      # The chip's published figures (peak FLOP/s for MFU; HBM bandwidth beside the measured).
      "chip": dataclasses.asdict(chip) if chip else None,
      "peak_flops": chip.peak_flops if chip else None, "peak_flops_source": "poolformer_jax.chips",
      "torch_settings": {"channels_last": args.channels_last, "autocast": args.dtype,
                         "cudnn_benchmark": device.type == "cuda",
                         "adamw_fused": device.type == "cuda",
                         "compile": {"mode": args.torch_compile_mode,
                                     "backend": args.torch_compile_backend, "dynamic": False}},
      "ceilings": None, "runs": [], "targets": [], "complete": False,
  }
  log(f"jax {jax.__version__}: {len(devices)} x {devices[0].device_kind}; torch "
      f"{torch.__version__}: {info['device_name']}, {info['torch_threads']} threads")
  return device, results


def summarize(results) -> None:
  """Fills in what follows from the measurements: bounds, MFU, ratios."""
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


def peak_memory_mb(name, contender) -> float | None:
  """One comparable number: the process's peak RSS where measured (CPU), else ours' program
  buffers and PyTorch's allocator peak."""
  memory = contender.get("memory") or {}
  if "peak_rss_mb" in memory:
    return memory["peak_rss_mb"]
  if name == "ours":
    return (memory.get("xla") or {}).get("total_mb")
  return memory.get("max_memory_allocated_mb")


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
  lines.append(f"(MFU: of {results['peak_flops_source']}, {fmt(results['peak_flops'], '.3g')} "
               "FLOP/s)")
  for t in results.get("targets", []):
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
        for x, r, v in zip(xs, runs, ips):
          ratio = r.get("ratios", {}).get("ours/torch_compile")
          if ratio:
            axes[0, col].annotate(f"{ratio:.2f}x vs compile", (x, v),
                                  ha="center", va="bottom", fontsize=7)
    for ax in axes[:, col]:
      ax.set_xticks(np.arange(len(runs)) + width, labels)
    axes[0, col].set_title(f"{variant} {results['config']['dtype']} "
                           f"{results['config']['image_size']}px")
    axes[0, col].set_ylabel("images / s (median)")
    axes[1, col].set_ylabel("peak memory MB\n(ours: XLA buffers or RSS; PyTorch: allocator "
                            "or RSS)")
    axes[0, col].legend(fontsize=8)
  fig.suptitle(f"{results['devices']['device_name']}: ours (JAX) vs HF PyTorch, eager and "
               "torch.compile")
  fig.tight_layout()
  fig.savefig(path, dpi=100, format="png")
  plt.close(fig)


def write(results, path, json_view=None):
  """JSON (`json_view(results)` if given) and a PNG next to it, each written whole then renamed:
  an interrupted run keeps the last good pair."""
  with open(path + ".tmp", "w") as f:
    json.dump(json_view(results) if json_view else results, f, indent=1)
  os.replace(path + ".tmp", path)
  png = os.path.splitext(path)[0] + ".png"
  plot(results, png + ".tmp")
  os.replace(png + ".tmp", png)
  return png
