"""Stage `classifier`: one digit classifier per PolyMNIST modality.

One CNN per modality (not one shared network), because the field's coherence
protocol (MoPoE, MMVAE+) scores each modality with its own classifier. The M
networks' parameters live in a dict keyed by modality and are trained together
in one jitted step (see `sbmae.modalities`). The checkpoint is reused by
`evaluate` for coherence and for the classifier-feature Frechet distance
(`fd_clf`).
"""

import functools
import hashlib
import json
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import stages
from sbmae import training
from sbmae.data import modalities
from sbmae.data import input_pipeline
from sbmae.models import classifier as classifier_model
from sbmae.models import conv

STAGE = "classifier"


def build_model(config):
  """The DigitClassifier of `config.classifier`."""
  return classifier_model.DigitClassifier(width=config.classifier.width)


def init_params(model, rng, names):
  """Dict name -> parameters of one independent classifier per modality."""
  dummy = jnp.zeros((1, 28, 28, 3), jnp.float32)
  return {n: model.init(jax.random.fold_in(rng, k), dummy) for k, n in enumerate(names)}


def random_shift(rng, images, max_shift=2):
  """Translates each image by up to `max_shift` pixels (edge padding)."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode="edge")
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def get_loss_fn(model):
  """loss_fn(params, rng, batch) -> (mean cross-entropy over modalities, metrics).

  Training uses dropout and random shifts of up to 2 pixels: without them the
  classifiers overfit (train accuracy 0.998, test 0.97 on the hardest
  backgrounds).
  """

  def loss_fn(params, rng, batch):
    logits = []
    for k, (n, p) in enumerate(params.items()):
      shift_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, k))
      x = random_shift(shift_rng, batch[n])
      logits.append(model.apply(p, x, train=True, rngs={"dropout": dropout_rng}))
    logits = jnp.stack(logits)
    labels = jnp.broadcast_to(batch["label"], logits.shape[:2])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy}

  return loss_fn


def make_train_step(model, tx):
  """The stage's jitted train step (loss of `get_loss_fn`, conv compiler options)."""
  return training.make_train_step(get_loss_fn(model), tx,
                                  compiler_options=conv.compiler_options())


def logits_fn(model):
  """Jitted (params, {name: images [B, 28, 28, 3]}) -> {name: logits [B, 10]}."""
  return conv.jit(functools.partial(modalities.apply_each, model.apply))


def features_fn(model):
  """Jitted (params, {name: images}) -> {name: penultimate features [B, F]}."""
  features = functools.partial(model.apply, features=True)
  return conv.jit(functools.partial(modalities.apply_each, features))


def accuracy(model, params, arrays, names, batch_size=1000):
  """Per-modality test accuracy: dict name -> float."""
  predict = logits_fn(model)
  correct, total = dict.fromkeys(names, 0), 0
  for batch in input_pipeline.eval_batches(arrays, batch_size):
    logits = predict(params, {n: batch[n] for n in names})
    for n in names:
      correct[n] += int(jnp.sum(jnp.argmax(logits[n], -1) == batch["label"]))
    total += len(batch["label"])
  return {n: correct[n] / total for n in names}


def _init(config, names):
  """(model, optimiser, freshly initialised TrainState)."""
  c = config.classifier
  model = build_model(config)
  tx = training.make_optimizer(c.learning_rate, c.num_steps, warmup_steps=100)
  params = init_params(model, stages.stage_rng(config, STAGE), names)
  return model, tx, training.TrainState.create(params, tx)


def restore(config, run, names):
  """(model, dict name -> params) of a finished classifier stage of `run` (a RunDir)."""
  model, _, state = _init(config, names)
  state = training.restore_stage(run.checkpoints(STAGE), STAGE, state)
  return model, state.params


def cache_folder(config, data):
  """The shared folder of this data set's classifiers, or None when caching is off.

  The classifiers are an evaluation instrument: the same data and classifier
  settings give the same networks, so full, reduced and repeated runs can
  share one training. The folder is named by a SHA-1 of the training and test
  arrays and of everything that shapes the training (the `classifier`
  section and the stage's seed).
  """
  root = config.classifier.cache_dir
  if not root:
    return None
  digest = hashlib.sha1()
  for split in ("train", "test"):
    for name in sorted(data[split]):
      array = np.ascontiguousarray(data[split][name])
      digest.update(f"{split}/{name}/{array.dtype}/{array.shape}".encode())
      digest.update(memoryview(array).cast("B"))
  settings = {k: v for k, v in config.classifier.items() if k != "cache_dir"}
  digest.update(json.dumps({"classifier": settings, "seed": stages.stage_seed(config, STAGE)},
                           sort_keys=True, default=str).encode())
  return pathlib.Path(root).expanduser() / digest.hexdigest()[:16]


def _link_cache(run, folder):
  """Points the run's classifier checkpoints at the shared cache `folder`."""
  link = run.checkpoints(STAGE)
  target = (folder / "checkpoints").absolute()
  target.mkdir(parents=True, exist_ok=True)
  if link.is_symlink() and link.resolve() == target.resolve():
    return
  if link.exists() or link.is_symlink():
    logging.info("[classifier] %s exists: training there, not in the cache %s", link, folder)
    return
  link.parent.mkdir(parents=True, exist_ok=True)
  link.symlink_to(target, target_is_directory=True)
  logging.info("[classifier] checkpoints shared through the cache %s", target)


def train(config, run, data, writer):
  """Trains (or resumes, or loads when finished) the classifiers.

  With `config.classifier.cache_dir` set, the checkpoints live in the cache
  (`cache_folder`), linked from the run folder, so a finished classifier of
  the same data and settings is loaded instead of trained again.

  Args:
    config: full config.
    run: the `RunDir`.
    data: {"train": arrays, "test": arrays}, arrays = dict name -> array.
    writer: metrics Writer.

  Returns:
    (model, dict name -> params).
  """
  c = config.classifier
  names = [f"m{k}" for k in range(config.data.num_modalities)]
  # Single-process runs only: other processes would race the link.
  folder = cache_folder(config, data) if jax.process_count() == 1 else None
  if folder is not None:
    _link_cache(run, folder)
  model, tx, state = _init(config, names)
  ds = input_pipeline.dataset(data["train"], training.per_process_batch(c.batch_size),
                              seed=stages.stage_seed(config, STAGE))
  state = training.run(
      STAGE, state, make_train_step(model, tx), ds.__getitem__,
      num_steps=c.num_steps, rng=stages.stage_rng(config, STAGE),
      manager=training.checkpoint_manager(run.checkpoints(STAGE)),
      writer=writer, log_every=config.log_every, checkpoint_every=config.checkpoint_every)
  acc = accuracy(model, state.params, data["test"], names)
  logging.info("[classifier] test accuracy per modality: %s",
               " ".join(f"{n}={a:.4f}" for n, a in acc.items()))
  writer.scalars(c.num_steps, acc, prefix="classifier/test_accuracy")
  writer.json(run.classifier_accuracy, acc)
  return model, state.params
