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

Timings (benchmarks/harness.py): each sample a few calls back to back then one wait for the
device, so launches overlap as in a real loop. Also recorded per contender: first-call /
compile time, peak device memory (ours: the compiled executable's memory_analysis() and the
device's peak bytes in use, a process-wide high-water mark; PyTorch:
torch.cuda.max_memory_allocated, reset per contender), MFU against the chip's dense bf16 peak
(poolformer_jax.chips) with FLOPs from XLA's cost analysis of the lowered program (the same
count for every contender), and XLA's bytes accessed per image against the device-to-device
copy bandwidth measured in the same run (a bandwidth-bound images/s). The targets (training
>= 1.3x torch.compile, inference >= 1.0x torch.compile at the first batch size, S12 training
>= 10k images/s) are reported as met or not.

Order: for each variant inference at the first batch size then training, then the other batch
sizes, so the comparisons the targets need come first. With --time-budget-s, a part whose
estimated time (from what the same kind of work took so far, scaled by the number of blocks)
would pass the budget is skipped and recorded as such. The JSON and the PNG plot are rewritten
after every part, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def copy_bandwidth(args, device) -> float:
  """Device-to-device copy bandwidth (bytes read + written per second), random data."""
  import torch  # pylint: disable=g-import-not-at-top
  src = torch.randn(args.copy_mib * 2**20 // 4, device=device)  # Random data, not zeros.
  dst, copies = torch.empty_like(src), 20

  def copy_sample():
    for _ in range(copies):
      dst.copy_(src)
    harness.torch_sync(device)

  med, _ = harness.interleaved({"copy": copy_sample}, args.repeats, args.warmup)
  return 2 * src.numel() * src.element_size() * copies / med["copy"]


def measure_ceilings(args, device, results):
  """The copy bandwidth and the matmul rate, both measured here."""
  bandwidth = copy_bandwidth(args, device)
  rates = harness.matmul_rates(args.matmul_size, args.dtype, device, args.repeats, args.warmup,
                               calls=20)
  results["ceilings"] = {
      "copy_bandwidth_bytes_per_s": bandwidth, "copy_mib": args.copy_mib,
      "matmul": {"n": args.matmul_size, "dtype": args.dtype,
                 **{f"{k}_flops_per_s": v for k, v in rates.items()}}}
  harness.log(f"copy {bandwidth / 1e9:.0f} GB/s (read + write); {args.matmul_size}^3 "
              f"{args.dtype} matmul " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s"
                                                   for k, v in rates.items()))


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


def summarize(results) -> None:
  """Fills in what follows from the measurements: bounds, MFU, ratios, targets."""
  harness.summarize(results)
  results["targets"] = targets(results)


def save(results, path, budget):
  summarize(results)
  results["elapsed_s"] = budget.elapsed()
  results["tensorflow_modules"] = sorted(
      m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
  return harness.write(results, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", nargs="+", default=["poolformer_s12", "poolformer_m36"])
  p.add_argument("--modes", nargs="+", default=list(harness.MODES), choices=harness.MODES)
  harness.add_flags(p, batch_sizes=[256, 1024], train_batch_size=256, dtype="bfloat16")
  p.add_argument("--sample-s", type=float, default=0.1, help="about how long one sample lasts")
  p.add_argument("--time-budget-s", type=float, default=0,
                 help="skip parts estimated to end later than this (0: no limit)")
  p.add_argument("--torch-compile-mode", default="default",
                 help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
  p.add_argument("--torch-compile-backend", default="inductor")
  p.add_argument("--copy-mib", type=int, default=2048, help="buffer of the bandwidth copy")
  p.add_argument("--matmul-size", type=int, default=8192)
  p.add_argument("--peak-flops", type=float, default=0,
                 help="the chip's dense peak FLOP/s for MFU (default: poolformer_jax.chips)")
  p.add_argument("--tiny", action="store_true",
                 help="dry run: tiny models, images, batches and ceilings; torch.compile with "
                      "the aot_eager backend (no code generation)")
  p.add_argument("--out", default="gpu_benchmark.json", help="JSON path; the PNG goes next to it")
  p.set_defaults(channels_last=True, torch_compile_modes=harness.MODES)
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
  harness.check_out_dir(p, args.out)
  return args


def main(argv=None):
  args = parse_args(argv)
  budget = harness.Budget(args.time_budget_s)
  device, results = harness.start(args, __doc__.split("\n\n")[0])
  results["notes"] = NOTES
  if args.peak_flops:
    results.update(peak_flops=args.peak_flops, peak_flops_source="--peak-flops")
  elif results["peak_flops"] is None and args.tiny:
    results.update(peak_flops=1e12,
                   peak_flops_source="nominal 1e12 (--tiny on a chip without a known peak)")
  harness.log(f"peak {results['peak_flops']} FLOP/s ({results['peak_flops_source']}); time "
              "budget " + (f"{args.time_budget_s:.0f} s" if args.time_budget_s else "none"))
  measure_ceilings(args, device, results)
  save(results, args.out, budget)
  harness.run_parts(args, device, budget, results, lambda r: save(r, args.out, budget))
  results["complete"] = True
  png = save(results, args.out, budget)
  harness.log(f"wrote {args.out} and {png}\n\n{harness.table(results)}")


if __name__ == "__main__":
  main()
