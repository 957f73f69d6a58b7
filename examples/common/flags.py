"""The examples' flag vocabulary, one name for one thing (torchdiffeq's names for the solvers), and the
argparse types whose errors name the flag and the expected value."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

import pyro_ffjord as pf
from pyro_ffjord.settings import ADAPTIVE_STAGES, METHOD_OPTIONS


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help already tells it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type`` whose error names the expected value (argparse prints the flag's name)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a non-negative number")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
int_list = _checked(
    lambda s: tuple(int(w) for w in s.split(",")), lambda v: all(w > 0 for w in v), "positive integers such as 64,64"
)


def add_common_args(parser: argparse.ArgumentParser, out: str, num_steps: int, step_name: str = "steps") -> None:
    """The flags of every run: length, seed, device, outputs, resume, threads, compile, data parallelism."""
    parser.add_argument("-n", f"--num-{step_name}", type=positive_int, default=num_steps, help=f"training {step_name}")
    if step_name == "steps":
        parser.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", default=out, help="folder for checkpoint, log, metrics and plot")
    parser.add_argument("--plot", default=None, help="PNG path (default: in --out)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (a larger -n extends)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--distributed", action="store_true", help="data parallel over torchrun's processes")
    parser.add_argument(
        "--compile", nargs="?", const="inductor", default=None, metavar="BACKEND", help="torch.compile the dynamics"
    )


def add_solver_args(
    parser: argparse.ArgumentParser, method: str, step_size: float, tol: float, max_steps: int, trace: str = "exact"
) -> None:
    """The training and evaluation solvers, with torchdiffeq's names; the evaluation is adaptive."""
    parser.add_argument("--method", default=method, help="training solver: fixed grid (rk4, ...) or adaptive")
    parser.add_argument("--step-size", type=positive_float, default=step_size, help="step of a fixed-grid solver")
    parser.add_argument("--rtol", type=positive_float, default=tol, help="of an adaptive training solver")
    parser.add_argument("--atol", type=positive_float, default=tol, help="of an adaptive training solver")
    parser.add_argument("--max-num-steps", type=positive_int, default=1000, help="step budget of a training solve")
    parser.add_argument("--adjoint", action="store_true", help="adjoint gradients (O(1) memory)")
    parser.add_argument("--eval-method", default="dopri5", help="adaptive solver of every reported number")
    parser.add_argument("--eval-rtol", type=positive_float, default=tol, help="of the evaluation solver")
    parser.add_argument("--eval-atol", type=positive_float, default=tol, help="of the evaluation solver")
    parser.add_argument("--eval-max-num-steps", type=positive_int, default=max_steps, help="its step budget")
    parser.add_argument("--eval-divergence", choices=["exact", "hutchinson"], default=trace, help="its trace")


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``pf.ffjord`` keywords of the training solver flags."""
    if args.method not in METHOD_OPTIONS:
        raise SystemExit(f"error: --method {args.method}: expected one of {', '.join(METHOD_OPTIONS)}")
    fixed = args.method not in ADAPTIVE_STAGES
    return {
        "method": args.method,
        "options": {"step_size": args.step_size} if fixed else None,
        "rtol": args.rtol,
        "atol": args.atol,
        "max_num_steps": args.max_num_steps,
        "adjoint": args.adjoint,
        "compile": {"backend": args.compile} if args.compile else False,
    }


def evaluation_solver(module: torch.nn.Module, args: argparse.Namespace):
    """Switches every CNF in ``module`` to the evaluation solver (a context manager)."""
    return pf.solver_settings(
        module,
        divergence=args.eval_divergence,
        method=args.eval_method,
        rtol=args.eval_rtol,
        atol=args.eval_atol,
        options=None,
        max_num_steps=args.eval_max_num_steps,
    )


def add_objective_args(parser: argparse.ArgumentParser, default: str, choices: tuple[str, ...] = ("ml", "fm", "fm+ml")):
    """``--objective``: maximum likelihood (SVI), flow matching, or flow matching then maximum likelihood."""
    parser.add_argument("--objective", choices=choices, default=default, help="ml, fm or fm then ml")
    parser.add_argument("--fm-fraction", type=fraction, default=0.5, help="share of the steps by fm under fm+ml")
    parser.add_argument("--coupling", choices=pf.flow_matching.COUPLINGS, default="independent", help="fm pairing")
    parser.add_argument("--sigma-min", type=non_negative_float, default=0.0, help="fm path width at the data end")


def flow_matching_now(args: argparse.Namespace, step: int, num_steps: int) -> bool:
    """Whether step ``step`` of ``num_steps`` trains by flow matching under ``--objective``."""
    return args.objective == "fm" or (args.objective == "fm+ml" and step < args.fm_fraction * num_steps)
