"""Where the real datasets live: ``--data-dir``/``root``, else ``$PYRO_FFJORD_DATA``, else ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PYRO_FFJORD_DATA"


def default_data_dir() -> Path:
    """The data directory: ``$PYRO_FFJORD_DATA``, else ``shared/data`` beside the checkout or the cwd."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return checkout.parent / "shared" / "data"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a ``Path``, or :func:`default_data_dir` when it is None."""
    return default_data_dir() if root is None else Path(root)


def require_file(path: Path, what: str, source: str) -> Path:
    """Returns ``path`` if it is a file; otherwise raises ``FileNotFoundError`` saying what to put there and
    where it comes from."""
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {what}: expected the file {path}; {source}. Put it there, or pass --data-dir/root "
            f"(or set ${ENV_VAR}) to the folder that holds it."
        )
    return path
