"""Training-loop utilities shared by the examples: atomic checkpoints, resume, RNG state, logging, and the
:class:`TrainingGuard` that handles solver faults, non-finite numbers and SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch

import pyro_ffjord as pf


def _number_type(convert: Callable[[str], Any], least: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts and checks a flag's value, so that bad values fail at parse time."""

    def check(text: str) -> Any:
        value = convert(text)
        if not (value > least if strict else value >= least) or value != value or value == math.inf:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    check.__name__ = what.replace(" ", "_")  # argparse names the type in "invalid ... value" messages
    return check


positive_int = _number_type(int, 0, True, "a positive integer")
non_negative_int = _number_type(int, 0, False, "a non-negative integer")
positive_float = _number_type(float, 0.0, True, "a positive number")
non_negative_float = _number_type(float, 0.0, False, "a non-negative number")


def fraction(text: str) -> float:
    """An argparse ``type`` for a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def add_common_args(
    parser: argparse.ArgumentParser, out: str, *, num_steps: int | None = None, num_epochs: int | None = None
) -> None:
    """Adds the flags every example shares; training is measured in iterations (``-n/--num-steps``, with
    ``--checkpoint-every``) or, given ``num_epochs``, in epochs (``-n/--num-epochs``, a checkpoint each epoch)."""
    if num_epochs is not None:
        parser.add_argument("-n", "--num-epochs", type=positive_int, default=num_epochs, help="training epochs")
    else:
        parser.add_argument("-n", "--num-steps", type=positive_int, default=num_steps, help="training iterations")
        parser.add_argument("--checkpoint-every", type=positive_int, default=100, help="iterations between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", default=out, help="folder for checkpoint, log and plot")
    parser.add_argument("--plot", default=None, help="PNG path (default: <out>/<name>.png)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/checkpoint.pt (a larger -n extends the run; a cosine schedule then spans the new -n)",
    )
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: all cores)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="compile the CNF dynamics with torch.compile, at the first solve (backend: inductor, which needs a "
        "C++ compiler on CPU; aot_eager to check tracing)",
    )
    add_fault_args(parser)


def compile_option(args: argparse.Namespace) -> dict[str, str] | bool:
    """The CNFs' ``compile=`` option from ``--compile [BACKEND]``."""
    return {"backend": args.compile} if args.compile else False


def add_train_steps_arg(parser: argparse.ArgumentParser, default: int) -> None:
    """``--train-steps n``: a fixed-grid training solver with steps of T₀/n in units of t, or adaptive for 0."""
    parser.add_argument(
        "--train-steps",
        type=non_negative_int,
        default=default,
        help="fixed-grid steps over the initial T: the step T/n stays as T is learned (0: adaptive)",
    )


def train_grid(args: argparse.Namespace) -> dict[str, float] | None:
    """The torchdiffeq options of ``--train-steps``: a step of T₀/n, or None for an adaptive solver."""
    return {"step_size": args.T / args.train_steps} if args.train_steps else None


OBJECTIVES = ("ml", "fm", "fm+ml")


def add_objective_args(parser: argparse.ArgumentParser, default: str, choices: tuple[str, ...] = OBJECTIVES) -> None:
    """``--objective``: maximum likelihood (SVI), flow matching, or flow matching then maximum likelihood."""
    parser.add_argument(
        "--objective",
        choices=choices,
        default=default,
        help="ml: maximum likelihood through the ODE solve (Pyro SVI); fm: flow matching (no solve in training); "
        "fm+ml: flow matching for the first --fm-fraction of the steps, then maximum likelihood",
    )
    parser.add_argument(
        "--fm-fraction", type=fraction, default=0.5, help="share of the steps trained by flow matching under fm+ml"
    )
    parser.add_argument(
        "--coupling",
        choices=pf.flow_matching.COUPLINGS,
        default="independent",
        help="flow matching: pair data with independent noise, or by minibatch optimal transport",
    )
    parser.add_argument(
        "--sigma-min", type=non_negative_float, default=0.0, help="flow matching: path width at the data end"
    )


def flow_matching_now(args: argparse.Namespace, step: int, num_steps: int) -> bool:
    """Whether step ``step`` of ``num_steps`` trains by flow matching under ``--objective``."""
    return args.objective == "fm" or (args.objective == "fm+ml" and step < args.fm_fraction * num_steps)


def flow_matching_step(cnf: pf.FFJORD, x: torch.Tensor, optimizer: pyro.optim.PyroOptim, args) -> float:
    """One optimizer step on :func:`pyro_ffjord.flow_matching_loss` (parameters registered with ``pyro.module``)."""
    loss = pf.flow_matching_loss(cnf, x, sigma_min=args.sigma_min, coupling=args.coupling)
    params = [p for p in cnf.parameters() if p.requires_grad]
    loss.backward()
    optimizer(params)
    for p in params:
        p.grad = None
    return loss.item()


def parse_ints(text: str) -> tuple[int, ...]:
    """``"64,64,64"`` -> ``(64, 64, 64)``, for flags of layer widths."""
    return tuple(int(w) for w in text.split(","))


def add_evaluation_args(parser: argparse.ArgumentParser, tol: float, max_steps: int, divergence: str = "exact") -> None:
    """Flags of the solver behind every reported number (adaptive; exact trace unless ``divergence`` says
    otherwise, e.g. for images, where D vector-Jacobian products per evaluation are too many)."""
    parser.add_argument("--eval-method", default="dopri5", help="adaptive torchdiffeq solver for evaluation")
    parser.add_argument(
        "--eval-rtol", type=positive_float, default=tol, help="relative tolerance of the evaluation solves"
    )
    parser.add_argument(
        "--eval-atol", type=positive_float, default=tol, help="absolute tolerance of the evaluation solves"
    )
    parser.add_argument(
        "--eval-max-steps", type=positive_int, default=max_steps, help="step budget of the evaluation solves"
    )
    parser.add_argument(
        "--eval-divergence",
        choices=["exact", "hutchinson"],
        default=divergence,
        help="trace of the evaluation solves (Hutchinson: an unbiased estimate of the log-likelihood)",
    )


def evaluation_solver(module: torch.nn.Module, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Switches every CNF in ``module`` to the evaluation solver of :func:`add_evaluation_args`."""
    return pf.solver_settings(
        module,
        divergence=args.eval_divergence,
        method=args.eval_method,
        rtol=args.eval_rtol,
        atol=args.eval_atol,
        options=None,
        max_num_steps=args.eval_max_steps,
    )


def train_batches(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Row indices of the batch of ``step``: epoch-wise seeded shuffles, so a resumed run sees the same batches."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but absent; sets CPU threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


class Processes(NamedTuple):
    """Where this process stands in a (possibly single-process) data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes checkpoints, logs, plots and metrics."""
        return self.rank == 0


def init_distributed(device: torch.device, distributed: bool) -> Processes:
    """Joins the process group that ``torchrun`` describes in the environment when ``distributed``.

    The backend is NCCL on CUDA (each process takes ``cuda:$LOCAL_RANK``) and Gloo on CPU; the rendezvous
    (``MASTER_ADDR``/``MASTER_PORT`` or torchrun's ``--rdzv-endpoint``) comes from torchrun, so the same
    command scales from one machine to several.
    """
    if not distributed:
        return Processes(0, 1, device)
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise SystemExit("--distributed: start the script with torchrun (e.g. torchrun --nproc_per_node=2 ...)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Calls ``write`` on a temporary binary file, syncs it to disk, then renames it over ``path``.

    A crash at any moment leaves either the old or the new file, never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, partial(torch.save, obj))


def rng_state() -> dict[str, Any]:
    """Every RNG an example draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured (a checkpoint loaded with ``map_location="cuda"`` included:
    RNG states must be CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated by hand, another file, ...: what torch.load raises varies
        raise SystemExit(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    current = dict(pyro.get_param_store().named_parameters())
    for name, saved in state["param_store"]["params"].items():
        if name in current and saved.shape != current[name].shape:
            raise SystemExit(
                f"--resume: {path} holds another model: {name} has shape {tuple(saved.shape)} there and "
                f"{tuple(current[name].shape)} here; resume with the flags it was trained with"
            )
    if "state" not in state and "losses" in state:  # the toy and images loops' layout before run_steps
        state["state"] = loop_state(state.pop("losses"))
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

    def truncate(self, step: int) -> None:
        """Drops the rows of steps ``>= step`` (after a rollback to the state before ``step``)."""
        with open(self.path, newline="") as f:
            rows = [row for row in list(csv.reader(f))[1:] if row and int(row[0]) < step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([self.fields, *rows])

    def write(self, **row: Any) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[name] for name in self.fields])


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Writes ``obj`` as JSON atomically."""
    text = json.dumps(obj, indent=2).encode()
    _atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------------
# Fault handling: solver failures, non-finite numbers and SIGINT/SIGTERM during training.

FAULT_POLICIES = ("stop", "reduce-lr", "restart-from-checkpoint")
# Stride between the data/noise seeds of successive restarts (``--on-nan restart-from-checkpoint``).
SEED_STRIDE = 7919


def add_fault_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--on-nan``, ``--max-retries`` and ``--max-num-steps``."""
    parser.add_argument(
        "--on-nan",
        choices=FAULT_POLICIES,
        default="stop",
        help="what to do when a training solve fails or a loss/parameter is non-finite: stop with a checkpoint "
        "of the last good state, restore it and halve the learning rate, or reload the last checkpoint and "
        "continue with other data/noise seeds",
    )
    parser.add_argument("--max-retries", type=non_negative_int, default=3, help="recoveries allowed before stopping")
    parser.add_argument(
        "--max-num-steps", type=positive_int, default=1000, help="solver steps allowed per training solve (step budget)"
    )


class NonFiniteError(ArithmeticError):
    """A non-finite training loss, or parameters made non-finite by an update."""

    def __init__(self, message: str, after_update: bool) -> None:
        super().__init__(message)
        self.after_update = after_update


class Rollback(NamedTuple):
    """What :meth:`TrainingGuard.run` returns after a recovery: the step to continue from and the
    restored values of the ``extra`` state given to it."""

    step: int
    extra: dict[str, Any]


def solver_fault(error: BaseException) -> pf.ODESolveError | NonFiniteError | None:
    """The :class:`~pyro_ffjord.pf.ODESolveError` or :class:`NonFiniteError` behind ``error``, if any.

    Pyro re-raises an error inside a distribution's ``log_prob`` as a plain ``ValueError`` ("Error while
    computing log_prob at site ...") chained to the original, so the cause chain is searched.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (pf.ODESolveError, NonFiniteError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "optimizer") and hasattr(obj, "base_lrs")


def _optimizer_states(optimizer: pyro.optim.PyroOptim) -> dict[str, Any]:
    """A deep copy of the optimizer's per-parameter states, those not yet consumed after a resume included."""
    states = copy.deepcopy(getattr(optimizer, "_state_waiting_to_be_consumed", {}))
    states.update(copy.deepcopy(optimizer.get_state()))
    return states


def _restore_optimizer(optimizer: pyro.optim.PyroOptim, states: dict[str, Any]) -> None:
    """Loads ``states`` (from :func:`_optimizer_states` or a checkpoint) into the optimizer in place.

    Parameters without a saved state lose their optimizer, which is created afresh at the next step.
    """
    store = pyro.get_param_store()
    pending = dict(states)
    for param in list(optimizer.optim_objs):
        obj, state = optimizer.optim_objs[param], pending.pop(store.param_name(param), None)
        if state is None:
            del optimizer.optim_objs[param]
            optimizer.grad_clip.pop(param, None)
        elif _is_scheduler(obj):
            obj.load_state_dict(copy.deepcopy(state["scheduler"]))
            obj.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        else:
            obj.load_state_dict(copy.deepcopy(state))
    optimizer._state_waiting_to_be_consumed = copy.deepcopy(pending)


def _scale_constructor_lr(optimizer: pyro.optim.PyroOptim, factor: float) -> None:
    if isinstance(optimizer.pt_optim_args, dict) and "lr" in optimizer.pt_optim_args:
        optimizer.pt_optim_args = {**optimizer.pt_optim_args, "lr": optimizer.pt_optim_args["lr"] * factor}


def scale_learning_rate(optimizer: pyro.optim.PyroOptim, factor: float) -> None:
    """Multiplies every learning rate of a Pyro optimizer or LR scheduler by ``factor``: the live torch
    optimizers, the schedulers' base rates, the states waiting to be loaded and the constructor's rate."""

    def scale_state(state: dict[str, Any]) -> None:
        if "scheduler" in state and "optimizer" in state:
            scheduler = state["scheduler"]
            scheduler["base_lrs"] = [lr * factor for lr in scheduler.get("base_lrs", [])]
            scale_state(state["optimizer"])
        for group in state.get("param_groups", []):
            group["lr"] *= factor

    _scale_constructor_lr(optimizer, factor)
    for obj in optimizer.optim_objs.values():
        if _is_scheduler(obj):
            obj.base_lrs = [lr * factor for lr in obj.base_lrs]
            obj = obj.optimizer
        for group in obj.param_groups:
            group["lr"] *= factor
    for state in getattr(optimizer, "_state_waiting_to_be_consumed", {}).values():
        scale_state(state)


def loop_state(losses: list[float] | None = None) -> dict[str, Any]:
    """The state :meth:`TrainingGuard.run_steps` checkpoints: the losses, the stop flag and the training time."""
    return {"losses": [] if losses is None else losses, "stopped": False, "seconds": 0.0}


def early_stopping_state(module: torch.nn.Module) -> dict[str, Any]:
    """:func:`loop_state` with validations and the early-stopping record."""
    return {
        **loop_state(),
        "val": [],
        "best_val": math.inf,
        "best_at": 0,
        "best_module": copy.deepcopy(module.state_dict()),
        "bad_evals": 0,
    }


def record_validation(
    state: dict[str, Any], at: int, value: float, module: torch.nn.Module, patience: int, count: bool = True
) -> None:
    """Early stopping: records validation loss ``value`` at step/epoch ``at`` in ``state``.

    Keeps a copy of the module's best state; after ``patience`` validations without improvement (not
    counted when ``count`` is False, e.g. during a warm-up) it sets ``state["stopped"]``.

    Raises:
        NonFiniteError: ``value`` is NaN or infinite.
    """
    if not math.isfinite(value):
        raise NonFiniteError(f"the validation loss is {value}", after_update=False)
    state["last_val"] = value
    state["val"].append((at, value))
    if value < state["best_val"]:
        state.update(best_val=value, best_at=at, best_module=copy.deepcopy(module.state_dict()), bad_evals=0)
    elif count:
        state["bad_evals"] += 1
    state["stopped"] = state["bad_evals"] >= patience


def resuming(args: argparse.Namespace, checkpoint: Path, later_model: bool) -> bool:
    """Whether a model resumes from ``checkpoint``: with ``--resume``, except a later model of a run of
    several that had not started when the run stopped (it has no checkpoint yet, so it starts fresh)."""
    return args.resume and not (later_model and not checkpoint.is_file())


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run with ``--resume`` added."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", argv[0], *(a for a in argv[1:] if a != "--resume"), "--resume"])


class TrainingGuard:
    """Runs the steps of a training loop so that nothing is lost and no NaN goes unnoticed.

    * Before each step it keeps an in-memory snapshot of the last good state: the module's parameters
      and buffers, the optimizer's state, the RNG states and the example's own ``extra`` state.
    * A step that raises :class:`pyro_ffjord.pf.ODESolveError` (step budget exceeded, non-finite
      dynamics), returns a non-finite loss or leaves non-finite parameters is a fault, answered by
      ``--on-nan``:

      - ``stop`` (default): save the state from before the failing step as the checkpoint (never a
        NaN state) and exit with a one-paragraph message (exit code 1);
      - ``reduce-lr``: restore the last good parameters and optimizer state and halve the learning
        rate. When the failing step's own update made the parameters non-finite, that is the state
        before the failing step; when the failing step's solve or loss failed, its parameters came
        from the previous step's update, so the state before the previous step is restored and that
        step is repeated;
      - ``restart-from-checkpoint``: reload the last checkpoint and continue from it with other data
        and noise seeds (:attr:`data_seed` changes).

      At most ``--max-retries`` recoveries per run; the next fault stops as above.
    * The first SIGINT/SIGTERM lets the current step finish; :meth:`exit_if_interrupted` then writes
      a checkpoint atomically and exits with a message saying how to resume. A second signal acts at
      once (KeyboardInterrupt for SIGINT, the default action for SIGTERM).

    Use it as a context manager (the signal handlers are installed on entry and restored on exit)::

        with TrainingGuard(args, checkpoint, optimizer, flow, log=log, bar=bar, resumed=saved) as guard:
            state = guard.run_steps(state, start, args.num_steps, train_step, report, checkpoint_due)
    """

    def __init__(
        self,
        args: argparse.Namespace,
        checkpoint: Path,
        optimizer: pyro.optim.PyroOptim,
        module: torch.nn.Module,
        *,
        log: CSVLog | None = None,
        bar: Any = None,
        resumed: dict[str, Any] | None = None,
        writer: bool = True,
    ) -> None:
        if args.max_retries < 0:
            raise SystemExit(f"--max-retries must be >= 0, got {args.max_retries}")
        self.args = args
        self.path = checkpoint
        self.optimizer = optimizer
        self.module = module
        self.log = log
        self.bar = bar
        self.writer = writer
        self.policy = args.on_nan
        self.max_retries = args.max_retries
        self.retries = 0
        self.seed_offset = 0
        self.lr_scale = 1.0
        self.signum: int | None = None
        self._snapshots: deque[dict[str, Any]] = deque(maxlen=2)
        self._previous_handlers: dict[int, Any] = {}
        self._need_initial_checkpoint = resumed is None and self.policy == "restart-from-checkpoint"
        if resumed is not None and "fault" in resumed:
            fault = resumed["fault"]
            # a resumed run keeps its seed offset and learning-rate scale, and gets --max-retries afresh
            self.seed_offset, self.lr_scale = fault["seed_offset"], fault["lr_scale"]
            _scale_constructor_lr(optimizer, self.lr_scale)  # for optimizers created after the resume

    # -- context manager: signal handlers -------------------------------------------------------
    def __enter__(self) -> TrainingGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: act now
            signal.signal(signum, self._previous_handlers.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    # -- state --------------------------------------------------------------------------------------
    @property
    def data_seed(self) -> int:
        """The seed of the training batches: ``--seed``, shifted after each restart from a checkpoint."""
        return self.args.seed + SEED_STRIDE * self.seed_offset

    def state(self) -> dict[str, Any]:
        """The guard's counters, saved in every checkpoint and restored by ``resumed=``."""
        return {"retries": self.retries, "seed_offset": self.seed_offset, "lr_scale": self.lr_scale}

    def save(self, step: int, **extra: Any) -> None:
        """Atomically checkpoints the current state (see :func:`save_checkpoint`) with the module's state dict.

        Only the writer (rank 0 of a data-parallel run, whose replicas hold the same state) writes.
        """
        if not self.writer:
            return
        save_checkpoint(
            self.path,
            step,
            self.optimizer,
            module=self.module.state_dict(),
            fault=self.state(),
            args=vars(self.args),
            **extra,
        )

    def _snapshot(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "module": copy.deepcopy(self.module.state_dict()),
            "optimizer": _optimizer_states(self.optimizer),
            "rng": rng_state(),
            "extra": copy.deepcopy(extra),
            "lr_scale": self.lr_scale,
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        for p in self.module.parameters():
            p.grad = None
        for p in self.optimizer.optim_objs:
            p.grad = None
        self.module.load_state_dict(snapshot["module"])
        _restore_optimizer(self.optimizer, snapshot["optimizer"])
        set_rng_state(snapshot["rng"])
        if self.lr_scale != snapshot["lr_scale"]:
            scale_learning_rate(self.optimizer, self.lr_scale / snapshot["lr_scale"])
        if self.log is not None:
            self.log.truncate(snapshot["step"])
        if self.bar is not None:
            self.bar.n = snapshot["step"]
            self.bar.refresh()

    def _checkpoint_snapshot(self, keys: list[str]) -> dict[str, Any]:
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        return {
            "step": saved["step"],
            "module": saved["module"],
            "optimizer": saved["optimizer"],
            "rng": saved["rng"],
            "extra": {key: saved[key] for key in keys},
            "lr_scale": saved["fault"]["lr_scale"],
        }

    # -- the step -----------------------------------------------------------------------------------
    def run(self, step: int, fn: Callable[[], float], **extra: Any) -> float | Rollback:
        """Runs ``fn`` (one training step, returning its loss) as step ``step``.

        ``extra`` is the example's state that the step changes (lists of losses, early-stopping
        state...); it is snapshotted with the parameters and handed back restored in a
        :class:`Rollback`. Returns the loss, or a :class:`Rollback` after a recovered fault; raises
        ``SystemExit`` when the fault is not recovered.
        """
        if self._need_initial_checkpoint:  # a restart needs a checkpoint of this run, even at step 0
            self.save(step, **extra)
            self._need_initial_checkpoint = False
        self._snapshots.append(self._snapshot(step, extra))
        try:
            loss = fn()
            if not math.isfinite(loss):
                raise NonFiniteError(f"the training loss is {loss}", after_update=False)
            bad = [name for name, p in self.module.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteError(f"the update made parameters {bad[:3]} non-finite", after_update=True)
        except Exception as error:
            fault = solver_fault(error)
            if fault is None:
                raise
            return self._recover(step, fault, list(extra))
        return loss

    def run_steps(
        self,
        state: dict[str, Any],
        start: int,
        num_steps: int,
        train_step: Callable[[int, dict[str, Any]], float],
        report: Callable[[int, float, dict[str, Any]], None],
        checkpoint_due: Callable[[int], bool],
    ) -> dict[str, Any]:
        """The training loop of an example.

        ``state`` is what the loop checkpoints: at least ``"stopped"`` (set it to stop early, see
        :func:`early_stopping_state` and :func:`record_validation`) and ``"seconds"`` (training time,
        accumulated over resumes), plus whatever ``train_step`` keeps, such as the losses.

        Runs ``train_step(step, state)`` through :meth:`run` for steps ``start`` to ``num_steps`` or until
        ``state["stopped"]``, rolling back on recovered faults; after each step calls ``report(step, loss,
        state)`` (progress bar, log), checkpoints when ``checkpoint_due(step + 1)``, at the end and on an
        early stop, and exits cleanly on a pending signal. Returns the final state.
        """
        started = time.time() - state["seconds"]
        step = start
        while step < num_steps and not state["stopped"]:
            outcome = self.run(step, partial(train_step, step, state), state=state)
            if isinstance(outcome, Rollback):  # a recovered solver fault or NaN
                step, state = outcome.step, outcome.extra["state"]
                continue
            state["seconds"] = time.time() - started
            report(step, outcome, state)
            state.pop("last_val", None)
            step += 1
            if checkpoint_due(step) or step == num_steps or state["stopped"]:
                self.save(step, state=state)
            self.exit_if_interrupted(step, state=state)
        return state

    def _recover(self, step: int, error: Exception, keys: list[str]) -> Rollback:
        before = self._snapshots[-1]  # the state before the failing step: finite, as every snapshot
        what = f"step {step} failed: {type(error).__name__}: {error}"
        if self.policy == "stop" or self.retries >= self.max_retries:
            self._stop(what, before)
        self.retries += 1
        if self.policy == "reduce-lr":
            after_update = isinstance(error, NonFiniteError) and error.after_update
            target = before if after_update or len(self._snapshots) == 1 else self._snapshots[0]
            self.lr_scale /= 2
            action = f"restored the state before step {target['step']} and halved the learning rate"
        else:
            target = self._checkpoint_snapshot(keys)
            self.seed_offset += 1
            action = f"reloaded the checkpoint of step {target['step']} and changed the data/noise seed offset"
        self._snapshots.clear()
        self._restore(target)
        if self.policy == "restart-from-checkpoint":
            pyro.set_rng_seed(self.data_seed + target["step"])
        self._snapshots.append(target)
        print(
            f"warning: {what}; {action} (retry {self.retries}/{self.max_retries}, learning rate x{self.lr_scale:g})",
            file=sys.stderr,
            flush=True,
        )
        return Rollback(target["step"], copy.deepcopy(target["extra"]))

    def _stop(self, what: str, before: dict[str, Any]) -> None:
        self._restore(before)
        self.save(before["step"], **before["extra"])
        if self.bar is not None:
            self.bar.close()
        retried = f" after {self.retries} recoveries" if self.retries else ""
        raise SystemExit(
            f"error: training stopped{retried}: {what}. The last good state (before step {before['step']}) is "
            f"saved in {self.path}. Try a smaller --lr, a larger --max-num-steps or looser tolerances, or let "
            f"training recover with --on-nan reduce-lr or --on-nan restart-from-checkpoint (--max-retries "
            f"{self.max_retries}); continue with: {resume_command()}"
        )

    def exit_if_interrupted(self, step: int, **extra: Any) -> None:
        """After a step: on a pending SIGINT/SIGTERM, checkpoint ``step`` atomically and exit (128 + signal)."""
        if self.signum is None:
            return
        self.save(step, **extra)
        if self.bar is not None:
            self.bar.close()
        print(
            f"interrupted by {signal.Signals(self.signum).name} after step {step}: checkpoint saved in {self.path}. "
            f"Resume with: {resume_command()}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + self.signum)
