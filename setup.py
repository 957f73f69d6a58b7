from setuptools import find_packages, setup

setup(
    name="pyro-ffjord",
    version="0.1.0",
    description="FFJORD free-form continuous normalizing flows for Pyro",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyro_ffjord", "pyro_ffjord.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "pyro-ppl>=1.9", "torchdiffeq>=0.2.4", "scipy", "tqdm"],
    extras_require={
        "examples": ["matplotlib", "torchvision", "scipy", "pandas", "h5py"],
        "test": ["pytest", "hypothesis", "ruff", "matplotlib", "torchvision", "scipy", "pandas", "h5py", "zuko"],
        "bench": ["zuko"],
    },
)
