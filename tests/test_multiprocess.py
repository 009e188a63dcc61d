"""Two local processes, one JAX job over loopback: train, checkpoint, resume."""

import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, num_steps, xla_flags):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))  # 1 device each
  procs = []
  for pid in range(2):
    env_i = dict(env, JAX_PLATFORMS="cpu", SBMAE_COORDINATOR=f"127.0.0.1:{port}",
                 SBMAE_NUM_PROCESSES="2", SBMAE_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "sbmae.main", "--config=configs/polymnist.py:quick",
         f"--workdir={workdir}", "--config.stage=autoencoders",
         f"--config.autoencoder.num_steps={num_steps}", "--config.checkpoint_every=2",
         # Resuming with more steps changes the config on purpose.
         "--config.allow_config_change=True",
         "--config.log_every=1", "--config.autoencoder.widths=(8, 8, 8)",
         "--config.autoencoder.latent_dim=8", "--config.data.num_train=256",
         "--config.data.num_test=64"],
        cwd=REPO, env=env_i, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def test_two_processes_train_checkpoint_and_resume(tmp_path, xla_flags):
  logs = _run_two_processes(tmp_path, num_steps=2, xla_flags=xla_flags)
  assert all("JAX processes" in log and "2 devices" not in log for log in logs)
  assert "processes 0/2" in logs[0] and "processes 1/2" in logs[1]
  checkpoints = tmp_path / "autoencoders" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
  logs = _run_two_processes(tmp_path, num_steps=4, xla_flags=xla_flags)
  assert all("[autoencoders] resumed at step 2" in log for log in logs)
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2", "4"]
  # Only process 0 writes metrics.
  assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # one per run
