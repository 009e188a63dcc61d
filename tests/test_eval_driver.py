"""Evaluation semantics (sbmae.eval.driver, sbmae.eval.polymnist) on a model with known outputs.

The fake model's latent of an example is its row's "digit" repeated; the
fake sampler writes, on the unobserved modalities, the digit the test wants
(a wrong one for some modalities); the fake classifier reads the digit back.
So every coherence figure has a value computed by hand.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sbmae import rundir
from sbmae.eval import driver
from sbmae.eval import polymnist

NAMES = ("m0", "m1", "m2")
DIMS = (2, 2, 2)


class _FakeModel:
  """Latent = the digit of each modality; the sampler fills in `fill(mask)`."""

  def __init__(self, fill):
    self.names, self.dims, self.prior_params = NAMES, DIMS, jnp.zeros(())
    self.fill = fill
    self.sampled_masks = []

  def encode(self, batch):
    return jnp.concatenate([jnp.repeat(batch[n][:, :1], 2, axis=1) for n in self.names], -1)

  def decode(self, flat, rng=None):
    del rng
    return {n: flat[:, 2 * i:2 * i + 1] for i, n in enumerate(self.names)}

  def sampler(self, rng, params, observed, mask, min_observed=0):
    del rng, params
    # The driver promises what each subset observes (joint guidance skips the rest).
    assert min_observed == int(np.sum(mask)), (min_observed, mask)
    self.sampled_masks.append(tuple(np.asarray(mask)))
    fill = jnp.repeat(jnp.asarray(self.fill(np.asarray(mask)), jnp.float32), 2)
    obs = jnp.repeat(jnp.asarray(mask), 2)
    return jnp.where(obs, observed, fill[None, :] + 0 * observed)


class _RecordingScorer:
  """Scores = the decoded values, so the test sees exactly what was generated."""
  instances = []

  def __init__(self, config, run, names, truth, labels):
    del config, run
    self.names, self.truth, self.labels = names, truth, labels
    self.calls = []
    _RecordingScorer.instances.append(self)

  def conditional(self, output, observed):
    self.calls.append(("conditional", observed))
    return {n: np.asarray(output[n]).ravel().tolist() for n in self.names}

  def unconditional(self, output):
    self.calls.append(("unconditional",))
    return {"n": len(output[self.names[0]])}

  def reconstruction(self, output):
    self.calls.append(("reconstruction",))
    return {n: np.asarray(output[n]).ravel().tolist() for n in self.names}

  def summarise(self, conditional, unconditional, reconstruction):
    return ({"done": 1.0}, {"conditional": conditional, "unconditional": unconditional,
                           "reconstruction": reconstruction})

  def picture(self, kind, output, observed=(), index=0):
    del kind, output, observed, index


class _Writer:
  def __init__(self):
    self.payload = None

  def scalars(self, step, values, prefix=""):
    del step, values, prefix

  def json(self, path, payload):
    del path
    self.payload = payload


def _config(num_examples, batch_size, max_subsets=-1):
  return ml_collections.ConfigDict(dict(
      seed=0, data=dict(name="fake"), sampling=dict(batch_size=batch_size),
      eval=dict(num_examples=num_examples, num_unconditional=3, max_subsets=max_subsets,
                grid_examples=2)))


def _test_arrays(n):
  digits = np.arange(n) % 10
  arrays = {name: np.repeat(digits[:, None], 4, axis=1).astype(np.float32) for name in NAMES}
  arrays["label"] = digits
  return arrays


@pytest.mark.parametrize("batch_size", [2, 5, 8])  # padded chunks, one chunk, padding only
def test_every_subset_once_observed_kept_missing_generated(batch_size, monkeypatch, tmp_path):
  monkeypatch.setitem(driver.SCORERS, "fake", _RecordingScorer)
  _RecordingScorer.instances = []
  model = _FakeModel(fill=lambda mask: np.where(mask, -1.0, 7.0))
  writer = _Writer()
  driver.run(_config(5, batch_size), rundir.RunDir(tmp_path), model, _test_arrays(5), writer)
  scorer, = _RecordingScorer.instances
  conditional = writer.payload["per_subset"]["conditional"]
  expected = {k: [tuple(NAMES[i] for i in s) for s in itertools.combinations(range(3), k)]
              for k in (1, 2)}
  assert {k: list(v) for k, v in conditional.items()} == expected
  for k, by_subset in conditional.items():
    for observed, scores in by_subset.items():
      for n in NAMES:  # observed: the test tuple's own value; missing: generated.
        want = [float(d) for d in range(5)] if n in observed else [7.0] * 5
        assert scores[n] == want, (k, observed, n)
  assert writer.payload["per_subset"]["reconstruction"] == {
      n: [float(d) for d in range(5)] for n in NAMES}
  assert writer.payload["per_subset"]["unconditional"] == {"n": 3}
  assert writer.payload["num_examples"] == 5
  np.testing.assert_array_equal(scorer.labels, np.arange(5))


def test_max_subsets_is_a_seeded_sample():
  rng = lambda: np.random.default_rng(0)
  picked = driver.subsets_of_size(5, 2, 3, rng())
  assert len(picked) == 3 and picked == sorted(picked)
  assert picked == driver.subsets_of_size(5, 2, 3, rng())
  assert picked != driver.subsets_of_size(5, 2, 3, np.random.default_rng(1))
  assert set(picked) <= set(itertools.combinations(range(5), 2))
  assert driver.subsets_of_size(5, 2, -1, rng()) == list(itertools.combinations(range(5), 2))
  assert driver.subsets_of_size(5, 2, 10, rng()) == list(itertools.combinations(range(5), 2))


@pytest.mark.parametrize("num_modalities,k,n,slack", [
    (10, 1, 5, 0), (10, 3, 5, 0), (10, 7, 5, 0), (10, 9, 5, 0), (10, 4, 10, 0), (10, 5, 23, 0),
    (5, 2, 7, 0), (5, 3, 4, 0),
    (10, 8, 30, 1)])  # 30 of 45: rounds of cyclic windows collide, greedy fill.
def test_max_subsets_is_balanced(num_modalities, k, n, slack):
  """Each modality is observed in floor or ceil of k n / M subsets; no subset twice."""
  for seed in range(5):
    picked = driver.subsets_of_size(num_modalities, k, n, np.random.default_rng(seed))
    assert len(set(picked)) == n and all(len(s) == k and len(set(s)) == k for s in picked)
    counts = np.bincount(np.concatenate(picked), minlength=num_modalities)
    assert counts.min() >= k * n // num_modalities - slack, (seed, counts)
    assert counts.max() <= -(-k * n // num_modalities) + slack, (seed, counts)


def _polymnist_scorer(labels):
  """A PolyMNIST scorer whose 'classifier' reads the digit value off the image."""
  scorer = object.__new__(polymnist.Scorer)
  scorer.names, scorer.labels = NAMES, np.asarray(labels)
  scorer.params = {n: None for n in NAMES}
  scorer.logits = lambda params, images: {
      n: jax.nn.one_hot(jnp.round(images[n][:, 0]).astype(int), 10) for n in images}
  scorer.features = lambda params, images: {
      n: jnp.concatenate([v, v ** 2 + 1.0], axis=-1) for n, v in images.items()}
  scorer.inception_path = ""
  return scorer


def test_polymnist_coherence_by_hand():
  scorer = _polymnist_scorer([1, 2, 3, 4])
  right = jnp.asarray([[1.0], [2.0], [3.0], [4.0]])
  wrong = jnp.asarray([[1.0], [0.0], [0.0], [0.0]])  # one of four right
  # Given m0: m1 all right, m2 one in four: coherence (1 + 0.25) / 2.
  given_m0 = scorer.conditional({"m0": right, "m1": right, "m2": wrong}, ("m0",))
  assert given_m0 == {"coherence": pytest.approx(0.625)}
  given_m1_m2 = scorer.conditional({"m0": wrong, "m1": wrong, "m2": wrong}, ("m1", "m2"))
  assert given_m1_m2 == {"coherence": pytest.approx(0.25)}
  # Joint samples agree when all three predicted labels are equal: rows 0 and 2 here.
  joint = {"m0": jnp.asarray([[5.0], [1.0], [2.0], [3.0]]),
           "m1": jnp.asarray([[5.0], [2.0], [2.0], [3.0]]),
           "m2": jnp.asarray([[5.0], [3.0], [2.0], [4.0]])}
  scorer.truth = joint
  unconditional = scorer.unconditional(joint)
  assert unconditional["coherence"] == 0.5
  assert unconditional["fd_clf/m0"] == pytest.approx(0.0, abs=1e-6)  # same features
  metrics, per_subset = scorer.summarise(
      {1: {("m0",): given_m0, ("m1",): {"coherence": 1.0}, ("m2",): {"coherence": 0.0}},
       2: {("m1", "m2"): given_m1_m2}},
      {"coherence": 0.5, "fd_clf/m0": 3.0}, {"m0": 1.0, "m1": 0.5, "m2": 0.25})
  assert metrics["coherence/conditional_k1"] == pytest.approx((0.625 + 1.0 + 0.0) / 3)
  assert metrics["coherence/conditional_k2"] == pytest.approx(0.25)
  assert metrics["coherence/conditional_mean"] == pytest.approx(((0.625 + 1.0) / 3 + 0.25) / 2)
  assert metrics["coherence/unconditional"] == 0.5 and metrics["fd_clf/m0"] == 3.0
  assert metrics["coherence/reconstruction_m2"] == 0.25
  assert per_subset == {"m0": 0.625, "m1": 1.0, "m2": 0.0, "m1+m2": 0.25}


def test_every_proper_subset_is_evaluated():
  rng = np.random.default_rng(0)
  assert [s for k in (1, 2) for s in driver.subsets_of_size(3, k, -1, rng)] == [
      (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
