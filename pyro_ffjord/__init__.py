"""pyro-ffjord: free-form continuous normalizing flows (FFJORD) for Pyro."""

from .autoguide import AutoFFJORD
from .dynamics import NFE
from .flow_matching import flow_matching_loss, ot_coupling
from .multiscale import MultiscaleFFJORD, bits_per_dim, dequantize
from .nets import AmortizedLowRankODENet, ODENet
from .scaling import standardization
from .settings import SolverSettings
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
from .unet import UNet

__version__ = "0.1.0"

__all__ = [
    "AmortizedFFJORD",
    "AmortizedLowRankODENet",
    "AutoFFJORD",
    "FFJORD",
    "NFE",
    "ConditionalFFJORD",
    "ConditionedFFJORD",
    "MultiscaleFFJORD",
    "ODENet",
    "ODESolveError",
    "SolverSettings",
    "UNet",
    "amortized_ffjord",
    "bits_per_dim",
    "conditional_ffjord",
    "dequantize",
    "ffjord",
    "flow_matching_loss",
    "ot_coupling",
    "solver_settings",
    "standardization",
]
