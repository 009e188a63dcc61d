"""Benchmark of sbmae.reduction.fit at PolyMNIST-10 size (10 x 64 latents).

Synthetic latents with a known answer: three Gaussian factors shared by all
modalities (canonical correlations RHOS), so H is Sigma - 2 I + Sigma^{-1} in
closed form, plus one bimodal direction in modality m0; every block is then
mixed by a random invertible map and shifted. Prints the time of each stage,
the training step's throughput and share of peak, the chosen ranks and KL
bound, and the learned spectra and subspaces against the analytic ones.

Run:
  JAX_PLATFORMS=cpu python bench/bench_reduction.py [--parametrisation=ridge]
      [--plot_dir=/tmp/reduction_plots]
"""

import time

from absl import app
from absl import flags
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from sbmae import latents as latents_lib
from sbmae import testing
from sbmae.reduction import plots
from sbmae.reduction import reduction
from sbmae.reduction import score_ratio

_N = flags.DEFINE_integer("num_samples", 10000, "Latent samples N.")
_M = flags.DEFINE_integer("num_modalities", 10, "Modalities M.")
_D = flags.DEFINE_integer("dim", 64, "Latent size per modality.")
_EPS = flags.DEFINE_float("epsilon", 0.5, "Target KL bound.")
_PAR = flags.DEFINE_string("parametrisation", None,
                           "Override ReductionConfig.parametrisation.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and fit seed.")
_PLOTS = flags.DEFINE_string("plot_dir", "", "If set, write the plots here.")

RHOS = (0.9, 0.7, 0.5)
BIMODAL_MEAN = 0.9


def make_latents(n, m, d, seed):
  """(latents, mixing maps, analytic H blocks in unmixed coordinates)."""
  rs = np.random.RandomState(seed)
  rho = np.asarray(RHOS)
  k = len(rho)
  factors = rs.randn(n, k)
  frames = [np.linalg.qr(rs.randn(d, k + 1))[0] for _ in range(m)]
  xs = []
  for frame in frames:
    u = frame[:, :k]
    # Marginal covariance I: the factors' share plus noise filling the rest.
    w, v = np.linalg.eigh(np.eye(d) - u @ np.diag(rho**2) @ u.T)
    xs.append((factors * rho) @ u.T + rs.randn(n, d) @ (v * np.sqrt(w)) @ v.T)
  sigma = np.eye(m * d)
  for i in range(m):
    for j in range(m):
      if i != j:
        sigma[i * d:(i + 1) * d, j * d:(j + 1) * d] = (
            frames[i][:, :k] @ np.diag(rho**2) @ frames[j][:, :k].T)
  h = testing.gaussian_h(sigma)
  h_blocks = [h[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(m)]
  # Replace m0's coordinate along a direction orthogonal to its factors by an
  # independent bimodal variable (unit variance, H eigenvalue ~2.94).
  e = frames[0][:, k]
  a = BIMODAL_MEAN
  y = rs.choice([-a, a], size=n) + np.sqrt(1 - a * a) * rs.randn(n)
  xs[0] = xs[0] + np.outer(y - xs[0] @ e, e)
  h_blocks[0] = h_blocks[0] + testing.bimodal_eigenvalue(a) * np.outer(e, e)
  # Random rotations times scales in [e^-1, e]: latent coordinates of unequal
  # size that the fit must whiten.
  mixing = [np.linalg.qr(rs.randn(d, d))[0] * np.exp(rs.uniform(-1, 1, d))
            for _ in range(m)]
  latents = {f"m{i}": (x @ mix.T + rs.randn(d)).astype(np.float32)
             for i, (x, mix) in enumerate(zip(xs, mixing))}
  return latents, mixing, h_blocks


def largest_angle(u, v):
  u, v = np.linalg.qr(np.asarray(u, np.float64))[0], np.linalg.qr(
      np.asarray(v, np.float64))[0]
  cos = np.linalg.svd(u.T @ v, compute_uv=False)
  return float(np.arccos(np.clip(cos.min(), -1, 1))) if len(cos) else 0.0


def step_throughput(config, dim, n_train, steps=100):
  """Steps/s and GFLOP/s of the jitted training step (after compilation)."""
  model = score_ratio.get_model(dim, config)
  loss_fn = score_ratio.get_loss_fn(model, 0.1)
  x = jax.random.normal(jax.random.key(0), (n_train, dim))
  b0 = None if config.parametrisation == "mlp" else jnp.eye(dim) * 0.1
  state = train_state.TrainState.create(
      apply_fn=None, params=model.init(jax.random.key(1), b0),
      tx=optax.adam(config.learning_rate))
  kwargs = dict(loss_fn=loss_fn, batch_size=config.batch_size)
  compiled = score_ratio.train_steps.lower(
      state, x, jax.random.key(2), num_steps=1, **kwargs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, _ = score_ratio.train_steps(state, x, jax.random.key(2),
                                   num_steps=steps, **kwargs)
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, _ = score_ratio.train_steps(state, x, jax.random.key(3),
                                   num_steps=steps, **kwargs)
  jax.block_until_ready(state)
  rate = steps / (time.perf_counter() - start)
  return rate, flops * rate / 1e9


def main(argv):
  del argv
  config = reduction.ReductionConfig()
  if _PAR.value:
    config = reduction.ReductionConfig(parametrisation=_PAR.value)
  latents, mixing, h_blocks = make_latents(_N.value, _M.value, _D.value,
                                           _SEED.value)
  dim = _M.value * _D.value
  print(f"fit on {_N.value} x {dim} latents ({_M.value} modalities x "
        f"{_D.value}), epsilon {_EPS.value}, config {config}")

  start = time.perf_counter()
  white = latents_lib.Whitening.fit(latents)
  latents = {n: np.asarray(v) for n, v in white.whiten(latents).items()}
  t_whiten = time.perf_counter() - start
  red = reduction.fit(latents, epsilon=_EPS.value,
                      rng=jax.random.key(_SEED.value), config=config)
  total = time.perf_counter() - start
  st = red.stats
  print(f"\ntotal {total:.1f} s = whitening {t_whiten:.1f} s"
        f" + training s_theta {st['train_seconds']:.1f} s"
        f" ({st['train_steps']} steps, best at {st['best_step']})"
        f" + accumulating H {st['diagnostic_seconds']:.2f} s"
        f" + eigh {st['eigh_seconds']:.2f} s (rest: rank selection, transfers)")
  print(f"held-out F {st['held_out_objective']:.3f}"
        f" (linear fit alone {st.get('linear_held_out_objective', np.nan):.3f};"
        f" analytic optimum {-0.5 * sum(np.trace(h) for h in h_blocks):.3f})")

  n_train = _N.value - round(config.held_out_fraction * _N.value)
  rate, gflops = step_throughput(config, dim, n_train)
  peak = common.measured_peak_gflops()
  print(f"training step: {rate:.1f} steps/s, {rate * config.batch_size:.0f} "
        f"samples/s, {gflops:.1f} GFLOP/s = {100 * gflops / peak:.1f}% "
        f"of this machine's measured {peak:.0f} GFLOP/s matmul peak")

  true_lams = [np.sort(np.linalg.eigvalsh(h))[::-1] for h in h_blocks]
  true_ranks, true_bound = reduction.select_ranks(
      true_lams, _EPS.value, config.min_rank, config.max_rank)
  print(f"\nchosen ranks {red.ranks}, KL bound {red.kl_bound:.4f}")
  print(f"analytic H gives ranks {dict(zip(red.names, true_ranks))}, "
        f"bound {true_bound:.4f}")
  print("modality: top eigenvalues learned | analytic; angle of the common "
        "top subspace (rad)")
  for i, name in enumerate(red.names):
    lam_true, vec_true = np.linalg.eigh(h_blocks[i])
    vec_true = vec_true[:, ::-1]
    r = min(red.ranks[name], true_ranks[i])
    q = np.asarray(white.whitener[name], np.float64) @ mixing[i]
    angle = largest_angle(q @ vec_true[:, :r], red.eigenvectors[name][:, :r])
    print(f"  {name}: {np.round(np.asarray(red.eigenvalues[name][:5]), 3)} | "
          f"{np.round(lam_true[::-1][:5], 3)}; angle(top {r}) {angle:.3f}")
  if _PLOTS.value:
    print("plots:", *plots.save_all(red, _PLOTS.value))


if __name__ == "__main__":
  app.run(main)
