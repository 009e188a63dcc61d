"""Per-modality dimension reduction by score-ratio matching.

It works on whitened latents (`sbmae.latents.Whitening`: x_m = L_m^T (z_m -
mu_m), L_m L_m^T the empirical precision of block m), so the reference density
is rho = N(0, I_D). The score
ratio s = grad log(pi / rho) is fitted by minimising the implicit objective
F(s) = E[1/2 ||s||^2 + div s - s.x] (DESIGN.md, "The maths"; the model and its
training live in `sbmae.reduction.score_ratio`, its closed-form parts in
`sbmae.reduction.closed_form`): a closed-form linear term,
closed-form splines of every direction's marginal law in each block's ICA
basis (so a private non-Gaussian unit, however weak, is not lost beside shared
structure), and a nonlinear residual for the dependence between directions,
dropped unless it beats the closed-form parts on held-out data. Only
the diagonal blocks H_mm = E[s_m s_m^T] of the diagnostic matrix are
accumulated, on the held-out samples; their eigenvectors give each modality's
basis U_m, and each eigenvector's u^T H_mm u is re-estimated with a control
variate, (u.x)^2 of known mean, that removes the heavy tails of a
Student-t-like direction (whose score ratio grows like x), and each marginal
spline's share of it is replaced by a debiased energy of that spline (less
smoothing, the smoother's variance subtracted: `closed_form._energy_correction`),
since the smoothing that is best for held-out F shrinks weak directions'
eigenvalues. Each eigenvector
then takes a cross-fitted test (Stein's identity on held-out samples,
`diagnostics.direction_z_scores`): a direction where the
learned s is not correlated with the true score ratio is estimation noise (the
noise floor) and is never kept. Among the rest, ranks are chosen so that the
estimated bound 1/2 * (discarded eigenvalue mass) <= epsilon; it bounds
KL(pi || pi_W) for the true score ratio, so it is reported beside the held-out
F of the learned one.

Typical use:
  x = latents.Whitening.fit(z).whiten(z)  # dict name -> whitened [N, d_m]
  red = reduction.fit(x, epsilon=0.5, rng=jax.random.key(0))
  y = red.project(x)                 # dict name -> [N, r_m]
  x_w = red.lift(y, rng=key)         # samples of pi_W, whitened coordinates
"""

import dataclasses
import json
import pathlib
import time
from typing import Any, Mapping, Sequence

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sbmae import errors
from sbmae import faults
from sbmae.reduction import closed_form
from sbmae.reduction import diagnostics
from sbmae.reduction import score_ratio


# Human-readable summary (names, ranks, dims, estimated KL bound, fit statistics) written
# by `Reduction.save` next to the Orbax arrays.
SUMMARY_FILE = "reduction.json"


@dataclasses.dataclass(frozen=True)
class ReductionConfig:
  """Settings of `fit`; the defaults suit N ~ 1e4 samples of D ~ 10..1000 dims.

  Attributes:
    parametrisation: form of s_theta. All but "mlp" are B_0 x + m(x) + r(x):
      B_0 the closed-form linear fit of `linear_fit` (exact for Gaussian
      latents), m the closed-form marginal splines of `marginal_fit` (see
      marginal_knots), both kept fixed, and r a learned nonlinear residual.
      "auto" (default): fits "ridge" and "subspace" on the same closed-form
      parts, split and keys and keeps the lower held-out F
      (`stats["parametrisation"]` says which), since neither wins everywhere:
      "subspace" on low-rank structure (every synthetic structure of
      `bench/bench_reduction.py`, e.g. `mixed`: F -12.5 vs -10.6, where the
      ridge residual overfits), "ridge" where the structure is in nearly
      every direction (real PolyMNIST-5 VAE beta 0.1 latents: F -63.4 vs
      -27.7; RAE latents: -134.1 vs -96.8).
      "ridge": r(x) = A g(W^T x), A, W in R^{D x k}, g acting on
      each of its k coordinates separately (a sum of k ridge functions; exact
      divergence in one jvp). "lowrank": the same with g an MLP on R^k.
      "subspace": r(x) = U h(U^T x), U [D, k] started at the directions
      where B_0 x + m(x) already shows structure
      (`diagnostics.structured_subspace`) and trained inside their blocks
      (subspace_learning_rate), h an MLP on R^k: the form of the true score
      ratio when the structure lives in span(U), with far fewer directions
      to single out training samples than "ridge" (k is capped at
      `bottleneck`, which is why it loses on real latents).
      "linear_mlp": r = MLP on R^D. "mlp": s(x) = MLP(x) alone.
    bottleneck: k of "ridge" (may exceed D: more ridge functions start from
      more random directions), of "lowrank" (capped at D), and the most
      directions "subspace" refines (those with the largest z-scores).
    width: hidden width of g (per coordinate for "ridge") or of the MLP.
    depth: hidden layers of the MLP (not used by "ridge", which has one).
      3 rather than 2: the "subspace" residual's held-out F is lower in 9 of
      10 synthetic fits and the weakest structured eigenvalues less shrunk
      (docs/reduction.md, "depth of the subspace residual").
    divergence: "exact" (Jacobian trace by forward mode: k jvps for
      "lowrank", D for the MLPs) or "hutchinson" (Rademacher probes,
      unbiased). "subspace", "ridge" and linear terms always use their exact
      trace.
    num_probes: Hutchinson probes per sample.
    threshold_grid: thresholds tried by `linear_fit`, in units of
      sqrt(D / n_train).
    penalty: c in the penalty c sqrt(D / n_train) / 2 (||A||^2 + ||W||^2)
      ("ridge", "lowrank"); its minimum over factorisations is a nuclear norm
      of the residual's linear part, which keeps it off sampling noise.
    weight_decay: decoupled (AdamW) weight decay on the nonlinear weights.
    learning_rate: peak Adam learning rate (cosine decay to 1% at max_steps).
    batch_size: training batch; also the batch of evaluation and of H.
    max_steps: training steps at most (0: the linear fit alone).
    ica_directions: per block, W columns ("ridge", "lowrank") that start at
      the block's most non-Gaussian directions (`closed_form.ica_directions`)
      instead of at random; 0: all random.
    marginal_knots: J, spline knots per direction of the closed-form
      marginal part (`closed_form.marginal_fit`: every direction of each
      block's ICA basis gets the score ratio of its own marginal law, so weak
      private units are found); 0: no marginal part. Not used by "mlp".
    smoothing_grid: roughness-penalty weights of the marginal splines, one
      chosen per direction by held-out F.
    ica_samples: training samples the ICA basis of the marginal part is found
      on (0: all); 16,384 is the scale of the synthetic benchmark, and the
      ICA's cost grows linearly with them (48,000 PolyMNIST latents: ~3x).
    ica_refine_rounds: rounds of maximum-likelihood ICA that move the
      directions with a marginal spline to the fixed point of FastICA whose
      nonlinearity is the fitted score (`closed_form._refine_basis`), each
      followed by a new spline fit; 0: the tanh FastICA basis as it is. On
      the polymnist benchmark one round moves a sharp bimodal unit from 12
      to 1 degree off, and its eigenvalue from 9.0 to 16.4 (true 15.9).
      Run after the first ICA and after each deflation round.
    ica_polish_rounds: further rounds at most on the final basis (after
      deflation), until no direction moves more than ica_refine_tolerance
      degrees in a round: a weak unit converges slowly (`private` m2 at
      split key 12, H 0.46: 20 degrees off after 2 rounds, 7.3 after 4).
    ica_refine_tolerance: see ica_polish_rounds.
    ica_deflation_rounds: rounds that look for directions the ICA missed:
      each block's directions without a spline are replaced by an ICA of
      their span (the complement of those with one), then splines and
      refinement again (`closed_form.marginal_fit`); 0: none. On `private`
      seed 1 it finds the weak bimodal unit of m2 that the first ICA left
      74 degrees off.
    energy_smoothing: the eigenvalues take each marginal spline's energy
      E[g_k^2] debiased (`closed_form._energy_correction`: refitted with
      this factor times its chosen roughness weight, the smoother's
      variance term subtracted) instead of the fitted spline's, which the
      smoothing that is best for held-out F shrinks; 0: the fitted s's
      energies as they are.
    significance: z-score a direction of H_mm must reach in the cross-fitted
      test of `diagnostics.direction_z_scores` to count as structure; the
      others are the estimator's noise floor and are never kept (their
      eigenvalues count as 0 for the ranks and the estimated bound). One-sided
      Gaussian tail at 4: 3e-5 per empty direction. -inf: no test. The same
      test on the closed-form parts chooses the "subspace" directions.
    subspace_learning_rate: peak Adam learning rate of the "subspace"
      residual's directions U (cosine decay like learning_rate), each column
      moving inside its own block; 0: U stays where `structured_subspace`
      put it. The closed-form parts locate a weak shared plane only roughly
      (`mixed`: span(U) 8-10 degrees off it in m0 and m2, seed 0), and a
      residual confined to a fixed U cannot do better than U.
    eval_every: steps between held-out evaluations of F.
    patience: evaluations without improvement before stopping; the
      parameters with the best held-out F are kept, so a residual that only
      overfits leaves the linear fit.
    held_out_fraction: share of the samples kept out of training; they choose
      the linear threshold, stop training and estimate H.
    min_rank: floor on every modality's rank (capped at d_m).
    max_rank: ceiling on every modality's rank; -1 for none.

  `configs/default.py` builds its `reduction` section from these defaults, so
  they are written here only.
  """
  parametrisation: str = "auto"
  bottleneck: int = 64
  width: int = 32
  depth: int = 3
  divergence: str = "hutchinson"
  num_probes: int = 1
  threshold_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
  penalty: float = 0.5
  weight_decay: float = 1e-4
  learning_rate: float = 3e-3
  batch_size: int = 256
  max_steps: int = 4000
  ica_directions: int = 4
  marginal_knots: int = 24
  smoothing_grid: tuple[float, ...] = tuple(float(10 ** (e / 4)) for e in range(-20, 9))
  ica_samples: int = 16384
  ica_refine_rounds: int = 2
  ica_polish_rounds: int = 6
  ica_refine_tolerance: float = 0.5
  ica_deflation_rounds: int = 1
  energy_smoothing: float = 0.01
  significance: float = 4.0
  subspace_learning_rate: float = 3e-4
  eval_every: int = 100
  patience: int = 5
  held_out_fraction: float = 0.2
  min_rank: int = 1
  max_rank: int = -1


# Keys of the project's `config.reduction` section that are not fit settings.
_NOT_FIT_KEYS = ("enabled", "epsilon")


def make_config(config=None) -> ReductionConfig:
  """ReductionConfig from None (defaults), itself, or a mapping/ConfigDict.

  A mapping may hold any subset of the fields (the rest take their defaults)
  plus the project's "enabled" and "epsilon", which are ignored here.
  """
  if config is None:
    return ReductionConfig()
  if isinstance(config, ReductionConfig):
    return config
  fields = {f.name for f in dataclasses.fields(ReductionConfig)}
  items = dict(config.items())
  unknown = set(items) - fields - set(_NOT_FIT_KEYS)
  if unknown:
    raise ValueError(f"Unknown reduction config keys: {sorted(unknown)}")
  # ConfigDicts may hold lists where the dataclass wants tuples.
  return ReductionConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in items.items() if k in fields})


def select_ranks(eigenvalues: Sequence[Any], epsilon: float, min_rank: int = 0,
                 max_rank: int = -1):
  """Chooses per-block ranks from the pooled eigenvalues.

  Every block first keeps its top min(min_rank, d_m) directions; then the
  largest remaining eigenvalues over all blocks not at their ceiling
  (min(max_rank, d_m), none if max_rank < 0) are kept one at a time until
  1/2 * (sum of the discarded ones) < epsilon. Without floors and ceilings this
  is the smallest total rank meeting the bound. Floors can only lower the bound;
  ceilings can leave it above epsilon, and the returned bound is always computed
  from what is actually discarded.

  Args:
    eigenvalues: per block, its eigenvalues (any order; negatives count as 0).
    epsilon: target bound on KL(pi || pi_W).
    min_rank: floor on every block's rank.
    max_rank: ceiling on every block's rank; negative for none.

  Returns:
    (ranks, kl_bound): a tuple of ints and 1/2 * discarded eigenvalue mass.
  """
  if 0 <= max_rank < min_rank:
    raise ValueError(f"max_rank={max_rank} is below min_rank={min_rank}")
  lams = [np.sort(np.clip(np.asarray(e, np.float64), 0, None))[::-1]
          for e in eigenvalues]
  ranks = [min(min_rank, len(l)) for l in lams]
  caps = [len(l) if max_rank < 0 else min(max_rank, len(l)) for l in lams]
  discarded = sum(float(l[r:].sum()) for l, r in zip(lams, ranks))
  candidates = sorted(((-l[i], m, i) for m, l in enumerate(lams)
                       for i in range(ranks[m], caps[m])))
  for neg_lam, m, _ in candidates:
    if 0.5 * discarded < epsilon:
      break
    ranks[m] += 1
    discarded += neg_lam
  return tuple(ranks), 0.5 * max(discarded, 0.0)


@struct.dataclass
class Reduction:
  """A fitted block-diagonal reduction of whitened latents; a pytree usable inside jit.

  Attributes:
    eigenvalues: name -> u^T H_mm u of each eigenvector u [d_m], descending,
      >= 0: on the held-out samples, with the control variate (u.x)^2 of
      `diagnostics.direction_z_scores` against heavy tails.
    eigenvectors: name -> the matching orthonormal eigenvectors [d_m, d_m].
    names: modality names, in the order of the concatenated latent.
    rank_tuple: r_m in the order of `names` (see `ranks`).
    estimated_kl_bound: 1/2 * the discarded eigenvalue mass of the directions
      above the noise floor: the bound on KL(pi || pi_W) estimated with the
      learned s (a bound for the true score ratio only; an underfitted s gives
      a smaller figure, so read it beside the held-out F in `stats`).
    epsilon: the target the ranks were chosen for.
    signal_dims: per block, how many of its leading eigen-pairs passed the
      noise-floor test (`fit`); the eigen-pairs are ordered passing first, and
      only those can be kept. Empty: all passed.
    fit_stats: (key, value) pairs describing the fit (see `stats`).
  """
  eigenvalues: dict[str, jax.Array]
  eigenvectors: dict[str, jax.Array]
  names: tuple[str, ...] = struct.field(pytree_node=False)
  rank_tuple: tuple[int, ...] = struct.field(pytree_node=False)
  estimated_kl_bound: float = struct.field(pytree_node=False)
  epsilon: float = struct.field(pytree_node=False)
  signal_dims: tuple[int, ...] = struct.field(pytree_node=False, default=())
  fit_stats: tuple[tuple[str, Any], ...] = struct.field(pytree_node=False,
                                                        default=())

  @property
  def ranks(self) -> dict[str, int]:
    return dict(zip(self.names, self.rank_tuple))

  @property
  def dims(self) -> dict[str, int]:
    return {n: self.eigenvalues[n].shape[0] for n in self.names}

  @property
  def bases(self) -> dict[str, jax.Array]:
    """name -> U_m [d_m, r_m], orthonormal columns in whitened coordinates."""
    return {n: self.eigenvectors[n][:, :r] for n, r in self.ranks.items()}

  @property
  def complements(self) -> dict[str, jax.Array]:
    """name -> U_m,perp [d_m, d_m - r_m]."""
    return {n: self.eigenvectors[n][:, r:] for n, r in self.ranks.items()}

  @property
  def stats(self) -> dict[str, Any]:
    """Timings (seconds), training figures and the residual kept, from `fit`."""
    return dict(self.fit_stats)

  def with_epsilon(self, epsilon: float, min_rank: int = 0,
                   max_rank: int = -1) -> "Reduction":
    """The same fit with ranks re-chosen for `epsilon` (no refitting)."""
    ranks, bound = select_ranks(self.signal_eigenvalues, epsilon, min_rank,
                                max_rank)
    return self.replace(rank_tuple=ranks, estimated_kl_bound=float(bound),
                        epsilon=float(epsilon))

  @property
  def signal_eigenvalues(self) -> list[np.ndarray]:
    """Per block, the eigenvalues with those under the noise floor set to 0."""
    out = []
    for i, n in enumerate(self.names):
      lam = np.array(self.eigenvalues[n], np.float64)
      if self.signal_dims:
        lam[self.signal_dims[i]:] = 0.0
      out.append(lam)
    return out

  def project(self, latents: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Whitened latents x_m -> reduced y_m = U_m^T x_m [..., r_m].

    Modalities absent from `latents` are skipped (also by `lift`).
    """
    bases = self.bases
    return {n: latents[n] @ bases[n] for n in self.names if n in latents}

  def lift(self, reduced: Mapping[str, jax.Array],
           rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Reduced y_m -> whitened latents x_m = U_m y_m + U_m,perp xi.

    Args:
      reduced: name -> y_m [..., r_m].
      rng: if given, xi ~ N(0, I) (a sample of pi_W given y); else xi = 0.

    Returns:
      name -> x_m [..., d_m].
    """
    bases, comps, x = self.bases, self.complements, {}
    for i, n in enumerate(self.names):
      if n not in reduced:
        continue
      y = reduced[n]
      x[n] = y @ bases[n].T
      if rng is not None:
        xi = jax.random.normal(jax.random.fold_in(rng, i),
                               y.shape[:-1] + (comps[n].shape[1],), y.dtype)
        x[n] = x[n] + xi @ comps[n].T
    return x

  def save(self, path) -> None:
    """Writes the arrays (Orbax), then names/ranks/bound (JSON, the "done" marker)."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(self, k) for k in _ARRAY_FIELDS}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path / "arrays", arrays, force=True)
    faults.point("reduce:summary")
    meta = dict(names=list(self.names), ranks=list(self.rank_tuple),
                dims=[self.dims[n] for n in self.names],
                estimated_kl_bound=self.estimated_kl_bound,
                epsilon=self.epsilon, signal_dims=list(self.signal_dims),
                stats=self.stats)
    # The summary is the "done" marker: written last, atomically, after the arrays.
    faults.write_text(path / SUMMARY_FILE, json.dumps(meta, indent=1))

  @classmethod
  def restore(cls, path) -> "Reduction":
    """Reads a Reduction written by `save`."""
    path = pathlib.Path(path).absolute()
    meta = json.loads((path / SUMMARY_FILE).read_text())
    names = tuple(meta["names"])
    shapes = dict(eigenvalues=lambda d: (d,), eigenvectors=lambda d: (d, d))
    target = {k: {n: jax.ShapeDtypeStruct(shapes[k](d), jnp.float32)
                  for n, d in zip(names, meta["dims"])} for k in _ARRAY_FIELDS}
    with ocp.StandardCheckpointer() as ckptr:
      arrays = ckptr.restore(path / "arrays", target)
    return cls(**arrays, names=names, rank_tuple=tuple(meta["ranks"]),
               estimated_kl_bound=meta.get("estimated_kl_bound",
                                           meta.get("kl_bound")),
               epsilon=meta["epsilon"],
               signal_dims=tuple(meta.get("signal_dims", ())),
               fit_stats=tuple(meta["stats"].items()))


_ARRAY_FIELDS = ("eigenvalues", "eigenvectors")


def check_whitened(latents: Mapping[str, Any], tolerance: float = 0.5):
  """Raises DataError naming the modality whose block is clearly not whitened.

  The reduction's reference density is N(0, I): raw latents would make every
  direction look informative. Loose on purpose, so that any large sample of
  whitened latents passes: every mean within `tolerance` of 0 and every
  variance within a factor 1 + `tolerance` of 1.
  """
  for n, z in latents.items():
    z = np.asarray(z, np.float64)
    mean, var = np.abs(z.mean(0)).max(), z.var(0)
    if mean > tolerance or var.max() > 1 + tolerance or var.min() < 1 / (1 + tolerance):
      raise errors.DataError(
          f"latents of modality {n!r} are not whitened (largest |mean| {mean:.3g}, "
          f"variances {var.min():.3g}..{var.max():.3g}): pass them through "
          "sbmae.latents.Whitening first (a variance near 0 means a constant direction)")


def check_inputs(latents: Mapping[str, Any], epsilon: float, cfg: ReductionConfig):
  """Raises a named error for bad arguments of `fit`, before any training.

  ConfigError for an epsilon or setting out of range (NaN, negative); DataError
  for latents that are not [N, d_m] float arrays with one N; NonFiniteError
  naming the modality and row of a NaN or inf latent.
  """
  errors.validate_config(ml_collections.ConfigDict(
      {"reduction": {**dataclasses.asdict(cfg), "epsilon": epsilon}}))
  if not latents:
    raise errors.DataError("reduction.fit: no latents given (a dict name -> [N, d_m])")
  sizes = {}
  for n, z in latents.items():
    z = np.asarray(z)
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.floating) or z.shape[1] < 1:
      raise errors.DataError(f"reduction.fit: latents of modality {n!r} have shape "
                             f"{z.shape} and dtype {z.dtype}; expected float [N, d_m]")
    errors.check_finite_rows(z, f"reduction.fit: latents of modality {n!r}")
    sizes[n] = len(z)
  if len(set(sizes.values())) > 1:
    raise errors.DataError(f"reduction.fit: modalities have different sample counts {sizes}; "
                           "row i of every modality must be the same example")
  if min(sizes.values()) < 4:
    raise errors.DataError(f"reduction.fit: {min(sizes.values())} samples; need at least 4 "
                           "(train and held-out)")


def fit(latents: Mapping[str, Any], *, epsilon: float, rng: jax.Array,
        config=None) -> Reduction:
  """Fits the per-modality reduction to samples of the whitened latents.

  Args:
    latents: name -> [N, d_m] whitened samples (`sbmae.latents.Whitening`).
    epsilon: target bound (nats) on KL(pi || pi_W).
    rng: PRNG key (data split, initialisation, batches, probes).
    config: anything `make_config` accepts (None: ReductionConfig defaults).

  Returns:
    The fitted Reduction.

  Raises:
    sbmae.errors.ConfigError, DataError, NonFiniteError: bad arguments
      (`check_inputs`), before any training.
  """
  cfg = make_config(config)
  names = tuple(latents)
  check_inputs(latents, epsilon, cfg)
  check_whitened(latents)
  x = jnp.concatenate([jnp.asarray(latents[n], jnp.float32) for n in names], axis=-1)
  dims = tuple(int(latents[n].shape[-1]) for n in names)
  n_held = max(1, int(round(cfg.held_out_fraction * x.shape[0])))
  k_split, k_train = jax.random.split(rng)
  perm = jax.random.permutation(k_split, x.shape[0])
  x_held, x_train = x[perm[:n_held]], x[perm[n_held:]]

  t0 = time.perf_counter()
  model, params, info = score_ratio.train_score_ratio(
      x_train, x_held, rng=k_train, config=cfg, dims=dims)
  t_train = time.perf_counter() - t0

  t0 = time.perf_counter()
  sums, count = diagnostics.diagnostic_blocks(model.score, params, x_held, dims,
                                  cfg.batch_size)
  blocks = [jax.block_until_ready(s / count) for s in sums]
  t_h = time.perf_counter() - t0

  t0 = time.perf_counter()
  eigvals, eigvecs, signal_dims = [], [], []
  # The noise floor: directions whose learned s is not correlated with the
  # true score ratio on held-out samples (signal first, each part by
  # eigenvalue).
  for lam, vec, _, z in diagnostics.block_eigen_z_scores(
      model.score, params, blocks, x_held, dims, cfg.batch_size, model.curvature,
      diagnostics.block_second_moments(x, dims),
      closed_form.energy_correction_blocks(params, dims)):
    signal = np.asarray(z) >= cfg.significance
    order = np.argsort(~signal, kind="stable")
    eigvals.append(lam[order])
    eigvecs.append(vec[:, order])
    signal_dims.append(int(signal.sum()))
  jax.block_until_ready(eigvecs)
  t_eigh = time.perf_counter() - t0

  masked = [np.where(np.arange(len(l)) < k, np.asarray(l), 0.0)
            for l, k in zip(eigvals, signal_dims)]
  ranks, bound = select_ranks(masked, epsilon, cfg.min_rank, cfg.max_rank)
  if bound >= epsilon:
    logging.warning("reduction: estimated KL bound %.3f >= epsilon %.3f "
                    "(rank ceilings)", bound, epsilon)
  stats = dict(train_seconds=t_train, diagnostic_seconds=t_h,
               eigh_and_test_seconds=t_eigh, **info)
  logging.info("reduction: training %.1f s (%d steps, best held-out F %.4f @ "
               "%d), H blocks %.2f s, eigh and noise-floor test %.2f s; "
               "directions above the floor %s, ranks %s, estimated KL bound "
               "%.4f", t_train, info["train_steps"], info["held_out_objective"],
               info["best_step"], t_h, t_eigh,
               dict(zip(names, signal_dims)), dict(zip(names, ranks)), bound)
  as_dict = lambda arrays: dict(zip(names, (jnp.asarray(a) for a in arrays)))
  return Reduction(eigenvalues=as_dict(eigvals),
                   eigenvectors=as_dict(eigvecs), names=names,
                   rank_tuple=ranks, estimated_kl_bound=float(bound),
                   epsilon=float(epsilon), signal_dims=tuple(signal_dims),
                   fit_stats=tuple(stats.items()))
