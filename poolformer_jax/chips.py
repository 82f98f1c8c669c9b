"""The accelerators' published per-chip figures: one table for MFU, compile mode and benchmarks.

Peak FLOP/s are dense bfloat16 (no sparsity). For TPUs also the TPU VM of a full host (vCPUs,
chips), which says how many host cores feed each chip. v4 and v5p chips hold two TensorCores
that JAX drives as one device ("megacore"); v5e and v6e chips have one. Either way: one JAX
device per chip.
"""

from __future__ import annotations

import dataclasses

GiB, MiB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's per-chip peak figures, as its maker publishes them."""

  name: str
  device_kind: str  # What JAX's devices call it (a prefix of it for GPUs).
  peak_flops: float  # Dense bfloat16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.
  hbm_bytes: float
  source: str
  host_vcpus: int | None = None  # TPUs: vCPUs of the TPU VM of a full host...
  host_chips: int | None = None  # ...which holds this many chips.
  vmem_bytes: int | None = None  # TPUs: the vector memory of each TensorCore (Pallas blocks).

  @property
  def vcpus_per_chip(self) -> float | None:
    return self.host_vcpus / self.host_chips if self.host_vcpus and self.host_chips else None


_TPU_DOCS = "https://cloud.google.com/tpu/docs/"
_NVIDIA = "https://www.nvidia.com/en-us/data-center/"
# TPU HBM as the docs give it ("16 GB" is 16 GiB of HBM2). XLA refuses to compile a program
# that needs more than it can use, a little less (e.g. 15.75 GiB of a v5e's 16). The TPU VM of
# each generation (vCPUs, chips) from the same page's VM / host properties: v4 240 vCPUs and 4
# chips, v5e 224 and 8 (ct5lp-hightpu-8t), v5p 208 and 4, v6e 180 and 8 (ct6e-standard-8t).
# VMEM per TensorCore from JAX's Pallas TPU hardware reference (`pltpu.get_tpu_info_for_chip`).
# GPUs: the SXM parts' datasheets (HBM in the datasheet's GB, 10^9 bytes; bandwidth in TB/s);
# a PCIe card of the same name has lower figures.
CHIPS = {
    "v4": Chip("TPU v4", "TPU v4", 275e12, 1200e9, 32 * GiB, _TPU_DOCS + "v4", 240, 4,
               16 * MiB),
    "v5e": Chip("TPU v5e", "TPU v5 lite", 197e12, 819e9, 16 * GiB, _TPU_DOCS + "v5e", 224, 8,
                128 * MiB),
    "v5p": Chip("TPU v5p", "TPU v5", 459e12, 2765e9, 95 * GiB, _TPU_DOCS + "v5p", 208, 4,
                64 * MiB),
    "v6e": Chip("TPU v6e", "TPU v6 lite", 918e12, 1638e9, 32 * GiB, _TPU_DOCS + "v6e", 180, 8,
                128 * MiB),
    "h100": Chip("NVIDIA H100 SXM", "NVIDIA H100", 989e12, 3.35e12, 80e9, _NVIDIA + "h100/"),
    "h200": Chip("NVIDIA H200 SXM", "NVIDIA H200", 989e12, 4.8e12, 141e9, _NVIDIA + "h200/"),
    "a100": Chip("NVIDIA A100 SXM 80GB", "NVIDIA A100", 312e12, 2.039e12, 80e9,
                 _NVIDIA + "a100/"),
}


def chip_of(device) -> Chip | None:
  """The table's row for a JAX device (None for CPUs and chips not listed).

  Matched by the longest prefix of the device's kind among the chips' kinds and names, so
  "TPU v5 lite" is a v5e, not a v5p ("TPU v5").
  """
  kind = getattr(device, "device_kind", "")
  prefixes = [(p, chip) for chip in CHIPS.values() for p in (chip.device_kind, chip.name)]
  matches = [(len(p), chip) for p, chip in prefixes if kind.startswith(p)]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def peak_flops(device) -> float | None:
  """The device's dense bf16 peak FLOP/s, for MFU (None where the table has no figure)."""
  chip = chip_of(device)
  return chip.peak_flops if chip else None
