"""Score-ratio matching: the network s_theta ~ grad log(pi / rho) and its training.

For whitened samples x of pi and the reference rho = N(0, I_D), the score ratio
s = grad log(pi / rho) minimises the implicit objective
F(s) = E[1/2 ||s||^2 + div s - s.x] (DESIGN.md, "The maths"); F needs no
density. `train_score_ratio` fits s_theta = B_0 x + m(x) + r(x): a closed-form
linear term (`linear_fit`, exact for Gaussian latents, shrunk against sampling
noise), closed-form splines of each direction's marginal law (`marginal_fit`,
which finds private non-Gaussian units however weak) and a nonlinear residual
for the dependence between directions (ridge functions, or confined to the
directions of `structured_subspace`), trained by the project's one training loop
(`sbmae.training.run`, without checkpoints: the fit takes minutes) with early
stopping on held-out F.
The closed-form parts are in `sbmae.reduction.closed_form`; H's blocks and the
cross-fitted tests of structure in `sbmae.reduction.diagnostics`.
`sbmae.reduction.reduction` builds the per-modality reduction on top of these;
the networks are in `sbmae.models.score_ratio`.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import errors
from sbmae import training
from sbmae.models.score_ratio import MLP
from sbmae.models.score_ratio import RidgeFunctions
from sbmae.reduction.closed_form import closed_form_base
from sbmae.reduction.closed_form import closed_form_curvature
from sbmae.reduction.closed_form import closed_form_parts
from sbmae.reduction.closed_form import closed_form_score
from sbmae.reduction.closed_form import ica_directions
from sbmae.reduction.diagnostics import batched
from sbmae.reduction.diagnostics import jvp_curvature
from sbmae.reduction.diagnostics import structured_subspace

Params = Any
PARAMETRISATIONS = ("subspace", "ridge", "lowrank", "linear_mlp", "mlp")


class ScoreRatioModel(NamedTuple):
  """Pure functions of a score-ratio parametrisation.

  init(rng, base, w0=None) -> params, base the fixed closed-form parts
  ({"linear": B_0 [D, D], "marginal": `marginal_fit`'s dict}, either optional;
  {} for "mlp"), stored in params under those keys and never trained, w0
  [D, j] starting directions for the first j columns of W ("ridge",
  "lowrank"; ignored else); score(params, x[B, D]) -> s[B, D];
  score_and_divergence(params, x[B, D], rng) -> (s[B, D], div s [B]);
  penalty(params) -> the sum of squares that the penalty coefficient scales;
  curvature(params, x[B, D], directions[K, D]) -> u^T J_s(x) u [B, K] (for
  `direction_z_scores`).
  """
  init: Callable[..., Params]
  score: Callable[[Params, jax.Array], jax.Array]
  score_and_divergence: Callable[..., tuple[jax.Array, jax.Array]]
  penalty: Callable[[Params], jax.Array]
  curvature: Callable[..., jax.Array]


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


def _block_mask(u, dims):
  """[D, k] 0/1: 1 on the rows of the block that holds each column of u."""
  edges = np.cumsum((0,) + tuple(dims))
  block = np.searchsorted(edges, np.argmax(np.abs(np.asarray(u)), axis=0), side="right") - 1
  rows = np.arange(edges[-1])[:, None]
  return jnp.asarray((rows >= edges[block]) & (rows < edges[block + 1]), u.dtype)


def get_model(dim: int, config) -> ScoreRatioModel:
  """The score-ratio model on R^dim chosen by `config.parametrisation`.

  "auto" is not a model: `train_score_ratio` resolves it to two.
  """
  mode, probes = config.divergence, config.num_probes
  kind = config.parametrisation
  if kind == "subspace":
    # U = params["subspace"] [D, k] starts at `structured_subspace`'s
    # orthonormal directions; h is an MLP on R^k whose last layer starts at
    # zero. With subspace_learning_rate > 0 each column of U moves inside its
    # own block (params["subspace_mask"], fixed), else U is fixed.
    net = lambda k: MLP(k, config.width, config.depth)

    # An empty U (no structure found) leaves the closed-form parts alone.
    def init(rng, base, w0=None):
      del w0
      k = base["subspace"].shape[1]
      return dict(base, net=net(k).init(rng, jnp.zeros((k,)))["params"] if k else {})

    def directions(params):
      u = params["subspace"] * params["subspace_mask"]
      return u if config.subspace_learning_rate else jax.lax.stop_gradient(u)

    def residual(params, x):
      u = directions(params)
      if not u.shape[1]:
        return jnp.zeros_like(x)
      return net(u.shape[1]).apply({"params": params["net"]}, x @ u) @ u.T

    def residual_divergence(params, x, rng):
      # div U h(U^T x) = tr(J_h U^T U) (tr J_h while U stays orthonormal):
      # exact, k <= bottleneck jvps.
      del rng
      u = directions(params)
      if not u.shape[1]:
        return jnp.zeros(x.shape[:1], x.dtype)
      h = lambda v: net(u.shape[1]).apply({"params": params["net"]}, v)
      gram = u.T @ u
      return jax.vmap(lambda v: _weighted_trace(h, v, None, gram, "exact", 0))(x @ u)

    def penalty(params):
      del params
      return jnp.zeros(())

  elif kind in ("ridge", "lowrank"):
    # More ridge functions than dimensions help (more random starting
    # directions); an MLP on R^k gains nothing from k > D.
    k = config.bottleneck if kind == "ridge" else min(config.bottleneck, dim)
    # A starts at zero, so g keeps a random last layer (else no gradient).
    net = (RidgeFunctions(k, config.width) if kind == "ridge" else
           MLP(k, config.width, config.depth, zero_output=False))

    def init(rng, base, w0=None):
      rw, rg = jax.random.split(rng)
      w = jax.random.normal(rw, (dim, k)) / math.sqrt(dim)
      if w0 is not None:
        w = w.at[:, :min(k, w0.shape[1])].set(w0[:, :k])
      return dict(base, A=jnp.zeros((dim, k)), W=w,
                  g=net.init(rg, jnp.zeros((k,)))["params"])

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

    def init(rng, base, w0=None):
      del w0
      return dict(base, net=net.init(rng, jnp.zeros((dim,)))["params"])

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
    return residual(params, x) + closed_form_score(params, x)

  def curvature(params, x, directions):
    # u^T J u: closed form for the fixed parts, jvps through the residual alone.
    return (jvp_curvature(residual, params, x, directions)
            + closed_form_curvature(params, x, directions))

  def score_and_divergence(params, x, rng):
    s_base, div_base = closed_form_parts(params, x)
    return (residual(params, x) + s_base,
            residual_divergence(params, x, rng) + div_base)

  return ScoreRatioModel(init, score, score_and_divergence, penalty, curvature)


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


@functools.partial(jax.jit, static_argnames=("objective_fn", "batch_size"))
def held_out_objective(objective_fn, params, x, rng, batch_size):
  """Mean of objective_fn over x in batches (same rng: same probes)."""
  xb, wb = batched(x, batch_size)

  def body(total, inp):
    i, xi, wi = inp
    f = objective_fn(params, jax.random.fold_in(rng, i), xi)
    return total + jnp.sum(f * wi), None

  total, _ = jax.lax.scan(body, jnp.zeros(()),
                          (jnp.arange(xb.shape[0]), xb, wb))
  return total / x.shape[0]


def train_score_ratio(x_train, x_held_out, *, rng, config, dims=None):
  """Fits s_theta by score-ratio matching with early stopping on held-out F.

  "auto" fits the "ridge" and the "subspace" residual on the same closed-form
  parts, split, initialisation keys and held-out probes and keeps the one
  with the lower held-out F: neither wins everywhere (module docstring of
  `sbmae.reduction.reduction`, ReductionConfig.parametrisation).

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    rng: PRNG key.
    dims: block sizes d_m (summing to D); the marginal splines
      (`marginal_fit`, if `config.marginal_knots`) live in each block's ICA
      basis, and the first W columns of "ridge" and "lowrank" start at each
      block's `config.ica_directions` most non-Gaussian directions. None: one
      block.
    config: a `sbmae.reduction.ReductionConfig` (its score-ratio fields).

  Returns:
    (model, params, info): the ScoreRatioModel, the parameters with the best
    held-out F, and a dict with "held_out_objective" (that F),
    "linear_held_out_objective" (F of the linear fit alone, if any),
    "marginal_held_out_gain" (the marginal splines' gain over it, if any),
    "base_held_out_objective" (F of the closed-form parts, before training),
    "train_steps", "best_step" and "parametrisation" (the residual kept; for
    "auto" also "<name>_held_out_objective" of each residual tried).
  """
  dims = tuple(dims or (x_train.shape[1],))
  keys = jax.random.split(rng, 4)  # init, batches, held-out probes, ICA
  base, info = closed_form_base(x_train, x_held_out, rng=keys[3], config=config, dims=dims)
  kinds = (("ridge", "subspace") if config.parametrisation == "auto" else
           (config.parametrisation,))
  fits = {kind: _train_residual(base, x_train, x_held_out, keys=keys, dims=dims,
                                config=dataclasses.replace(config, parametrisation=kind))
          for kind in kinds}
  objectives = {k: f[2]["held_out_objective"] for k, f in fits.items()}
  kind = min(objectives, key=objectives.get)
  if len(kinds) > 1:
    info.update({f"{k}_held_out_objective": f for k, f in objectives.items()})
    logging.info("reduction: residual %r kept (held-out F %s)", kind,
                 {k: round(f, 4) for k, f in objectives.items()})
  model, params, fit_info = fits[kind]
  info.update(fit_info, parametrisation=kind)
  return model, params, info


def _train_residual(base, x_train, x_held_out, *, keys, config, dims):
  """Trains one residual (`config.parametrisation`) on top of `base`.

  keys: (init, batches, held-out probes, ICA), the same for every residual.
  """
  n, dim = x_train.shape
  model = get_model(dim, config)
  k_init, k_train, k_eval, k_ica = keys
  base, info, num_steps = dict(base), {}, config.max_steps
  if config.parametrisation == "subspace":
    if "subspace" not in base:  # a caller's starting U is kept
      base["subspace"] = structured_subspace(
          base, x_train, x_held_out, dims, num=config.bottleneck,
          significance=config.significance, batch_size=config.batch_size)
    base["subspace_mask"] = _block_mask(base["subspace"], dims)
    logging.info("reduction: residual on %d structured directions",
                 base["subspace"].shape[1])
    if base["subspace"].shape[1] == 0:
      num_steps = 0  # nothing beyond the closed-form parts to refine
  penalty = config.penalty * math.sqrt(dim / n)
  loss_fn = get_loss_fn(model, penalty)
  objective_fn = get_objective_fn(model)
  w0 = None
  if config.parametrisation in ("ridge", "lowrank") and config.ica_directions:
    edges = np.cumsum((0,) + dims)
    cols = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
      num = min(config.ica_directions, int(b - a))
      u = (base["marginal"]["W"][a:b, a:a + num] if "marginal" in base else
           ica_directions(x_train[:, a:b], jax.random.fold_in(k_ica, i), num=num))
      cols.append(jnp.zeros((dim, u.shape[1])).at[a:b].set(u))
    w0 = jnp.concatenate(cols, axis=1)
  # max(1, .): max_steps=0 (the linear fit alone) never steps, but optax
  # refuses a zero-length schedule.
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(1, config.max_steps),
                                         alpha=0.01)
  # Weight decay on the nonlinear kernels only (A, W have their penalty); the
  # closed-form linear part stays fixed.
  frozen = ("linear", "marginal", "subspace_mask") + (
      () if config.subspace_learning_rate else ("subspace",))
  labels = lambda p: flax.traverse_util.path_aware_map(
      lambda path, _: ("frozen" if path[0] in frozen else
                       "directions" if path[0] == "subspace" else
                       "decay" if path[-1].startswith("kernel") else "plain"),
      p)
  tx = optax.multi_transform(
      {"frozen": optax.set_to_zero(),
       "directions": optax.adam(optax.cosine_decay_schedule(
           config.subspace_learning_rate, max(1, config.max_steps), alpha=0.01)),
       "decay": optax.adamw(schedule, weight_decay=config.weight_decay),
       "plain": optax.adam(schedule)}, labels)
  state = training.TrainState.create(model.init(k_init, base, w0), tx)
  # Batches drawn with replacement, a pure function of the step (resumable).
  x_host, seed = np.asarray(x_train), int(jax.random.randint(k_train, (), 0, 2**31 - 1))
  batch_fn = lambda step: x_host[np.random.default_rng((seed, step)).integers(
      0, n, config.batch_size)]
  held_out_f = lambda p: float(held_out_objective(
      objective_fn, p, x_held_out, k_eval, config.batch_size))
  # The parameters with the best held-out F (copies: the train step donates).
  best = {"f": held_out_f(state.params), "step": 0, "bad": 0,
          "params": jax.tree.map(jnp.copy, state.params)}
  info["base_held_out_objective"] = best["f"]

  def eval_fn(state):
    step, f = int(state.step), held_out_f(state.params)
    if not math.isfinite(f):
      raise errors.NonFiniteError(
          f"reduction: held-out objective is {f} at step {step}; lower "
          "reduction.learning_rate or check the latents")
    if f < best["f"]:
      best.update(f=f, step=step, bad=0, params=jax.tree.map(jnp.copy, state.params))
    else:
      best["bad"] += 1
    return {"held_out_F": f, "best_held_out_F": best["f"]}

  state = training.run(
      "reduce", state, training.make_train_step(loss_fn, tx), batch_fn,
      num_steps=num_steps, rng=k_train, manager=None,
      log_every=config.eval_every, eval_fn=eval_fn, eval_every=config.eval_every,
      stop_fn=lambda history: best["bad"] >= config.patience)
  best_f, best_step, best_params = best["f"], best["step"], best["params"]
  info.update(held_out_objective=best_f, train_steps=int(state.step),
              best_step=best_step)
  return model, best_params, info
