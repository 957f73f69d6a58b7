"""The examples' training loop: updates that skip non-finite gradients and average over torchrun's processes,
atomic checkpoints read with ``weights_only=True``, ``--resume``, and a clean stop (with a checkpoint) on a
failed solve, a NaN or SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import pickle
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch

import pyro_ffjord as pf


class NonFiniteError(ArithmeticError):
    """A non-finite loss or gradient: the update was not applied."""


def update(loss: torch.Tensor | float, params: list[torch.Tensor], optimizer: pyro.optim.PyroOptim) -> float:
    """Applies ``optimizer`` to the gradients of ``params`` and clears them; returns the loss.

    Under ``torchrun`` the loss and gradients are first averaged over the processes (one ``all_reduce``), so
    that every replica takes the same step: data parallelism for any Pyro model and guide. A non-finite loss
    or gradient changes nothing and raises :class:`NonFiniteError`.
    """
    grads = [p.grad for p in params]
    if torch.distributed.is_initialized():  # params come in the same order on every process
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        flat = torch.cat([torch.as_tensor(loss, dtype=grads[0].dtype, device=grads[0].device).reshape(1)]
                         + [g.flatten() for g in grads])  # fmt: skip
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        loss, grads = flat[0], [g.view_as(p) for g, p in zip(flat[1:].split([p.numel() for p in params]), params)]
    norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
    loss, norm = float(loss), float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer(params)
    for p in params:
        p.grad = None
    if not finite:
        raise NonFiniteError(f"the loss is {loss} and the gradient norm {norm}")
    return loss


def svi_step(elbo: pyro.infer.ELBO, optimizer: pyro.optim.PyroOptim, model, guide, *args, **kwargs) -> float:
    """``SVI.step`` that applies no non-finite update (see :func:`update`)."""
    with pyro.poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    return update(loss, [params[name] for name in sorted(params)], optimizer)


def flow_matching_step(cnf: pf.FFJORD, x: torch.Tensor, optimizer: pyro.optim.PyroOptim, args) -> float:
    """One optimizer step on :func:`pyro_ffjord.flow_matching_loss`."""
    loss = pf.flow_matching_loss(cnf, x, sigma_min=args.sigma_min, coupling=args.coupling)
    loss.backward()
    return update(loss.detach(), [p for p in cnf.parameters() if p.requires_grad], optimizer)


class Processes(NamedTuple):
    """Where this process stands in a (possibly single-process) data-parallel run; rank 0 writes the files."""

    rank: int
    world_size: int
    device: torch.device


def batch_seed(seed: int, step: int, procs: Processes) -> int:
    """One seed per (run, step, process): each process draws its own batch and noise at each step."""
    return (seed * 1_000_003 + step) * procs.world_size + procs.rank


def train_batches(n: int, batch_size: int, seed: int, step: int, procs: Processes) -> torch.Tensor:
    """Row indices of this process's batch at ``step``: epoch-wise seeded shuffles (a resumed run sees the same
    batches), the consecutive batches of a shuffle going to consecutive processes."""
    epoch, i = divmod(step * procs.world_size + procs.rank, max(n // batch_size, 1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def resuming(args: argparse.Namespace, checkpoint: Path, later_model: bool) -> bool:
    """Whether a model resumes from ``checkpoint`` under ``--resume``: not a later model of a run of several
    that had not started when the run stopped (it has no checkpoint yet, so it starts afresh)."""
    return args.resume and not (later_model and not checkpoint.is_file())


@contextlib.contextmanager
def processes(args: argparse.Namespace) -> Iterator[Processes]:
    """The device (with clear errors), CPU threads, and with ``--distributed`` the process group of ``torchrun``
    (NCCL on CUDA, each process on ``cuda:$LOCAL_RANK``; Gloo on CPU), left at the end."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"error: --device {args.device}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available on this machine")
    if not args.distributed:
        yield Processes(0, 1, device)
        return
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: --distributed: start the script with torchrun (torchrun --nproc_per_node=2 ...)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)
    finally:
        torch.distributed.destroy_process_group()


def in_sync(module: torch.nn.Module) -> bool:
    """Whether every process holds exactly the same parameters (True without ``torchrun``)."""
    if not torch.distributed.is_initialized():
        return True
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    low, high = flat.clone(), flat.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    return torch.equal(low, high)


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` (with the user's permissions), syncs it and renames
    it over ``path``: a crash leaves the old or the new file, never a truncated one."""
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


def write_csv(path: Path, rows: list[dict[str, Any]], append: bool = False) -> None:
    """Writes ``rows`` (dicts with the same keys) under a header, atomically, or appends them."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    if not append:
        writer.writeheader()
    writer.writerows(rows)
    if append:
        with open(path, "a", newline="") as f:
            f.write(text.getvalue())
    else:
        atomic_write(path, text.getvalue().encode())


def _rng_state() -> dict[str, Any]:
    """The RNGs the examples draw from (torch's; the data pipelines use their own seeded generators)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: pyro.optim.PyroOptim) -> dict[str, Any]:
    """Restores the module, the optimizer and the RNGs from ``path``; returns the checkpoint.

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, so that a checkpoint from
    elsewhere cannot run code."""
    if not path.is_file():
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "?"
        raise SystemExit(
            f"error: --resume: {path} holds a pickled Python object ({what}): only tensors and plain data are loaded"
        ) from None
    except Exception as e:  # truncated, another format...: what torch.load raises varies
        raise SystemExit(f"error: --resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    current = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    for name, tensor in saved["module"].items():
        if tuple(tensor.shape) != current.get(name):
            raise SystemExit(
                f"error: --resume: {path} holds another model: {name} has shape {tuple(tensor.shape)} there and "
                f"{current.get(name, 'is absent')} here; resume with the flags it was trained with"
            )
    module.load_state_dict(saved["module"])
    optimizer.set_state(saved["optimizer"])
    _set_rng_state(saved["rng"])
    return saved


def resume_command() -> str:
    """This run's command line with ``--resume``."""
    return shlex.join(["python", sys.argv[0], *(a for a in sys.argv[1:] if a != "--resume"), "--resume"])


def training_state() -> dict[str, Any]:
    """What :meth:`Trainer.run` checkpoints: the log rows, the training seconds and the stop flag."""
    return {"log": [], "seconds": 0.0, "stopped": False}


def early_stopping_state(module: torch.nn.Module) -> dict[str, Any]:
    """A :func:`training_state` with the validations and the best module so far."""
    best = copy.deepcopy(module.state_dict())
    return {**training_state(), "val": [], "best_val": math.inf, "best_at": 0, "best_module": best, "bad_evals": 0}


def record_validation(state: dict, at: int, value: float, module: torch.nn.Module, patience: int, count=True) -> None:
    """Early stopping: records validation loss ``value`` at ``at``, keeps the best module's state, and sets
    ``state["stopped"]`` after ``patience`` counted validations without improvement."""
    if not math.isfinite(value):
        raise NonFiniteError(f"the validation loss is {value}")
    state["val"].append((at, value))
    if value < state["best_val"]:
        state.update(best_val=value, best_at=at, best_module=copy.deepcopy(module.state_dict()), bad_evals=0)
    elif count:
        state["bad_evals"] += 1
    state["stopped"] = state["bad_evals"] >= patience


def _fault(error: BaseException | None) -> BaseException | None:
    """The solver failure or NaN behind ``error`` (Pyro re-raises errors in ``log_prob`` as ``ValueError``)."""
    while error is not None and not isinstance(error, (pf.ODESolveError, NonFiniteError)):
        error = error.__cause__ or error.__context__
    return error


class Trainer:
    """Runs training steps so that nothing is lost.

    The checkpoint (``torch.save`` to a temporary file, then ``os.replace``) holds the module's state dict,
    the optimizer's state (``PyroOptim.get_state``), the RNGs and the example's ``state`` (log rows, training
    seconds, early stopping...); a resumed run continues bit for bit. A step whose solve fails or whose loss
    or gradient is non-finite changes nothing (:func:`update`): the run stops with a checkpoint of the
    state before it (after its update, when its validation loss is non-finite). The first SIGINT/SIGTERM
    ends the current step, checkpoints and exits; a second one acts at once. Only rank 0 (``writer``) writes.
    """

    def __init__(self, path: Path, module: torch.nn.Module, optimizer, state: dict, resume: bool, writer: bool = True):
        """Starts from ``state`` at step 0, or with ``resume`` from the checkpoint at ``path``."""
        self.path, self.module, self.optimizer, self.writer = path, module, optimizer, writer
        saved = load_checkpoint(path, module, optimizer) if resume else {"step": 0, "state": state, "optimizer": {}}
        self.start, self.state = saved["step"], saved["state"]
        # states set by ``PyroOptim.set_state`` are reported by ``get_state`` only once their parameters step
        self.optimizer_state = saved["optimizer"]
        self.signum: int | None = None

    def save(self, step: int) -> None:
        if self.writer:
            self.optimizer_state = {**self.optimizer_state, **self.optimizer.get_state()}
            checkpoint = {"step": step, "module": self.module.state_dict(), "optimizer": self.optimizer_state,
                          "rng": _rng_state(), "state": self.state}  # fmt: skip
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write(self.path, buffer.getvalue())

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal acts at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr, flush=True)

    def run(self, num_steps: int, train_step, report, checkpoint_due) -> dict[str, Any]:
        """Runs ``loss = train_step(step, state)`` then ``report(step, loss, state)`` for steps :attr:`start` to
        ``num_steps`` or until ``state["stopped"]``; checkpoints when ``checkpoint_due(step + 1)`` and at the end.
        ``state["seconds"]`` accumulates the training time over resumes; the rows of ``state["log"]`` go to
        ``log.csv`` beside the checkpoint as they come (a resumed run rewrites it from the checkpoint's rows)."""
        state = self.state
        log, logged = self.path.with_name("log.csv"), len(state["log"])
        if self.writer:
            log.parent.mkdir(parents=True, exist_ok=True)
            if logged:
                write_csv(log, state["log"])
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            started, step = time.time() - state["seconds"], self.start
            while step < num_steps and not state["stopped"]:
                try:
                    loss = train_step(step, state)
                except Exception as error:
                    fault = _fault(error)
                    if fault is None:
                        raise
                    self.save(step)
                    raise SystemExit(
                        f"error: training stopped at step {step}: {type(fault).__name__}: {fault}. The last finite "
                        f"state is saved in {self.path}; try a smaller --lr, a larger --max-num-steps or looser "
                        f"tolerances, and continue with: {resume_command()}"
                    ) from None
                state["seconds"] = time.time() - started
                report(step, loss, state)
                if self.writer and len(state["log"]) > logged:
                    write_csv(log, state["log"][logged:], append=logged > 0)
                    logged = len(state["log"])
                step += 1
                if checkpoint_due(step) or step == num_steps or state["stopped"] or self.signum is not None:
                    self.save(step)
                if self.signum is not None:
                    print(f"stopped after step {step - 1}; resume with: {resume_command()}", file=sys.stderr)
                    raise SystemExit(128 + self.signum)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return state
