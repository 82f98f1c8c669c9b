"""Checked file lists for image-folder datasets: every file decoded once, before training.

An unreadable file in a folder dataset (a truncated download, an HTML error page saved as
.jpg) would stop a run when the pipeline reaches it, maybe hours in; skipping it there would
change that epoch and break exact resume. So every file is decoded once, up front, in parallel
and with the pipeline's own decoder (`tf.io.decode_image`: by content, whatever the extension;
CMYK JPEGs and 16-bit PNGs come out as 8-bit RGB). The files that decode are written to a
manifest, `<manifest_dir>/<split>.json` (the trainer uses WORKDIR/data_manifest); the input
pipeline then reads the manifest instead of the folder. A resumed run reuses it, so its epochs
are those of the first run even if the folder changed in between. Undecodable files are
reported (`<split>_bad_files.txt` beside the manifest) and left out, up to a configured
fraction of the split; beyond it the run stops before training, naming them.

With several processes each decodes an interleaved share of the files, the verdicts are
gathered, and process 0 writes the manifest (the workdir is shared, as checkpoints need).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf

from poolformer_jax import measure
from poolformer_jax import multihost
from poolformer_jax.errors import BadImagesError

FORMAT = 1
_SHOWN = 10  # Bad files named in a log line or an error; the report file lists them all.


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The checked file list of one split. Paths are relative to `folder`."""

  folder: str
  split: str
  label_names: tuple[str, ...]
  files: tuple[str, ...]
  labels: tuple[int, ...]
  excluded: tuple[tuple[str, str], ...] = ()  # (path, why it cannot be decoded)

  def paths(self) -> list[str]:
    return [os.path.join(self.folder, f) for f in self.files]


def manifest_path(manifest_dir: str, split: str) -> epath.Path:
  return epath.Path(manifest_dir) / f"{split}.json"


def report_path(manifest_dir: str, split: str) -> epath.Path:
  return epath.Path(manifest_dir) / f"{split}_bad_files.txt"


def read(manifest_dir: str, split: str) -> Manifest | None:
  """The split's manifest in `manifest_dir`, or None if there is none yet."""
  path = manifest_path(manifest_dir, split)
  if not path.exists():
    return None
  stat = path.stat()
  return _parse(os.fspath(path), stat.mtime, stat.length)


# The run builds its folder source several times (dataset info, epoch size, each iterator): a
# list of a million files is parsed once. Keyed by mtime and size, and cleared when this process
# writes a list, so a rewritten list is read again.
@functools.lru_cache(maxsize=4)
def _parse(path: str, mtime: float, length: int) -> Manifest:
  del mtime, length  # Cache key only.
  try:
    raw = json.loads(epath.Path(path).read_text())
    if raw.get("format") != FORMAT:
      raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
    return Manifest(folder=raw["folder"], split=raw["split"],
                    label_names=tuple(raw["label_names"]),
                    files=tuple(f for f, _ in raw["files"]),
                    labels=tuple(int(y) for _, y in raw["files"]),
                    excluded=tuple(tuple(e) for e in raw["excluded"]))
  except (ValueError, KeyError, TypeError) as e:
    raise BadImagesError(f"the file list {path} is damaged ({e}); delete it to scan the folder "
                         "again") from None


def _write(manifest_dir: str, manifest: Manifest) -> None:
  """Atomically (temporary file, then rename): a killed process never leaves half a list."""
  path = manifest_path(manifest_dir, manifest.split)
  raw = {"format": FORMAT, "folder": manifest.folder, "split": manifest.split,
         "label_names": list(manifest.label_names),
         "files": [[f, y] for f, y in zip(manifest.files, manifest.labels)],
         "excluded": [list(e) for e in manifest.excluded], "created": time.time()}
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(raw, indent=0))
  tmp.rename(path)
  _parse.cache_clear()


def _write_report(manifest_dir: str, split: str, bad: list[tuple[str, str]]) -> None:
  report_path(manifest_dir, split).write_text("".join(f"{p}\t{why}\n" for p, why in bad))


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------


def undecodable(paths: list[str]) -> list[int]:
  """Indices of the files that `tf.io.decode_image` cannot decode (all decoded in parallel).

  tf.data runs the decodes on all host cores; `ignore_errors` drops the failing ones, and the
  indices that did not come back are the bad files.
  """
  if not paths:
    return []

  def decode(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return i, tf.shape(image)  # Using the shape keeps the decode from being pruned.

  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64),
                                           np.asarray(paths)))
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
  ds = ds.map(lambda i, _: i).batch(8192)
  good = np.zeros(len(paths), bool)
  for indices in ds.as_numpy_iterator():
    good[indices] = True
  return np.flatnonzero(~good).tolist()


def why_undecodable(path: str) -> str:
  """TF's reason, in one line, e.g. 'jpeg::Uncompress failed. Invalid JPEG data or crop window'."""
  try:
    data = tf.io.read_file(path)
    if int(tf.strings.length(data)) == 0:
      return "empty file (0 bytes)"
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message)  # TF's "{{function_node ...}}" prefix.
    return re.sub(r"\s*\[Op:.*$", "", text, flags=re.S).strip() or type(e).__name__
  return "decodes now (it failed during the scan: changed or flaky storage?)"


def _undecodable_all_processes(paths: list[str]) -> list[int]:
  """`undecodable` over all processes: each decodes every P-th file, verdicts are gathered."""
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return undecodable(paths)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bad = np.zeros(len(paths), np.uint8)
  for local in undecodable(paths[index::count]):
    bad[index + local * count] = 1
  return np.flatnonzero(np.asarray(multihost_utils.process_allgather(bad)).any(axis=0)).tolist()


# ---------------------------------------------------------------------------
# Building or reusing a split's manifest.
# ---------------------------------------------------------------------------


def ensure(manifest_dir: str, *, folder: str, split: str, label_names: tuple[str, ...],
           list_files, max_bad_fraction: float, threshold_name: str) -> Manifest:
  """The split's manifest: reused if `manifest_dir` has one, else built by decoding every file.

  `list_files()` -> (absolute paths, labels) of the split's images, called only when building.
  Raises BadImagesError, before anything is written but the report, when more than
  `max_bad_fraction` of the split cannot be decoded.
  """
  import jax  # pylint: disable=g-import-not-at-top
  folder = os.path.abspath(folder)
  existing = _read_agreed(manifest_dir, split)
  if existing is not None:
    if os.path.abspath(existing.folder) != folder:
      raise BadImagesError(
          f"{manifest_path(manifest_dir, split)} lists the files of {existing.folder}, but "
          f"config.data.folder is {folder}; use another --workdir (or "
          "config.data.manifest_dir), or delete that file to scan the new folder")
    logging.info("Folder split %r: reusing the checked file list %s (%d files, %d left out)",
                 split, manifest_path(manifest_dir, split), len(existing.files),
                 len(existing.excluded))
    return existing

  paths, labels = list_files()
  bad, seconds = measure.stopwatch(lambda: _undecodable_all_processes(paths))
  logging.info("Folder split %r: decoded %d files in %.1f s (%.0f files/s), %d undecodable",
               split, len(paths), seconds, len(paths) / max(seconds, 1e-9), len(bad))
  bad_set = set(bad)
  rel = lambda p: os.path.relpath(p, folder)  # pylint: disable=unnecessary-lambda-assignment
  reasons = [(rel(paths[i]), why_undecodable(paths[i])) for i in bad]
  manifest = Manifest(folder=folder, split=split, label_names=tuple(label_names),
                      files=tuple(rel(p) for i, p in enumerate(paths) if i not in bad_set),
                      labels=tuple(y for i, y in enumerate(labels) if i not in bad_set),
                      excluded=tuple(reasons))
  writer = jax.process_index() == 0
  if writer:
    epath.Path(manifest_dir).mkdir(parents=True, exist_ok=True)
  if writer and reasons:
    _write_report(manifest_dir, split, reasons)
  shown = "\n".join(f"  {p}: {why}" for p, why in reasons[:_SHOWN])
  more = f"\n  ... and {len(reasons) - _SHOWN} more" if len(reasons) > _SHOWN else ""
  where = f"{os.path.join(folder, split)}"
  if len(bad) > max_bad_fraction * len(paths) or len(bad) == len(paths):
    raise BadImagesError(
        f"{len(bad)} of {len(paths)} files ({100 * len(bad) / len(paths):.2f}%) in {where} "
        f"cannot be decoded, more than {threshold_name}={max_bad_fraction:g} allows:\n"
        f"{shown}{more}\n"
        + (f"All of them are listed in {report_path(manifest_dir, split)}. " if reasons else "")
        + f"Fix or delete them and rerun, or raise {threshold_name} to leave them out.")
  if reasons:
    logging.warning("Folder split %r: %d of %d files cannot be decoded and are left out "
                    "(%s=%g allows it):\n%s%s\nAll listed in %s", split, len(bad), len(paths),
                    threshold_name, max_bad_fraction, shown, more,
                    report_path(manifest_dir, split))
  if writer:
    _write(manifest_dir, manifest)
  multihost.sync(f"folder manifest {split}")
  if not manifest_path(manifest_dir, split).exists():
    raise BadImagesError(f"{manifest_path(manifest_dir, split)} was written by process 0 but is "
                         "not visible here: the workdir must be shared by all processes")
  return manifest


def _read_agreed(manifest_dir: str, split: str) -> Manifest | None:
  """`read`, with all processes agreeing on whether a manifest exists (process 0 decides)."""
  import jax  # pylint: disable=g-import-not-at-top
  found = manifest_path(manifest_dir, split).exists()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if bool(multihost_utils.broadcast_one_to_all(np.int32(found))) != found:
      raise BadImagesError(f"{manifest_path(manifest_dir, split)} is visible on process 0 but "
                           "not on this one, or the other way round: the workdir must be shared "
                           "by all processes")
  return read(manifest_dir, split) if found else None
