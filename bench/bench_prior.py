"""Throughput of the latent score prior: DSM train step and PC sampler.

Measures, for the default MLP prior on D = 5 x 64 latents and the SBM-AE
latent U-Net (5 modalities as 5 channels of 8x8, width 64, mults 1,2,2,2):
  * the train step (DSM loss, grads, Adam update) at batch 256: examples/s;
  * the sampler (100 Euler-Maruyama predictor steps + 1 Langevin corrector
    step each, plus the final denoising: 201 score evaluations) for 256
    samples: samples/s;
each with achieved GFLOP/s and its share of the machine's XLA matmul peak
(measured at start). FLOPs come from XLA's cost analysis of the lowered
function; for the sampler, whose loop XLA counts once, it is (score
evaluations) x (FLOPs of one batched score call).

Reference, PyTorch SBM-AE U-Net on the same 2-core CPU: train step 1.21 s;
100 PC steps for 256 samples 81.5 s.

Run:
  JAX_PLATFORMS=cpu python bench/bench_prior.py [--models=mlp,unet]
      [--guidance=2 --joint_guidance=1 --corrector_steps=3]  # the cpu config's sampler
      [--profile]  # also where the train step's XLA op time goes (common.op_breakdown)
      [--models=mlp --mlp_hidden=512 --mlp_layers=3 --batch_size=B]  # the cpu config's prior
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from sbmae.diffusion import losses
from sbmae.diffusion import sample as sample_lib
from sbmae.diffusion import sde as sde_lib
from sbmae.models import score as score_lib
from sbmae.stages import prior

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "unet"], "Priors to time: mlp and/or unet.")
flags.DEFINE_integer("batch_size", 256, "Train batch and number of samples.")
flags.DEFINE_integer("train_iters", 10, "Timed train steps (after warm-up).")
flags.DEFINE_integer("sample_iters", 3, "Timed sampler calls (after warm-up).")
flags.DEFINE_enum("update", "adam", ["adam", "sgd", "none"], "Parameter update of the "
                  "timed train step; none: it returns the gradients (loss and gradient alone).")
flags.DEFINE_integer("num_steps", 100, "Predictor steps of the sampler.")
flags.DEFINE_integer("corrector_steps", 1, "Corrector steps per predictor step.")
flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w of the sampler.")
flags.DEFINE_float("joint_guidance", 0.0, "Joint guidance weight v of the sampler; > 0 "
                   "also times it with min_observed = 2 (the marginals of the 3 "
                   "unobserved modalities only).")
flags.DEFINE_bool("profile", False, "Also print where the train step's XLA op time goes.")
flags.DEFINE_integer("mlp_hidden", 1024, "The MLP prior's width (the cpu config's: 512).")
flags.DEFINE_integer("mlp_layers", 4, "The MLP prior's residual blocks (the cpu config's: 3).")

DIMS = (64,) * 5
MODELS = {
    "mlp": lambda: score_lib.ScoreMLP(hidden=FLAGS.mlp_hidden, num_layers=FLAGS.mlp_layers,
                                      time_embed_dim=128),
    "unet": lambda: score_lib.LatentUNet(dims=DIMS, width=64, mults=(1, 2, 2, 2),
                                         time_embed_dim=128),
}


def bench_model(name, peak):
  """Times the train step and the sampler of one prior; prints the figures."""
  model = MODELS[name]()
  sde = sde_lib.VPSDE()
  d, b = sum(DIMS), FLAGS.batch_size
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, d)),
                               jnp.ones((2,)), jnp.zeros((2, d)))["params"]
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  print(f"== {name}: {num_params / 1e6:.2f} M parameters, D = {d}", flush=True)

  loss_fn = losses.get_dsm_loss_fn(sde, model, DIMS)
  tx = {"adam": optax.adam(1e-4), "sgd": optax.sgd(1e-4), "none": None}[FLAGS.update]
  base_key = jax.random.PRNGKey(1)

  def train_step(state, batch, step):
    params, opt_state = state
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        params, jax.random.fold_in(base_key, step), batch)
    if tx is None:  # the gradients are an output, so XLA cannot drop the backward
      return state, (metrics, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), metrics

  batch = jax.random.normal(jax.random.PRNGKey(2), (b, d))
  state = (params, tx.init(params) if tx else ())
  options = prior.compiler_options(name)  # as the prior stage compiles them
  step_fn = jax.jit(train_step, donate_argnums=0, compiler_options=options)
  lowered = step_fn.lower(state, batch, 0)
  train_flops = common.flops(lowered)
  counter = [0]

  def run_train():
    nonlocal state
    counter[0] += 1
    state, metrics = step_fn(state, batch, counter[0])
    return metrics
  for _ in range(2):
    run_train()
  seconds = common.median_seconds(run_train, FLAGS.train_iters)
  common.report(f"{name} train step ({FLAGS.update} update), batch {b}", seconds, b,
                "examples", train_flops, peak)
  if FLAGS.profile:
    common.op_breakdown(run_train, FLAGS.train_iters, hlo_text=lowered.compile().as_text())

  params = state[0]
  score_fn = losses.get_score_fn(sde, model)
  x, t, clean = jnp.zeros((b, d)), jnp.full((b,), 0.5), jnp.zeros((b, d))
  score_flops = common.flops(jax.jit(score_fn).lower(params, x, t, clean))
  evals = FLAGS.num_steps * (1 + FLAGS.corrector_steps) + 1
  w, v = FLAGS.guidance, FLAGS.joint_guidance
  sampler = sample_lib.get_sampler(sde, score_fn, DIMS, num_steps=FLAGS.num_steps,
                                   corrector_steps=FLAGS.corrector_steps,
                                   clean_conditioning=bool(w or v), guidance=w,
                                   joint_guidance=v, compiler_options=options)
  observed = jnp.zeros((b, d))
  mask = np.array([True, False, True, False, False])  # 2 of 5 observed.
  keys = iter(range(10 ** 6))
  for min_observed in (0, 2) if v else (0,):
    # Network rows per score evaluation, in units of the batch (sbmae.diffusion.sample).
    rows = 1 + (w > 0) + (len(DIMS) - min_observed) * (v > 0)

    def run_sampler(min_observed=min_observed):
      return sampler(jax.random.PRNGKey(next(keys)), params, observed, mask,
                     min_observed=min_observed)
    run_sampler()  # compile + warm-up
    seconds = common.median_seconds(run_sampler, FLAGS.sample_iters)
    common.report(f"{name} sampler, {FLAGS.num_steps} steps x (1 + "
                  f"{FLAGS.corrector_steps}) for {b} samples ({evals} score evals x "
                  f"{rows} B rows: w {w:g}, v {v:g}, min_observed {min_observed})",
                  seconds, b, "samples", evals * rows * score_flops, peak)


def main(argv):
  del argv
  peak = common.print_peak()
  for name in FLAGS.models:
    bench_model(name, peak)


if __name__ == "__main__":
  app.run(main)
