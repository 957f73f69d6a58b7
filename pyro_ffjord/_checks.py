"""Argument checks shared by the public constructors: errors name the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_int(name: str, value: object, least: int = 1) -> int:
    """``value`` if it is an integer (not a bool) ``>= least``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        expected = {0: "a non-negative integer", 1: "a positive integer"}.get(least, f"an integer >= {least}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(name: str, value: object, high: float = math.inf, closed: bool = False) -> float:
    """``value`` if it is a real number (not a bool) in ``(0, high)`` (``[0, high)`` if ``closed``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (0 <= value if closed else 0 < value) and value < high):
        sign = "non-negative" if closed else "positive"
        expected = f"a {sign} finite number" if high == math.inf else f"a {sign} number below {high:g}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def positive_ints(name: str, value: object, length: int | None = None, empty: bool = False) -> tuple[int, ...]:
    """``value`` as a tuple of positive integers (``length`` of them; none only if ``empty``), else an error."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of positive integers, got {value!r}")
    value = tuple(value)
    if (
        (not value and not empty)
        or (length is not None and len(value) != length)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be {'' if length is None else f'{length} '}positive integers, got {value!r}")
    return value


def check_tensor(name: str, value: object, event_shape: Sequence[int] = (), like: Tensor | None = None) -> Tensor:
    """``value`` if it is a finite tensor of shape ``(..., *event_shape)`` with ``like``'s dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if like is not None and value.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} (the flow's parameters), got {value.dtype}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the flow's parameters are on {like.device}")
    k = len(event_shape)
    if value.dim() < k or tuple(value.shape[value.dim() - k :]) != tuple(event_shape):
        raise ValueError(f"{name} must have shape (..., {', '.join(map(str, event_shape))}), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value
