"""What the examples share: one flag vocabulary (torchdiffeq's names for the solvers), torchrun's processes, and
a training loop that loses nothing: atomic checkpoints read with ``weights_only=True``, ``--resume``, and a clean
stop with a checkpoint on a failed solve, a non-finite loss or gradient, or SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm import tqdm

import pyro_ffjord as pf
from pyro_ffjord.dynamics import ContinuousFlow
from pyro_ffjord.settings import ADAPTIVE_STAGES, METHOD_OPTIONS


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (unless its help already tells it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type`` whose error names the expected value (argparse prints the flag's name)."""

    def parse(text: str) -> Any:
        with contextlib.suppress(ValueError, RuntimeError):  # torch.device raises RuntimeError
            if ok(value := convert(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a non-negative number")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
int_list = _checked(lambda s: tuple(map(int, s.split(","))), lambda v: min(v) > 0, "positive integers such as 64,64")
torch_device = _checked(
    torch.device, lambda d: d.type != "cuda" or torch.cuda.is_available(), "cpu, or cuda[:N] on a machine with CUDA"
)


def add_common_args(parser: argparse.ArgumentParser, out: str, num_steps: int | str, unit: str = "steps") -> None:
    """Every run's flags: length (``num_steps``: the default, or the text that tells it), seed, device, outputs,
    resume, threads, compile, data parallelism."""
    default, tells = (num_steps, "") if isinstance(num_steps, int) else (None, f" (default: {num_steps})")
    parser.add_argument("-n", f"--num-{unit}", type=positive_int, default=default, help=f"training {unit}{tells}")
    if unit == "steps":
        parser.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", default=out, help="folder for checkpoint, log, metrics and plot")
    parser.add_argument("--plot", default=None, help="PNG path (default: in --out)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (a larger -n extends)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--distributed", action="store_true", help="data parallel over torchrun's processes")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND", help="torch.compile the dynamics")


def add_solver_args(parser, method: str, step_size: float, tol: float, max_steps: int, trace: str = "exact") -> None:
    """The training solver and the (adaptive) evaluation solver, with torchdiffeq's names."""
    parser.add_argument("--method", choices=list(METHOD_OPTIONS), default=method, help="training solver")
    parser.add_argument("--step-size", type=positive_float, default=step_size, help="step of a fixed-grid solver")
    parser.add_argument("--rtol", type=positive_float, default=tol, help="of an adaptive training solver")
    parser.add_argument("--atol", type=positive_float, default=tol, help="of an adaptive training solver")
    parser.add_argument("--max-num-steps", type=positive_int, default=1000, help="step budget of a training solve")
    parser.add_argument("--adjoint", action="store_true", help="adjoint gradients (O(1) memory)")
    parser.add_argument("--eval-method", choices=list(ADAPTIVE_STAGES), default="dopri5", help="evaluation solver")
    parser.add_argument("--eval-rtol", type=positive_float, default=tol, help="of the evaluation solver")
    parser.add_argument("--eval-atol", type=positive_float, default=tol, help="of the evaluation solver")
    parser.add_argument("--eval-max-num-steps", type=positive_int, default=max_steps, help="its step budget")
    parser.add_argument("--eval-divergence", choices=["exact", "hutchinson"], default=trace, help="its trace")


def add_objective_args(parser: argparse.ArgumentParser, default: str, choices=("ml", "fm", "fm+ml")) -> None:
    """``--objective``: maximum likelihood (SVI), flow matching, or flow matching then maximum likelihood."""
    parser.add_argument("--objective", choices=choices, default=default, help="ml, fm or fm then ml")
    parser.add_argument("--fm-fraction", type=fraction, default=0.5, help="share of the steps by fm under fm+ml")
    parser.add_argument("--coupling", choices=pf.flow_matching.COUPLINGS, default="independent", help="fm pairing")
    parser.add_argument("--sigma-min", type=non_negative_float, default=0.0, help="fm path width at the data end")
    parser.add_argument("--fm-time", choices=pf.flow_matching.TIMES, default="uniform", help="fm time law")


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``pf.ffjord`` keywords of the integration-time and training-solver flags (and of the RNODE weights
    ``--kinetic``/``--jacobian``, where the example has them)."""
    return {
        "T": args.T,
        "train_T": args.train_T,
        "method": args.method,
        "options": None if args.method in ADAPTIVE_STAGES else {"step_size": args.step_size},
        "rtol": args.rtol,
        "atol": args.atol,
        "max_num_steps": args.max_num_steps,
        "adjoint": args.adjoint,
        "compile": {"backend": args.compile} if args.compile else False,
        "regularization": {name: w for name in ("kinetic", "jacobian") if (w := getattr(args, name, 0.0))},
    }


def evaluation_solver(module: torch.nn.Module, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Switches every CNF in ``module`` to the evaluation solver for the ``with`` block (a baseline has none)."""
    if not any(isinstance(m, ContinuousFlow) for m in module.modules()):  # what pf.solver_settings switches
        return contextlib.nullcontext()
    options = {"method": args.eval_method, "rtol": args.eval_rtol, "atol": args.eval_atol, "options": None}
    return pf.solver_settings(module, **options, divergence=args.eval_divergence, max_num_steps=args.eval_max_num_steps)


def flow_matching_now(args: argparse.Namespace, step: int, num_steps: int) -> bool:
    """Whether step ``step`` of ``num_steps`` trains by flow matching under ``--objective``."""
    return args.objective == "fm" or (args.objective == "fm+ml" and step < args.fm_fraction * num_steps)


Processes = namedtuple("Processes", ["rank", "world_size", "device"])  # of a data-parallel run; rank 0 writes


@contextlib.contextmanager
def processes(args: argparse.Namespace) -> Iterator[Processes]:
    """CPU threads and, with ``--distributed``, torchrun's process group (NCCL on ``cuda:$LOCAL_RANK``, or Gloo)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    procs = Processes(0, 1, args.device)
    if args.distributed:
        if "LOCAL_RANK" not in os.environ:
            raise SystemExit("error: --distributed: start the script with torchrun (torchrun --nproc_per_node=2 ...)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device.type == "cuda" else args.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        procs = Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)
    try:
        yield procs
    except pf.ODESolveError as e:  # a training solve's failure stops in Trainer.run: this is an evaluation's
        raise SystemExit(f"error: an evaluation solve failed ({e}); try larger --eval-rtol/--eval-atol") from None
    finally:
        if args.distributed:
            torch.distributed.destroy_process_group()


def batch_seed(seed: int, step: int, procs: Processes) -> int:
    """One seed per (run, step, process): each process draws its own batch and noise at each step."""
    return (seed * 1_000_003 + step) * procs.world_size + procs.rank


def train_batch(rows: torch.Tensor, batch_size: int, seed: int, step: int, procs: Processes) -> torch.Tensor:
    """This process's batch at ``step`` from seeded shuffles per epoch (a resumed run sees the same batches)."""
    epoch, i = divmod(step * procs.world_size + procs.rank, max(len(rows) // batch_size, 1))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return rows[order[i * batch_size : (i + 1) * batch_size].to(rows.device)]


def in_sync(module: torch.nn.Module) -> bool:
    """Whether every process holds exactly the same parameters (True without ``torchrun``)."""
    if not torch.distributed.is_initialized():
        return True
    low = torch.cat([p.detach().flatten() for p in module.parameters()])
    high = low.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    return torch.equal(low, high)


def update(loss: torch.Tensor | float, params: list[torch.Tensor], optimizer: pyro.optim.PyroOptim) -> float:
    """Applies ``optimizer`` to the gradients of ``params`` (averaged with the loss over torchrun's processes),
    clears them and returns the loss. A non-finite loss or gradient changes nothing: ``FloatingPointError``."""
    if torch.distributed.is_initialized():  # params come in the same order on every process
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([torch.as_tensor(loss).to(grads[0]).reshape(1), *(g.flatten() for g in grads)])
        torch.distributed.all_reduce(flat)
        loss, *grads = (flat / torch.distributed.get_world_size()).split([1, *(p.numel() for p in params)])
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
    loss, norm = float(loss), float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    try:
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"the loss is {loss} and the gradient norm {norm}")
        optimizer(params)
    finally:
        for p in params:
            p.grad = None
    return loss


def svi_step(elbo: pyro.infer.ELBO, optimizer: pyro.optim.PyroOptim, model, guide, *args, **kwargs) -> float:
    """``SVI.step`` that applies no non-finite update (see :func:`update`)."""
    with pyro.poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    return update(loss, [params[name] for name in sorted(params)], optimizer)


def flow_matching_loss(cnf: pf.FFJORD, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """:func:`pyro_ffjord.flow_matching_loss` of ``cnf`` on ``x`` with the objective flags."""
    return pf.flow_matching_loss(cnf, x, sigma_min=args.sigma_min, coupling=args.coupling, time=args.fm_time)


def flow_matching_step(cnf: pf.FFJORD, x: torch.Tensor, optimizer: pyro.optim.PyroOptim, args) -> float:
    """One :func:`update` of ``cnf`` on :func:`flow_matching_loss`."""
    loss = flow_matching_loss(cnf, x, args)
    loss.backward()
    return update(loss.detach(), [p for p in cnf.parameters() if p.requires_grad], optimizer)


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` (with the user's permissions), syncs it and renames it
    over ``path``: a crash leaves the old or the new file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(obj, indent=2).encode())


def save_figure(fig: Any, path: Path) -> None:
    """Lays out a matplotlib ``Figure`` and writes it to ``path``, creating its folder."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def record_validation(state: dict, at: int, value: float, module: torch.nn.Module, patience: int, count=True) -> None:
    """Early stopping: records validation loss ``value`` at ``at`` in ``state["val"]``, keeps the best parameters in
    ``state["best_module"]`` and stops after ``patience`` counted validations without improvement."""
    if not math.isfinite(value):
        raise FloatingPointError(f"the validation loss is {value}")
    state.setdefault("val", []).append((at, value))
    if value < state.get("best_val", math.inf):
        state.update(best_val=value, best_at=at, best_module=copy.deepcopy(module.state_dict()), bad_evals=0)
    elif count:
        state["bad_evals"] += 1
    state["stopped"] = state["bad_evals"] >= patience


def _fault(error: BaseException | None) -> BaseException | None:
    """The solver failure or NaN behind ``error`` (Pyro re-raises errors in ``log_prob`` as ``ValueError``)."""
    while error is not None and not isinstance(error, (pf.ODESolveError, FloatingPointError)):
        error = error.__cause__ or error.__context__
    return error


def _resume_command() -> str:
    return shlex.join(["python", sys.argv[0], *(a for a in sys.argv[1:] if a != "--resume"), "--resume"])


class Trainer:
    """Runs training steps so that nothing is lost.

    The checkpoint ``<out>/checkpoint.pt``, written atomically, holds the module, the optimizer's state, torch's
    RNG states and ``state`` (the log rows, training seconds, early stopping...): ``--resume`` continues bit for bit.
    ``log.csv`` beside it has the rows. A failed solve or a non-finite loss or gradient changes nothing
    (:func:`update`) and stops the run with a checkpoint; the first SIGINT/SIGTERM ends the current step,
    checkpoints and exits, a second one acts at once. Only rank 0 writes.
    """

    def __init__(self, args, module: torch.nn.Module, optimizer: pyro.optim.PyroOptim, procs: Processes) -> None:
        """Starts at step 0, or with ``--resume`` from the checkpoint."""
        self.path, self.module, self.optimizer = Path(args.out) / "checkpoint.pt", module, optimizer
        self.writer, self.progress, self.signum = procs.rank == 0, not args.no_progress, None
        saved = self._load() if args.resume else {"step": 0, "optimizer": {}, "state": {}}
        self.start, self.state = saved["step"], {"log": [], "seconds": 0.0, "stopped": False, **saved["state"]}
        self.optimizer_state = saved["optimizer"]  # PyroOptim.get_state shows set_state's only once they step

    def _load(self) -> dict[str, Any]:
        """The checkpoint, read with ``weights_only=True`` (tensors and plain data: it cannot run code)."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated, holding objects...: what torch.load raises varies
            why = f"is not a readable checkpoint ({type(e).__name__}: {e})"
            if pickled := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
                why = f"holds a pickled Python object ({pickled[1]}): only tensors and plain data are loaded"
            raise SystemExit(f"error: --resume: {self.path} {why}") from None
        try:
            self.module.load_state_dict(saved["module"])
        except RuntimeError as e:  # torch names each parameter and its two shapes
            raise SystemExit(f"error: --resume: {self.path} holds another model; resume with its flags. {e}") from None
        self.optimizer.set_state(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"].get("cuda", []))
        return saved

    def save(self, step: int) -> None:
        """Writes the checkpoint after ``step`` steps, then ``log.csv`` with its rows (on rank 0)."""
        if not self.writer:
            return
        self.optimizer_state |= self.optimizer.get_state()
        checkpoint = {
            "step": step,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer_state,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
            "state": self.state,
        }
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(self.path, buffer.getvalue())
        if rows := self.state["log"]:
            lines = [",".join(rows[0]), *(",".join(map(str, row.values())) for row in rows)]
            atomic_write(self.path.with_name("log.csv"), "\n".join(lines).encode() + b"\n")

    def _on_signal(self, signum: int, frame: Any) -> None:
        signal.signal(signum, self.handlers[signum])  # a second signal acts at once
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr, flush=True)

    def run(self, train_step: Callable[[int, dict], dict], num_steps: int, checkpoint_every: int) -> dict[str, Any]:
        """Runs ``row = train_step(step, state)`` up to ``num_steps`` or ``state["stopped"]``, logging each ``row``
        (its ``"loss"`` first) with the step and the training seconds; checkpoints every ``checkpoint_every``."""
        state, step = self.state, self.start
        bar = tqdm(initial=step, total=num_steps, disable=not (self.progress and self.writer))
        self.handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            started = time.time() - state["seconds"]
            while step < num_steps and not state["stopped"]:
                try:
                    row = train_step(step, state)
                except Exception as error:
                    if (fault := _fault(error)) is None:
                        raise
                    self.save(step)
                    raise SystemExit(
                        f"error: training stopped at step {step}: {type(fault).__name__}: {fault}. The last finite "
                        f"state is saved in {self.path}; try a smaller --lr, a larger --max-num-steps or looser "
                        f"tolerances, and continue with: {_resume_command()}"
                    ) from None
                state["seconds"] = time.time() - started
                state["log"].append({"step": step, **row, "seconds": state["seconds"]})
                bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
                bar.update()
                step += 1
                if step % checkpoint_every == 0 or step == num_steps or state["stopped"] or self.signum:
                    self.save(step)
                if self.signum is not None:
                    print(f"stopped after step {step - 1}; resume with: {_resume_command()}", file=sys.stderr)
                    raise SystemExit(128 + self.signum)
        finally:
            bar.close()
            for s, handler in self.handlers.items():
                signal.signal(s, handler)
        return state
