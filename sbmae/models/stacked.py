"""M independent networks with parameters stacked on a leading axis.

`apply_each` runs one network per modality inside a single jitted function by
unrolling over the (static) modality axis. `jax.vmap` over the stacked
parameters would be the textbook choice, but it turns every convolution into a
grouped convolution and `lax.map` puts it in a while loop; on XLA:CPU both run
~20x slower than the unrolled program (measured: 1.36 s / 1.31 s / 0.063 s for
a train step of 5 small CNNs at batch 64). Unrolling costs compile time linear
in M, which is small for M <= 10.
"""

import jax
import jax.numpy as jnp


def init_each(init_fn, rng, num):
  """Stacks `num` independent initialisations: init_fn(key) -> params."""
  keys = jax.random.split(rng, num)
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[init_fn(k) for k in keys])


def index(params, i):
  """The i-th network's parameters."""
  return jax.tree.map(lambda leaf: leaf[i], params)


def apply_each(fn, params, *inputs):
  """[fn(params[i], *[x[i] for x in inputs]) for each i], outputs stacked.

  Args:
    fn: (params_i, *inputs_i) -> pytree of arrays.
    params: stacked parameters, leading axis M.
    *inputs: arrays (or sequences) with leading axis M.

  Returns:
    The outputs stacked on a new leading axis M.
  """
  num = jax.tree.leaves(params)[0].shape[0]
  outputs = [fn(index(params, i), *(x[i] for x in inputs)) for i in range(num)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
