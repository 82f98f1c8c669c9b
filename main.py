"""Train, evaluate or classify images with PoolFormer in JAX.

  python main.py                     # the embedded demo: digits on CPU, ~3 min, -> workdir/demo
  python main.py --config=configs/imagenet.py:s12 --workdir=gs://BUCKET/runs/s12
  python main.py --mode=eval --config=configs/imagenet.py:s12 \\
      --config.init_from=checkpoints/poolformer_s12 --workdir=/tmp/eval_s12
  python main.py --mode=predict --checkpoint=caformer_s18.sail_in1k_384 photos/ cat.jpg
  python main.py --mode=compile --config=configs/imagenet.py:s12 --config.topology=v4-8

Any config field can be overridden: --config.batch_size=1024 --config.data.data_dir=gs://...
A run resumes from WORKDIR/checkpoints by itself. On a multi-host TPU pod, run the same command
on every host (JAX finds its peers); elsewhere pass --coordinator_address, --num_processes and
--process_id. Compile mode (needs libtpu, not a TPU) compiles the real train and eval steps
for a Cloud TPU slice and reports whether they fit and how fast they can go. The work lives
in poolformer_jax.train, poolformer_jax.inference and poolformer_jax.tpu_compile.
"""

from __future__ import annotations

import signal
import threading

from poolformer_jax import cpu_tuning

# First of all, the re-execution (see its docstring): whatever ran before it would run twice.
# Then, from the first moment on, a SIGTERM (a preemption notice) is remembered rather than
# fatal: the trainer acts on it (before the first step: exit 75; later: a checkpoint, then exit
# 75). The imports below take seconds. Other modes restore the default in main().
_SIGTERM = threading.Event()
if __name__ == "__main__":
  cpu_tuning.reexec_with_malloc_hugepages()
  signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())

import logging as std_logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from poolformer_jax import multihost

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "demo.py"),
                                "Config file (ml_collections), optionally `file.py:arg`.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events "
                    "(local or gs://). Default: workdir/<config name>.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "compile"],
                  "What to do. compile: AOT-compile for --config.topology (a TPU slice such as "
                  "v4-8) and report memory and speed bounds.")
flags.DEFINE_string("checkpoint", None, "predict: a converted model directory, a training "
                    "workdir, or released weights by name (caformer_s18.sail_in1k_384, "
                    "hf-hub:sail/poolformer_s12; downloaded and converted once, then cached).")
flags.DEFINE_enum("format", "table", ["table", "jsonl"], "predict: output format.")
flags.DEFINE_integer("top_k", 5, "predict: classes per image.")
flags.DEFINE_integer("batch_size", 32, "predict: images per forward pass, at most (fewer "
                     "images: one pass of just them).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
# JAX's own defaults, set explicitly: what a multi-process job waits for (poolformer_jax.multihost).
flags.DEFINE_integer("initialization_timeout_s", 300, "Multi-process: how long all processes "
                     "may take to join at start before the job gives up (exit code 1).")
flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process: a process silent this long is "
                     "lost; the others stop, naming it and the step (exit code 75: rerun).")
flags.DEFINE_integer("shutdown_timeout_s", 300, "Multi-process: how long a finished process "
                     "waits for the others at exit.")

FLAGS = flags.FLAGS


def default_workdir() -> str:
  """workdir/<config file stem>[_<arg>], e.g. workdir/demo, workdir/imagenet_s12."""
  name = config_flags.get_config_filename(FLAGS["config"])
  path, _, arg = name.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{stem}_{arg}" if arg else stem)


def _multi_process() -> bool:
  """Explicit --coordinator_address / --num_processes / --process_id, or a multi-host TPU VM."""
  explicit = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
  return bool(explicit) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _init_distributed() -> None:
  """Joins the other processes (arguments left None are auto-detected, e.g. on a TPU pod)."""
  if _multi_process():
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         initialization_timeout_s=FLAGS.initialization_timeout_s,
                         heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                         shutdown_timeout_s=FLAGS.shutdown_timeout_s)


def predict(argv) -> int:
  """Classifies image files and folders; never imports TensorFlow."""
  from poolformer_jax import errors, hub, inference  # pylint: disable=g-import-not-at-top
  paths = argv[1:]
  if not FLAGS.checkpoint or not paths:
    raise errors.ConfigError("--mode=predict needs --checkpoint=DIR_OR_NAME and image files or "
                             "folders, e.g. python main.py --mode=predict "
                             "--checkpoint=caformer_s18.sail_in1k photos/")
  if FLAGS.batch_size < 1 or FLAGS.top_k < 1:
    raise errors.ConfigError("--batch_size and --top_k must be >= 1")
  model, info = hub.load_pretrained(FLAGS.checkpoint)
  files = inference.list_image_files(paths)
  results, failed = inference.classify_files(
      model, files, preprocessing=info.preprocessing, labels=info.labels, top_k=FLAGS.top_k,
      batch_size=FLAGS.batch_size, progress=len(files) > FLAGS.batch_size and sys.stderr.isatty())
  if FLAGS.format == "jsonl":
    print(inference.format_jsonl(results, failed))
  else:
    if results:
      print(inference.format_table(results))
    for path, message in failed.items():
      print(f"error: {message}", file=sys.stderr)
  if failed:
    print(f"{len(failed)} of {len(files)} file(s) could not be read: "
          f"{', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


class _OwnInfoOnly(std_logging.Filter):
  """Console: INFO from poolformer_jax only (Orbax, TFDS, XLA chatter hidden), WARNING+ from all.

  Also hides asyncio's "Task exception was never retrieved" dumps: when a checkpoint file is
  damaged, Orbax's other in-flight reads fail too and asyncio prints each one with a page of
  TensorStore spec, after our one-line error has said what and where.
  """

  def filter(self, record):
    if record.name == "asyncio" and "never retrieved" in str(record.msg):
      return False
    return record.levelno >= std_logging.WARNING or "poolformer_jax" in record.pathname


def train_or_evaluate() -> int:
  from poolformer_jax import train  # pylint: disable=g-import-not-at-top
  _init_distributed()
  workdir = FLAGS.workdir or default_workdir()
  # Multi-process runs hear of preemptions through JAX's distributed runtime instead.
  sigterm = None if _multi_process() else _SIGTERM
  try:
    if FLAGS.mode == "eval":
      train.evaluate(FLAGS.config, workdir, sigterm=sigterm)
    else:
      result = train.train_and_evaluate(FLAGS.config, workdir, sigterm=sigterm)
      top1 = result.get("eval/top1")
      print(f"done: {workdir} step {result['step']}"
            + (f", eval/top1 {top1:.4f}" if top1 is not None else ""))
    return 0
  except train.Preempted as e:
    print(f"{e}", file=sys.stderr)  # One line: what happened and what to do.
    return train.PREEMPTED_EXIT_CODE


def _keep_off_libtpu_without_a_tpu() -> None:
  """Modes other than compile: on a machine without TPU chips JAX must not start libtpu
  (installed for compile mode), which would print its initialisation error dump.

  Only where nothing else is there to choose: with an explicit JAX_PLATFORMS, or GPU device
  files (JAX then picks the GPU), JAX's own choice stands.
  """
  from poolformer_jax import tpu_compile  # pylint: disable=g-import-not-at-top
  gpu_files = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
  if (os.environ.get("JAX_PLATFORMS") or tpu_compile.machine_has_tpu()
      or any(os.path.exists(f) for f in gpu_files)):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


def main(argv) -> int:
  logging.get_absl_handler().python_handler.addFilter(_OwnInfoOnly())
  if FLAGS.mode not in ("train", "eval") or _multi_process():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Nothing to save: a SIGTERM ends it.
    if _SIGTERM.is_set():
      signal.raise_signal(signal.SIGTERM)
  if FLAGS.mode != "predict" and len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]} (files are for --mode=predict)")
  if FLAGS.mode != "compile":
    _keep_off_libtpu_without_a_tpu()
  if FLAGS.mode in ("train", "eval") and _multi_process() and not multihost.supervised():
    # This process becomes a small parent of the trainer (never returns): if JAX's runtime
    # aborts the trainer (a peer was lost), the parent says so, with the step.
    multihost.supervise(coordinator_address=FLAGS.coordinator_address,
                        initialization_timeout_s=FLAGS.initialization_timeout_s)
  # Imported here: flag parsing and --help stay fast, and JAX starts after absl's logging.
  from poolformer_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == "predict":
      return predict(argv)
    if FLAGS.mode == "compile":  # Before any JAX backend starts: it compiles for TPU devices.
      from poolformer_jax import tpu_compile  # pylint: disable=g-import-not-at-top
      tpu_compile.run(FLAGS.config, FLAGS.workdir or default_workdir())
      return 0
    return train_or_evaluate()
  except errors.Error as e:  # Ours: the message says what to do. Anything else is a bug.
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
