"""The pipeline's training stages, in order, and the one place their seeds come from.

Each stage module (classifier, autoencoders, reduce, prior) has `train(...)`,
which trains or resumes or loads a finished stage, and `restore(...)`, which
rebuilds its result for later stages. The `evaluate` stage lives in
`sbmae.eval`.
"""

import jax

STAGES = ("classifier", "autoencoders", "reduce", "prior", "evaluate")

# Stage -> offset of its seed from config.seed. Changing one changes every
# result downstream of that stage; fixed so that runs stay comparable.
_SEED_OFFSETS = {"classifier": 0, "autoencoders": 1, "reduce": 2, "prior": 3,
                 "evaluate": 4, "rank_sweep": 5, "prior_eval": 6}


def stage_seed(config, name):
  """The integer seed of stage `name` (data order, subset choice)."""
  return config.seed + _SEED_OFFSETS[name]


def stage_rng(config, name):
  """The base PRNG key of stage `name` (initialisation, per-step keys, sampling)."""
  return jax.random.PRNGKey(stage_seed(config, name))
