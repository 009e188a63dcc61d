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
      # Shared folder of trained classifiers (an evaluation instrument), keyed
      # by the data and these settings, so runs on the same data train them
      # once (sbmae.stages.classifier.cache_folder); empty: in the run folder.
      cache_dir="~/.cache/sbmae/classifiers",
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
      # The conv decoder's last layers: "upsample" (to full resolution, then a
      # 5x5 convolution) or "subpixel" (a 5x5 convolution at half resolution
      # to 4x the channels, then depth-to-space; 1.5x faster on CPU).
      decoder_head="upsample",
      beta=1e-4,  # weight of ||z||^2 (rae) or of the KL term (vae).
      noise_std=0.01,  # rae: Gaussian noise added to z before decoding.
      # vae: the latents handed on are posterior samples mu + sigma e ("sample",
      # the aggregate posterior, which matches N(0, I) where the decoder uses
      # nothing) or the means ("mean").
      vae_latents="sample",
      num_steps=20000,
      # name -> steps for modalities whose autoencoder should stop before
      # `num_steps` (the smaller of the two counts; each modality's learning
      # rate schedule spans its own steps); the stage then trains only the
      # others. Set in a config file, e.g. {"m1": 4000}.
      modality_steps=ml_collections.ConfigDict(),
      batch_size=256,
      learning_rate=1e-3,
      warmup_steps=500,
      # Clips the gradients of the modalities a step trains by their joint norm.
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
      # Conditioning tasks (sbmae.diffusion.losses): each example keeps k modalities
      # clean, k = 0..M-1 drawn from `clean_count_dist` ("uniform"; "none":
      # k = 0 always, an unconditional prior for the replacement sampler; or M
      # comma-separated weights for k = 0..M-1: "1,5,10,10,5" is the task mix of
      # the former independent Bernoulli(0.5) masking for M = 5), mixed with
      # `uncond_share` of examples forced to k = 0; then a uniform random subset
      # of size k. Every example is averaged over its own diffused coordinates,
      # so each k gets the share drawn (logged as prior/train/share_k{k}).
      clean_count_dist="uniform",
      uncond_share=0.1,
      # Probability that an example's clean modalities are made absent instead
      # (classifier-free guidance training; sampling.guidance needs it > 0).
      absent_prob=0.1,
      # Held-out denoising loss per k on the first `eval_examples` test latents
      # (and as many training latents) every `eval_every` steps; 0: off.
      eval_every=1000,
      eval_examples=1000,
      eps=1e-5,
      # Predict eps as std x / (alpha^2 + std^2) + network: E[eps | x_t] for
      # N(0, I) latents under either SDE, so the network learns only the
      # dependence (sbmae.models.score.get_eps_fn).
      gaussian_base=True,
  ))

  config.sampling = ml_collections.ConfigDict(dict(
      num_steps=100,
      corrector_steps=1,
      snr=0.16,
      eps=1e-3,
      # Hold observed modalities clean and flagged (needs prior.clean_count_dist
      # other than "none"); False: replace them by their diffused values.
      clean_conditioning=True,
      # Classifier-free guidance weight w: s_cond + w (s_cond - s_absent), where
      # s_absent has the observed modalities absent (sbmae.diffusion.sample). 0: unguided.
      # On the former quick config (200 RAE steps) mean conditional coherence
      # rises with w (0.207, 0.301, 0.365, 0.386 at w = 0, 1, 2, 3) while the
      # Frechet distance of conditional samples is about level up to w = 2 and
      # grows beyond.
      guidance=2.0,
      # Joint guidance weight v: + v (s_cond - s_marg), each unobserved modality
      # against its own marginal; the only guidance unconditional generation
      # gets (sbmae.diffusion.sample). 0: none; v > 0 costs M more network rows.
      # PolyMNIST-5 cpu prior: unconditional coherence 0.176 / 0.376 / 0.460 /
      # 0.504 / 0.490 / 0.470 / 0.392 / 0.108 at v = 0 / 0.5 / 0.75 / 1 / 1.25 /
      # 1.5 / 2 / 3; conditional k = 1 0.631 -> 0.702 (2 subsets) at v = 1.
      joint_guidance=1.0,
      batch_size=500,
  ))

  config.eval = ml_collections.ConfigDict(dict(
      num_examples=1000,  # test tuples used for conditional coherence.
      # Subsets per size k: -1 evaluates all C(M, k) of them; otherwise a fixed
      # sample (seeded) of that many subsets per k, balanced so that every
      # modality is missing equally often (sbmae.eval.driver.subsets_of_size).
      max_subsets=-1,
      num_unconditional=1000,
      inception_path="",  # local InceptionV3 weights; empty: classifier features only.
      grid_examples=8,
  ))
  return config
