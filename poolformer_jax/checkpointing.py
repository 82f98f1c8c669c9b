"""Training checkpoints: Orbax `CheckpointManager`, async saves, verified restores.

A step directory `WORKDIR/checkpoints/<step>/` holds the items
  params/  the model's parameters (a plain nested dict, the same tree `load_pretrained` reads)
  train/   everything else that resumes a run: optimizer state, EMA params, step
  meta/    JSON: step, a fingerprint of every saved array, anything the trainer adds
Orbax writes a step to a temporary directory and renames it when complete, so a process killed
mid-write leaves a `*.orbax-checkpoint-tmp*` directory that is never mistaken for a checkpoint.

Disk space: before each save the free space is compared with the state's size (where the
filesystem tells: not on gs://), and an out-of-space error from Orbax's asynchronous write is
caught too; either way the run stops with DiskFullError naming the directory and the bytes,
and the previous complete checkpoint stays as it was.

Why fingerprints: Orbax stores zstd-compressed chunks without checksums, so a flipped byte in
an array file can restore silently as wrong weights (measured: it does). Every array's bits are
hashed on device before saving (a position-weighted sum mod 2^32: exact integer arithmetic, so
the same on any number of devices) and checked after restoring; a mismatch names the step and
the array. An option falls back to the newest step that verifies.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from absl import logging
from etils import epath  # An Orbax dependency: local and gs:// paths alike.
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from poolformer_jax import multihost
from poolformer_jax.errors import CheckpointError, DiskFullError


@jax.jit
def fingerprints(tree):
  """Per array: sum over elements of bits(x_i) * (2i + 1), mod 2^32.

  Any single changed element changes it (the weights are odd); dtype-generic via the bits.
  """
  def one(x):
    x = jnp.asarray(x)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[
        x.dtype.itemsize])  # 8-byte types are not used (and would need uint64).
    weights = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)

  return jax.tree.map(one, tree)


def flat_fingerprints(items: dict[str, Any]) -> dict[str, int]:
  """{'params/stages.2.blocks.0.mlp.fc1.kernel': fingerprint, ...} for every array of `items`."""
  prints = jax.device_get(fingerprints(items))
  return {f"{path[0].key}/{jax.tree_util.keystr(path[1:], simple=True, separator='.')}": int(v)
          for path, v in jax.tree_util.tree_leaves_with_path(prints)}


def first_mismatch(expected: dict[str, int], items: dict[str, Any]) -> str | None:
  """The first 'item/array' of `items` whose bits differ from `expected` (flat_fingerprints
  saved with it), or None when every array verifies."""
  return next((key for key, value in flat_fingerprints(items).items()
               if expected.get(key) != value), None)


# Orbax's replica-parallel save cuts each replicated array into one slice per replica, so that
# hosts share the writing. Each cut is an eager op, with a program of its own for each offset
# (compiled at the first save, on a TPU as here). Most of these models' arrays are small (norm
# and layer scales, biases, and their optimizer moments): cutting them costs more than the bytes
# it shares out. Measured on 8 CPU devices: 600 small arrays blocked a save for 2.5 s, 0.6 s
# written whole; the demo's smoke run spent 6.8 s in its two saves, 1.5 s now. Arrays of at
# least this many bytes per replica are still cut.
MIN_REPLICA_SLICE_BYTES = 1 << 20
ITEMS = ("params", "train")  # The array trees of a step; `meta` is JSON.


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Orbax's own handlers for the step's items, with MIN_REPLICA_SLICE_BYTES for jax.Arrays.

  (Their ArrayHandler also drops Orbax's array-metadata store, which only typed PRNG keys
  need; the trainer's state holds none: its randomness is folded from the seed and the step.)
  """
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  types = ocp.type_handlers.create_type_handler_registry(*[
      (t, arrays if t is jax.Array else ocp.type_handlers.get_type_handler(t))
      for t in ocp.type_handlers.supported_types()])
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in ITEMS:
    trees = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    registry.add(item, ocp.args.PyTreeSave, trees)
    registry.add(item, ocp.args.PyTreeRestore, trees)
  registry.add("meta", ocp.args.JsonSave)
  registry.add("meta", ocp.args.JsonRestore)
  return registry


def orbax_path(directory) -> str:
  """`directory` as Orbax accepts it: local paths made absolute (Orbax refuses relative ones,
  and `python main.py` defaults to the relative `workdir/demo`); gs:// and other URLs as given."""
  directory = str(directory)
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves and restores training state in `directory` (any path Orbax supports, gs:// too)."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    directory = orbax_path(directory)
    self.directory = directory
    self.read_only = read_only
    incomplete = _incomplete_steps(directory)
    if incomplete:
      logging.warning("Ignoring %d incomplete checkpoint(s) from a save that did not finish "
                      "(the process was killed while writing): %s", len(incomplete),
                      ", ".join(incomplete))
    # read_only: this class then never saves, moves or cleans up anything. (Orbax's own
    # read_only option would warn on every open.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=not read_only, create=not read_only)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          handler_registry=_handler_registry())
    self._saving = None  # (step, bytes) of the save in flight.
    self._failed = None  # A save error already raised, which Orbax would raise at every wait.

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, items: dict[str, Any], meta: dict | None = None) -> None:
    """Starts an asynchronous save of `items` ({'params': ..., 'train': ...}) at `step`.

    Returns once the arrays are copied off the devices, so the caller may donate them.
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    if self._failed is not None:
      raise self._failed
    self.wait_until_finished()  # The previous save must succeed, and free space be measured.
    needed = state_bytes(items)
    free = free_bytes(self.directory)
    enough_here = free is None or free >= needed
    if not multihost.all_agree(enough_here):
      raise DiskFullError(
          f"not enough disk space to save checkpoint step {step} in {self.directory}: it needs "
          f"about {_size(needed)} (the state's size), "
          + (f"{_size(free)} are free" if not enough_here else "another process has less free")
          + self._resume_hint())
    meta = {**(meta or {}), "step": int(step), "fingerprints": flat_fingerprints(items)}
    args = {name: ocp.args.PyTreeSave(tree) for name, tree in items.items()}
    self._saving = (int(step), needed)
    try:
      self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                         force=True)
    except Exception as e:  # Orbax/TensorStore raise many types.  pylint: disable=broad-except
      raise self._save_error(e) from e

  def _save_error(self, error: BaseException) -> CheckpointError:
    """The failed save's error in one line, naming the step, directory and root cause.

    A full disk (ENOSPC) becomes DiskFullError with the bytes needed; the step's partial
    directory is removed so the space comes back (the next run would remove it anyway).
    """
    step, needed = self._saving or (None, None)
    self._saving = None
    root = _root_cause(error)
    text = str(root)
    if not ("No space left on device" in text or "os_error_code='28'" in text
            or getattr(root, "errno", None) == 28):
      self._failed = CheckpointError(f"checkpoint step {step} could not be written to "
                                     f"{self.directory}: {summarise(error)}")
      return self._failed
    self._remove_partial(step)
    free = free_bytes(self.directory)
    file = re.search(r'Failed writing: "([^"]+)"', text)  # TensorStore names the file.
    self._failed = DiskFullError(
        f"checkpoint step {step} could not be written to {self.directory}: no space left on "
        f"device{f' (writing {file[1]})' if file else ''}. It needs about {_size(needed)} (the "
        "state's size)" + (f", {_size(free)} are free now" if free is not None else "")
        + self._resume_hint())
    return self._failed

  def _resume_hint(self) -> str:
    last = self.latest_step()
    if last is None:
      return ". No checkpoint was saved yet: free space or choose another --workdir."
    return (f". The last complete checkpoint, step {last}, is intact: free space (or move the "
            f"workdir) and rerun the same command to resume from it.")

  def _remove_partial(self, step) -> None:
    if jax.process_index() != 0 or step is None:
      return
    for path in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      try:
        path.rmtree()
        logging.warning("Removed the partial checkpoint %s", path)
      except OSError as e:
        logging.warning("Could not remove the partial checkpoint %s: %s", path, e)

  def restore(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restores `targets`' items (abstract trees with shardings) at `step`, verified.

    Raises CheckpointError naming the step and the array when a file cannot be read or an
    array's bits differ from what was saved.
    """
    where = os.path.join(str(self.directory), str(step))
    args = {name: ocp.args.PyTreeRestore(tree, ocp.checkpoint_utils.construct_restore_args(tree))
            for name, tree in targets.items()}
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
    except Exception as e:  # Orbax/TensorStore raise many types; all mean "unreadable".
      raise CheckpointError(f"checkpoint step {step} cannot be read ({where}): "
                            f"{summarise(e)}") from e
    meta = restored["meta"]
    expected = (meta or {}).get("fingerprints")
    if not expected:
      raise CheckpointError(f"checkpoint step {step} has no fingerprints in {where}/meta; "
                            "it was not written by this trainer or its meta file is damaged")
    bad = first_mismatch(expected, {name: restored[name] for name in targets})
    if bad is not None:
      item, array = bad.split("/", 1)
      raise CheckpointError(
          f"checkpoint step {step} is corrupt: array '{array}' in {where}/{item} does not "
          "match the fingerprint saved with it (the file was altered or damaged after saving)")
    return {name: restored[name] for name in targets}, meta

  def restore_latest(self, targets: dict[str, Any], *, fallback: bool = False):
    """(items, meta) of the newest step, or None without checkpoints.

    With `fallback`, a step that fails verification is skipped (with a warning) for the newest
    one that passes; without it the error says how to fall back.
    """
    steps = self.all_steps()
    for i, step in enumerate(reversed(steps)):
      try:
        return self.restore(step, targets)
      except CheckpointError as e:
        older = steps[:len(steps) - 1 - i]
        if not fallback:
          hint = (f" To resume from the previous step ({older[-1]}), rerun with "
                  "--config.checkpoint_fallback=True, or delete that step's directory."
                  if older else " There is no older checkpoint to fall back to.")
          raise CheckpointError(f"{e}.{hint}") from e
        logging.warning("%s; falling back to an older checkpoint.", e)
        self._quarantine(step)
    if steps:
      raise CheckpointError(f"no checkpoint in {self.directory} passes verification "
                            f"(steps {steps}); delete them to start over")
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a corrupt step out of the way (kept for inspection), so the run can save it anew."""
    if self.read_only:
      return
    target = epath.Path(f"{self.directory}_corrupt") / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
      logging.warning("Moved corrupt checkpoint step %d to %s", step, target)
    multihost.sync(f"quarantine checkpoint {step}")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Waits for the save in flight; raises its error (once) if it failed."""
    if self._failed is not None:
      return  # Already raised; Orbax would raise it again at every wait.
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self._saving = None

  def close(self) -> None:
    self.wait_until_finished()
    if self._failed is None:
      self._manager.close()


def state_bytes(items) -> int:
  """Bytes of every array in `items` (global shapes): what a checkpoint of them takes, about."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(items))


def free_bytes(directory: str) -> int | None:
  """Free bytes on the filesystem holding `directory`, or None where it cannot tell (gs://)."""
  if "://" in str(directory):
    return None
  path = str(directory)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def _size(n: int) -> str:
  return f"{n / 2**20:.1f} MiB ({n:,} bytes)"


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _incomplete_steps(directory: str) -> list[str]:
  """Step directories left by an interrupted save (Orbax's temporary names)."""
  path = epath.Path(directory)
  if not path.exists():
    return []
  return sorted(p.name for p in path.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def summarise(error: BaseException) -> str:
  """The root cause of an Orbax/TensorStore error in one line, plus the array it names.

  Orbax wraps TensorStore's error (e.g. 'OUT_OF_RANGE: Error reading "stem.conv.kernel/0.0.0.0"
  in OCDBT database at local file ".../params/": Requested byte range ... is not valid') in a
  generic one whose text is a page of spec; the root cause is what a user needs.
  """
  root = _root_cause(error)
  text = str(root).strip()
  line = text.splitlines()[0][:400] if text else type(root).__name__
  array = re.search(r'reading "([^"/]+)/', text) or re.search(r"'path': '([^'/][^']*)/'", str(error))
  return f"{line}" + (f" (array '{array[1]}')" if array else "")
