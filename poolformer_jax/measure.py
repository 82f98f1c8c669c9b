"""What a compiled program costs, how long something took, and how a duration is printed.

One reader of XLA's cost analysis for everything that reports FLOPs, MFU or bytes: the
trainer, compile mode and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class Cost:
  """XLA's count of one call of a program (None where it has none)."""

  flops: float | None
  bytes_accessed: float | None

  def per(self, n: int) -> Cost:
    """Per image (or any unit) of `n` per call."""
    return Cost(*(v / n if v is not None else None for v in (self.flops, self.bytes_accessed)))


def program_cost(stage, loop_trips: int = 1) -> Cost:
  """XLA's cost analysis of a Lowered or Compiled stage.

  `loop_trips`: XLA counts a while-loop's body once, so a program that runs its body K times
  (gradient accumulation) costs K of what it reports (its work outside the loop, such as an
  optimizer update, is then counted K times too). `cost_analysis()` gives a dict, a list of
  dicts on some versions, and None or an error on backends without it.
  """
  try:
    cost = stage.cost_analysis()
  except Exception:  # Not every backend or version implements it.  pylint: disable=broad-except
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}

  def read(key):
    value = cost.get(key)
    return float(value) * loop_trips if value and value > 0 else None

  return Cost(flops=read("flops"), bytes_accessed=read("bytes accessed"))


def stopwatch(fn):
  """(fn(), seconds it took)."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def duration(seconds: float) -> str:
  """'3m05s' below an hour, '41h17m' above: what a person reads at a glance."""
  h, rem = divmod(int(seconds), 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
