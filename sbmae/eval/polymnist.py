"""PolyMNIST scores: coherence, Frechet distances and sample grids.

Protocol (DESIGN.md "Evaluation"):
- conditional coherence for k observed modalities: for each subset S of size
  k, generate the missing modalities of `eval.num_examples` test tuples from
  the observed ones, classify every generated image with its modality's
  classifier and count it correct when it shows the tuple's label; average over
  the generated modalities, then over the subsets of size k. All C(M, k)
  subsets are used when `eval.max_subsets` is -1, else a fixed sample (seeded
  by config.seed) of that many subsets per k in which every modality is
  missing equally often (`sbmae.eval.driver.subsets_of_size`).
- unconditional coherence: share of joint samples whose M predicted labels agree.
- `coherence/reconstruction_{m}`: classifier accuracy on decode(encode(x)) of
  the test images, through the prior's latent (so after the reduction, with
  the discarded directions drawn from N(0, I)). It is the ceiling on
  conditional coherence that the autoencoders and the reduction leave to the
  prior.
- `fd_clf/{m}`: Frechet distance between the classifier's penultimate features
  of unconditional samples and of real test images of modality m. It is NOT
  Inception FID (named so no one mistakes it); `fid/{m}` is added when
  `eval.inception_path` points to local InceptionV3 weights.
`sbmae.eval.driver` generates the outputs; this module scores them.
"""

import numpy as np

from sbmae import images
from sbmae.eval import frechet
from sbmae.stages import classifier as classifier_lib


def label_accuracy(clf_logits, clf_params, images_by_name, labels):
  """dict name -> share of `images_by_name[name]` classified as `labels`."""
  logits = clf_logits({n: clf_params[n] for n in images_by_name}, images_by_name)
  return {n: float(np.mean(np.argmax(v, -1) == labels)) for n, v in logits.items()}


class Scorer:
  """Scores generated PolyMNIST tuples with the run's digit classifiers.

  Interface shared with `sbmae.eval.celeba.Scorer` (see `sbmae.eval.driver`).
  """

  def __init__(self, config, run, names, truth, labels):
    """Args: full config, RunDir, modality names, test images dict, test labels."""
    self.run, self.names, self.truth, self.labels = run, tuple(names), truth, labels
    self.num_pictures = config.eval.grid_examples
    self.inception_path = config.eval.inception_path
    model, self.params = classifier_lib.restore(config, run, self.names)
    self.logits = classifier_lib.logits_fn(model)
    self.features = classifier_lib.features_fn(model)

  def conditional(self, output, observed):
    """{"coherence": mean accuracy of the modalities not in `observed`}."""
    missing = {n: output[n] for n in self.names if n not in observed}
    accuracy = label_accuracy(self.logits, self.params, missing, self.labels)
    return {"coherence": float(np.mean(list(accuracy.values())))}

  def unconditional(self, output):
    """Label agreement of the joint samples, and their Frechet distances per modality."""
    logits = self.logits(self.params, output)
    predicted = np.stack([np.argmax(logits[n], -1) for n in self.names])
    scores = {"coherence": float(np.mean(np.all(predicted == predicted[:1], axis=0)))}
    real = self.features(self.params, self.truth)
    fake = self.features(self.params, output)
    for n in self.names:
      scores[f"fd_clf/{n}"] = frechet.feature_distance(real[n], fake[n])
    if self.inception_path:
      from sbmae.eval import inception  # pylint: disable=g-import-not-at-top
      feature_fn = inception.get_feature_fn(self.inception_path)
      for n in self.names:
        scores[f"fid/{n}"] = inception.fid(feature_fn, self.truth[n], output[n], batch_size=50)
    return scores

  def reconstruction(self, output):
    """Classifier accuracy on every modality's reconstruction."""
    return label_accuracy(self.logits, self.params, output, self.labels)

  def summarise(self, conditional, unconditional, reconstruction):
    """Flat metrics and per-subset coherence.

    Returns:
      (metrics, per_subset): coherence/conditional_k{k} (mean over the
      subsets of size k), its mean over k, coherence/unconditional,
      coherence/reconstruction_{m}, fd_clf/{m} (fid/{m}); subset label
      ("m0+m2") -> coherence.
    """
    metrics, per_subset = {}, {}
    for k, by_subset in conditional.items():
      values = [v["coherence"] for v in by_subset.values()]
      metrics[f"coherence/conditional_k{k}"] = float(np.mean(values))
      per_subset.update({"+".join(s): v["coherence"] for s, v in by_subset.items()})
    metrics["coherence/conditional_mean"] = float(np.mean(
        [metrics[f"coherence/conditional_k{k}"] for k in conditional]))
    metrics["coherence/unconditional"] = unconditional["coherence"]
    metrics.update({key: v for key, v in unconditional.items() if key != "coherence"})
    metrics.update({f"coherence/reconstruction_{n}": v for n, v in reconstruction.items()})
    return metrics, per_subset

  @staticmethod
  def save_examples(path, arrays, names, num=8):
    """PNG of the first `num` training tuples, one row each (uint8 images)."""
    grid = np.stack([np.asarray(arrays[n][:num]) for n in names], axis=1)
    images.save_png(path, images.grid(grid), scale=2)

  def picture(self, kind, output, observed=(), index=0):
    """PNG grid of the first tuples, one row each.

    Conditional (the first subset of sizes 1, M/2 and M-1 only):
    `conditional_given_{subset}.png`, the observed test images where observed,
    the generated ones elsewhere. Unconditional: `unconditional.png`.
    Reconstruction: `reconstruction.png`, test images then reconstructions.
    """
    m, num = len(self.names), self.num_pictures
    if kind == "conditional":
      if index or len(observed) not in (1, m // 2, m - 1):
        return
      row = [self.truth[n] if n in observed else output[n] for n in self.names]
      name = "conditional_given_" + "+".join(observed)
    elif kind == "unconditional":
      row, name = [output[n] for n in self.names], "unconditional"
    else:
      row = [self.truth[n] for n in self.names] + [output[n] for n in self.names]
      name = "reconstruction"
    grid = np.stack([np.asarray(r[:num]) for r in row], axis=1)
    images.save_png(self.run.eval_picture(name), images.grid(grid), scale=2)

