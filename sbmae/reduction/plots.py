"""PNG plots of a fitted dimension reduction (`sbmae.reduction.reduction.Reduction`).

Each function takes a Reduction and an output path and writes one figure:
the eigenvalue spectra of the diagnostic blocks H_mm, the estimated KL bound
(1/2 x discarded eigenvalues of H for the learned s) against the total rank,
and the chosen rank of every modality. The held-out objective F of the learned
s is shown beside the bound: the bound holds for the true score ratio only.
"""

import pathlib

import matplotlib

matplotlib.use("Agg")  # Files only; no display on the training machines.
import matplotlib.pyplot as plt
import numpy as np

# Eigenvalues at or below this are drawn at it (a log axis cannot show 0).
_FLOOR = 1e-8


def _save(fig, path):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _finish_log_plot(fig, ax, xlabel, ylabel, path, ncol=1):
  """Labels, legend and a log-scale grid, then writes the figure."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7, ncol=ncol)
  ax.grid(True, which="both", alpha=0.3)
  _save(fig, path)


def _held_out_f(reduction):
  """', held-out F ...' from the fit's statistics, or '' if absent."""
  f = reduction.stats.get("held_out_objective")
  return "" if f is None else f"; held-out F {f:.3g}"


def bound_curve(reduction):
  """Estimated KL bound of the best ridge approximation of every total rank.

  Directions under the noise floor (`Reduction.signal_dims`) count as 0.

  Args:
    reduction: a fitted Reduction.

  Returns:
    [D + 1] array; entry r is 1/2 * (sum of all pooled eigenvalues but the r
    largest), the bound reached by keeping the r largest over all blocks.
  """
  pooled = np.concatenate(reduction.signal_eigenvalues)
  pooled = np.sort(np.clip(pooled, 0, None))[::-1]
  tails = np.concatenate([np.cumsum(pooled[::-1])[::-1], [0.0]])
  return 0.5 * tails


def plot_spectra(reduction, path):
  """Eigenvalues of each H_mm (log scale), the kept ones marked.

  Args:
    reduction: a fitted Reduction.
    path: PNG file to write.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in reduction.names:
    lam = np.maximum(np.asarray(reduction.eigenvalues[name]), _FLOOR)
    idx = np.arange(1, len(lam) + 1)
    line, = ax.semilogy(idx, lam, "-", lw=1.2, label=name)
    r = reduction.ranks[name]
    ax.semilogy(idx[:r], lam[:r], "o", ms=4, color=line.get_color())
  ax.set_title("Diagnostic spectra per modality (dots: kept directions)")
  _finish_log_plot(fig, ax, "index i", "eigenvalue of H_mm", path, ncol=2)


def plot_kl_bound(reduction, path):
  """Estimated KL bound versus total rank, with epsilon and the chosen rank.

  Args:
    reduction: a fitted Reduction.
    path: PNG file to write.
  """
  curve = bound_curve(reduction)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.semilogy(np.arange(len(curve)), np.maximum(curve, _FLOOR), "-",
              label="1/2 (discarded eigenvalues), best blocks")
  ax.axhline(reduction.epsilon, color="gray", ls="--",
             label=f"epsilon = {reduction.epsilon:g}")
  total = sum(reduction.ranks.values())
  ax.plot([total], [max(reduction.estimated_kl_bound, _FLOOR)], "o", color="C3",
          label=f"chosen: rank {total}, estimated bound "
          f"{reduction.estimated_kl_bound:.3g}")
  ax.set_title(f"Estimated bound for the learned s{_held_out_f(reduction)}")
  _finish_log_plot(fig, ax, "total rank sum_m r_m",
                   "estimated bound on KL(pi || pi_W) (nats)", path)


def plot_ranks(reduction, path):
  """Chosen rank r_m against latent size d_m for each modality.

  Args:
    reduction: a fitted Reduction.
    path: PNG file to write.
  """
  names = reduction.names
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 4))
  ax.bar(x, [reduction.dims[n] for n in names], color="0.85", label="d_m")
  ax.bar(x, [reduction.ranks[n] for n in names], color="C0", label="r_m")
  for i, n in enumerate(names):
    ax.text(i, reduction.ranks[n], str(reduction.ranks[n]), ha="center",
            va="bottom", fontsize=8)
  ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0)
  ax.set_ylabel("dimensions")
  ax.set_title(f"Chosen ranks (estimated KL bound "
               f"{reduction.estimated_kl_bound:.3g}{_held_out_f(reduction)})")
  ax.legend(fontsize=8)
  _save(fig, path)


def save_all(reduction, out_dir):
  """Writes spectra.png, kl_bound.png and ranks.png under out_dir.

  Args:
    reduction: a fitted Reduction.
    out_dir: folder for the three files.

  Returns:
    The three paths.
  """
  out_dir = pathlib.Path(out_dir)
  paths = [out_dir / f for f in ("spectra.png", "kl_bound.png", "ranks.png")]
  for fn, path in zip((plot_spectra, plot_kl_bound, plot_ranks), paths):
    fn(reduction, path)
  return paths


def save_unit_plot(fig, ax, xlabel, ylabel, path):
  """Labels, a [0, 1] y axis, grid and legend, then writes the figure (coherence plots)."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_rank_sweep(rows, path):
  """Reconstruction coherence against total rank, one point per epsilon.

  Args:
    rows: `sbmae.tools.rank_sweep.sweep` output (the row with epsilon None is the
      unreduced latent, drawn as a horizontal line).
    path: output PNG.
  """
  fig, ax = plt.subplots(figsize=(5, 3.5))
  reduced = [r for r in rows if r["epsilon"] is not None]
  ax.plot([r["total_rank"] for r in reduced], [r["reconstruction_mean"] for r in reduced],
          marker="o", label="reduced")
  for r in reduced:
    ax.annotate(f"eps={r['epsilon']:g}", (r["total_rank"], r["reconstruction_mean"]),
                textcoords="offset points", xytext=(4, -10), fontsize=7)
  for r in rows:
    if r["epsilon"] is None:
      ax.axhline(r["reconstruction_mean"], color="k", ls="--",
                 label=f"full ({r['total_rank']} dims)")
  save_unit_plot(fig, ax, "total rank", "reconstruction coherence", path)
