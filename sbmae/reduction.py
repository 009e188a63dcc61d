"""Per-modality dimension reduction by score-ratio matching.

Each modality's latent block is whitened (x_m = L_m^T (z_m - mu_m), L_m L_m^T
the empirical precision), so the reference density is rho = N(0, I_D). The score
ratio s = grad log(pi / rho) is fitted by minimising the implicit objective
F(s) = E[1/2 ||s||^2 + div s - s.x] (DESIGN.md, "The maths"), in two parts: a
closed-form linear term B_0 x (exact for Gaussian latents, shrunk against
sampling noise) plus a nonlinear residual trained with early stopping on
held-out F; a residual that does not beat the linear term on held-out data is
dropped. Only the diagonal blocks H_mm = E[s_m s_m^T] of the diagnostic matrix
are accumulated, on the held-out samples; their eigenvectors give each
modality's basis U_m, and ranks are chosen so that
KL(pi || pi_W) <= 1/2 * (discarded eigenvalue mass) <= epsilon.

Typical use:
  red = reduction.fit(latents, epsilon=0.5, rng=jax.random.key(0))
  y = red.project(latents)           # dict name -> [N, r_m]
  z = red.lift(y, rng=key)           # samples of pi_W in the raw latent space
"""

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import flax
from flax import struct
from flax.training import train_state
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

Params = Any
PARAMETRISATIONS = ("ridge", "lowrank", "linear_mlp", "mlp")


@dataclasses.dataclass(frozen=True)
class ReductionConfig:
  """Settings of `fit`; the defaults suit N ~ 1e4 samples of D ~ 10..1000 dims.

  Attributes:
    parametrisation: form of s_theta. All but "mlp" are B_0 x + r(x): B_0 the
      closed-form linear fit of `linear_fit` (exact for Gaussian latents),
      kept fixed, and r a learned nonlinear residual. "ridge":
      r(x) = A g(W^T x), A, W in R^{D x k}, g acting on each of its k
      coordinates separately (a sum of k ridge functions; exact divergence in
      one jvp). "lowrank": the same with g an MLP on R^k. "linear_mlp":
      r = MLP on R^D. "mlp": s(x) = MLP(x) alone.
    bottleneck: k of "ridge" (may exceed D: more ridge functions start from
      more random directions) and of "lowrank" (capped at D).
    width: hidden width of g (per coordinate for "ridge") or of the MLP.
    depth: hidden layers of the MLP (not used by "ridge", which has one).
    divergence: "exact" (Jacobian trace by forward mode: k jvps for
      "lowrank", D for the MLPs) or "hutchinson" (Rademacher probes,
      unbiased). "ridge" and linear terms always use their exact trace.
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
    eval_every: steps between held-out evaluations of F.
    patience: evaluations without improvement before stopping; the
      parameters with the best held-out F are kept, so a residual that only
      overfits leaves the linear fit.
    held_out_fraction: share of the samples kept out of training; they choose
      the linear threshold, stop training and estimate H.
    min_rank: floor on every modality's rank (capped at d_m).
    max_rank: ceiling on every modality's rank; -1 for none.
    whiten_jitter: added to each block covariance's diagonal, relative to its
      mean variance, so that exactly degenerate blocks still invert. Keep it
      tiny: a direction whose variance is not far above it is not whitened
      to unit variance and then looks informative (drop dead dims instead).
  """
  parametrisation: str = "ridge"
  bottleneck: int = 64
  width: int = 32
  depth: int = 2
  divergence: str = "hutchinson"
  num_probes: int = 1
  threshold_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
  penalty: float = 0.5
  weight_decay: float = 1e-4
  learning_rate: float = 3e-3
  batch_size: int = 256
  max_steps: int = 4000
  eval_every: int = 100
  patience: int = 5
  held_out_fraction: float = 0.2
  min_rank: int = 1
  max_rank: int = -1
  whiten_jitter: float = 1e-9


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


class MLP(nn.Module):
  """GELU MLP; its last layer starts at zero unless `zero_output` is False."""
  features: int
  width: int
  depth: int
  zero_output: bool = True

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.gelu(nn.Dense(self.width)(x))
    init = (nn.initializers.zeros if self.zero_output else
            nn.linear.default_kernel_init)
    return nn.Dense(self.features, kernel_init=init)(x)


class RidgeFunctions(nn.Module):
  """k separate scalar functions g_j(u_j), each a one-hidden-layer GELU net."""
  features: int
  width: int

  @nn.compact
  def __call__(self, u):
    shape = (self.features, self.width)
    normal = nn.initializers.normal
    w_in = self.param("kernel_in", normal(1.0), shape)
    b_in = self.param("bias_in", normal(1.0), shape)
    w_out = self.param("kernel_out", normal(self.width**-0.5), shape)
    b_out = self.param("bias_out", nn.initializers.zeros, (self.features,))
    return jnp.sum(nn.gelu(u[..., None] * w_in + b_in) * w_out, -1) + b_out


class ScoreRatioModel(NamedTuple):
  """Pure functions of a score-ratio parametrisation.

  init(rng, b0) -> params, b0 [D, D] the linear fit (None for "mlp"), stored
  as params["linear"] and never trained; score(params, x[B, D]) -> s[B, D];
  score_and_divergence(params, x[B, D], rng) -> (s[B, D], div s [B]);
  penalty(params) -> the sum of squares that the penalty coefficient scales.
  """
  init: Callable[..., Params]
  score: Callable[[Params, jax.Array], jax.Array]
  score_and_divergence: Callable[..., tuple[jax.Array, jax.Array]]
  penalty: Callable[[Params], jax.Array]


def _weighted_trace(f, u, rng, weight, mode, num_probes):
  """tr(weight @ J_f(u)) for one vector u, exactly or by Hutchinson probes."""
  if mode == "exact":
    jac = jax.jacfwd(f)(u)
    return jnp.trace(jac) if weight is None else jnp.sum(jac.T * weight)
  if mode != "hutchinson":
    raise ValueError(f"Unknown divergence mode {mode!r}")
  probes = jax.random.rademacher(rng, (num_probes, u.shape[-1]), u.dtype)
  _, f_jvp = jax.linearize(f, u)
  left = probes if weight is None else probes @ weight
  return jnp.mean(jnp.sum(left * jax.vmap(f_jvp)(probes), axis=-1))


def linear_fit(x_train, x_held_out, grid):
  """Closed-form linear score ratio s(x) = B_0 x, guarded against noise.

  The minimiser of F over linear maps is I - Sigma^{-1}, i.e. diag(1 - 1/sigma)
  in the eigenbasis V of the training second moment. With gamma = D / n,
  sampling noise alone spreads sigma over the Marchenko-Pastur bulk
  [(1 - sqrt(gamma))^2, (1 + sqrt(gamma))^2], so three shrinkers are tried:
  soft thresholding, b = sign(sigma - 1) max(|sigma - 1| - lam, 0) / sigma (the
  minimiser of F + lam ||B||_*); hard thresholding, b = (1 - 1/sigma)
  [|sigma - 1| > lam]; and the spiked-covariance rule, b = 1 - 1/s_eff outside
  the bulk (0 inside), where ell solves sigma = ell (1 + gamma / (ell - 1)) and
  s_eff = 1 + c^2 (ell - 1) is the population variance along the sample
  eigenvector (c^2 its squared cosine with the spike). F is quadratic in b, so
  every candidate's held-out F is exact and cheap; the best is kept.

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    grid: thresholds lam to try, in units of sqrt(gamma).

  Returns:
    (B_0 [D, D], name of the chosen rule, its held-out F).
  """
  n, dim = x_train.shape
  gamma = dim / n
  sigma, v = jnp.linalg.eigh(x_train.T @ x_train / n)
  sigma = jnp.maximum(sigma, 1e-6)  # a constant direction would give 1/0
  # Held-out second moment along v: F(B) = sum_i b_i^2 s_i / 2 + b_i - b_i s_i.
  s_held = jnp.mean((x_held_out @ v) ** 2, axis=0)
  lams = jnp.asarray(grid, jnp.float32)[:, None] * math.sqrt(gamma)
  gap = jnp.abs(sigma - 1)
  soft = jnp.sign(sigma - 1) * jnp.maximum(gap - lams, 0) / sigma
  hard = jnp.where(gap > lams, 1 - 1 / sigma, 0.0)
  q = 1 + sigma - gamma
  root = jnp.sqrt(jnp.maximum(q**2 - 4 * sigma, 0))
  ell = jnp.where(sigma > 1, q + root, q - root) / 2
  cos2 = jnp.clip((1 - gamma / (ell - 1)**2) / (1 + gamma / (ell - 1)), 0, 1)
  outside = ((sigma > (1 + math.sqrt(gamma))**2)
             | (sigma < (1 - math.sqrt(gamma))**2))
  spiked = jnp.where(outside, 1 - 1 / (1 + cos2 * (ell - 1)), 0.0)
  b = jnp.concatenate([soft, hard, spiked[None]])
  f_held = jnp.sum(0.5 * b**2 * s_held + b - b * s_held, axis=-1)
  best = int(jnp.argmin(f_held))
  names = [f"{rule} threshold {lam} sqrt(D/n)" for rule in ("soft", "hard")
           for lam in grid] + ["spiked-covariance shrinkage"]
  return (v * b[best]) @ v.T, names[best], float(f_held[best])


def get_model(dim: int, config: ReductionConfig) -> ScoreRatioModel:
  """The score-ratio model on R^dim chosen by `config.parametrisation`."""
  mode, probes = config.divergence, config.num_probes
  kind = config.parametrisation
  if kind in ("ridge", "lowrank"):
    # More ridge functions than dimensions help (more random starting
    # directions); an MLP on R^k gains nothing from k > D.
    k = config.bottleneck if kind == "ridge" else min(config.bottleneck, dim)
    # A starts at zero, so g keeps a random last layer (else no gradient).
    net = (RidgeFunctions(k, config.width) if kind == "ridge" else
           MLP(k, config.width, config.depth, zero_output=False))

    def init(rng, b0):
      rw, rg = jax.random.split(rng)
      return {"linear": b0, "A": jnp.zeros((dim, k)),
              "W": jax.random.normal(rw, (dim, k)) / math.sqrt(dim),
              "g": net.init(rg, jnp.zeros((k,)))["params"]}

    def residual(params, x):
      return net.apply({"params": params["g"]}, x @ params["W"]) @ params["A"].T

    def residual_divergence(params, x, rng):
      # div A g(W^T x) = tr(W^T A J_g(u)) at u = W^T x.
      g = lambda u: net.apply({"params": params["g"]}, u)
      u = x @ params["W"]
      if kind == "ridge":  # J_g is diagonal: one jvp along ones gives it.
        _, dg = jax.jvp(g, (u,), (jnp.ones_like(u),))
        return dg @ jnp.sum(params["W"] * params["A"], 0)
      m = params["W"].T @ params["A"]
      return jax.vmap(lambda ui, r: _weighted_trace(g, ui, r, m, mode, probes))(
          u, jax.random.split(rng, x.shape[0]))

    def penalty(params):
      return jnp.sum(params["A"] ** 2) + jnp.sum(params["W"] ** 2)

  elif kind in ("linear_mlp", "mlp"):
    net = MLP(dim, config.width, config.depth)

    def init(rng, b0):
      params = {"net": net.init(rng, jnp.zeros((dim,)))["params"]}
      return params if kind == "mlp" else dict(params, linear=b0)

    def residual(params, x):
      return net.apply({"params": params["net"]}, x)

    def residual_divergence(params, x, rng):
      g = lambda xi: net.apply({"params": params["net"]}, xi)
      return jax.vmap(lambda xi, r: _weighted_trace(g, xi, r, None, mode,
                                                    probes))(
          x, jax.random.split(rng, x.shape[0]))

    def penalty(params):
      del params
      return jnp.zeros(())

  else:
    raise ValueError(f"parametrisation must be one of {PARAMETRISATIONS}, "
                     f"got {kind!r}")

  def score(params, x):
    s = residual(params, x)
    if "linear" in params:
      s = s + x @ jax.lax.stop_gradient(params["linear"]).T
    return s

  def score_and_divergence(params, x, rng):
    div = residual_divergence(params, x, rng)
    if "linear" in params:
      div = div + jnp.trace(params["linear"])
    return score(params, x), div

  return ScoreRatioModel(init, score, score_and_divergence, penalty)


def get_objective_fn(model: ScoreRatioModel):
  """Per-sample implicit objective f(x) = 1/2 ||s||^2 + div s - s.x.

  Its mean is F(s), equal to 1/2 E||s - grad log(pi/rho)||^2 up to a constant.
  """
  def objective_fn(params, rng, x):
    s, div = model.score_and_divergence(params, x, rng)
    return 0.5 * jnp.sum(s * s, -1) + div - jnp.sum(s * x, -1)
  return objective_fn


def get_loss_fn(model: ScoreRatioModel, penalty: float):
  """Training loss: mean objective plus penalty/2 * model.penalty(params).

  Returns:
    loss_fn(params, rng, batch) -> (loss, metrics).
  """
  objective_fn = get_objective_fn(model)

  def loss_fn(params, rng, batch):
    objective = jnp.mean(objective_fn(params, rng, batch))
    reg = 0.5 * penalty * model.penalty(params)
    return objective + reg, {"objective": objective, "penalty": reg}
  return loss_fn


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size",
                                             "num_steps"), donate_argnums=0)
def train_steps(state, x, rng, *, loss_fn, batch_size, num_steps):
  """Runs `num_steps` Adam steps on batches drawn (with replacement) from x.

  Args:
    state: flax TrainState (donated).
    x: [n, D] training samples.
    rng: base key; step t uses fold_in(rng, t), so runs are reproducible.
    loss_fn: from get_loss_fn.
    batch_size: samples per step.
    num_steps: steps in this call.

  Returns:
    (new state, metrics of the last step).
  """
  def step(state, _):
    key = jax.random.fold_in(rng, state.step)
    k_batch, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_batch, (batch_size,), 0, x.shape[0])
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, k_loss,
                                                     x[idx])
    return state.apply_gradients(grads=grads), metrics

  state, metrics = jax.lax.scan(step, state, None, length=num_steps)
  return state, jax.tree.map(lambda m: m[-1], metrics)


def _batched(x, batch_size):
  """Pads x [n, ...] to whole batches: ([nb, batch, ...], weights)."""
  n = x.shape[0]
  nb = -(-n // batch_size)
  xp = jnp.pad(x, [(0, nb * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
  w = (jnp.arange(nb * batch_size) < n).astype(x.dtype)
  return xp.reshape(nb, batch_size, *x.shape[1:]), w.reshape(nb, batch_size)


@functools.partial(jax.jit, static_argnames=("objective_fn", "batch_size"))
def held_out_objective(objective_fn, params, x, rng, batch_size):
  """Mean of objective_fn over x in batches (same rng: same probes)."""
  xb, wb = _batched(x, batch_size)

  def body(total, inp):
    i, xi, wi = inp
    f = objective_fn(params, jax.random.fold_in(rng, i), xi)
    return total + jnp.sum(f * wi), None

  total, _ = jax.lax.scan(body, jnp.zeros(()),
                          (jnp.arange(xb.shape[0]), xb, wb))
  return total / x.shape[0]


@functools.partial(jax.jit, static_argnames=("score_fn", "dims", "batch_size"))
def diagnostic_blocks(score_fn, params, x, dims, batch_size):
  """Sums of s_m s_m^T over x for every block m, never forming the D x D matrix.

  Args:
    score_fn: score_fn(params, x[B, D]) -> s[B, D].
    params: its parameters.
    x: [n, D] whitened samples (concatenated blocks).
    dims: tuple of block sizes d_m, summing to D.
    batch_size: samples per step of the accumulation loop.

  Returns:
    (sums, count): a tuple of [d_m, d_m] sums and the number of samples; H_mm is
    sums[m] / count. Both can be psum-ed over devices before the division.
  """
  xb, wb = _batched(x, batch_size)
  edges = np.cumsum((0,) + tuple(dims))

  def body(sums, inp):
    xi, wi = inp
    s = score_fn(params, xi) * wi[:, None]
    blocks = [s[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    return tuple(acc + sb.T @ sb for acc, sb in zip(sums, blocks)), None

  init = tuple(jnp.zeros((d, d), x.dtype) for d in dims)
  sums, _ = jax.lax.scan(body, init, (xb, wb))
  return sums, jnp.sum(wb)


def train_score_ratio(x_train, x_held_out, *, rng, config=None):
  """Fits s_theta by score-ratio matching with early stopping on held-out F.

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    rng: PRNG key.
    config: anything `make_config` accepts.

  Returns:
    (model, params, info): the ScoreRatioModel, the parameters with the best
    held-out F, and a dict with "held_out_objective" (that F),
    "linear_held_out_objective" (F of the linear fit alone, if any),
    "train_steps" and "best_step".
  """
  cfg = make_config(config)
  n, dim = x_train.shape
  model = get_model(dim, cfg)
  b0 = None
  if cfg.parametrisation != "mlp":
    b0, rule, linear_f = linear_fit(x_train, x_held_out, cfg.threshold_grid)
    logging.info("reduction: linear fit (%s), held-out F %.4f", rule, linear_f)
  penalty = cfg.penalty * math.sqrt(dim / n)
  loss_fn = get_loss_fn(model, penalty)
  objective_fn = get_objective_fn(model)
  k_init, k_train, k_eval = jax.random.split(rng, 3)
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.max_steps,
                                         alpha=0.01)
  # Weight decay on the nonlinear kernels only (A, W have their penalty); the
  # closed-form linear part stays fixed.
  labels = lambda p: flax.traverse_util.path_aware_map(
      lambda path, _: ("frozen" if path[0] == "linear" else
                       "decay" if path[-1].startswith("kernel") else "plain"),
      p)
  tx = optax.multi_transform(
      {"frozen": optax.set_to_zero(),
       "decay": optax.adamw(schedule, weight_decay=cfg.weight_decay),
       "plain": optax.adam(schedule)}, labels)
  state = train_state.TrainState.create(
      apply_fn=None, params=model.init(k_init, b0), tx=tx)
  eval_fn = lambda p: float(held_out_objective(
      objective_fn, p, x_held_out, k_eval, cfg.batch_size))
  # Copies: the state's buffers are donated to train_steps.
  best_f, best_step = eval_fn(state.params), 0
  best_params = jax.tree.map(jnp.copy, state.params)
  bad_evals, start = 0, time.perf_counter()
  while int(state.step) < cfg.max_steps and bad_evals < cfg.patience:
    num = min(cfg.eval_every, cfg.max_steps - int(state.step))
    state, metrics = train_steps(state, x_train, k_train, loss_fn=loss_fn,
                                 batch_size=cfg.batch_size, num_steps=num)
    step, f = int(state.step), eval_fn(state.params)
    if not math.isfinite(f):
      raise FloatingPointError(f"Held-out objective is {f} at step {step}")
    if f < best_f:
      best_params = jax.tree.map(jnp.copy, state.params)
      best_f, best_step, bad_evals = f, step, 0
    else:
      bad_evals += 1
    rate = step / (time.perf_counter() - start)
    logging.info("reduction step %d: train F %.4f, penalty %.4f, held-out F "
                 "%.4f (best %.4f @ %d); %.1f steps/s, ETA <= %.0f s", step,
                 metrics["objective"], metrics["penalty"], f, best_f,
                 best_step, rate, (cfg.max_steps - step) / rate)
  info = dict(held_out_objective=best_f, train_steps=int(state.step),
              best_step=best_step)
  if b0 is not None:
    info["linear_held_out_objective"] = linear_f
  return model, best_params, info


def whitening(z, jitter: float = 1e-9):
  """Empirical whitening of one block: x = L^T (z - mu), L L^T the precision.

  Computed in float64 on the host (d x d matrices only).

  Args:
    z: [N, d] samples.
    jitter: added to the covariance diagonal, relative to the mean variance.

  Returns:
    (mu [d], L^T [d, d], L^{-T} [d, d]) as float32 numpy arrays.
  """
  z = np.asarray(z, np.float64)
  mu = z.mean(0)
  cov = np.cov(z - mu, rowvar=False, bias=True).reshape(z.shape[1], -1)
  cov += jitter * np.trace(cov) / len(cov) * np.eye(len(cov))
  chol = np.linalg.cholesky(np.linalg.inv(cov))
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(mu), f32(chol.T), f32(np.linalg.inv(chol.T))


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
  """A fitted block-diagonal reduction; a pytree usable inside jit.

  Attributes:
    means: name -> mu_m [d_m].
    whiteners: name -> L_m^T [d_m, d_m]; x_m = L_m^T (z_m - mu_m).
    unwhiteners: name -> L_m^{-T}.
    eigenvalues: name -> eigenvalues of H_mm [d_m], descending, >= 0.
    eigenvectors: name -> the matching orthonormal eigenvectors [d_m, d_m].
    names: modality names, in the order of the concatenated latent.
    rank_tuple: r_m in the order of `names` (see `ranks`).
    kl_bound: 1/2 * the discarded eigenvalue mass (bound on KL(pi || pi_W)).
    epsilon: the target the ranks were chosen for.
    fit_stats: (key, value) pairs describing the fit (see `stats`).
  """
  means: dict[str, jax.Array]
  whiteners: dict[str, jax.Array]
  unwhiteners: dict[str, jax.Array]
  eigenvalues: dict[str, jax.Array]
  eigenvectors: dict[str, jax.Array]
  names: tuple[str, ...] = struct.field(pytree_node=False)
  rank_tuple: tuple[int, ...] = struct.field(pytree_node=False)
  kl_bound: float = struct.field(pytree_node=False)
  epsilon: float = struct.field(pytree_node=False)
  fit_stats: tuple[tuple[str, float], ...] = struct.field(pytree_node=False,
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
  def stats(self) -> dict[str, float]:
    """Timings (seconds) and training figures recorded by `fit`."""
    return dict(self.fit_stats)

  def whiten(self, latents: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Raw latents [..., d_m] -> whitened x_m = L_m^T (z_m - mu_m).

    Modalities absent from `latents` are skipped (also in the methods below).
    """
    return {n: (latents[n] - self.means[n]) @ self.whiteners[n].T
            for n in self.names if n in latents}

  def unwhiten(self, x: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Whitened x_m -> raw latents z_m = mu_m + L_m^{-T} x_m."""
    return {n: self.means[n] + x[n] @ self.unwhiteners[n].T
            for n in self.names if n in x}

  def project(self, latents: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Raw latents -> reduced y_m = U_m^T x_m [..., r_m]."""
    bases = self.bases
    return {n: x @ bases[n] for n, x in self.whiten(latents).items()}

  def lift(self, reduced: Mapping[str, jax.Array],
           rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Reduced y_m -> raw latents, x_m = U_m y_m + U_m,perp xi, un-whitened.

    Args:
      reduced: name -> y_m [..., r_m].
      rng: if given, xi ~ N(0, I) (a sample of pi_W given y); else xi = 0.

    Returns:
      name -> z_m [..., d_m].
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
    return self.unwhiten(x)

  def save(self, path) -> None:
    """Writes the arrays (Orbax) and names/ranks/bound (JSON) under `path`."""
    path = pathlib.Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(self, k) for k in _ARRAY_FIELDS}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path / "arrays", arrays, force=True)
    meta = dict(names=list(self.names), ranks=list(self.rank_tuple),
                dims=[self.dims[n] for n in self.names], kl_bound=self.kl_bound,
                epsilon=self.epsilon, stats=self.stats)
    (path / "reduction.json").write_text(json.dumps(meta, indent=1))

  @classmethod
  def restore(cls, path) -> "Reduction":
    """Reads a Reduction written by `save`."""
    path = pathlib.Path(path).absolute()
    meta = json.loads((path / "reduction.json").read_text())
    names = tuple(meta["names"])
    shapes = dict(means=lambda d: (d,), whiteners=lambda d: (d, d),
                  unwhiteners=lambda d: (d, d), eigenvalues=lambda d: (d,),
                  eigenvectors=lambda d: (d, d))
    target = {k: {n: jax.ShapeDtypeStruct(shapes[k](d), jnp.float32)
                  for n, d in zip(names, meta["dims"])} for k in _ARRAY_FIELDS}
    with ocp.StandardCheckpointer() as ckptr:
      arrays = ckptr.restore(path / "arrays", target)
    return cls(**arrays, names=names, rank_tuple=tuple(meta["ranks"]),
               kl_bound=meta["kl_bound"], epsilon=meta["epsilon"],
               fit_stats=tuple(meta["stats"].items()))


_ARRAY_FIELDS = ("means", "whiteners", "unwhiteners", "eigenvalues",
                 "eigenvectors")


def fit(latents: Mapping[str, Any], *, epsilon: float, rng: jax.Array,
        config=None) -> Reduction:
  """Fits the per-modality reduction to samples of the latents.

  Args:
    latents: name -> [N, d_m] samples (raw; each block is whitened here).
    epsilon: target bound (nats) on KL(pi || pi_W).
    rng: PRNG key (data split, initialisation, batches, probes).
    config: anything `make_config` accepts (None: ReductionConfig defaults).

  Returns:
    The fitted Reduction.
  """
  cfg = make_config(config)
  names = tuple(latents)
  t0 = time.perf_counter()
  mus, wts, uwts = zip(*(whitening(latents[n], cfg.whiten_jitter)
                         for n in names))
  x = jnp.concatenate([(jnp.asarray(latents[n], jnp.float32) - mu) @ wt.T
                       for n, mu, wt in zip(names, mus, wts)], axis=-1)
  dims = tuple(int(mu.shape[0]) for mu in mus)
  n_held = max(1, int(round(cfg.held_out_fraction * x.shape[0])))
  k_split, k_train = jax.random.split(rng)
  perm = jax.random.permutation(k_split, x.shape[0])
  x_held, x_train = x[perm[:n_held]], x[perm[n_held:]]
  t_whiten = time.perf_counter() - t0

  t0 = time.perf_counter()
  model, params, info = train_score_ratio(x_train, x_held, rng=k_train,
                                          config=cfg)
  t_train = time.perf_counter() - t0

  t0 = time.perf_counter()
  sums, count = diagnostic_blocks(model.score, params, x_held, dims,
                                  cfg.batch_size)
  blocks = [jax.block_until_ready(s / count) for s in sums]
  t_h = time.perf_counter() - t0

  t0 = time.perf_counter()
  eigvals, eigvecs = [], []
  for h in blocks:
    lam, vec = jnp.linalg.eigh(0.5 * (h + h.T))
    eigvals.append(jnp.clip(lam[::-1], 0.0, None))
    eigvecs.append(vec[:, ::-1])
  jax.block_until_ready(eigvecs)
  t_eigh = time.perf_counter() - t0

  ranks, kl_bound = select_ranks(eigvals, epsilon, cfg.min_rank, cfg.max_rank)
  if kl_bound >= epsilon:
    logging.warning("reduction: KL bound %.3f >= epsilon %.3f (rank ceilings)",
                    kl_bound, epsilon)
  stats = dict(whiten_seconds=t_whiten, train_seconds=t_train,
               diagnostic_seconds=t_h, eigh_seconds=t_eigh, **info)
  logging.info("reduction: whitening %.2f s, training %.1f s (%d steps, best "
               "held-out F %.4f @ %d), H blocks %.2f s, eigh %.2f s; ranks %s, "
               "KL bound %.4f", t_whiten, t_train, info["train_steps"],
               info["held_out_objective"], info["best_step"], t_h, t_eigh,
               dict(zip(names, ranks)), kl_bound)
  as_dict = lambda arrays: dict(zip(names, (jnp.asarray(a) for a in arrays)))
  return Reduction(means=as_dict(mus), whiteners=as_dict(wts),
                   unwhiteners=as_dict(uwts), eigenvalues=as_dict(eigvals),
                   eigenvectors=as_dict(eigvecs), names=names,
                   rank_tuple=ranks, kl_bound=float(kl_bound),
                   epsilon=float(epsilon), fit_stats=tuple(stats.items()))
