"""What a run reports: `WORKDIR/metrics.jsonl`, TensorBoard events, and the console.

`metrics.jsonl` holds one JSON object per logged step ({"step", "loss", "lr", ..., "img/s/chip",
"step_time", "eta_s", "mfu"} for training, {"step", "eval/top1", "eval/top5", "eval/loss"} for
evaluations), so runs can be compared by scripts. Only process 0 writes; paths may be gs://.

Not clu: `clu.metric_writers` would replace the three TensorBoard calls below but not
metrics.jsonl (and its truncation on resume), and `clu.periodic_actions.ReportProgress` reports
steps/s and an ETA but not images/s per chip or MFU, so it would add a dependency, not remove code.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from etils import epath
import jax

from poolformer_jax import measure

class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    if not self.active:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    # TensorFlow's event writer: only training imports it, and training reads data with TF.
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
    self._tb = tensorboard.SummaryWriter(f"{workdir}/tensorboard")

  def _truncate_after(self, step: int) -> None:
    """On resume, drops records logged after the restored step (they will be logged again).

    Also drops a torn last line (the process was killed mid-write).
    """
    if not self.path.exists():
      return
    lines = [line for line in self.path.read_text().splitlines(keepends=True) if line.strip()]
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
      tmp = self.path.with_name(self.path.name + ".tmp")
      tmp.write_text("".join(kept))
      tmp.replace(self.path)

  def write(self, step: int, record: dict) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def host_memory_mb() -> float | None:
  """This process's resident memory (Linux), for spotting leaks in long runs."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    return None


def _plain(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the record readable by any parser.
  return value


class Throughput:
  """Images/s per chip, step time, ETA and MFU over the interval since the last report."""

  def __init__(self, *, batch_size: int, num_devices: int, total_steps: int,
               flops_per_step: float | None, peak: float | None):
    self.batch_size, self.num_devices, self.total_steps = batch_size, num_devices, total_steps
    self.flops_per_step, self.peak = flops_per_step, peak
    self.reset(0)

  def reset(self, step: int) -> None:
    self._t0, self._step0 = time.perf_counter(), step

  def report(self, step: int) -> dict:
    elapsed = time.perf_counter() - self._t0
    steps = step - self._step0
    if steps <= 0 or elapsed <= 0:
      return {}
    step_time = elapsed / steps
    out = {
        "img/s/chip": self.batch_size / step_time / self.num_devices,
        "step_time": step_time,
        "eta_s": step_time * max(self.total_steps - step, 0),
        "mfu": (self.flops_per_step / step_time / self.peak
                if self.flops_per_step and self.peak else None),
        "host_memory_mb": host_memory_mb(),
    }
    self.reset(step)
    return out


def format_progress(step: int, total: int, record: dict) -> str:
  """One console line: 'step 120/600 (20%) | loss 0.53 | lr 1.0e-03 | 812 img/s/chip | ...'."""
  parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
  for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}")):
    if key in record:
      parts.append(f"{key} {fmt.format(record[key])}")
  if "img/s/chip" in record:
    parts.append(f"{record['img/s/chip']:.0f} img/s/chip")
    parts.append(f"{record['step_time'] * 1e3:.0f} ms/step")
    if record.get("mfu") is not None:
      parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"ETA {measure.duration(record['eta_s'])}")
  return " | ".join(parts)


def log(message: str) -> None:
  if jax.process_index() == 0:
    logging.info(message)
