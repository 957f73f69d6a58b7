from setuptools import find_packages, setup

# `import pyro_ffjord` needs exactly install_requires (scipy: the minibatch-OT coupling of flow matching).
DATA = ["numpy", "pandas", "h5py", "Pillow"]  # the readers in pyro_ffjord.datasets
EXAMPLES = ["matplotlib", "tqdm", "torchvision", *DATA]
TEST = ["pytest", "hypothesis", "ruff", "zuko", *EXAMPLES]

setup(
    name="pyro-ffjord",
    version="0.1.0",
    description="FFJORD free-form continuous normalizing flows for Pyro",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyro_ffjord", "pyro_ffjord.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "pyro-ppl>=1.9", "torchdiffeq>=0.2.4", "scipy"],
    extras_require={
        "data": DATA,
        "examples": EXAMPLES,
        "test": TEST,
        "bench": ["zuko"],
        "docs": ["sphinx", "myst-parser"],
    },
)
