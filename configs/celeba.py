"""CelebAMask-HQ configs (image, non-skin part mask, 18 attributes).

  python -m sbmae.main --config=configs/celeba.py --workdir=W \\
      --config.data.path=/path/to/CelebAMask-HQ                   # full size, U-Net prior
  python -m sbmae.main --config=configs/celeba.py:reduce --workdir=W \\
      --config.data.path=/path/to/CelebAMask-HQ                   # + dimension reduction
  python -m sbmae.main --config=configs/celeba.py:mlp --workdir=W \\
      --config.data.path=/path/to/CelebAMask-HQ                   # full latents, MLP prior
  python -m sbmae.main --config=configs/celeba.py:quick --workdir=W \\
      --config.data.path=/path/to/CelebAMask-HQ                   # 64x64, CPU-sized

The folder holds CelebA-HQ-img/, CelebAMask-HQ-mask-anno/ and
CelebAMask-HQ-attribute-anno.txt. The first run reads and resizes the release
once into `<workdir>/data` (or `--config.data.cache_dir`, which can be shared
between runs).

The argument is a comma-separated list of tokens: `quick` (64x64, tiny
networks, few steps) or none for full size (128x128, SBM-AE-scale networks and
training lengths), and optionally `reduce` (score-ratio dimension reduction
before the prior) or `mlp` (MLP prior on the full latents: the like-for-like
baseline of `reduce`). The U-Net prior stacks the three 256-d latents as 16x16
channels, which reduced latents (unequal ranks) cannot be, so `reduce` uses the
MLP prior.
"""

from configs import default

_TOKENS = ("quick", "reduce", "mlp")


def get_config(arg=""):
  """Returns the CelebAMask-HQ config for `arg` (see module docstring)."""
  tokens = default.parse_tokens(arg, _TOKENS)
  config = default.get_config()
  config.data.name = "celeba"

  if "quick" in tokens:
    config.data.update(image_size=64, num_train=5000, num_test=500)
    config.log_every = 20
    config.checkpoint_every = 100
    # 64x64: the stride-2 stem and one stride-2 stage per width reach 2x2.
    config.autoencoder.update(latent_dim=64, widths=(16, 32, 32, 64), num_steps=300,
                              batch_size=32, warmup_steps=30)
    config.prior.update(model="mlp", hidden=256, num_layers=2, num_steps=400, batch_size=128,
                        learning_rate=1e-3, warmup_steps=40, ema_decay=0.99)
    config.sampling.update(num_steps=30, batch_size=100)
    config.eval.update(num_examples=100, num_unconditional=100, grid_examples=6)
  else:
    # SBM-AE's CelebAMask-HQ setting: 128x128, 256-d latents, autoencoders with
    # beta 1e-4 and latent noise 1e-3, a U-Net prior of width 256 over the
    # latents as 3 channels of 16x16 (mults 1,2,2,2,2), ~1000 epochs of the
    # 25,000 training tuples at batch 256 (lr 5e-5); every test tuple evaluated.
    config.data.image_size = 128
    # 128x128: five stride-2 stages after the stem reach 2x2. The attribute
    # MLP uses the same widths as its hidden layers.
    config.autoencoder.update(latent_dim=256, widths=(64, 128, 256, 256, 512), beta=1e-4,
                              noise_std=1e-3, num_steps=30000, batch_size=256)
    config.prior.update(model="unet", width=256, mults=(1, 2, 2, 2, 2),
                        num_steps=100000, batch_size=256, learning_rate=5e-5,
                        warmup_steps=1000)
    config.eval.update(num_examples=5000, num_unconditional=5000)
  if "reduce" in tokens or "mlp" in tokens:
    config.prior.model = "mlp"
  if "reduce" in tokens:
    config.reduction.enabled = True
  return config
