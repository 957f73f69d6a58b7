"""Real-data loaders. They read local files (downloading only when asked) and name any missing file with its source."""

from ._paths import default_data_dir, require_file, resolve_root

__all__ = ["default_data_dir", "require_file", "resolve_root"]
