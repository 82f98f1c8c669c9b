"""Settings that make our programs faster on a host CPU (XLA:CPU). Accelerators are untouched.

Each is measured with `benchmarks/benchmark.py` (PoolFormer-S12, float32, 2 cores):

* Huge pages for malloc. XLA:CPU takes each execution's buffers (~1 GB for an S12 training
  step at batch 16) from malloc, which maps them fresh from the kernel and unmaps them after:
  with 4 KiB pages, ~200k page faults and ~0.3 s of kernel time per training step. glibc's
  `glibc.malloc.hugetlb=1` tunable backs those mappings with 2 MiB transparent huge pages
  (kernel THP mode `madvise` or `always`): a few hundred faults. Training +4-7%, inference
  +6-15%. glibc reads tunables only at start-up, so the entry points re-execute themselves
  once with it set.
* Forward-only programs (inference, evaluation) compiled without XLA's YNNPACK fusions:
  +7-8% images/s. Training steps keep them: without, a step ran 1.7x slower.

Neither changes results beyond float32 rounding: huge pages only move memory, and the forward
options are tested against the default compile (tests/test_cpu_tuning.py) and, through
`inference.predict`, against HF's PyTorch model.
"""

from __future__ import annotations

import os
import sys

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb"
_FORWARD_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def reexec_with_malloc_hugepages() -> None:
  """Re-executes this process (same argv) with `glibc.malloc.hugetlb=1` unless already set.

  Call it first thing in an entry point, before JAX starts. Returns without doing anything
  off Linux or when GLIBC_TUNABLES already names the tunable, with any value (so
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts out).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if not sys.platform.startswith("linux") or HUGEPAGES_TUNABLE in tunables:
    return
  env = dict(os.environ,
             GLIBC_TUNABLES=":".join(t for t in (tunables, f"{HUGEPAGES_TUNABLE}=1") if t))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def forward_compiler_options(platform: str) -> dict[str, str] | None:
  """`compiler_options` for a forward-only program compiled for `platform` (a device's
  `.platform`, e.g. of the mesh it runs on): the CPU options above, else None.

  Decided by the devices compiled for, not by the process's default backend: a TPU program
  compiled ahead of time on a CPU host must not get XLA:CPU's options.
  """
  return dict(_FORWARD_CPU_OPTIONS) if platform == "cpu" else None
