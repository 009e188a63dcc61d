"""Old import path of the sampler, kept for users' code: use `sbmae.diffusion.sample`."""

from sbmae.diffusion.sample import get_sampler  # pylint: disable=unused-import
from sbmae.latents import modality_mask_to_coords  # pylint: disable=unused-import
