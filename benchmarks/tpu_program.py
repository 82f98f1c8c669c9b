"""How lean is the TPU program? S12's train and eval steps on a v4-8, measured by compile mode.

  python benchmarks/tpu_program.py --label "what changed" --out benchmarks/results/tpu_program.json

Compiles `configs/imagenet.py:s12` for a v4-8 (4 chips) at 1024 and 256 images per chip
(global batch 4096 and 1024) with `main.py --mode=compile`, one fresh process at a time, and
appends one row (this checkout's commit, the label, XLA's figures per image and per chip) to
the JSON; then rewrites the markdown table next to it from all rows. Run it on successive
commits to get a before/after table per change. Needs libtpu, no TPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import tempfile

import tpu_fit_table  # benchmarks/, first on sys.path when this script runs.

REPO = pathlib.Path(__file__).resolve().parents[1]
PER_CHIP = (1024, 256)
CHIPS = 4  # v4-8


def compile_s12(per_chip: int) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    report = tpu_fit_table.compile_report("s12", "v4-8", workdir, batch_size=per_chip * CHIPS,
                                          eval_batch_size=per_chip * CHIPS)
  if "error" in report:
    raise RuntimeError(f"s12 at {per_chip} per chip: {report['error']}")
  return report


def row(label: str, commit: str | None) -> dict:
  commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=REPO).stdout.strip()
  result = {"commit": commit, "label": label}
  for per_chip in PER_CHIP:
    report = compile_s12(per_chip)
    for step in ("train", "eval"):
      s = report["steps"][step]
      result[f"{step}_{per_chip}"] = {
          "bytes_per_image": s["bytes_per_image"], "flops_per_image": s["flops_per_image"],
          "peak_hbm_bytes": s["peak_hbm_bytes"], "img_per_s_per_chip_bound":
          s["img_per_s_per_chip_bound"], "compile_s": s["compile_s"]}
    print(f"{label}: {per_chip}/chip done", flush=True)
  return result


def markdown(rows: list[dict]) -> str:
  head = ["change (commit)"]
  for per_chip in PER_CHIP:
    head += [f"train {per_chip}/chip: MB/img", "GFLOP/img", "peak HBM GiB",
             "roofline img/s/chip"]
  for per_chip in PER_CHIP:
    head += [f"eval {per_chip}/chip: MB/img"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['label']} ({r['commit']})"]
    for per_chip in PER_CHIP:
      t = r[f"train_{per_chip}"]
      cells += [f"{t['bytes_per_image'] / 1e6:.1f}", f"{t['flops_per_image'] / 1e9:.2f}",
                f"{t['peak_hbm_bytes'] / 2**30:.1f}", f"{t['img_per_s_per_chip_bound']:,.0f}"]
    for per_chip in PER_CHIP:
      cells += [f"{r[f'eval_{per_chip}']['bytes_per_image'] / 1e6:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", required=True)
  parser.add_argument("--out", default=str(REPO / "benchmarks/results/tpu_program.json"))
  parser.add_argument("--commit", help="the commit measured, for a checkout without .git")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  rows = json.loads(out.read_text())["rows"] if out.exists() else []
  rows.append(row(args.label, args.commit))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": "python benchmarks/tpu_program.py --label LABEL",
                             "rows": rows}, indent=2))
  out.with_suffix(".md").write_text(markdown(rows) + "\n")
  print(markdown(rows))


if __name__ == "__main__":
  main()
