"""Networks of the score-ratio parametrisations (`sbmae.reduction.score_ratio`)."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """GELU MLP; its last layer starts at zero unless `zero_output` is False."""
  features: int
  width: int
  depth: int
  zero_output: bool = True

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.gelu(nn.Dense(self.width)(x))
    init = (nn.initializers.zeros if self.zero_output else
            nn.linear.default_kernel_init)
    return nn.Dense(self.features, kernel_init=init)(x)


class RidgeFunctions(nn.Module):
  """k separate scalar functions g_j(u_j), each a one-hidden-layer GELU net."""
  features: int
  width: int

  @nn.compact
  def __call__(self, u):
    shape = (self.features, self.width)
    normal = nn.initializers.normal
    w_in = self.param("kernel_in", normal(1.0), shape)
    b_in = self.param("bias_in", normal(1.0), shape)
    w_out = self.param("kernel_out", normal(self.width**-0.5), shape)
    b_out = self.param("bias_out", nn.initializers.zeros, (self.features,))
    return jnp.sum(nn.gelu(u[..., None] * w_in + b_in) * w_out, -1) + b_out
