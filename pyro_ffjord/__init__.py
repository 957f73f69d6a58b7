"""pyro-ffjord: free-form continuous normalizing flows (FFJORD) for Pyro."""

from .autoguide import AutoFFJORD
from .dynamics import NFE
from .nets import AmortizedLowRankODENet, ODENet
from .solve import ODESolveError
from .transforms import (
    FFJORD,
    AmortizedFFJORD,
    ConditionalFFJORD,
    ConditionedFFJORD,
    amortized_ffjord,
    conditional_ffjord,
    ffjord,
    solver_settings,
)

__version__ = "0.1.0"

__all__ = [
    "AmortizedFFJORD",
    "AmortizedLowRankODENet",
    "AutoFFJORD",
    "FFJORD",
    "NFE",
    "ConditionalFFJORD",
    "ConditionedFFJORD",
    "ODENet",
    "ODESolveError",
    "amortized_ffjord",
    "conditional_ffjord",
    "ffjord",
    "solver_settings",
]
