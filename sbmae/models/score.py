"""Score networks for the joint prior over (reduced) latents.

Every network maps (x_t [B, D], t [B], clean_mask [B, D]) to a noise
prediction eps_hat [B, D]. `clean_mask` is a float per-coordinate conditioning
state (`sbmae.latents`): CLEAN (1) where the coordinate holds a clean
(undiffused) conditioning value, DIFFUSED (0) where it is diffused, ABSENT (-1)
where its modality is left out (the value is ignored; the network zeroes it);
all zeros for unconditional training/sampling. The networks see it as two
binary flags per coordinate, clean and absent.

Parametrisation: with the kernel x_t = alpha(t) x_0 + std(t) eps, the noise
prediction is eps_hat = std(t) x_t / (alpha(t)^2 + std(t)^2) + net(x_t, t,
clean_mask) (the Gaussian base: E[eps | x_t] for N(0, I) latents under either
SDE; `gaussian_base=False` drops it) and the score is
  score(x_t, t) = -eps_hat(x_t, t) / std(t)
(`sbmae.diffusion.losses.get_eps_fn`, `get_score_fn`). Regressing eps with an MSE is denoising score
matching with the usual std(t)^2 weighting, and keeps the output O(1) at
every t.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sbmae import models
from sbmae.latents import ABSENT
from sbmae.latents import CLEAN
from sbmae.models import conv


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of continuous times t in [0, 1] -> [B, dim].

  Times are scaled by 1000 so the frequencies match the usual DDPM embedding
  of integer steps.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _condition_inputs(x, clean_mask):
  """(x with absent coordinates zeroed, clean flags, absent flags), all like x."""
  clean_mask = jnp.broadcast_to(clean_mask, x.shape).astype(x.dtype)
  absent = (clean_mask == ABSENT).astype(x.dtype)
  return (jnp.where(absent > 0, 0.0, x), (clean_mask == CLEAN).astype(x.dtype),
          absent)


def _time_mlp(t, batch: int, dim: int):
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
  emb = nn.Dense(dim)(timestep_embedding(t, dim))
  return nn.Dense(dim)(nn.swish(emb))


class ScoreMLP(nn.Module):
  """Residual MLP with a sinusoidal time embedding; predicts eps.

  Attributes:
    hidden: width of the residual stream.
    num_layers: number of residual blocks (two Dense layers each).
    time_embed_dim: size of the time embedding.
  """
  hidden: int = 1024
  num_layers: int = 4
  time_embed_dim: int = 128

  @nn.compact
  def __call__(self, x, t, clean_mask):
    """Returns eps_hat [B, D] for x [B, D], t [B] (or scalar), clean_mask [B, D]."""
    temb = nn.swish(_time_mlp(t, x.shape[0], self.time_embed_dim))
    h = nn.Dense(self.hidden)(jnp.concatenate(_condition_inputs(x, clean_mask), axis=-1))
    for _ in range(self.num_layers):
      r = nn.Dense(self.hidden)(nn.swish(nn.LayerNorm()(h)))
      r = r + nn.Dense(self.hidden)(temb)
      r = nn.Dense(self.hidden)(nn.swish(nn.LayerNorm()(r)))
      h = h + r
    h = nn.swish(nn.LayerNorm()(h))
    # Zero init: the untrained model predicts eps = 0 (score 0), a stable start.
    return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(h)


class Conv3x3(conv.Conv):
  """The U-Net's 3x3 SAME convolution: `conv.Conv`, under its own name.

  Kept as a named subclass so the U-Net's parameter names (Conv3x3_N) stay
  those of existing checkpoints. On CPU its outputs of at most 4 positions
  (the 2x2 and 1x1 levels) run as im2col + one GEMM, and `upsample=True`
  (the decoder's nearest-neighbour 2x upsampling followed by this conv) runs
  as a sub-pixel conv at the low resolution; see sbmae/models/conv.py.
  """
  kernel_size: Sequence[int] = (3, 3)


def _group_norm(x):
  return nn.GroupNorm(num_groups=math.gcd(32, x.shape[-1]))(x)


class _ResBlock(nn.Module):
  """DDPM residual block: two 3x3 convs with the time embedding added between."""
  features: int

  @nn.compact
  def __call__(self, x, temb):
    h = Conv3x3(self.features)(nn.swish(_group_norm(x)))
    h = h + nn.Dense(self.features)(temb)[:, None, None, :]
    h = Conv3x3(self.features, kernel_init=nn.initializers.zeros)(
        nn.swish(_group_norm(h)))
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features)(x)  # 1x1 projection of the skip path.
    return x + h


class LatentUNet(nn.Module):
  """SBM-AE style U-Net over latents stacked as image channels; predicts eps.

  The M modality latents (each of size d = h * h) are reshaped to
  [B, h, h, M] (one channel per modality) together with M channels of clean
  flags and M of absent flags, and processed by a DDPM-like U-Net without attention (at the
  8x8 and smaller resolutions used here attention adds little).

  Attributes:
    dims: per-modality latent sizes; all equal to a perfect square h^2, with h
      divisible by 2^(len(mults) - 1).
    width: channels at the first level.
    mults: channel multiplier per level; the resolution halves between levels.
    num_res_blocks: residual blocks per level on the way down.
    time_embed_dim: size of the time embedding.
  """
  dims: Sequence[int]
  width: int = 64
  mults: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  time_embed_dim: int = 128

  def _side(self) -> int:
    dims = tuple(int(d) for d in self.dims)
    side = math.isqrt(dims[0]) if dims else 0
    if not dims or len(set(dims)) != 1 or side * side != dims[0]:
      raise ValueError(
          "LatentUNet stacks modality latents as channels of one h x h image, "
          f"so every latent size must be the same perfect square; got dims={dims}."
          " Use the MLP prior (prior.model='mlp') for unequal or reduced latents.")
    factor = 2 ** (len(self.mults) - 1)
    if side % factor:
      raise ValueError(
          f"LatentUNet with {len(self.mults)} levels halves the {side}x{side} "
          f"latent image {len(self.mults) - 1} times; {side} is not divisible "
          f"by {factor}. Use fewer mults.")
    return side

  @nn.compact
  def __call__(self, x, t, clean_mask):
    """Returns eps_hat [B, D] for x [B, D], t [B] (or scalar), clean_mask [B, D]."""
    side, m, b = self._side(), len(self.dims), x.shape[0]
    if x.shape[-1] != m * side * side:
      raise ValueError(f"x has {x.shape[-1]} coordinates, dims={tuple(self.dims)}.")

    def to_image(v):  # [B, M*h*h] -> [B, h, h, M]
      return v.reshape(b, m, side, side).transpose(0, 2, 3, 1)

    temb = nn.swish(_time_mlp(t, b, self.time_embed_dim))
    h = Conv3x3(self.width)(
        jnp.concatenate([to_image(v) for v in _condition_inputs(x, clean_mask)], axis=-1))
    skips = [h]
    for level, mult in enumerate(self.mults):
      for _ in range(self.num_res_blocks):
        h = _ResBlock(self.width * mult)(h, temb)
        skips.append(h)
      if level != len(self.mults) - 1:
        h = Conv3x3(h.shape[-1], strides=2)(h)
        skips.append(h)
    h = _ResBlock(h.shape[-1])(h, temb)
    h = _ResBlock(h.shape[-1])(h, temb)
    for level, mult in reversed(list(enumerate(self.mults))):
      for _ in range(self.num_res_blocks + 1):
        h = _ResBlock(self.width * mult)(
            jnp.concatenate([h, skips.pop()], axis=-1), temb)
      if level:
        h = Conv3x3(h.shape[-1], upsample=True)(h)
    h = nn.swish(_group_norm(h))
    h = Conv3x3(m, kernel_init=nn.initializers.zeros)(h)
    return h.transpose(0, 3, 1, 2).reshape(b, m * side * side)


MODELS = {"mlp": ScoreMLP, "unet": LatentUNet}


def get_model(config, dims: Sequence[int]) -> nn.Module:
  """Builds the score network named by `config.model` (the `prior` section).

  Args:
    config: the prior config; its keys that are fields of the chosen module
      (`sbmae.models.from_config`) set them.
    dims: per-modality latent sizes (the U-Net stacks them as channels).

  Returns:
    A ScoreMLP or LatentUNet.
  """
  if config["model"] not in MODELS:
    raise ValueError(f"Unknown prior model {config['model']!r}; known: {sorted(MODELS)}.")
  fixed = {"dims": tuple(int(d) for d in dims)} if config["model"] == "unet" else {}
  return models.from_config(MODELS[config["model"]], config, **fixed)
