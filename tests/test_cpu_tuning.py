"""poolformer_jax.cpu_tuning: the malloc huge-page re-exec and the forward-only compiler options."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

# Runs a jitted function whose 64 MB result XLA:CPU allocates on every call, and
# reports the page faults of 5 calls after warm-up, and what the re-exec left in env / argv.
SCRIPT = """
import json, os, resource, sys
sys.path.insert(0, {repo!r})
from poolformer_jax import cpu_tuning
if sys.argv[1] == "reexec":
  cpu_tuning.reexec_with_malloc_hugepages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.outer(jnp.sin(x), jnp.cos(x)))
x = jnp.ones((4096,))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:],
                   "faults": faults}}))
"""


def run(mode, tmp_path, tunables=None):
  script = tmp_path / "alloc.py"
  script.write_text(SCRIPT.format(repo=str(REPO)))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, str(script), mode, "extra arg"], env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_reexec_sets_the_tunable_keeps_argv_and_respects_an_explicit_setting(tmp_path):
  result = run("reexec", tmp_path)
  assert result["tunables"] == "glibc.malloc.hugetlb=1"
  assert result["argv"] == ["reexec", "extra arg"]
  assert run("reexec", tmp_path, "glibc.malloc.check=0")["tunables"] == (
      "glibc.malloc.check=0:glibc.malloc.hugetlb=1")
  assert run("reexec", tmp_path, "glibc.malloc.hugetlb=0")["tunables"] == "glibc.malloc.hugetlb=0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc tunable")
def test_main_re_executes_before_anything_heavy_is_imported():
  """What main.py imports before its re-exec is paid twice per run: the first process must
  import neither JAX nor TensorFlow (the package's top-level names load on first use)."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-X", "importtime", "main.py", "--helpshort"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert "--workdir" in proc.stdout, proc.stderr[-3000:]  # absl's help (it exits 1).
  imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")]
  assert imported.count("poolformer_jax.cpu_tuning") == 2  # Once per process: it re-executed.
  assert imported.count("jax") == 1 and imported.count("tensorflow") <= 1, (
      imported.count("jax"), imported.count("tensorflow"))
  import poolformer_jax  # pylint: disable=g-import-not-at-top
  assert poolformer_jax.create_model.__module__ == "poolformer_jax.hub"
  assert "create_model" in dir(poolformer_jax)


def _thp_mode():
  path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  return path.read_text() if path.exists() else "[never]"


@pytest.mark.skipif("[never]" in _thp_mode(), reason="the kernel has transparent huge pages off")
def test_huge_pages_cut_xla_cpu_page_faults(tmp_path):
  plain, huge = run("plain", tmp_path)["faults"], run("reexec", tmp_path)["faults"]
  # 5 calls x ~64 MB of 4 KiB pages is ~80k faults; with 2 MiB pages a few hundred.
  assert plain > 10_000, plain
  assert huge < plain / 10, (plain, huge)


def test_forward_options_turn_ynnpack_off_and_keep_the_logits():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from poolformer_jax import cpu_tuning, model as model_lib  # pylint: disable=g-import-not-at-top
  model = model_lib.create_model("poolformer_s12", num_classes=10, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = lambda state, x: nnx.merge(graphdef, state)(x)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  options = cpu_tuning.forward_compiler_options(jax.devices()[0].platform)
  assert options == {"xla_cpu_experimental_ynn_fusion_type": ""}  # The tests run on CPU.
  # Decided by the platform compiled for: a TPU or GPU program gets none of XLA:CPU's options.
  assert cpu_tuning.forward_compiler_options("tpu") is None
  assert cpu_tuning.forward_compiler_options("cuda") is None
  default = jax.jit(forward).lower(state, x).compile()
  tuned = jax.jit(forward, compiler_options=options).lower(state, x).compile()
  # The option took effect (an unknown or ignored option would leave the program as it was).
  assert "__ynn_fusion" in default.as_text() and "__ynn_fusion" not in tuned.as_text()
  np.testing.assert_allclose(tuned(state, x), default(state, x), rtol=1e-5, atol=1e-5)
