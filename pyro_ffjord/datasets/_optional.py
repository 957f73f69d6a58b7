"""Optional packages of the readers (the ``data`` extra): a missing one is one clear ``ImportError``."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, package: str, purpose: str) -> ModuleType:
    """Imports ``module``, or raises an ``ImportError`` that names ``package`` and the ``data`` extra.

    Args:
        module: Module to import, e.g. ``"h5py"`` or ``"PIL.Image"``.
        package: The distribution that provides it, e.g. ``"h5py"`` or ``"Pillow"``.
        purpose: What needs it, e.g. ``"reading BSDS300.hdf5"``; the message starts with it.

    Example:
        >>> require("math", "math", "arithmetic").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{purpose} needs {package}: pip install 'pyro-ffjord[data]' (or pip install {package})"
        raise ImportError(message) from e
