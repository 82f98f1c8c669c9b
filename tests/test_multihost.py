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

from conftest import REPO, cpu_env
from poolformer_jax import checkpointing
from poolformer_jax import pretrained

# One multi-process job at a time (each already keeps 2 cores busy), on one xdist worker, which
# also computes the shared `two_process_reference` once.
pytestmark = pytest.mark.xdist_group("multihost")

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
PEER = os.path.join(os.path.dirname(__file__), "multihost_peer.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(commands, devices, timeout=600):
  procs = [subprocess.Popen(cmd, cwd=REPO, env=cpu_env(devices), stdout=subprocess.PIPE,
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


# --------------------------------------------------------------------------- the real trainer

STEPS = 30


def main_commands(workdir, data_dir, port, *extra):
  """The demo's smoke config on 2 processes x 4 devices, per-process data, exactly resumable."""
  return [[sys.executable, "main.py", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", f"--config.total_steps={STEPS}",
           "--config.log_every_steps=1", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}", *extra] for i in range(2)]


def start(commands):
  return [subprocess.Popen(cmd, cwd=REPO, env=cpu_env(4, PYTHONUNBUFFERED="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for cmd in commands]


def wait_for_step(workdir, step, procs, timeout=600):
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while not (metrics.exists() and logged_steps(workdir) and logged_steps(workdir)[-1] >= step):
    assert time.time() < deadline, f"no step {step} within {timeout} s"
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
    time.sleep(0.05)


def logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def final_params(workdir):
  params, _, _ = pretrained.load_params(str(workdir))
  return jax.device_get(params)


def assert_same_params(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="session")
def two_process_reference(digits_data_dir, tmp_path_factory):
  """The uninterrupted 2-process run that every interrupted one must reproduce exactly."""
  workdir = tmp_path_factory.mktemp("two_process_reference")
  outs = run_processes(main_commands(workdir, digits_data_dir, free_port()), devices=4)
  assert all("done:" in out for out, _ in outs)
  return workdir


@pytest.mark.slow
def test_main_across_two_processes_survives_preemption_and_a_lost_host(
    two_process_reference, digits_data_dir, tmp_path):
  """The real trainer, 2 processes x 4 devices, per-process data, interrupted twice and resumed
  each time with the same two commands; it ends exactly like an uninterrupted run, with one
  metrics writer.

  1. SIGTERM reaches ONE process: JAX's preemption sync point makes both save the same step
     and exit 75.
  2. SIGKILL process 1 mid-training: process 0 exits by itself within the heartbeat timeout,
     with code 75 and one line naming the lost process and the step (not by SIGABRT); the
     rerun resumes from the last complete checkpoint. (Losing the coordinator: the test below.)
  """
  workdir = tmp_path / "run"
  extra = ["--heartbeat_timeout_s=10", "--config.checkpoint_every_steps=4"]
  commands = lambda: main_commands(workdir, digits_data_dir, free_port(), *extra)
  procs = start(commands())
  wait_for_step(workdir, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [75, 75], errs[0][-2000:] + errs[1][-2000:]
  steps = {int(re.search(r"preempted at step (\d+)", e)[1]) for e in errs}
  assert len(steps) == 1, steps  # Both agreed on the step.
  preempted = steps.pop()
  assert os.path.isdir(workdir / "checkpoints" / str(preempted)) and preempted < 12

  procs = start(commands())
  later = (preempted // 4 + 1) * 4  # The first periodic save after the resumed step.
  wait_for_step(workdir, later + 2, procs)
  while not (workdir / "checkpoints" / str(later)).is_dir():  # That save is complete.
    time.sleep(0.05)
  procs[1].kill()
  killed = time.time()
  _, err = procs[0].communicate(timeout=120)
  procs[1].communicate()
  assert time.time() - killed < 60, "the survivor did not exit within a bounded time"
  assert procs[0].returncode == 75, err[-3000:]
  assert f"Resumed from checkpoint step {preempted}" in err  # Process 0 does the talking.
  lost = re.match(r"error: lost process 1 at step (\d+) \(it stopped sending heartbeats",
                  err.strip().splitlines()[-1])
  assert lost and later + 2 <= int(lost[1]) < STEPS, err[-3000:]
  complete = max(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert complete >= later

  outs = run_processes(commands(), devices=4)
  assert all("done:" in out for out, _ in outs)
  assert f"Resumed from checkpoint step {complete}" in outs[0][1]
  assert "8 cpu device(s) in 2 process(es)" in outs[0][1]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # One writer.
  evals = [r for r in records if "eval/top1" in r]
  assert [r["step"] for r in evals] == [20, 30] and evals[-1]["eval/examples"] == 360
  assert_same_params(final_params(workdir), final_params(two_process_reference))


@pytest.mark.parametrize("victim", [1, 0])
def test_losing_a_peer_ends_the_survivor_with_one_line_and_code_75(tmp_path, victim):
  """Two processes of a job in a collective step loop; SIGKILL one. The survivor's trainer is
  aborted by JAX's runtime (a worker: after the heartbeat timeout; the coordinator: at once);
  its supervising parent ends with one line naming what was lost and the step, exit code 75."""
  port = free_port()
  step_files = [tmp_path / f"step{i}" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, PEER, str(port), str(i), "5", str(step_files[i])],
                            cwd=REPO, env=cpu_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 240
  while not all(f.exists() and f.read_text() and int(f.read_text()) >= 3 for f in step_files):
    assert time.time() < deadline and all(p.poll() is None for p in procs), \
        [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
    time.sleep(0.05)
  procs[victim].kill()
  killed = time.time()
  _, err = procs[1 - victim].communicate(timeout=120)
  procs[victim].communicate()
  assert procs[1 - victim].returncode == 75, err[-3000:]
  assert time.time() - killed < 30, "not within a bounded time (heartbeat timeout 5 s)"
  last = err.strip().splitlines()[-1]
  who = ("process 1 at step {} (it stopped sending heartbeats" if victim == 1 else
         "the coordinator (process 0) at step {} (it stopped answering")
  step = int(step_files[1 - victim].read_text())
  assert last.startswith(f"error: lost {who.format(step + 1)}") or last.startswith(
      f"error: lost {who.format(step)}"), last  # The step it was in, or had just finished.


def test_a_process_that_cannot_reach_the_coordinator_fails_in_bounded_time(tmp_path):
  """Process 1 started alone (nobody listens at the coordinator's address): one clear line
  and exit code 1 after --initialization_timeout_s, not a hang and not SIGABRT."""
  port = free_port()
  command = main_commands(tmp_path / "run", tmp_path / "tfds", port,
                          "--initialization_timeout_s=5")[1]
  started = time.time()
  proc = subprocess.run(command, cwd=REPO, env=cpu_env(4), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: the job did not assemble within 5 s (--initialization_timeout_s): the "
      f"coordinator 127.0.0.1:{port} did not answer"), proc.stderr[-3000:]
  assert time.time() - started < 240
