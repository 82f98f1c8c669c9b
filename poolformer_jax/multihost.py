"""Multi-process jobs: joining with explicit timeouts, and a clear exit when a peer is lost.

JAX's distributed runtime watches every process of a job. When one stops sending heartbeats
for `heartbeat_timeout_s` (its host died, it was killed), or the coordinator (process 0) stops
answering, it terminates the others: SIGABRT and a C++ stack dump, no word of the step. The
same happens when the job does not assemble within `initialization_timeout_s` at start. Its
Python API has no hook to do otherwise: jaxlib 0.10.2's `missed_heartbeat_callback` cannot
call Python (it terminates on std::bad_cast; measured).

So `main.py` runs a multi-process job under `supervise`: the process becomes a small parent
(this file run as a script: ~12 MB, not the ~750 MB of an imported trainer) that starts the
trainer as its child with the same command line, forwards SIGTERM and SIGINT to it, passes its
output through, and hears from it which step it is on. When JAX's runtime aborts the child,
the parent ends with one line saying what was lost and at which step, and exit code 75
(EX_TEMPFAIL, as for preemption: rerun the same command on every host; the run resumes from
the last complete checkpoint). A job that never assembled ends with code 1 and how to start it.
Killing the parent kills the child (Linux: PR_SET_PDEATHSIG), so to the other hosts the pair
is one process.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

PEER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL, as train.PREEMPTED_EXIT_CODE: rerun to resume.
_PROGRESS_FD = "POOLFORMER_PROGRESS_FD"  # Set in the child: where it reports its step.
_JAX_TERMINATED = "Terminating process because the JAX distributed service detected fatal errors"


# ---------------------------------------------------------------------------
# In the trainer (the child).
# ---------------------------------------------------------------------------


def supervised() -> bool:
  """True in a trainer started by `supervise`."""
  return _PROGRESS_FD in os.environ


def _report(message: str) -> None:
  fd = os.environ.get(_PROGRESS_FD)
  if fd is None:
    return
  try:
    os.write(int(fd), f"{message}\n".encode())
  except OSError:  # The parent is gone, or (never, at one line per step) the pipe is full.
    pass


def report_joined() -> None:
  """Tells the parent that every process of the job has joined."""
  fd = os.environ.get(_PROGRESS_FD)
  if fd is not None:
    os.set_blocking(int(fd), False)  # Never let a slow parent stall training.
    os.set_inheritable(int(fd), False)  # Nor leak into processes the trainer starts.
  _report("joined")


def report_step(step: int) -> None:
  """Tells the parent which training step runs now (a few bytes into a pipe)."""
  _report(f"step {step}")


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, initialization_timeout_s: int,
               heartbeat_timeout_s: int, shutdown_timeout_s: int) -> None:
  """`jax.distributed.initialize` with every timeout explicit (None arguments: auto-detect,
  e.g. on a TPU pod), then reports to the parent that the job has assembled."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=shutdown_timeout_s)
  report_joined()


def sync(name: str) -> None:
  """Waits until every process of the job gets here (nothing to wait for in one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
  """True only if `ok` on every process: each sees its own filesystem, all must decide alike."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ---------------------------------------------------------------------------
# The parent.
# ---------------------------------------------------------------------------


def _die_with_parent() -> None:  # Runs in the child between fork and exec.
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # Not Linux: the child may outlive a killed parent.
    pass


def supervise(*, coordinator_address: str | None, initialization_timeout_s: int):
  """Replaces this process by the supervising parent of the same command line (never returns).

  The parent's exit code is the trainer's, or, when JAX's distributed runtime aborted the
  trainer, 75 after a line saying why and at which step (1 if the job never assembled).
  """
  sys.stdout.flush()
  sys.stderr.flush()
  # -I: only the standard library; the script's own folder (the package) is not on sys.path.
  os.execv(sys.executable, [sys.executable, "-I", os.path.abspath(__file__),
                            str(initialization_timeout_s), coordinator_address or "", "--",
                            *sys.orig_argv])


def _supervise(command: list[str], coordinator_address: str | None,
               initialization_timeout_s: int) -> int:
  """Runs `command` as a child; its exit code, or 75 / 1 with a line when JAX aborted it."""
  read_fd, write_fd = os.pipe()
  child = subprocess.Popen(command, env=dict(os.environ, **{_PROGRESS_FD: str(write_fd)}),
                           pass_fds=(write_fd,), stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent)
  os.close(write_fd)
  for sig in (signal.SIGTERM, signal.SIGINT):  # Preemption notices go to the trainer.
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
  progress = {"joined": False, "step": None}
  tail = bytearray()  # The end of the child's stderr, where JAX says what it detected.
  threads = [threading.Thread(target=_read_progress, args=(read_fd, progress), daemon=True),
             threading.Thread(target=_pass_through, args=(child.stderr, tail), daemon=True)]
  for t in threads:
    t.start()
  code = child.wait()
  for t in threads:
    t.join(timeout=10)
  if code >= 0:
    return code
  report = tail.decode(errors="replace")
  if -code != signal.SIGABRT or _JAX_TERMINATED not in report:
    name = signal.Signals(-code).name
    print(f"error: the trainer process died of {name} {_at(progress)}", file=sys.stderr)
    return 128 - code
  if not progress["joined"]:
    print(f"error: the job did not assemble within {initialization_timeout_s} s "
          "(--initialization_timeout_s): the coordinator "
          f"{coordinator_address or '(auto-detected)'} did not answer, or not every process "
          "started. Start the same command on every host, with the same "
          "--coordinator_address and --num_processes and each its own --process_id.",
          file=sys.stderr)
    return 1
  who, why = _what_was_lost(report)
  print(f"error: lost {who} {_at(progress)} ({why}); this process cannot go on without it. "
        "Rerun the same command on every host: training resumes from the last complete "
        "checkpoint.", file=sys.stderr)
  return PEER_LOST_EXIT_CODE


def _at(progress) -> str:
  step = progress["step"]
  return f"at step {step}" if step is not None else "before the first training step"


def _what_was_lost(report: str) -> tuple[str, str]:
  """(who, why) from JAX's report: the peers that stopped sending heartbeats, or else the
  coordinator (this process's own link to it broke)."""
  unhealthy = re.search(r"unhealthy \(stopped sending heartbeats\):(.*?)The tasks", report,
                        flags=re.S)
  if unhealthy and re.search(r"\d", unhealthy[1]):
    peers = re.findall(r"\d+", unhealthy[1])
    return (f"process{'es' if len(peers) > 1 else ''} {', '.join(peers)}",
            "it stopped sending heartbeats: its host died or it was killed")
  return "the coordinator (process 0)", "it stopped answering: its host died or it was killed"


def _read_progress(fd: int, progress: dict) -> None:
  with os.fdopen(fd, "rb") as f:
    for line in f:
      text = line.decode().strip()
      if text == "joined":
        progress["joined"] = True
      elif text.startswith("step "):
        progress["step"] = int(text[5:])


def _pass_through(stream, tail: bytearray, keep: int = 16384) -> None:
  """Copies the child's stderr to ours as it comes, keeping its last `keep` bytes."""
  out = sys.stderr.buffer
  for chunk in iter(lambda: stream.read1(65536), b""):
    out.write(chunk)
    out.flush()
    tail.extend(chunk)
    del tail[:-keep]


if __name__ == "__main__":  # The parent, started by `supervise`.
  _timeout, _address, _, *_command = sys.argv[1:]
  sys.exit(_supervise(_command, _address or None, int(_timeout)))
