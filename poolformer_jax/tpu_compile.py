"""Compile mode: will a config fit on a Cloud TPU slice, and how fast can it go?

  python main.py --mode=compile --config=configs/imagenet.py:s12 --config.topology=v4-8

runs on any machine with libtpu installed (`pip install -r requirements-tpu.txt`), no TPU
needed: JAX compiles for a TPU topology ahead of time (`jax.experimental.topologies`). The
mesh is laid over that topology's devices and handed to the same `train.Trainer` that trains,
so what gets compiled is the program a run would execute: the real train and eval steps
with their shardings, donation, gradient accumulation, FSDP and remat. XLA's analyses of it
give the peak HBM per chip (does it fit?), and FLOPs and bytes accessed per chip-step, which
with the chip's peak FLOP/s and HBM bandwidth bound the speed from above (the roofline) and
the wall time of the whole recipe from below.

XLA's cost analysis counts a loop body once: with `grad_accum_steps=K` the figures are those
of one micro-batch step (plus the optimizer update), and a step costs K of them (the update
is then counted K times, about 1% too much for PoolFormer).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re

from etils import epath  # An Orbax dependency: local and gs:// paths alike.
import jax

from poolformer_jax import chips as chips_lib
from poolformer_jax import dataset_info
from poolformer_jax import errors
from poolformer_jax import measure

# The host pipeline's training images/s on one vCPU: benchmarks/pipeline.py's
# Dataset.train_iterator figure with the recipe's settings, RandAugment on the host
# (benchmarks/results/pipeline_cpu.json: one core of a 2-core AMD EPYC, ImageNet-sized JPEGs).
# --config.host_images_per_s_per_vcpu gives the real host's.
HOST_IMAGES_PER_S_PER_VCPU = 196.0

# Slice shapes (chips along each axis) by chip count, as the Cloud TPU docs list them.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
# generation: (libtpu's topology prefix, accelerator-type count is TensorCores (2 per chip)?)
_GENERATIONS = {"v4": ("v4", True), "v5p": ("v5", True), "v5e": ("v5e", False),
                "v6e": ("v6e", False)}
_ALIASES = {"v5litepod": "v5e"}  # Cloud's accelerator-type name for v5e.


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice by its accelerator type, e.g. `v4-8` (4 chips) or `v5e-16`."""

  name: str
  generation: str
  shape: tuple[int, ...]  # Chips along each axis.
  host_shape: tuple[int, int, int]  # Chips per host along each axis.

  @property
  def chip(self) -> chips_lib.Chip:
    return chips_lib.CHIPS[self.generation]

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_hosts(self) -> int:
    return self.num_chips // math.prod(self.host_shape)

  @property
  def libtpu_name(self) -> str:
    return f"{_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"


def known_topologies() -> list[str]:
  names = []
  for gen, (_, per_core) in _GENERATIONS.items():
    shapes = _SHAPES_3D if per_core else _SHAPES_2D
    names += [f"{gen}-{n * 2 if per_core else n}" for n in shapes]
  return names


def parse_topology(name: str) -> Topology:
  """`v4-8` -> 4 chips in a 2x2x1 slice on one host; raises ValueError listing valid names.

  As in Cloud's accelerator types, the count is TensorCores for v4 and v5p (two per chip)
  and chips for v5e and v6e.
  """
  gen, _, count = name.partition("-")
  gen = _ALIASES.get(gen, gen)
  if gen in _GENERATIONS and count.isdigit():
    per_core = _GENERATIONS[gen][1]
    chips = int(count) // 2 if per_core else int(count)
    shapes = _SHAPES_3D if per_core else _SHAPES_2D
    if chips in shapes and (not per_core or int(count) % 2 == 0):
      shape = shapes[chips]
      if per_core:  # Hosts of 2x2x1 chips.
        host = (2, 2, 1)
      else:  # Hosts of up to 8 chips (2x4).
        host = (2, 4, 1) if chips >= 8 else shape + (1,)
      return Topology(f"{gen}-{count}", gen, shape, host)
  raise ValueError(f"unknown TPU topology {name!r}; use an accelerator type such as "
                   f"{', '.join(known_topologies())}")


# ---------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------


def prepare_environment(topology: Topology) -> None:
  """Before JAX starts a backend: this process computes on its CPU and only compiles for TPU.

  libtpu then never opens a local TPU (one may be busy training), takes no lock on it, does
  not ask the GCE metadata server what machine this is (which stalls off Google Cloud), and
  does not warn that it cannot tell. None of these changes the compiled program.

  JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, common on TPU VMs) is off:
  it would store these programs for devices this process does not have, and cannot load them
  back without a TPU client (each later lookup warned and compiled again).
  """
  jax.config.update("jax_enable_compilation_cache", False)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  jax.config.update("jax_platforms", "cpu")


def machine_has_tpu() -> bool:
  """Whether this machine may have TPU chips: their device files (/dev/accel* up to v5e,
  VFIO groups /dev/vfio/<n> on v5p, v6e and later). Without them libtpu cannot open a TPU."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `topology`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  megacore = _GENERATIONS[topology.generation][1]
  try:
    desc = topologies.get_topology_desc(
        topology.libtpu_name, "tpu", chip_config_name="megacore" if megacore else "default",
        chips_per_host_bounds=topology.host_shape, num_slices=num_slices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise errors.ConfigError(
          "compile mode needs libtpu to compile for TPUs (no TPU is needed): "
          "pip install -r requirements-tpu.txt") from None
    raise
  return list(desc.devices)


# ---------------------------------------------------------------------------
# Compile and measure.
# ---------------------------------------------------------------------------

def _step_report(compiled, *, images_per_chip: int, repeats: int, chip: chips_lib.Chip,
                 compile_s: float) -> dict:
  """Memory and cost of one compiled step per chip; `repeats` micro-batches per step."""
  memory = compiled.memory_analysis()
  cost = measure.program_cost(compiled, loop_trips=repeats)
  peak = memory.peak_memory_in_bytes or (
      memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
  flops, nbytes = cost.flops, cost.bytes_accessed
  compute_s, memory_s = flops / chip.peak_flops, nbytes / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  images = images_per_chip * repeats
  return {
      "images_per_chip": images,
      "peak_hbm_bytes": int(peak),
      "flops": flops,
      "bytes_accessed": nbytes,
      "flops_per_image": flops / images,
      "bytes_per_image": nbytes / images,
      "step_s_bound": step_s,
      "bound_by": "HBM bandwidth" if memory_s >= compute_s else "compute",
      "img_per_s_per_chip_bound": images / step_s,
      "compile_s": round(compile_s, 1),
      # Per call; a gradient-accumulation loop's body counted once.
      "collective_bytes": measure.collective_bytes(compiled),
  }


def _hosts(devices) -> set[tuple[int, int]]:
  """The hosts that `devices` live on: process indices restart at 0 in every slice."""
  return {(getattr(d, "slice_index", 0), d.process_index) for d in devices}


def _xla_out_of_memory(e: Exception) -> tuple[float, float] | None:
  """(GiB needed, GiB available) when `e` is XLA refusing a program larger than HBM."""
  m = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
  m = m or re.search(r"Used ([\d.]+)G of ([\d.]+)G hbm", str(e))
  return (float(m.group(1)), float(m.group(2))) if m else None


def _knobs(config, num_chips: int) -> str:
  per_chip = config.batch_size // config.grad_accum_steps // num_chips
  return (f"now {per_chip} images per chip and micro-batch: --config.batch_size="
          f"{config.batch_size} --config.grad_accum_steps={config.grad_accum_steps} "
          f"--config.fsdp={config.fsdp} --config.remat={config.remat}"
          + (f" --config.remat_stages='{tuple(config.remat_stages)}'"
             if config.remat and config.get("remat_stages") else ""))


def compile_report(config) -> dict:
  """Compiles the train and eval steps of `config` for `config.topology`; the measurements.

  Raises errors.ConfigError for a config that cannot work there (including one that does not
  fit in HBM) and when libtpu is missing.
  """
  from poolformer_jax import train  # pylint: disable=g-import-not-at-top

  try:
    topology = parse_topology(config.topology)
  except ValueError as e:
    raise errors.ConfigError(f"config.topology: {e}") from None
  if config.num_slices < 1:
    raise errors.ConfigError(f"config.num_slices={config.num_slices} must be >= 1")
  chip = topology.chip
  devices = topology_devices(topology, config.num_slices)
  hosts = _hosts(devices)
  known = dataset_info.KNOWN.get(config.data.dataset)
  if known is None:  # The epoch size stays unknown (0): so does the recipe's time.
    if not config.num_classes:
      raise errors.ConfigError(f"compile mode does not read the data: set --config.num_classes "
                               f"for dataset {config.data.dataset!r}")
    known = dataset_info.DatasetInfo(config.num_classes, 0, 0)
  run = train.setup(config, None, (), devices=devices, process_count=len(hosts), info=known)
  config, mesh, steps_per_epoch, total_steps = (run.config, run.mesh, run.steps_per_epoch,
                                                run.total_steps)
  num_classes, eval_examples = known.num_classes, known.num_eval_examples
  trainer = train.Trainer(config, mesh, num_classes, max(steps_per_epoch, 1),
                          max(total_steps, 1))

  accum = config.grad_accum_steps

  def does_not_fit(needed: str, available: str) -> errors.ConfigError:
    return errors.ConfigError(
        f"{config.model} does not fit on {topology.name}: it needs {needed}, a {chip.name} "
        f"has {available}. Lower the memory per chip ({_knobs(config, len(devices))}"
        "): a smaller per-chip batch, more grad_accum_steps (same global batch), fsdp > 1 "
        "(parameters and optimizer state sharded), remat=True (activations recomputed)")

  try:
    train_step, train_s = measure.stopwatch(trainer.compile_train_step)
    eval_step, eval_s = measure.stopwatch(trainer.compile_eval_step)
  except Exception as e:  # pylint: disable=broad-except
    verdict = _xla_out_of_memory(e)
    if verdict is None:
      raise
    raise does_not_fit(f"more than {verdict[0]:.1f} GiB of HBM per chip (XLA's count of its "
                       "temporaries alone)", f"{verdict[1]:.1f} GiB usable") from None
  n = len(devices)
  steps = {
      "train": _step_report(train_step, images_per_chip=config.batch_size // accum // n,
                            repeats=accum, chip=chip, compile_s=train_s),
      "eval": _step_report(eval_step, images_per_chip=config.eval_batch_size // n, repeats=1,
                           chip=chip, compile_s=eval_s),
  }
  steps["train"]["augmentation"] = _augmentation_report(trainer, config.batch_size // accum // n)
  peak = max(s["peak_hbm_bytes"] for s in steps.values())
  host = _host_report(chip, steps["train"], config.get("host_images_per_s_per_vcpu", 0.0)
                      or HOST_IMAGES_PER_S_PER_VCPU)
  report = {
      "topology": topology.name,
      "num_slices": config.num_slices,
      "chip": dataclasses.asdict(chip),
      "chips": n,
      "hosts": len(hosts),
      "mesh": dict(mesh.shape),
      "mesh_devices": int(mesh.devices.size),
      "mesh_processes": len(_hosts(mesh.devices.flat)),
      "model": config.model,
      "params": trainer.num_params,
      "num_classes": num_classes,
      "dtype": config.dtype,
      "batch_size": config.batch_size,
      "grad_accum_steps": accum,
      "eval_batch_size": config.eval_batch_size,
      "fsdp": config.fsdp,
      "remat": bool(config.remat),
      "remat_stages": list(config.get("remat_stages", ())) if config.remat else [],
      "image_size": config.data.image_size,
      "steps": steps,
      "peak_hbm_bytes": peak,
      "hbm_bytes": chip.hbm_bytes,
      "fits": peak <= chip.hbm_bytes,
      "host": host,
      "recipe": _recipe(config, total_steps, steps_per_epoch, eval_examples, steps, host, n),
  }
  if not report["fits"]:
    raise does_not_fit(f"{peak / chips_lib.GiB:.1f} GiB of HBM per chip",
                       f"{chip.hbm_bytes / chips_lib.GiB:.1f} GiB")
  return report


def _augmentation_report(trainer, images_per_chip: int) -> dict:
  """Bytes and FLOPs per image of the on-device augmentation (RandAugment, random erasing,
  normalisation), compiled on its own for the train step's per-chip batch: the train step's
  figures include it; this says how much of them it is."""
  from poolformer_jax import augment  # pylint: disable=g-import-not-at-top
  size = trainer.config.data.image_size
  n = trainer.mesh.devices.size
  images = jax.ShapeDtypeStruct((images_per_chip * n, size, size, 3), jax.numpy.uint8,
                                sharding=trainer.batch_sharding)
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = jax.jit(lambda k, x: augment.augment_batch(k, x, trainer.config.data),
                     out_shardings=trainer.batch_sharding).lower(key, images).compile()
  cost = measure.program_cost(compiled).per(images_per_chip)
  return {"bytes_per_image": cost.bytes_accessed or 0.0, "flops_per_image": cost.flops or 0.0}


def _host_report(chip: chips_lib.Chip, train: dict, measured: float) -> dict:
  """What the roofline asks of each host vCPU, against what this pipeline delivers per vCPU."""
  needed = train["img_per_s_per_chip_bound"] / chip.vcpus_per_chip
  return {
      "vcpus_per_host": chip.host_vcpus,
      "chips_per_host": chip.host_chips,
      "images_per_s_per_vcpu_needed": needed,
      "pipeline_images_per_s_per_vcpu": measured,
      "input_bound": needed > measured,
      # What the hosts can feed each chip when every vCPU runs the pipeline.
      "input_bound_images_per_s_per_chip": measured * chip.vcpus_per_chip,
  }


def _recipe(config, total_steps, steps_per_epoch, eval_examples, steps, host, chips) -> dict:
  """Lower bound of the recipe's wall time on the slice: every step at its roofline bound, or
  at the rate the hosts can feed where that is lower (input-bound)."""
  step_s = steps["train"]["step_s_bound"]
  if host["input_bound"]:
    step_s = config.batch_size / (host["input_bound_images_per_s_per_chip"] * chips)
  train_h = total_steps * step_s / 3600 if total_steps else None
  eval_every = config.eval_every_steps or steps_per_epoch
  if train_h is None or not eval_every or not eval_examples:
    eval_h = 0.0
  else:
    evals = math.ceil(total_steps / eval_every)
    eval_steps = math.ceil(eval_examples / config.eval_batch_size)
    eval_h = evals * eval_steps * steps["eval"]["step_s_bound"] / 3600
  return {
      "steps": total_steps,
      "steps_per_epoch": steps_per_epoch,
      "epochs": total_steps / steps_per_epoch if steps_per_epoch else None,
      "train_hours_bound": train_h,
      "eval_hours_bound": eval_h,
      "hours_bound": None if train_h is None else train_h + eval_h,
  }


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _si(x: float, unit: str) -> str:
  """11.3e12, 'FLOP' -> '11.3 TFLOP'."""
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if x >= factor:
      return f"{x / factor:.1f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


def _binary(n: float) -> str:
  return f"{n / chips_lib.GiB:.1f} GiB" if n >= chips_lib.GiB else f"{n / 2**20:.0f} MiB"


def format_report(r: dict) -> str:
  """The console table (GitHub markdown) with the lines that explain it."""
  chip = r["chip"]
  lines = [
      f"{r['model']} ({r['params']:,} params, {r['dtype']}) on {r['topology']}"
      + (f" x {r['num_slices']} slices" if r["num_slices"] > 1 else "")
      + f": {r['chips']} {chip['name']} chips, {r['hosts']} host(s), mesh "
      + " x ".join(f"{k}={v}" for k, v in r["mesh"].items()),
      f"batch {r['batch_size']} ({r['batch_size'] // r['chips']} per chip"
      + (f", {r['grad_accum_steps']} micro-batches" if r["grad_accum_steps"] > 1 else "")
      + f"), eval batch {r['eval_batch_size']}, fsdp {r['fsdp']}, remat {r['remat']}"
      + (f" (stages {', '.join(map(str, r['remat_stages']))})" if r.get("remat_stages") else ""),
      "",
      "| step | images/chip | peak HBM/chip | fits | FLOPs/chip-step | bytes/chip-step | "
      "bytes/image | roofline img/s/chip | bound by |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, st in r["steps"].items():
    spare = chip["hbm_bytes"] - st["peak_hbm_bytes"]
    fits = f"yes, {_binary(spare)} spare" if spare >= 0 else f"NO, {_binary(-spare)} over"
    lines.append(
        f"| {name} | {st['images_per_chip']} | {_binary(st['peak_hbm_bytes'])} of "
        f"{_binary(chip['hbm_bytes'])} | {fits} | {_si(st['flops'], 'FLOP')} | "
        f"{_si(st['bytes_accessed'], 'B')} | {_si(st['bytes_per_image'], 'B')} | "
        f"{st['img_per_s_per_chip_bound']:,.0f} | {st['bound_by']} |")
  aug = r["steps"]["train"].get("augmentation")
  if aug:
    train = r["steps"]["train"]
    lines.append(f"of which the on-device augmentation and normalisation "
                 f"(augment.augment_batch): {_si(aug['bytes_per_image'], 'B')} and "
                 f"{_si(aug['flops_per_image'], 'FLOP')} per image "
                 f"({aug['bytes_per_image'] / train['bytes_per_image']:.1%} of the bytes, "
                 f"{aug['flops_per_image'] / train['flops_per_image']:.1%} of the FLOPs)")
  collectives = r["steps"]["train"].get("collective_bytes")
  if collectives:
    lines.append("collectives of the train step per chip (the arrays they produce): " + ", ".join(
        f"{kind} {_si(n, 'B')}" for kind, n in sorted(collectives.items())))
  host = r.get("host")
  train_rate = r["steps"]["train"]["img_per_s_per_chip_bound"]
  if host:
    lines.append(
        f"host: a TPU VM has {host['vcpus_per_host']} vCPUs for {host['chips_per_host']} chips; "
        f"the train roofline needs {host['images_per_s_per_vcpu_needed']:,.0f} images/s per vCPU, "
        f"this input pipeline delivers {host['pipeline_images_per_s_per_vcpu']:,.0f} "
        "(measured per core, --config.host_images_per_s_per_vcpu)")
    if host["input_bound"]:
      lines.append(
          f"INPUT-BOUND: the hosts feed at most {host['input_bound_images_per_s_per_chip']:,.0f} "
          f"images/s per chip ({host['input_bound_images_per_s_per_chip'] / train_rate:.0%} of "
          "the roofline), fewer as the JAX runtime needs cores too; the recipe time below is at "
          "that rate")
  rec = r["recipe"]
  lines.append("")
  if rec["hours_bound"] is not None:
    epochs = f"{rec['epochs']:.1f} epochs, " if rec["epochs"] else ""
    hours = lambda key: measure.duration(3600 * rec[key])
    lines.append(f"recipe ({epochs}{rec['steps']:,} steps of {r['batch_size']}): at least "
                 f"{hours('hours_bound')} on this slice ({hours('train_hours_bound')} training + "
                 f"{hours('eval_hours_bound')} evaluation, every step at its "
                 + ("input-bound rate)" if host and host["input_bound"] else "roofline bound)"))
  else:
    lines.append("recipe time: unknown (the epoch size of this dataset is not known here; "
                 "set --config.total_steps)")
  lines.append(f"{chip['name']}: {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
               f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s and {_binary(chip['hbm_bytes'])} of "
               f"HBM per chip ({chip['source']})")
  return "\n".join(lines)


def report_path(workdir: str, r: dict) -> str:
  slices = f"_x{r['num_slices']}" if r["num_slices"] > 1 else ""
  return os.path.join(workdir, f"compile_{r['topology']}{slices}.json")


def run(config, workdir: str) -> dict:
  """Compile mode's entry point: compiles, prints the table, writes WORKDIR/compile_*.json."""
  if not config.topology:
    raise errors.ConfigError("--mode=compile needs --config.topology, e.g. "
                             f"--config.topology=v4-8 (known: {', '.join(known_topologies())})")
  try:
    prepare_environment(parse_topology(config.topology))
  except ValueError as e:
    raise errors.ConfigError(f"config.topology: {e}") from None
  report = compile_report(config)
  path = epath.Path(report_path(workdir, report))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2))
  print(format_report(report))
  print(f"wrote {path}")
  return report
