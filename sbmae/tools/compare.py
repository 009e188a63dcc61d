"""Compares finished runs: a Markdown table and a coherence-vs-k plot.

  python -m sbmae.tools.compare --run=full:/tmp/w/full --run=reduced:/tmp/w/reduced \
      --out=/tmp/w/compare

reads each run's `eval/metrics.json` (and `reduce/reduction.json` when the run
used the dimension reduction) and writes `<out>/coherence.png` and
`<out>/table.md` (also printed): ranks and KL bound, the reconstruction
coherence (mean over modalities; the ceiling the autoencoders and reduction
leave), conditional coherence for every k, its mean, unconditional coherence
and fd_clf per modality.
"""

import json
import pathlib

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")  # Files only.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from sbmae import rundir
from sbmae.reduction import plots
from sbmae.stages import reduce

_RUNS = flags.DEFINE_multi_string("run", [], "label:workdir of a finished run (repeat).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")


def conditional_ks(metrics):
  """Sorted k of every `coherence/conditional_k{k}` key in an eval metrics dict."""
  return sorted(int(key.rsplit("_k", 1)[1]) for key in metrics
                if key.startswith("coherence/conditional_k"))


def plot_coherence(runs, path):
  """Conditional coherence against the number of observed modalities.

  Args:
    runs: dict label -> eval metrics (the "metrics" dict of eval/metrics.json),
      one line per run.
    path: output PNG.
  """
  fig, ax = plt.subplots(figsize=(5, 3.5))
  all_ks = set()
  for label, metrics in runs.items():
    ks = conditional_ks(metrics)
    ax.plot(ks, [metrics[f"coherence/conditional_k{k}"] for k in ks], marker="o",
            label=label)
    all_ks.update(ks)
  ax.set_xticks(sorted(all_ks))
  plots.save_unit_plot(fig, ax, "observed modalities k", "conditional coherence", path)


def load_run(workdir):
  """(eval metrics dict, reduction summary dict or None) of a finished run."""
  run = rundir.RunDir(workdir)
  metrics_path = run.eval_metrics
  if not metrics_path.exists():
    raise FileNotFoundError(f"{metrics_path} not found: run the evaluate stage of {workdir} "
                            f"first (python -m sbmae.main ... --workdir={workdir}).")
  metrics = json.loads(metrics_path.read_text())["metrics"]
  summary_path = reduce.summary(run)
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
  return metrics, summary


def table(runs):
  """Markdown table with one row per run.

  Args:
    runs: dict label -> (metrics, reduction or None) from `load_run`.
  """
  metrics = [m for m, _ in runs.values()]
  ks = sorted({k for m in metrics for k in conditional_ks(m)})
  fds = sorted({key for m in metrics for key in m if key.startswith("fd_clf/")},
               key=lambda s: (len(s), s))  # m2 before m10
  head = (["run", "latent dims (ranks)", "est. KL bound", "recon. coh."] + [f"k={k}" for k in ks]
          + ["mean", "uncond."] + [f.replace("fd_clf/", "fd_clf ") for f in fds])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, (m, red) in runs.items():
    if red is None:
      dims, bound = "full", "-"
    else:
      dims = f"{sum(red['ranks'])} ({'/'.join(str(r) for r in red['ranks'])})"
      bound = f"{red.get('estimated_kl_bound', red.get('kl_bound')):.3f}"
    recon = [v for key, v in m.items() if key.startswith("coherence/reconstruction_")]
    cells = ([label, dims, bound, f"{sum(recon) / len(recon):.3f}" if recon else "-"]
             + [f"{m[f'coherence/conditional_k{k}']:.3f}" if f"coherence/conditional_k{k}" in m
                else "-" for k in ks]
             + [f"{m['coherence/conditional_mean']:.3f}", f"{m['coherence/unconditional']:.3f}"]
             + [f"{m[f]:.1f}" if f in m else "-" for f in fds])
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv):
  del argv
  if not _RUNS.value or not _OUT.value:
    raise app.UsageError("give --run=label:workdir (one or more) and --out=folder")
  runs = {}
  for spec in _RUNS.value:
    label, sep, workdir = spec.partition(":")
    if not sep:
      raise app.UsageError(f"--run={spec!r}: expected label:workdir")
    runs[label] = load_run(workdir)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  plot_coherence({label: m for label, (m, _) in runs.items()}, out / "coherence.png")
  text = table(runs)
  (out / "table.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
