"""Per-modality autoencoders: residual conv nets for images, MLPs for vectors.

`ConvAutoEncoder` follows SBM-AE's PolyMNIST networks: the image is padded to a
power of two, a 5x5 stride-2 stem, then one stage per width of residual blocks
each ending in a stride-2 convolution, down to 2x2; a dense layer gives the
latent (mean and log-variance for a VAE). The decoder mirrors it with
convolution + depth-to-space upsampling, and ends in one of two heads
(`decoder_head`): "upsample", a last upsampling to full resolution and a 5x5
convolution there, or "subpixel", a 5x5 convolution at half resolution to 4x the
image channels and depth-to-space, the exact mirror of the stem, with no
full-resolution hidden layer. Decoder outputs are logits: sigmoid for "mse"
modalities, Bernoulli logits for "bernoulli" ones.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sbmae.models import conv


class ResBlock(nn.Module):
  """Pre-activation residual block: x + conv(act(conv(act(x))))."""
  features: int

  @nn.compact
  def __call__(self, x):
    h = conv.Conv(self.features, (3, 3))(nn.silu(x))
    h = conv.Conv(self.features, (3, 3))(nn.silu(h))
    if x.shape[-1] != self.features:
      x = conv.Conv(self.features, (1, 1))(x)
    return x + h


class Upsample(nn.Module):
  """2x upsampling by a convolution to 4x the channels and depth-to-space.

  Same receptive field as a stride-2 transposed convolution, but it runs as an
  ordinary convolution, which XLA:CPU executes much faster (decoder train step,
  widths 32-64-128, batch 64: 813 ms with transposed convolutions, 348 ms here).
  """
  features: int

  @nn.compact
  def __call__(self, x):
    return conv.depth_to_space(conv.Conv(4 * self.features, (3, 3))(x))


def _padded_size(size):
  return 1 << (size - 1).bit_length()


class ConvEncoder(nn.Module):
  """[B, H, W, C] -> [B, out_dim]."""
  widths: Sequence[int]
  out_dim: int
  blocks_per_stage: int = 1

  @nn.compact
  def __call__(self, x):
    size = _padded_size(x.shape[-2])
    pad = size - x.shape[-2]
    x = jnp.pad(2.0 * x - 1.0, ((0, 0), (pad // 2, pad - pad // 2),
                                (pad // 2, pad - pad // 2), (0, 0)))
    x = conv.Conv(self.widths[0], (5, 5), strides=(2, 2))(x)
    for i, width in enumerate(self.widths):
      for _ in range(self.blocks_per_stage):
        x = ResBlock(width)(x)
      next_width = self.widths[min(i + 1, len(self.widths) - 1)]
      x = conv.Conv(next_width, (4, 4), strides=(2, 2))(nn.silu(x))
    return nn.Dense(self.out_dim)(nn.silu(x).reshape(x.shape[0], -1))


class ConvDecoder(nn.Module):
  """[B, latent] -> [B, H, W, C] logits (mirror of ConvEncoder).

  `head` "subpixel" replaces the last `Upsample` and the 5x5 convolution at full
  resolution by one 5x5 convolution at half resolution to 4 C channels and
  depth-to-space, fewer FLOPs (SBM-AE's train step at batch 256: 237 instead of
  291 GFLOP) and no full-resolution hidden layer; on 2 CPU cores the `cpu`
  config's 5-autoencoder train step (widths 16-32-64, batch 64) takes 0.28 s
  instead of 0.42 s, SBM-AE's 64-128-256 at batch 256 1.39 s instead of 2.21 s
  (docs/speed.md, "Sub-pixel decoder head").
  """
  widths: Sequence[int]
  shape: Sequence[int]
  blocks_per_stage: int = 1
  head: str = "upsample"

  @nn.compact
  def __call__(self, z):
    h, w, c = self.shape
    size = _padded_size(w)
    bottom = size >> (len(self.widths) + 1)
    x = nn.Dense(bottom * bottom * self.widths[-1])(z)
    x = x.reshape(z.shape[0], bottom, bottom, self.widths[-1])
    for width in reversed(self.widths):
      x = Upsample(width)(nn.silu(x))
      for _ in range(self.blocks_per_stage):
        x = ResBlock(width)(x)
    if self.head == "subpixel":
      x = conv.depth_to_space(conv.Conv(4 * c, (5, 5))(nn.silu(x)))
    elif self.head == "upsample":
      x = Upsample(self.widths[0])(nn.silu(x))
      x = conv.Conv(c, (5, 5))(nn.silu(x))
    else:
      raise ValueError(f"decoder head {self.head!r}: expected 'upsample' or 'subpixel'")
    top, left = (size - h) // 2, (size - w) // 2
    return x[:, top:top + h, left:left + w, :]


class MLP(nn.Module):
  """Plain MLP with SiLU activations."""
  widths: Sequence[int]
  out_dim: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.silu(nn.Dense(width)(x))
    return nn.Dense(self.out_dim)(x)


class AutoEncoder(nn.Module):
  """Encoder/decoder pair for one modality.

  Attributes:
    kind: "image" (conv) or "vector" (MLP).
    shape: shape of one example.
    latent_dim: latent size.
    widths: conv widths (image) or hidden widths (vector).
    blocks_per_stage: residual blocks per conv stage.
    variational: encoder outputs mean and log-variance (VAE).
    decoder_head: the conv decoder's last layers, "upsample" or "subpixel"
      (`ConvDecoder.head`).
  """
  kind: str
  shape: Sequence[int]
  latent_dim: int
  widths: Sequence[int]
  blocks_per_stage: int = 1
  variational: bool = False
  decoder_head: str = "upsample"

  def setup(self):
    out = 2 * self.latent_dim if self.variational else self.latent_dim
    if self.kind == "image":
      self.encoder = ConvEncoder(self.widths, out, self.blocks_per_stage)
      self.decoder = ConvDecoder(self.widths, self.shape, self.blocks_per_stage,
                                 self.decoder_head)
    else:
      self.encoder = MLP(self.widths, out)
      self.decoder = MLP(tuple(reversed(self.widths)), self.shape[-1])

  def encode(self, x):
    """Returns (mean, log-variance or None)."""
    h = self.encoder(x)
    if self.variational:
      mean, logvar = jnp.split(h, 2, axis=-1)
      return mean, jnp.clip(logvar, -30.0, 20.0)
    return h, None

  def decode(self, z):
    """Returns decoder logits with the modality's shape."""
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = self.encode(x)
    return self.decode(mean)
