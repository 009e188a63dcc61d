"""Entry point: `python -m sbmae.main --config=configs/polymnist.py:quick --workdir=DIR`.

Runs every stage of the pipeline in order, each resuming from its own
checkpoint, so re-running the same command after an interruption continues
where it stopped. `--config.stage=NAME` runs one stage. A bad input
(`sbmae.errors.SbmaeError`) ends the run with its message on one line and
exit status 1.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from sbmae import errors
from sbmae import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder, used verbatim (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def maybe_initialize_distributed():
  """Calls `jax.distributed.initialize()` when the environment asks for it.

  Multi-process runs are recognised by an explicit coordinator
  (SBMAE_COORDINATOR=host:port with SBMAE_NUM_PROCESSES and SBMAE_PROCESS_ID),
  a SLURM job step with more than one task, or a TPU pod slice (TPU_WORKER_HOSTNAMES
  listing several hosts); jax picks the details up from the environment.
  """
  env = os.environ
  if "SBMAE_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["SBMAE_COORDINATOR"],
                               num_processes=int(env["SBMAE_NUM_PROCESSES"]),
                               process_id=int(env["SBMAE_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  maybe_initialize_distributed()
  logging.info("JAX processes %d/%d, devices %s", jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    pipeline.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.SbmaeError as e:
    sys.exit(f"sbmae: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
