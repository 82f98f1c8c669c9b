"""Multi-host for real: two processes joined by `jax.distributed.initialize` on loopback."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from poolformer_jax import checkpointing
from poolformer_jax import pretrained

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_processes(commands, devices, timeout=600):
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in commands]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    outs.append((out, err))
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
  """2 processes x 4 devices == 1 process x 8 devices after 3 steps on the same global batch.

  Both runs compile the same SPMD program; only the all-reduce crosses a process boundary (gloo
  over TCP) in one of them, so float32 sums may be added in another order: parameters agree to
  1e-5 absolute (a wrong row assembly or a missing gradient shard would be off by ~1e-3).
  """
  port = free_port()
  two = run_processes([[sys.executable, WORKER, str(tmp_path / "two"), "2", str(i), str(port)]
                       for i in range(2)], devices=4)
  (one_out, _), = run_processes([[sys.executable, WORKER, str(tmp_path / "one"), "1", "0", "0"]],
                                devices=8)
  assert "process 0/2 devices 8" in two[0][0] and "process 1/2 devices 8" in two[1][0]
  losses = {out.split("loss ")[1].strip() for out, _ in two} | {one_out.split("loss ")[1].strip()}
  assert len(losses) == 1, losses  # Every process reports the same (replicated) loss.
  # The checkpoint written jointly by the two processes restores (and verifies) on one.
  for a, b in zip(jax.tree.leaves(_params(tmp_path / "one")),
                  jax.tree.leaves(_params(tmp_path / "two"))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _params(directory):
  from poolformer_jax import model as model_lib
  cfg = model_lib.get_config("poolformer_s12", num_classes=10, depths=(1, 1, 1, 1),
                             widths=(8, 16, 24, 32))
  target = pretrained.abstract_params(cfg)
  ckpt = checkpointing.Checkpointer(str(directory), read_only=True)
  items, _ = ckpt.restore(3, {"params": target})
  ckpt.close()
  return jax.device_get(items["params"])


@pytest.mark.slow
def test_main_across_two_processes_survives_preemption_of_one(tmp_path, digits_data_dir):
  """The real trainer, 2 processes x 4 devices, per-process data. SIGTERM reaches ONE process:
  JAX's preemption sync point makes both save the same step and exit 75; the same two commands
  resume and finish, with one metrics writer and a checkpoint that loads."""
  workdir = tmp_path / "run"

  def commands(port):
    return [[sys.executable, "main.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
             f"--config.data.data_dir={digits_data_dir}", "--config.total_steps=30",
             "--config.log_every_steps=1", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"] for i in range(2)]

  procs = [subprocess.Popen(cmd, cwd=REPO, env=env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in commands(free_port())]
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [75, 75], errs[0][-2000:] + errs[1][-2000:]
  steps = {int(re.search(r"preempted at step (\d+)", e)[1]) for e in errs}
  assert len(steps) == 1, steps  # Both agreed on the step.
  step = steps.pop()
  assert os.path.isdir(workdir / "checkpoints" / str(step)) and step < 30

  outs = run_processes(commands(free_port()), devices=4)
  assert all("done:" in out for out, _ in outs)
  assert f"Resumed from checkpoint step {step}" in outs[0][1]  # Process 0 does the talking.
  assert "8 cpu device(s) in 2 process(es)" in outs[0][1]
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))  # One writer.
  evals = [r for r in records if "eval/top1" in r]
  assert [r["step"] for r in evals] == [20, 30] and evals[-1]["eval/examples"] == 360
  params, info, _ = pretrained.load_params(str(workdir))
  assert info.num_classes == 10 and np.all(np.isfinite(params["head"]["kernel"]))
