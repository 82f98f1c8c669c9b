"""Test-wide environment. Runs before any test module imports jax, torch or transformers."""

import os
import shutil
import tempfile

# XLA:CPU compiles fast in the tests: the suite is compile-bound (hundreds of small programs, each
# run a few steps). Two flags, each measured on its own:
# - the backend (LLVM) at -O0: 2-5x faster compiles for ~2x slower steps (tests/test_train.py +
#   test_model.py, 12.7 -> 7.9 min);
# - XLA:CPU's older elemental emitters instead of its MLIR fusion emitters: a tiny CAFormer's train
#   step compiled in 7.6-7.9 s instead of 10.2-13.0; tests/test_recipes.py + test_model.py, one
#   core, 395 / 370 -> 322 / 264 s.
# XLA's HLO passes still run: the same computation, up to float rounding (the smoke run's 40
# steps: parameters within 1.1e-6 of the defaults'), and TPU programs compile the same. Every
# process of a test session uses them, so runs compared bit for bit agree; long runs opt out.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


# The XLA flags the developer started the tests with (not the ones added below), kept in the
# environment so that pytest-xdist's workers, which inherit the controller's changes, see them too.
_DEVELOPER_XLA_FLAGS = os.environ.setdefault(
    "POOLFORMER_JAX_TESTS_DEVELOPER_XLA_FLAGS", os.environ.get("XLA_FLAGS", "")).split()
# Each of FAST_COMPILE's flags that the developer set themselves keeps their value.
_FAST_FLAGS = [f for f in FAST_COMPILE
               if not any(d.split("=")[0] == f.split("=")[0] for d in _DEVELOPER_XLA_FLAGS)]


def cpu_env(devices: int, *, fast_compile: bool = True, **extra) -> dict:
  """os.environ for a subprocess with `devices` fake CPU devices (and this file's settings).

  The developer's own XLA flags carry over, an optimisation level included: FAST_COMPILE's
  flags are added where they set none, and `fast_compile=False` (run-bound runs) leaves them out.
  """
  flags = [f"--xla_force_host_platform_device_count={devices}"] + [
      f for f in _DEVELOPER_XLA_FLAGS if not f.startswith("--xla_force_host_platform_device_count")]
  if fast_compile:
    flags += _FAST_FLAGS
  return dict(os.environ, XLA_FLAGS=" ".join(flags), **extra)


# 8 fake CPU devices so sharding is exercised on a laptop (unless the developer chose a count),
# and the fast compiles; must be set before jax is imported. xdist's workers inherit the result.
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith("--xla_force_host_platform_device_count") for f in _flags):
  _flags.append("--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _FAST_FLAGS if f not in _flags])
# The tests compute on the CPU. With libtpu installed (compile-mode tests), JAX would also try
# to open a TPU; compile mode compiles for TPU topologies without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Nothing may wait on the network: the HF hub is never contacted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the whole test run, shared by every process: pytest-xdist's workers
# inherit this environment from the controller, and the subprocesses (main.py runs, benchmarks)
# from them. The suite runs the same small programs many times (a run, its kill, its resume;
# the same config in several files), and each compiles once. A hit is the same executable, so
# no result changes; `Compiling ...` is still logged, so compile counts hold. JAX writes entries
# in place: a size limit turns on its file lock, so no process reads an entry while another
# writes it. The process that made it (the controller) removes it at the end.
_XLA_CACHE = os.path.join(tempfile.gettempdir(), f"poolformer_jax_tests_{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))  # Never reached.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import collections  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_unconfigure(config):
  del config
  if os.environ["JAX_COMPILATION_CACHE_DIR"] == _XLA_CACHE:  # Made by this process.
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Makes `--dist loadgroup` keep each `xdist_group` on one worker again, and hands out the
  slow tests first.

  pytest-xdist groups tests by suffixing their node id with '@<group>' (it sets
  `item._nodeid`); pytest 9 keeps node ids in `item._id`, so the suffix is lost and every
  group is spread over all workers (measured: shared session fixtures such as `reference_run`
  were computed once per worker, and two multi-process tests ran at once). This redoes it.
  """
  if not getattr(config.option, "loadgroup", False):  # Set by xdist on its workers.
    return
  for item in items:
    groups = sorted({m.args[0] if m.args else m.kwargs.get("name", "default")
                     for m in item.iter_markers("xdist_group")})
    if groups and "@" not in item.nodeid:  # Older pytest: xdist's own suffix is there.
      from _pytest.nodeid import NodeId  # pylint: disable=g-import-not-at-top
      item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")  # pylint: disable=protected-access
  # xdist hands out work in collection order (groups first, largest first): the README's
  # 3-minute job, collected last, ran alone at the end while the other worker sat idle
  # (measured: 130 s). Longest first balances the workers; `slow` marks the long ones.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the prepared `digits` dataset (prepared offline, a few seconds)."""
  from poolformer_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")
  digits.Digits(data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def load_config(spec: str):
  """A config from configs/, as main.py loads it: 'demo.py:smoke' -> get_config('smoke')."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  name, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"configs_{name[:-3]}", REPO / "configs" / name)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations per function name while active (from `jax.log_compiles`' log).

  A retrace with new shapes, or a recompile for new shardings, adds one; a cached call does not.
  """
  import jax  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()

  class Handler(logging.Handler):
    def emit(self, record):
      match = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
      if match:
        counts[match[1]] += 1

  handler = Handler()
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles():
      yield counts
  finally:
    logging.getLogger("jax").removeHandler(handler)


@contextlib.contextmanager
def main_flags(*args):
  """main.py with its flags parsed in this process (`args` after the program name), unparsed
  afterwards. Unparsing sets absl's logger to WARNING (its verbosity flag's default), which
  would hide INFO records from the tests that run after on the same worker: it is restored."""
  import main  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  level = absl_logging.get_absl_logger().level
  try:
    main.FLAGS(["main.py", *args])
    yield main
  finally:
    main.FLAGS.unparse_flags()
    absl_logging.get_absl_logger().setLevel(level)


def count_primitive(jaxpr, primitive) -> int:
  """Equations of `primitive` in `jaxpr`, nested jaxprs (jit, scan, remat, ...) included."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  return (sum(eqn.primitive is primitive for eqn in jaxpr.eqns)
          + sum(count_primitive(sub, primitive) for sub in core.subjaxprs(jaxpr)))


class SmallFilesystem:
  """A directory on its own size-limited filesystem (tmpfs): a disk that can fill up."""

  def __init__(self, path: pathlib.Path, size: int):
    import subprocess  # pylint: disable=g-import-not-at-top
    self.path = path
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:  # Not root (CAP_SYS_ADMIN): CI's container is; say why we skip.
      pytest.skip(f"mounting a small tmpfs needs root: {proc.stderr.strip()}")

  def resize(self, size: int) -> None:
    """Frees space the way an operator would: a bigger disk, same files."""
    import subprocess  # pylint: disable=g-import-not-at-top
    subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

  def unmount(self) -> None:
    import subprocess  # pylint: disable=g-import-not-at-top
    subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_filesystem(tmp_path):
  """small_filesystem(size) -> SmallFilesystem under tmp_path, unmounted after the test."""
  mounted = []

  def make(size: int, name: str = "small_fs") -> SmallFilesystem:
    mounted.append(SmallFilesystem(tmp_path / name, size))
    return mounted[-1]

  yield make
  for fs in mounted:
    fs.unmount()
