"""Surviving faults: files written atomically, and the kill points the fault tests use.

A run may be killed at any instant (kill -9, preemption, a full disk). Every
file a later run *trusts* (a data cache, latents, the reduction's summary,
config.json, metrics JSON) is therefore written to a temporary file in the same
folder and renamed over its final name (`atomic_write`): a reader sees the old
file, the whole new file, or no file, never half of one. Orbax checkpoints
commit the same way (a temporary folder, renamed when complete). Temporary
files a killed run leaves behind (`*.tmp*`) are never read.

`point(name)` is the one fault-injection hook: when the environment variable
SBMAE_FAULT_AT equals `name`, the process kills itself with SIGKILL on the
spot (no cleanup, no `finally`), as a preemption would. The names, placed
where a kill is most likely to leave something half done:

  data:write                 the data cache is written to its temporary file, not renamed
  <stage>:<step>             a training stage finished step <step> (1-based)
  <stage>:save:<step>        the step-<step> Orbax checkpoint was started, not committed
  autoencoders:latents       latent_stats.npz written, latents.npz not yet
  reduce:summary             the reduction's arrays written, reduction.json not yet
  evaluate:k<k>              subsets of size k scored, metrics.json not written

`tests/test_faults.py` kills a run at seeded points and checks that re-running
the same command gives the uninterrupted run's metrics bit for bit. Unset (the
normal case) `point` costs one dict lookup.
"""

import contextlib
import os
import pathlib
import signal
import tempfile

ENV_VAR = "SBMAE_FAULT_AT"


def point(name):
  """Kills this process with SIGKILL when SBMAE_FAULT_AT == `name` (tests only)."""
  if os.environ.get(ENV_VAR) == name:
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
  """Opens a temporary file beside `path`; renames it to `path` only on success.

  Args:
    path: the final file name.
    mode: "wb" or "w".

  Yields:
    The open temporary file. If the block raises, the temporary file is removed
    and `path` is left as it was.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path, text):
  """Writes `text` to `path` atomically."""
  with atomic_write(path, "w") as f:
    f.write(text)
