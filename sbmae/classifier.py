"""Stage `classifier`: one digit classifier per PolyMNIST modality.

One CNN per modality (not one shared network), because the field's coherence
protocol (MoPoE, MMVAE+) scores each modality with its own classifier. The M
networks' parameters are stacked on a leading axis and trained together in one
jitted step (see `sbmae.models.stacked`). The checkpoint is reused by `evaluate` for coherence and
for the classifier-feature Frechet distance (`fd_clf`).
"""

import functools
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import training
from sbmae.data import pipeline
from sbmae.models import classifier as classifier_model
from sbmae.models import stacked

STAGE = "classifier"


def build_model(config):
  return classifier_model.DigitClassifier(width=config.classifier.width)


def init_params(model, rng, num_modalities):
  """Stacked parameters [M, ...] of M independent classifiers."""
  dummy = jnp.zeros((1, 28, 28, 3), jnp.float32)
  return stacked.init_each(lambda k: model.init(k, dummy), rng, num_modalities)


def get_loss_fn(model, names):
  """loss_fn(params, batch) -> (mean cross-entropy over modalities, metrics)."""

  def loss_fn(params, batch):
    images = pipeline.stack(batch, names)  # [M, B, 28, 28, 3]
    logits = stacked.apply_each(model.apply, params, images)
    labels = jnp.broadcast_to(batch["label"], logits.shape[:2])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy}

  return loss_fn


def make_train_step(loss_fn, tx):
  """Jitted (state, batch, rng) -> (state, metrics)."""

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch, rng):
    del rng  # deterministic network; the data order carries the randomness.
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch)
    return state.apply_gradients(grads, tx), metrics

  return train_step


def logits_fn(model):
  """Jitted (stacked params, images [M, B, 28, 28, 3]) -> logits [M, B, 10]."""
  return jax.jit(functools.partial(stacked.apply_each, model.apply))


def features_fn(model):
  """Jitted (stacked params, images [M, B, ...]) -> penultimate features [M, B, F]."""
  return jax.jit(functools.partial(stacked.apply_each,
                                   functools.partial(model.apply, features=True)))


def accuracy(model, params, arrays, names, batch_size=1000):
  """Per-modality test accuracy: dict name -> float."""
  predict = logits_fn(model)
  correct, total = np.zeros(len(names)), 0
  for batch in pipeline.eval_batches(arrays, batch_size):
    logits = predict(params, pipeline.stack(batch, names))
    correct += np.asarray(jnp.sum(jnp.argmax(logits, -1) == batch["label"], axis=1))
    total += len(batch["label"])
  return {n: float(c / total) for n, c in zip(names, correct)}


def train(config, workdir, splits, writer):
  """Trains (or resumes, or loads when finished) the classifiers.

  Args:
    config: full config.
    workdir: run folder; checkpoints go to `<workdir>/classifier/checkpoints`.
    splits: {"train": Split, "test": Split}.
    writer: metrics Writer.

  Returns:
    (model, stacked params).
  """
  c = config.classifier
  names = [f"m{k}" for k in range(config.data.num_modalities)]
  model = build_model(config)
  tx = training.make_optimizer(c.learning_rate, c.num_steps, warmup_steps=100)
  rng = jax.random.PRNGKey(config.seed)
  state = training.TrainState.create(init_params(model, jax.random.fold_in(rng, 0),
                                                 len(names)), tx)
  manager = training.checkpoint_manager(pathlib.Path(workdir) / STAGE / "checkpoints")
  train_arrays = pipeline.modality_arrays(splits["train"])
  ds = pipeline.dataset(train_arrays, c.batch_size, seed=config.seed)
  state = training.run(
      STAGE, state, make_train_step(get_loss_fn(model, names), tx), ds.__getitem__,
      num_steps=c.num_steps, rng=jax.random.fold_in(rng, 1), manager=manager,
      writer=writer, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every)
  acc = accuracy(model, state.params, pipeline.modality_arrays(splits["test"]), names)
  logging.info("[classifier] test accuracy per modality: %s",
               " ".join(f"{n}={a:.4f}" for n, a in acc.items()))
  writer.scalars(c.num_steps, acc, prefix="classifier/test_accuracy")
  writer.json(f"{STAGE}/test_accuracy.json", acc)
  return model, state.params
