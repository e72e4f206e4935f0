"""Staged generators for GAN-prior distillation.

- :class:`StagedGenerator`: the interface (sample latents, advance a stage, render, stage count).
- :class:`ConvGenerator`: a small class-conditional generator, :func:`train_generator` to train
  it, :func:`save_generator` / :func:`load_generator`, and :func:`pretrained` for the checkpoint
  shipped with the package (digits).
- :func:`train_for_dataset`: train one for a dataset into a folder (resumable; weights, JSON and
  a sample grid), :func:`cached_generator`: the same in the cache (``--generator auto``).
- :func:`from_modules`: any list of modules as stages.
- :func:`pixels`: pixel space (one stage whose latents are the images), for MTT / DM / DC on
  pixels through the same loop.
- :func:`from_stylegan`: StyleGAN2-ADA / StyleGAN3 / StyleGAN-XL generators loaded with their
  own code (:func:`load_stylegan_pickle` reads a local network pickle, with explicit opt-in).
"""

from hpd_fast.generators.base import StagedGenerator
from hpd_fast.generators.convgen import ConvGenerator, stage_layout
from hpd_fast.generators.fit import cached_generator, train_for_dataset
from hpd_fast.generators.io import load_generator, pretrained, save_generator
from hpd_fast.generators.modules import ModuleGenerator, from_modules
from hpd_fast.generators.pixels import PIXEL_INITS, PixelGenerator, pixels
from hpd_fast.generators.stylegan import StyleGANGenerator, from_stylegan, load_stylegan_pickle
from hpd_fast.generators.train import train_generator

__all__ = [
    "ConvGenerator",
    "ModuleGenerator",
    "PIXEL_INITS",
    "PixelGenerator",
    "StagedGenerator",
    "StyleGANGenerator",
    "cached_generator",
    "from_modules",
    "from_stylegan",
    "load_generator",
    "load_stylegan_pickle",
    "pixels",
    "pretrained",
    "save_generator",
    "stage_layout",
    "train_for_dataset",
    "train_generator",
]
