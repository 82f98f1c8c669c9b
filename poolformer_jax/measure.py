"""What a compiled program costs, how long something took, and how a duration is printed.

One reader of XLA's cost analysis for everything that reports FLOPs, MFU or bytes: the
trainer, compile mode and the benchmarks.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
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


_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.*?) (all-reduce|all-gather|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")
# A reduce-scatter that XLA:TPU writes as a fusion of an all-reduce and a slice.
_FUSED_REDUCE_SCATTER = re.compile(
    r"^\s*(?:ROOT )?%[\w.-]+ = (.*?) fusion\(.*calls=%all-reduce-scatter")
_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16)\[([0-9,]*)\]")


def collective_bytes(compiled) -> dict[str, int]:
  """Bytes of the results of each kind of collective in a compiled program, per device and
  call, read from its optimized HLO (XLA's cost analysis has no such count): what the
  all-reduces, all-gathers and reduce-scatters produce, not what crosses the wire (a ring
  all-reduce over n devices moves 2 (n - 1) / n of it)."""
  totals = collections.Counter()
  for line in compiled.as_text().splitlines():
    match = _COLLECTIVE.match(line)
    kind = match and match.group(2)
    if not match:
      match, kind = _FUSED_REDUCE_SCATTER.match(line), "reduce-scatter"
    if not match:
      continue
    for dtype, dims in _ARRAY.findall(match.group(1)):
      bits = 8 if dtype == "pred" else int(dtype.lstrip("bsfu") or 16)
      totals[kind] += bits // 8 * math.prod(int(d) for d in dims.split(",") if d)
  return dict(totals)


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
