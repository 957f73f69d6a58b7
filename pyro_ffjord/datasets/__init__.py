"""Real-data loaders. They read local files only (never download) and name any missing file."""

from ._paths import default_data_dir, require_file, resolve_root

__all__ = ["default_data_dir", "require_file", "resolve_root"]
