"""The README's "Will it fit, and how fast can it go?" table, from compile mode, row by row.

  python benchmarks/tpu_fit_table.py --out benchmarks/results/tpu_fit.json

For each (variant, Cloud TPU slice) it runs `main.py --mode=compile` with the ImageNet recipe
(`configs/imagenet.py:VARIANT`, global batch 4096) in a fresh process, one at a time (each
compile takes minutes of one core and GBs of memory). Where the recipe's batch does not fit
in one step it keeps the global batch and raises `grad_accum_steps` (2, 4, 8, ...: the same
updates in smaller micro-batches) until it fits, and records what the first try needed.
Writes the JSON (every compile mode report) and, next to it, the markdown table; needs
libtpu (requirements-tpu.txt), no TPU. `--table-only` rewrites the table from the JSON. Rows
already in the JSON are kept, not compiled again (so an interrupted run resumes where it stopped);
`--recompile` compiles them afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from poolformer_jax import measure  # pylint: disable=g-import-not-at-top,wrong-import-position

# One S-size and one M-size model of each MetaFormer baselines family.
BASELINES = ("poolformerv2_s12", "poolformerv2_m36", "identityformer_s12", "identityformer_m36",
             "randformer_s12", "randformer_m36", "convformer_s18", "convformer_m36",
             "caformer_s18", "caformer_m36")
ROWS = ([(v, "v4-8") for v in ("s12", "s24", "s36", "m36", "m48")]
        + [(v, t) for t in ("v5e-8", "v5p-8") for v in ("s12", "m48")]
        + [(v, t) for t in ("v4-8", "v5e-8") for v in BASELINES])
MAX_ACCUM = 64


def compile_report(variant: str, topology: str, workdir: str, **overrides) -> dict:
  """`main.py --mode=compile` for `configs/imagenet.py:VARIANT` with `--config.KEY=VALUE` for each
  override, in a fresh process: its JSON report, or {'error': its error line}."""
  cmd = [sys.executable, str(REPO / "main.py"), "--mode=compile",
         f"--config={REPO / 'configs' / 'imagenet.py'}:{variant}", f"--config.topology={topology}",
         *(f"--config.{k}={v}" for k, v in overrides.items()), f"--workdir={workdir}"]
  out, seconds = measure.stopwatch(
      lambda: subprocess.run(cmd, capture_output=True, text=True, cwd=REPO))
  if out.returncode == 0:
    with open(os.path.join(workdir, f"compile_{topology}.json")) as f:
      return {**json.load(f), "wall_s": round(seconds, 1)}
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  if not errors:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return {"error": errors[-1], "wall_s": round(seconds, 1)}


def fit_row(variant: str, topology: str) -> dict:
  """Compiles at grad_accum_steps 1, then at the power of two that the HBM shortfall calls
  for (activations scale with the micro-batch), doubling again until it fits."""
  tries = []
  accum = 1
  while accum <= MAX_ACCUM:
    with tempfile.TemporaryDirectory() as workdir:
      result = compile_report(variant, topology, workdir, grad_accum_steps=accum)
    tries.append({"grad_accum_steps": accum, **result})
    print(f"  {variant} {topology} grad_accum_steps={accum}: "
          + (result["error"] if "error" in result else "fits"), flush=True)
    if "error" not in result or "does not fit" not in result["error"]:
      break
    m = re.search(r"needs (?:more than )?([\d.]+) GiB .*has ([\d.]+) GiB", result["error"])
    shortfall = float(m.group(1)) / float(m.group(2)) if m else 2.0
    accum *= 2 ** max(1, math.ceil(math.log2(shortfall * 1.1)))
  return {"variant": variant, "topology": topology, "tries": tries}


def _needed(error: str) -> str:
  """'more than 49.9 GiB' / '40.1 GiB' from a compile mode error line."""
  m = re.search(r"it needs ((?:more than )?[\d.]+ GiB)", error)
  return m.group(1) if m else "?"


def markdown(rows: list[dict]) -> str:
  lines = [
      "| model | slice | images per chip and step | peak HBM per chip | fits | MB / image | "
      "GFLOP / image | roofline img/s/chip | img/s per host vCPU needed | hosts feed img/s/chip "
      "| recipe, hours (at least) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    first, last = row["tries"][0], row["tries"][-1]
    name = row["variant"] if "_" in row["variant"] else f"poolformer_{row['variant']}"
    if "error" in last:
      lines.append(f"| {name} | {row['topology']} | | needs {_needed(last['error'])} | no "
                   f"(not even with grad_accum_steps={last['grad_accum_steps']}) | | | | | | |")
      continue
    train = last["steps"]["train"]
    k = last["grad_accum_steps"]
    per_chip = train["images_per_chip"]
    batch = f"{per_chip}" if k == 1 else f"{per_chip} ({k} x {per_chip // k})"
    fits = "yes" if k == 1 else (f"with grad_accum_steps={k} (in one step: needs "
                                 f"{_needed(first['error'])})")
    needed = last["host"]["images_per_s_per_vcpu_needed"]
    fed = last["host"]["input_bound_images_per_s_per_chip"]
    roofline = train["img_per_s_per_chip_bound"]
    hours = last["recipe"]["hours_bound"]
    lines.append(
        f"| {name} | {row['topology']} | {batch} | {train['peak_hbm_bytes'] / 2**30:.1f} of "
        f"{last['hbm_bytes'] / 2**30:.0f} GiB | {fits} | {train['bytes_per_image'] / 1e6:.0f} | "
        f"{train['flops_per_image'] / 1e9:.1f} | {roofline:,.0f} | {needed:,.0f} | "
        + (f"**{fed:,.0f} (input-bound)**" if fed < roofline else f"{fed:,.0f}")
        + f" | {hours:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/tpu_fit.json")
  parser.add_argument("--rows", nargs="*", help="VARIANT:TOPOLOGY (default: the README's)")
  parser.add_argument("--table-only", action="store_true",
                      help="rewrite the markdown table from --out's JSON, compiling nothing")
  parser.add_argument("--recompile", action="store_true",
                      help="compile rows that --out's JSON already holds again")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  done = json.loads(out.read_text())["rows"] if out.exists() else []
  if args.table_only:
    write_table(out, done)
    return
  rows = ROWS if not args.rows else [tuple(r.split(":")) for r in args.rows]
  if args.recompile:
    done = [r for r in done if (r["variant"], r["topology"]) not in rows]
  out.parent.mkdir(parents=True, exist_ok=True)
  for variant, topology in rows:
    if any((r["variant"], r["topology"]) == (variant, topology) for r in done):
      continue
    done.append(fit_row(variant, topology))
    # The command that makes every row from scratch (rows may come from several resumed runs).
    out.write_text(json.dumps({"command": REPRODUCE, "rows": done}, indent=2))
  write_table(out, done)


REPRODUCE = "python benchmarks/tpu_fit_table.py --recompile"


def write_table(out: pathlib.Path, rows: list[dict]) -> None:
  """The markdown table next to the JSON, rows in ROWS' order (then any others)."""
  order = {row: i for i, row in enumerate(ROWS)}
  rows = sorted(rows, key=lambda r: order.get((r["variant"], r["topology"]), len(order)))
  table = markdown(rows)
  out.with_suffix(".md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
