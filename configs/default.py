"""Default configuration shared by every dataset config.

Dataset configs (configs/polymnist.py, configs/celeba.py) start from this one and
override fields; they never add keys of their own, so a mistyped override such as
`--config.prior.num_step=10` fails with the key named.

Run:
  python -m sbmae.main --config=configs/polymnist.py:quick --workdir=/tmp/sbmae_quick
"""

import dataclasses

import ml_collections

from sbmae.reduction import reduction


def parse_tokens(arg, allowed):
  """Splits a `get_config` argument "a,b" into tokens, naming any unknown one."""
  tokens = [t for t in arg.split(",") if t]
  unknown = [t for t in tokens if t not in allowed]
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; expected tokens from {allowed}")
  return tokens


def get_config():
  """Returns the default (full-size PolyMNIST-5) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Stages run in this order; each is skipped when its checkpoint says it is
  # finished. `--config.stage=prior` runs that stage alone (its inputs must exist).
  config.stage = ""
  config.log_every = 100
  config.checkpoint_every = 1000
  # A workdir remembers its config; re-running it with different values (other
  # than sbmae.errors.MAY_DIFFER) stops with the keys named unless this is True.
  config.allow_config_change = False

  config.data = ml_collections.ConfigDict(dict(
      name="polymnist",
      num_modalities=5,
      # Digits: "mnist" (real MNIST, see `mnist_path`) or "sklearn_digits" (the
      # 8x8 digits that ship inside scikit-learn, resized; quickstart only).
      digits="mnist",
      # Keras-style mnist.npz, or a folder with the four idx-ubyte files (gz or
      # not). Empty: $SBMAE_MNIST, then `mnist_search`, then tfds.
      mnist_path="",
      # Where to look for MNIST when mnist_path and $SBMAE_MNIST are empty,
      # relative to the working directory: this project's checkouts keep real
      # MNIST beside the repository, in ../shared/data.
      mnist_search=("../shared/data/mnist.npz",),
      # "builtin": the colour images shipped by scikit-image/scikit-learn; else
      # a folder of the user's background images (e.g. the original PolyMNIST ones).
      backgrounds="builtin",
      # Folder of the released PolyMNIST ({train,test}/m{k}/{index}.{label}.png);
      # when set it is read instead of building the data set.
      released_path="",
      # Where the built data set is cached; empty means <workdir>/data.
      cache_dir="",
      # Use only the first n train/test tuples (-1: all of them).
      num_train=-1,
      num_test=-1,
      # CelebAMask-HQ only.
      path="",
      image_size=128,
      # The last n images (by index) form the test split, the rest train; 5000
      # is the standard first 25,000 / last 5,000.
      test_split_size=5000,
  ))

  config.classifier = ml_collections.ConfigDict(dict(
      width=32,
      num_steps=3000,
      batch_size=256,
      learning_rate=1e-3,
  ))

  config.autoencoder = ml_collections.ConfigDict(dict(
      kind="rae",  # "rae" or "vae".
      latent_dim=64,
      widths=(64, 128, 256),
      blocks_per_stage=1,
      beta=1e-4,  # weight of ||z||^2 (rae) or of the KL term (vae).
      noise_std=0.01,  # rae: Gaussian noise added to z before decoding.
      num_steps=20000,
      batch_size=256,
      learning_rate=1e-3,
      warmup_steps=500,
      grad_clip=1.0,
  ))

  # Every fit setting and its default is documented once, in
  # sbmae.reduction.reduction.ReductionConfig; the section adds whether the
  # stage runs and its target.
  config.reduction = ml_collections.ConfigDict(dict(
      enabled=False,
      epsilon=0.5,  # target KL bound (nats) of the ridge approximation.
      **dataclasses.asdict(reduction.ReductionConfig()),
  ))

  config.sde = ml_collections.ConfigDict(dict(
      name="vpsde",  # or "vesde" (then sigma_min, sigma_max apply).
      beta_min=0.1,
      beta_max=20.0,
      sigma_min=0.01,
      sigma_max=50.0,
      N=1000,  # discretisation of the DDPM-style `discretize`.
  ))

  config.prior = ml_collections.ConfigDict(dict(
      # "mlp" (sbmae.models.score.ScoreMLP) or "unet" (LatentUNet); the keys
      # below that name a field of the chosen module build it.
      model="mlp",
      hidden=1024,  # mlp: width of the residual stream.
      num_layers=4,  # mlp: residual blocks.
      time_embed_dim=128,
      width=64,  # unet: channels at the top level.
      mults=(1, 2, 2, 2),  # unet: channel multiplier per level.
      num_res_blocks=2,  # unet: residual blocks per level.
      num_steps=50000,
      batch_size=256,
      learning_rate=2e-4,
      warmup_steps=1000,
      grad_clip=1.0,
      ema_decay=0.999,
      # Probability that a modality is replaced by its clean latent during
      # training (teaches conditioning explicitly); 0 disables masking.
      mask_prob=0.0,
      eps=1e-5,
      # Predict eps as std(t) x + network: exact for N(0, I) latents under the
      # VP-SDE (approximate under VE), so the
      # network learns only the dependence (sbmae.models.score.get_eps_fn).
      gaussian_base=True,
  ))

  config.sampling = ml_collections.ConfigDict(dict(
      num_steps=100,
      corrector_steps=1,
      snr=0.16,
      eps=1e-3,
      batch_size=500,
  ))

  config.eval = ml_collections.ConfigDict(dict(
      num_examples=1000,  # test tuples used for conditional coherence.
      # Subsets per size k: -1 evaluates all C(M, k) of them; otherwise a fixed
      # random sample (seeded) of that many subsets per k.
      max_subsets=-1,
      num_unconditional=1000,
      inception_path="",  # local InceptionV3 weights; empty: classifier features only.
      grid_examples=8,
  ))
  return config
