"""Stage `autoencoders`: one autoencoder per modality, trained in one jitted step.

Variants (config.autoencoder.kind):
  rae: reconstruction + beta * ||z||^2, Gaussian noise (noise_std) on z before
       decoding (a regularised deterministic autoencoder, as in SBM-AE).
  vae: reconstruction + beta * KL(q(z|x) || N(0, I)) (beta-VAE); the mean is
       the latent used downstream.
Reconstruction terms are summed over an example's dimensions and averaged over
the batch: squared error for "mse" modalities (outputs sigmoid(logits)), binary
cross-entropy for "bernoulli" ones.

After training the stage encodes both splits once, fits per-modality latent
statistics (mean and the Cholesky factor of the empirical precision) and stores
the *whitened* latents in `<workdir>/autoencoders/latents.npz`; everything
downstream works on whitened latents and un-whitens only to decode.
"""

import functools
import pathlib

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import images
from sbmae import modalities as modalities_lib
from sbmae import reduction
from sbmae import training
from sbmae.data import pipeline
from sbmae.models import autoencoder

STAGE = "autoencoders"


def build_models(ae_config, modalities):
  """dict name -> AutoEncoder module for each modality."""
  if ae_config.kind not in ("rae", "vae"):
    raise ValueError(f"config.autoencoder.kind={ae_config.kind!r}: expected 'rae' or 'vae'")
  return {m.name: autoencoder.AutoEncoder(
      kind=m.kind, shape=m.shape, latent_dim=ae_config.latent_dim,
      widths=tuple(ae_config.widths), blocks_per_stage=ae_config.blocks_per_stage,
      variational=ae_config.kind == "vae") for m in modalities}


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


def mean_output(likelihood, logits):
  """Decoder mean: sigmoid(logits) for both likelihoods (pixels or probabilities)."""
  del likelihood
  return jax.nn.sigmoid(logits)


def get_loss_fn(models, modalities, ae_config):
  """loss_fn(params, rng, batch) -> (summed loss over modalities, metrics)."""

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
      loss, mets = one(models[m.name], m, params[m.name], jax.random.fold_in(rng, k),
                       batch[m.name])
      total += loss
      metrics.update(mets)
    metrics["loss"] = total
    return total, metrics

  return loss_fn



def encode_fn(models):
  """Jitted (params, {name: x}) -> {name: latent mean [B, d]}."""
  return jax.jit(functools.partial(modalities_lib.apply_each, {
      n: (lambda p, x, m=m: m.apply(p, x, method="encode")[0]) for n, m in models.items()}))


def decode_fn(models, modalities):
  """Jitted (params, {name: z}) -> {name: decoder mean with the modality's shape}."""
  likelihood = {m.name: m.likelihood for m in modalities}
  return jax.jit(functools.partial(modalities_lib.apply_each, {
      n: (lambda p, z, m=m, n=n: mean_output(likelihood[n], m.apply(p, z, method="decode")))
      for n, m in models.items()}))


@flax.struct.dataclass
class LatentStats:
  """Per-modality whitening x = L^T (z - mean), L L^T = empirical precision."""
  mean: dict
  whitener: dict  # L^T
  unwhitener: dict  # L^{-T}

  @classmethod
  def fit(cls, latents, jitter=1e-6):
    """Fits the statistics of dict name -> latents [N, d] (`reduction.whitening`).

    `jitter` (relative to the mean variance) keeps the Cholesky factor defined
    when an autoencoder leaves a latent direction unused.
    """
    parts = {}
    for n, z in latents.items():
      try:
        parts[n] = reduction.whitening(z, jitter)
      except np.linalg.LinAlgError as e:
        raise ValueError(f"latents of modality {n!r} have a singular covariance even with "
                         f"jitter {jitter}: the autoencoder collapsed ({e})") from e
    return cls(*({n: jnp.asarray(p[i]) for n, p in parts.items()} for i in range(3)))

  def whiten(self, latents):
    """dict name -> z [.., d]  to  dict name -> x = L^T (z - mean)."""
    return {n: (z - self.mean[n]) @ self.whitener[n].T for n, z in latents.items()}

  def unwhiten(self, x):
    """Inverse of `whiten`: z = mean + L^{-T} x."""
    return {n: self.mean[n] + v @ self.unwhitener[n].T for n, v in x.items()}

  def save(self, path):
    np.savez(path, **{f"{field}/{n}": v for field in ("mean", "whitener", "unwhitener")
                      for n, v in getattr(self, field).items()})

  @classmethod
  def load(cls, path):
    with np.load(path) as f:
      part = lambda p: {k.split("/", 1)[1]: jnp.asarray(f[k]) for k in f if k.startswith(p)}
      return cls(part("mean/"), part("whitener/"), part("unwhitener/"))


def encode_all(encode, params, arrays, names, batch_size=500):
  """Encodes every example: dict name -> float32 [N, d] (numpy)."""
  out = {n: [] for n in names}
  for batch in pipeline.eval_batches(arrays, batch_size):
    z = encode(params, {n: batch[n] for n in names})
    for n in names:
      out[n].append(np.asarray(z[n]))
  return {n: np.concatenate(v) for n, v in out.items()}


def _init(config, modalities):
  """(models, optimiser, freshly initialised TrainState)."""
  c = config.autoencoder
  models = build_models(c, modalities)
  tx = training.make_optimizer(c.learning_rate, c.num_steps, warmup_steps=c.warmup_steps,
                               grad_clip=c.grad_clip)
  params = init_params(models, modalities, jax.random.PRNGKey(config.seed + 1))
  return models, tx, training.TrainState.create(params, tx)


def restore(config, workdir, modalities):
  """(models, dict name -> params) of a finished autoencoders stage."""
  models, _, state = _init(config, modalities)
  state = training.restore_stage(workdir, STAGE, state)
  return models, state.params


def train(config, workdir, data, modalities, writer):
  """Trains (or resumes / loads) the autoencoders and writes latent artefacts.

  Args:
    config: full config.
    workdir: run folder (stage files under `<workdir>/autoencoders`).
    data: {"train": arrays, "test": arrays}, arrays = dict name -> array.
    modalities: tuple of `Modality`.
    writer: metrics Writer.

  Returns:
    (models, params, LatentStats).
  """
  c = config.autoencoder
  names = [m.name for m in modalities]
  stage_dir = pathlib.Path(workdir) / STAGE
  models, tx, state = _init(config, modalities)
  ds = pipeline.dataset(data["train"], training.per_process_batch(c.batch_size),
                        seed=config.seed + 1)
  state = training.run(
      STAGE, state, training.make_train_step(get_loss_fn(models, modalities, c), tx),
      ds.__getitem__,
      num_steps=c.num_steps, rng=jax.random.PRNGKey(config.seed + 1),
      manager=training.checkpoint_manager(workdir, STAGE), writer=writer,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every)
  params = state.params
  latents_path, stats_path = stage_dir / "latents.npz", stage_dir / "latent_stats.npz"
  if latents_path.exists() and stats_path.exists():
    return models, params, LatentStats.load(stats_path)

  encode = encode_fn(models)
  z = {s: encode_all(encode, params, data[s], names) for s in ("train", "test")}
  stats = LatentStats.fit(z["train"])
  white = {s: {n: np.asarray(v) for n, v in stats.whiten(z[s]).items()} for s in z}
  decode = decode_fn(models, modalities)
  test_rec = _test_reconstruction(encode, decode, params, data["test"], modalities)
  logging.info("[autoencoders] test reconstruction MSE per dim: %s",
               " ".join(f"{n}={v:.5f}" for n, v in test_rec.items()))
  writer.scalars(c.num_steps, test_rec, prefix="autoencoders/test_mse")
  if jax.process_index() == 0:
    writer.json(f"{STAGE}/test_reconstruction.json", test_rec)
    _save_reconstruction_grid(encode, decode, params, data["test"], modalities,
                              stage_dir / "reconstructions.png")
    stats.save(stats_path)
    tmp = stage_dir / "latents.tmp.npz"
    np.savez(tmp, **{f"{s}/{n}": v for s in white for n, v in white[s].items()})
    tmp.replace(latents_path)
  return models, params, stats


def load_latents(workdir):
  """Whitened latents written by the stage: {"train"|"test": {name: [N, d]}}."""
  out = {"train": {}, "test": {}}
  with np.load(pathlib.Path(workdir) / STAGE / "latents.npz") as f:
    for key in f:
      split, name = key.split("/", 1)
      out[split][name] = f[key]
  return out


def _test_reconstruction(encode, decode, params, arrays, modalities, batch_size=500):
  names = [m.name for m in modalities]
  total, count = dict.fromkeys(names, 0.0), 0
  for batch in pipeline.eval_batches(arrays, batch_size):
    x = {n: batch[n] for n in names}
    out = decode(params, encode(params, x))
    for n in names:
      total[n] += float(jnp.sum(jnp.mean((out[n] - x[n]) ** 2, axis=tuple(range(1, x[n].ndim)))))
    count += len(x[names[0]])
  return {n: total[n] / count for n in names}


def _save_reconstruction_grid(encode, decode, params, arrays, modalities, path, num=8):
  image_names = [m.name for m in modalities if m.kind == "image"]
  x = {m.name: pipeline.as_float(arrays[m.name][:num]) for m in modalities}
  out = decode(params, encode(params, x))
  rows = [np.stack([images.to_uint8(x[n][i]) for n in image_names]
                   + [images.to_uint8(out[n][i]) for n in image_names]) for i in range(num)]
  images.save_png(path, images.grid(np.stack(rows)), scale=2)
