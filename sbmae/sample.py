"""Old import path of the sampler, kept for users' code: use `sbmae.diffusion.sample`."""

from sbmae.diffusion.sample import get_sampler
from sbmae.latents import modality_mask_to_coords

__all__ = ["get_sampler", "modality_mask_to_coords"]
