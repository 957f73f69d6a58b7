"""Training-loop utilities shared by the examples: atomic checkpoints, resume, RNG state, logging."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch


def add_common_args(parser: argparse.ArgumentParser, num_steps: int, out: str) -> None:
    """Adds the flags every example shares."""
    parser.add_argument("-n", "--num-steps", type=int, default=num_steps, help="training iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", default=out, help="folder for checkpoint, log and plot")
    parser.add_argument("--plot", default=None, help="PNG path (default: <out>/<name>.png)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but absent; sets CPU threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Writes ``obj`` with ``torch.save`` to a temporary file, then renames it over ``path``.

    A crash at any moment leaves either the old or the new file, never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    """Every RNG an example draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, step: int, optimizer: pyro.optim.PyroOptim, **extra: Any) -> None:
    """Atomically saves the Pyro param store, the optimizer, the RNG states and ``extra``."""
    state = {
        "step": step,
        "param_store": pyro.get_param_store().get_state(),
        "optimizer": optimizer.get_state(),
        "rng": rng_state(),
        **extra,
    }
    atomic_torch_save(state, path)


def load_checkpoint(path: Path, optimizer: pyro.optim.PyroOptim, device: torch.device) -> dict[str, Any]:
    """Restores what :func:`save_checkpoint` wrote; returns the whole checkpoint dict."""
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    pyro.get_param_store().set_state(state["param_store"])
    optimizer.set_state(state["optimizer"])
    set_rng_state(state["rng"])
    return state


class CSVLog:
    """Appends rows of metrics to a CSV file.

    On resume, rows logged after the checkpoint (by a run killed before its next checkpoint) are
    dropped, so the log matches the restored state.
    """

    def __init__(self, path: Path, fields: list[str], resume_step: int | None = None) -> None:
        self.path = path
        self.fields = fields
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [row for row in list(csv.reader(f))[1:] if row and int(row[0]) < resume_step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([fields, *rows])

    def write(self, **row: Any) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[name] for name in self.fields])


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Writes ``obj`` as JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
