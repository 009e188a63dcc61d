"""Digit classifier used to score coherence (one per modality)."""

import flax.linen as nn

from sbmae.models import conv


class DigitClassifier(nn.Module):
  """Small strided CNN: 28x28x3 in [0, 1] -> 10 logits.

  `features=True` returns the penultimate activations used by the
  classifier-feature Frechet distance.
  """
  width: int = 32
  num_classes: int = 10
  dropout: float = 0.3

  @nn.compact
  def __call__(self, x, train=False, features=False):
    x = 2.0 * x - 1.0
    for mult in (1, 2, 4):
      x = conv.Conv(self.width * mult, (3, 3), strides=(2, 2))(x)
      x = nn.gelu(x)
      x = conv.Conv(self.width * mult, (3, 3))(x)
      x = nn.gelu(x)
    h = nn.gelu(nn.Dense(4 * self.width)(x.reshape(x.shape[:-3] + (-1,))))
    if features:
      return h
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(self.num_classes)(h)
