"""Stage `autoencoders`: one autoencoder per modality, trained in one jitted step.

Variants (config.autoencoder.kind):
  rae: reconstruction + beta * ||z||^2, Gaussian noise (noise_std) on z before
       decoding (a regularised deterministic autoencoder, as in SBM-AE).
  vae: reconstruction + beta * KL(q(z|x) || N(0, I)) (beta-VAE); the latents
       handed on are posterior samples (`autoencoder.vae_latents`, see
       `posterior_latents`), and the directions it uses are counted
       (`RunDir.latent_usage`). Conditioning inputs are encoded by their mean.
Reconstruction terms are summed over an example's dimensions and averaged over
the batch: squared error for "mse" modalities (outputs sigmoid(logits)), binary
cross-entropy for "bernoulli" ones. Each modality has its own Adam and
learning-rate schedule and may stop early (`autoencoder.modality_steps`); a
step clips the gradients of the modalities it trains by their joint norm.

After training the stage encodes both splits once, fits the per-modality
`latents.Whitening` and stores the *whitened* latents (`RunDir.latents`);
everything downstream works on whitened latents and un-whitens only to decode.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import errors
from sbmae import faults
from sbmae import images
from sbmae import latents as latents_lib
from sbmae import models
from sbmae import stages
from sbmae import training
from sbmae.data import modalities as modalities_lib
from sbmae.data import input_pipeline
from sbmae.models import autoencoder
from sbmae.models import conv

STAGE = "autoencoders"
# A VAE latent direction counts as used when its posterior KL exceeds this (nats).
USED_KL_NATS = 0.01


def build_models(ae_config, modalities):
  """dict name -> AutoEncoder module for each modality."""
  if ae_config.kind not in ("rae", "vae"):
    raise ValueError(f"config.autoencoder.kind={ae_config.kind!r}: expected 'rae' or 'vae'")
  # `kind` of the config (rae/vae) is not the module's `kind` (image/vector).
  return {m.name: models.from_config(autoencoder.AutoEncoder, ae_config, kind=m.kind,
                                     shape=tuple(m.shape), variational=ae_config.kind == "vae")
          for m in modalities}


def init_params(models, modalities, rng):
  """dict name -> parameters, one independent initialisation per modality."""
  return {m.name: models[m.name].init(jax.random.fold_in(rng, k),
                                      jnp.zeros((1,) + tuple(m.shape)))
          for k, m in enumerate(modalities)}


def reconstruction_loss(likelihood, logits, x):
  """Per-example reconstruction term [B], summed over the example's dims."""
  axes = tuple(range(1, x.ndim))
  if likelihood == "mse":
    return jnp.sum((jax.nn.sigmoid(logits) - x) ** 2, axis=axes)
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=axes)


def get_loss_fn(models, modalities, ae_config):
  """loss_fn(params, rng, batch) -> (summed loss over modalities, metrics).

  Sums over the modalities in `batch` (a subset of `modalities` is fine);
  modality k of `modalities` draws its noise from fold_in(rng, k) whichever
  others are present.
  """

  def one(model, modality, params, rng, x):
    mean, logvar = model.apply(params, x, method="encode")
    if ae_config.kind == "vae":
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
      reg = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    else:
      z = mean + ae_config.noise_std * jax.random.normal(rng, mean.shape)
      reg = jnp.sum(mean ** 2, axis=-1)
    logits = model.apply(params, z, method="decode")
    rec = reconstruction_loss(modality.likelihood, logits, x)
    loss = jnp.mean(rec + ae_config.beta * reg)
    per_dim = jnp.mean(rec) / np.prod(modality.shape)
    return loss, {f"{modality.name}/loss": loss, f"{modality.name}/rec_per_dim": per_dim}

  def loss_fn(params, rng, batch):
    total, metrics = 0.0, {}
    for k, m in enumerate(modalities):
      if m.name not in batch:
        continue
      loss, mets = one(models[m.name], m, params[m.name], jax.random.fold_in(rng, k),
                       batch[m.name])
      total += loss
      metrics.update(mets)
    metrics["loss"] = total
    return total, metrics

  return loss_fn


def modality_steps(config, modalities):
  """dict name -> the number of steps that modality's autoencoder trains.

  `autoencoder.num_steps`, or for a modality named in `autoencoder.modality_steps`
  the smaller of its count and `num_steps` (an autoencoder that converges early
  stops there; the stage then runs only the others, and its time falls with
  them). Names of other modalities are left to `check_modality_steps`.

  Raises:
    errors.ConfigError: a count that is not a positive integer.
  """
  c = config.autoencoder
  overrides = dict(c.get("modality_steps", None) or {})
  for name, steps in overrides.items():
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
      raise errors.ConfigError(f"config.autoencoder.modality_steps.{name}={steps!r}: must be "
                               "a positive integer (steps of that modality's autoencoder)")
  return {m.name: min(int(overrides.get(m.name, c.num_steps)), c.num_steps)
          for m in modalities}


def check_modality_steps(config, modalities):
  """Raises ConfigError for `autoencoder.modality_steps` naming no modality of the data."""
  names = [m.name for m in modalities]
  for name in config.autoencoder.get("modality_steps", None) or {}:
    if name not in names:
      raise errors.ConfigError(f"config.autoencoder.modality_steps.{name}: {name!r} is not "
                               f"a modality of this data set ({names})")
  modality_steps(config, modalities)


def optimizers(config, modalities):
  """dict name -> that modality's Adam, its schedule over its own steps.

  Without clipping: the train step clips the gradients of the modalities it
  trains by their joint global norm (`autoencoder.grad_clip`), as one optimiser
  over all of them did before (`tests/test_autoencoders.py` checks the two
  agree bit for bit when every modality trains the same steps).
  """
  c = config.autoencoder
  return {n: training.make_optimizer(c.learning_rate, steps, warmup_steps=c.warmup_steps)
          for n, steps in modality_steps(config, modalities).items()}


def new_state(params, txs):
  """A TrainState over dict name -> parameters with one optimiser state per modality."""
  return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state={n: txs[n].init(p) for n, p in params.items()})


def make_train_step(models, modalities, ae_config, txs):
  """The stage's jitted, state-donating step (conv compiler options).

  (state, batch, rng) -> (state, metrics) trains the modalities whose images
  are in `batch` and leaves the others' parameters and optimiser states as
  they are; jit compiles once per set of modalities present.

  Args:
    models, modalities, ae_config: as for `get_loss_fn`.
    txs: dict name -> optax optimiser (`optimizers`).
  """
  loss_fn = get_loss_fn(models, modalities, ae_config)

  @functools.partial(jax.jit, donate_argnums=0, compiler_options=conv.compiler_options())
  def train_step(state, batch, rng):
    active = [m.name for m in modalities if m.name in batch]
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        {n: state.params[n] for n in active}, rng, batch)
    if ae_config.grad_clip > 0:
      clip = optax.clip_by_global_norm(ae_config.grad_clip)
      grads, _ = clip.update(grads, clip.init(grads))
    params, opt_state = dict(state.params), dict(state.opt_state)
    for n in active:
      updates, opt_state[n] = txs[n].update(grads[n], opt_state[n], params[n])
      params[n] = optax.apply_updates(params[n], updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def batch_fn(ds, steps):
  """step -> the batch of the modalities still training (`modality_steps`)."""
  return lambda step: {n: x for n, x in ds[step].items() if step < steps.get(n, 0)}


def encode_fn(models):
  """Jitted (params, {name: x}) -> {name: latent mean [B, d]}."""
  return conv.jit(functools.partial(modalities_lib.apply_each, {
      n: (lambda p, x, m=m: m.apply(p, x, method="encode")[0]) for n, m in models.items()}))


def decode_fn(models):
  """Jitted (params, {name: z}) -> {name: decoder mean with the modality's shape}.

  The mean is sigmoid(logits) for both likelihoods: pixel intensities for
  "mse" modalities, probabilities for "bernoulli" ones.
  """
  return conv.jit(functools.partial(modalities_lib.apply_each, {
      n: (lambda p, z, m=m: jax.nn.sigmoid(m.apply(p, z, method="decode")))
      for n, m in models.items()}))


def posterior_fn(models):
  """Jitted (params, {name: x}) -> {name: (mean [B, d], log-variance [B, d])} of a VAE."""
  return conv.jit(functools.partial(modalities_lib.apply_each, {
      n: (lambda p, x, m=m: m.apply(p, x, method="encode")) for n, m in models.items()}))


def encode_all(encode, params, arrays, names, batch_size=500):
  """Encodes every example: dict name -> float32 [N, d] (numpy)."""
  out = {n: [] for n in names}
  for batch in input_pipeline.eval_batches(arrays, batch_size):
    z = encode(params, {n: batch[n] for n in names})
    for n in names:
      out[n].append(np.asarray(z[n]))
  return {n: np.concatenate(v) for n, v in out.items()}


def posterior_latents(models, params, arrays, names, rng, batch_size=500):
  """A VAE's latents as posterior samples z = mu + sigma e, and its KL per dimension.

  The samples follow the aggregate posterior, which the VAE's prior N(0, I)
  matches: directions the decoder does not use are close to independent
  N(0, 1) there, and the reduction can discard them at no cost (DESIGN.md,
  "What the first results taught"); the means would make them near-constant.

  Returns:
    (dict name -> float32 [N, d] samples, dict name -> mean KL(q(z_i | x) ||
    N(0, 1)) per dimension [d] in nats).
  """
  posterior = posterior_fn(models)
  samples, kl = {n: [] for n in names}, {n: 0.0 for n in names}
  count = 0
  for i, batch in enumerate(input_pipeline.eval_batches(arrays, batch_size)):
    out = posterior(params, {n: batch[n] for n in names})
    for k, n in enumerate(names):
      mean, logvar = out[n]
      e = jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), k), mean.shape)
      samples[n].append(np.asarray(mean + jnp.exp(0.5 * logvar) * e))
      kl[n] = kl[n] + np.asarray(jnp.sum(0.5 * (mean ** 2 + jnp.exp(logvar) - 1 - logvar), 0))
    count += len(batch[names[0]])
  return ({n: np.concatenate(v) for n, v in samples.items()},
          {n: kl[n] / count for n in names})


def _encode_splits(config, models, params, data, names):
  """Latents of both splits (means, or VAE posterior samples) and the VAE's used dims."""
  c = config.autoencoder
  if c.kind != "vae" or c.vae_latents == "mean":
    encode = encode_fn(models)
    return {s: encode_all(encode, params, data[s], names) for s in ("train", "test")}, None
  rng = jax.random.fold_in(stages.stage_rng(config, STAGE), 1 << 30)  # not a training step
  z, kl = {}, None
  for i, s in enumerate(("train", "test")):
    z[s], split_kl = posterior_latents(models, params, data[s], names,
                                       jax.random.fold_in(rng, i))
    kl = split_kl if s == "test" else kl
  usage = {"used_dims": {n: int(np.sum(kl[n] > USED_KL_NATS)) for n in names},
           "kl_per_dim": {n: [float(v) for v in kl[n]] for n in names}}
  return z, usage


def init_state(config, modalities):
  """(models, dict name -> optimiser, freshly initialised TrainState) of `config.autoencoder`."""
  models = build_models(config.autoencoder, modalities)
  txs = optimizers(config, modalities)
  params = init_params(models, modalities, stages.stage_rng(config, STAGE))
  return models, txs, new_state(params, txs)


def restore(config, run, modalities):
  """(models, dict name -> params, Whitening) of a finished autoencoders stage."""
  models = build_models(config.autoencoder, modalities)
  params = training.restore_params(run.checkpoints(STAGE), STAGE, init_params(
      models, modalities, stages.stage_rng(config, STAGE)))
  return models, params, latents_lib.Whitening.load(run.latent_stats)


def train(config, run, data, modalities, writer):
  """Trains (or resumes / loads) the autoencoders and writes latent artefacts.

  Args:
    config: full config.
    run: the `RunDir`.
    data: {"train": arrays, "test": arrays}, arrays = dict name -> array.
    modalities: tuple of `Modality`.
    writer: metrics Writer.

  Returns:
    (models, params, Whitening).
  """
  c = config.autoencoder
  names = [m.name for m in modalities]
  models, txs, state = init_state(config, modalities)
  ds = input_pipeline.dataset(data["train"], training.per_process_batch(c.batch_size),
                              seed=stages.stage_seed(config, STAGE))
  state = training.run(
      STAGE, state, make_train_step(models, modalities, c, txs),
      batch_fn(ds, modality_steps(config, modalities)),
      num_steps=c.num_steps, rng=stages.stage_rng(config, STAGE),
      manager=training.checkpoint_manager(run.checkpoints(STAGE)), writer=writer,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every)
  params = state.params
  if run.latents.exists() and run.latent_stats.exists():
    return models, params, latents_lib.Whitening.load(run.latent_stats)

  encode = encode_fn(models)
  z, usage = _encode_splits(config, models, params, data, names)
  if usage is not None:
    logging.info("[autoencoders] VAE latent directions used (test KL > %g nats): %s",
                 USED_KL_NATS, usage["used_dims"])
    writer.json(run.latent_usage, usage)
  for s in z:
    for n in names:
      errors.check_finite_rows(z[s][n], f"{s} latents of modality {n!r} ({STAGE} stage)")
  stats = latents_lib.Whitening.fit(z["train"])
  white = {s: {n: np.asarray(v) for n, v in stats.whiten(z[s]).items()} for s in z}
  decode = decode_fn(models)
  test_rec = reconstruction_mse(encode, decode, params, data["test"], modalities)
  logging.info("[autoencoders] test reconstruction MSE per dim: %s",
               " ".join(f"{n}={v:.5f}" for n, v in test_rec.items()))
  writer.scalars(c.num_steps, test_rec, prefix="autoencoders/test_mse")
  if jax.process_index() == 0:
    writer.json(run.test_reconstruction, test_rec)
    _save_reconstruction_grid(encode, decode, params, data["test"], modalities,
                              run.reconstructions)
    # latents.npz last: its presence says the stage is finished (atomic writes).
    stats.save(run.latent_stats)
    faults.point("autoencoders:latents")
    with faults.atomic_write(run.latents) as f:
      np.savez(f, **{f"{s}/{n}": v for s in white for n, v in white[s].items()})
  return models, params, stats


def load_latents(run):
  """Whitened latents written by the stage: {"train"|"test": {name: [N, d]}}."""
  if not run.latents.exists():
    raise errors.StageOrderError(f"{run.latents} not found; run the `{STAGE}` stage first "
                                 "(or drop --config.stage)")
  out = {"train": {}, "test": {}}
  with np.load(run.latents) as f:
    for key in f:
      split, name = key.split("/", 1)
      out[split][name] = f[key]
  return out


def reconstruction_mse(encode, decode, params, arrays, modalities, batch_size=500):
  """dict name -> mean squared error per dimension of decode(encode(x)) over `arrays`."""
  names = [m.name for m in modalities]
  total, count = dict.fromkeys(names, 0.0), 0
  for batch in input_pipeline.eval_batches(arrays, batch_size):
    x = {n: batch[n] for n in names}
    out = decode(params, encode(params, x))
    for n in names:
      total[n] += float(jnp.sum(jnp.mean((out[n] - x[n]) ** 2, axis=tuple(range(1, x[n].ndim)))))
    count += len(x[names[0]])
  return {n: total[n] / count for n in names}


def _save_reconstruction_grid(encode, decode, params, arrays, modalities, path, num=8):
  image_names = [m.name for m in modalities if m.kind == "image"]
  x = {m.name: input_pipeline.as_float(arrays[m.name][:num]) for m in modalities}
  out = decode(params, encode(params, x))
  rows = [np.stack([images.to_uint8(x[n][i]) for n in image_names]
                   + [images.to_uint8(out[n][i]) for n in image_names]) for i in range(num)]
  images.save_png(path, images.grid(np.stack(rows)), scale=2)
