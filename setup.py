"""sbmae: score-based multimodal autoencoders with score-ratio dimension reduction."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="sbmae",
    version="0.1.0",
    description=("Score-based multimodal autoencoders with per-modality "
                 "score-ratio dimension reduction (JAX/Flax)."),
    packages=setuptools.find_packages(include=["sbmae", "sbmae.*"]),
    python_requires=">=3.11",
    install_requires=_requirements(),
    extras_require={"test": ["pytest>=8", "pytest-xdist==3.8.0"]},
)
