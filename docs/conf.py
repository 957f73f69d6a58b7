"""Sphinx configuration: the API pages come from the docstrings (autodoc, Google style via napoleon)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import pyro_ffjord  # noqa: E402

project = "pyro-ffjord"
author = "the pyro-ffjord authors"
release = version = pyro_ffjord.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
