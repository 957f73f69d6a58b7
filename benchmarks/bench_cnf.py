"""Side-by-side speed benchmark: pyro_ffjord against a reference-style FFJORD, zuko and Pyro flows.

Every contender sees the same data, network size, solver and tolerances in one process tree
(each contender runs in its own child process so that its peak memory can be measured):

* ``pf_hutchinson`` / ``pf_exact``: pyro_ffjord, dopri5 at the workload's tolerance, adjoint;
* ``pf_rnode``: as ``pf_hutchinson`` with the RNODE penalties (kinetic energy and Jacobian norm,
  ``--rnode`` each, 0.01 by default), which keep the learned dynamics easy to integrate (fewer
  steps at equal tolerance);
* ``pf_backprop``: as ``pf_hutchinson`` but differentiated by backpropagation through the solver's
  steps (``adjoint=False``: the exact gradient of the discretized solve, memory growing with NFE);
* ``pf_compiled`` / ``pf_compiled_adjoint``: ``pf_backprop`` / ``pf_hutchinson`` with the dynamics
  compiled (``compile=True``, backend ``--compile-backend``; the compilation happens in the warm-up
  steps, reported as ``warmup_seconds``, before the timed steps and the race);
* ``pf_fast``: pyro_ffjord in the toy example's solver configuration: fixed-grid rk4 with steps of
  T_END/4 in units of t (more as the learned T grows), learned T, exact trace at D=2 and Hutchinson's
  above, no adjoint; evaluated with the same adaptive exact solve as the others;
* ``reference``: a minimal FFJORD written here after the design of rtqichen/ffjord (concatsquash
  tanh layers, augmented state ``(z, logp)``, ``torchdiffeq.odeint_adjoint``, Rademacher
  vector-Jacobian trace with ``create_graph=True`` always, noise drawn once per solve);
* ``zuko``: :class:`zuko.flows.CNF` with the same hidden widths and tolerances;
* ``spline_coupling`` / ``affine_autoregressive``: four-layer discrete Pyro flows, for context.

Reported per contender: seconds per training iteration (``log_prob`` + backward + Adam step,
from a common initialization, and averaged over the race), NFE forward/backward, peak memory of a training step (max-RSS
increase of the child on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and the test NLL
reached after training for ``--budget`` seconds (CNFs evaluated with dopri5 and the exact
trace), each also as a ratio to (or, for the NLL, a difference from) the reference. Two extra
measurements: the cost of an exact-trace evaluation relative to a Hutchinson one at D=16, and
the peak memory of an adjoint (and a non-adjoint) training step against the integration time T
(rk4 with a fixed step in units of t, so that the number of steps grows with T).

    python benchmarks/bench_cnf.py --budget 60 --out outputs/bench_cnf.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import Permute, affine_autoregressive, spline_coupling
from torch import Tensor, nn
from torchdiffeq import odeint_adjoint

import pyro_ffjord as pf
from pyro_ffjord.datasets.toy import sample_toy, toy_log_density

T_END = 0.5  # integration time of every CNF but zuko's, whose time is fixed to [0, 1]
FAST_STEPS = 4  # rk4 steps over [0, T_END] in pf_fast (more once its learned T grows)
MEMORY_STEPS = 8  # rk4 steps per T_END in the adjoint-memory measurement
EVAL_CHUNK = 2048


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def _mixture16() -> dist.MixtureSameFamily:
    """A fixed 16-D mixture of 8 correlated Gaussians (the synthetic tabular workload)."""
    g = torch.Generator().manual_seed(1234)
    k, d = 8, 16
    means = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    factors = torch.randn(k, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    covariance = factors @ factors.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)
    components = dist.MultivariateNormal(means, covariance_matrix=covariance)
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(k, dtype=torch.float64)), components)


def sample_mixture16(n: int, seed: int) -> Tensor:
    """``n`` samples of :func:`_mixture16`, reproducible from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _mixture16().sample((n,))


@dataclass(frozen=True)
class Workload:
    """A density-estimation problem: data, network widths and the solver shared by all contenders."""

    name: str
    dim: int
    hidden: tuple[int, ...]
    batch_size: int
    rtol: float
    atol: float
    spline_bound: float  # the spline flows' tails are the identity outside [-bound, bound]
    sample: Callable[[int, int], Tensor]  # (n, seed) -> float64 samples
    log_density: Callable[[Tensor], Tensor]


# Module-level functions (not lambdas), so that workloads pickle into spawned CUDA children.
def sample_8gaussians(n: int, seed: int) -> Tensor:
    return sample_toy("8gaussians", n, seed=seed)


def log_density_8gaussians(x: Tensor) -> Tensor:
    return toy_log_density("8gaussians", x)


def log_density_mixture16(x: Tensor) -> Tensor:
    return _mixture16().log_prob(x)


WORKLOADS = {
    "toy2d": Workload("toy2d", 2, (64, 64, 64), 512, 1e-5, 1e-5, 5.0, sample_8gaussians, log_density_8gaussians),
    "mixture16": Workload(
        "mixture16", 16, (128, 128, 128), 512, 1e-5, 1e-5, 6.0, sample_mixture16, log_density_mixture16
    ),
}


# --------------------------------------------------------------------------------------------
# (b) A minimal FFJORD after the design of rtqichen/ffjord
# --------------------------------------------------------------------------------------------


class RefConcatSquash(nn.Module):
    """``(W x + b) * sigmoid(A t + a) + B t`` with a scalar time, as the reference's concatsquash layer.

    The sub-layers are created in the same order as pyro_ffjord's, so that equal seeds give equal
    weights.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(1, 1)
        return self.layer(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class RefODEnet(nn.Module):
    """Stack of concatsquash layers with tanh between them."""

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = (dim, *hidden, dim)
        self.layers = nn.ModuleList(RefConcatSquash(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            y = layer(t, y)
            if i < len(self.layers) - 1:
                y = torch.tanh(y)
        return y


def ref_divergence_approx(f: Tensor, y: Tensor, e: Tensor) -> Tensor:
    """Rademacher/Hutchinson trace ``e^T (df/dy) e``; the graph is always kept, as in the reference."""
    (e_dfdy,) = torch.autograd.grad(f, y, e, create_graph=True)
    return (e_dfdy * e).sum(1)


def ref_divergence_bf(f: Tensor, y: Tensor, e: Tensor | None = None) -> Tensor:
    """Exact trace by one gradient per dimension (the reference's brute-force divergence; ``e`` is unused)."""
    total = torch.zeros_like(f[:, 0])
    for i in range(y.shape[1]):
        total = total + torch.autograd.grad(f[:, i].sum(), y, create_graph=True)[0][:, i]
    return total


class RefODEfunc(nn.Module):
    """Augmented dynamics ``(dz/dt, dlogp/dt) = (f, -tr df/dz)``; counts its evaluations."""

    def __init__(self, net: RefODEnet) -> None:
        super().__init__()
        self.net = net
        self.divergence_fn = ref_divergence_approx
        self.noise: Tensor | None = None
        self.num_evals = 0

    def before_odeint(self) -> None:
        """Forgets the noise (a new draw at the first evaluation) and resets the counter."""
        self.noise = None
        self.num_evals = 0

    def forward(self, t: Tensor, states: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y = states[0]
        self.num_evals += 1
        if self.noise is None:
            self.noise = torch.randint(0, 2, y.shape).to(y) * 2 - 1
        with torch.enable_grad():
            y.requires_grad_(True)
            dy = self.net(t.to(y), y)
            divergence = self.divergence_fn(dy, y, e=self.noise)
        return dy, -divergence


class RefCNF(nn.Module):
    """Integrates ``(x, 0)`` from 0 to T with ``odeint_adjoint``; ``log p(x) = log N(z) - logp(T)``."""

    def __init__(self, dim: int, hidden: tuple[int, ...], rtol: float, atol: float) -> None:
        super().__init__()
        self.odefunc = RefODEfunc(RefODEnet(dim, hidden))
        self.register_buffer("times", torch.tensor([0.0, T_END]))
        self.rtol, self.atol = rtol, atol

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the data ``x``, shape ``(N,)``."""
        self.odefunc.before_odeint()
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        z, delta_logp = odeint_adjoint(self.odefunc, (x, zero), self.times.to(x), rtol=self.rtol, atol=self.atol)
        z, delta_logp = z[-1], delta_logp[-1]
        log_pz = -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        return log_pz - delta_logp


# --------------------------------------------------------------------------------------------
# Contenders: a common interface over the four libraries
# --------------------------------------------------------------------------------------------


class Contender:
    """A density model with a training ``log_prob``, an exact evaluation ``log_prob`` and NFE counters."""

    module: nn.Module

    def log_prob(self, x: Tensor) -> Tensor:
        """Training log-density (training solver and trace estimator)."""
        raise NotImplementedError

    def evaluation(self) -> Any:
        """Context in which :meth:`log_prob` is the exact, adaptive evaluation."""
        return nullcontext()

    def nfe(self) -> tuple[int | None, int | None]:
        """Function evaluations (forward, backward) of the last solve; None where not applicable."""
        return None, None

    def penalty(self) -> Tensor | float:
        """Regularization added to the training loss after :meth:`log_prob` (0 for none)."""
        return 0.0


def _standard_normal(dim: int, like: Tensor) -> dist.Distribution:
    return dist.Normal(like.new_zeros(dim), 1.0).to_event(1)


class PyroFFJORD(Contender):
    """pyro_ffjord's :func:`~pyro_ffjord.ffjord` as a ``TransformedDistribution``."""

    def __init__(self, w: Workload, **options: Any) -> None:
        options = {"T": T_END, "rtol": w.rtol, "atol": w.atol, **options}
        self.module = pf.ffjord(w.dim, hidden_dims=w.hidden, **options)
        self.w = w

    def log_prob(self, x: Tensor) -> Tensor:
        return dist.TransformedDistribution(_standard_normal(self.w.dim, x), [self.module]).log_prob(x)

    def evaluation(self) -> Any:
        return pf.solver_settings(
            self.module, divergence="exact", method="dopri5", rtol=self.w.rtol, atol=self.w.atol, options=None
        )

    def nfe(self) -> tuple[int | None, int | None]:
        return tuple(self.module.nfe)

    def penalty(self) -> Tensor | float:
        return self.module.regularization_loss()


class Reference(Contender):
    """(b): :class:`RefCNF`; evaluation swaps in the brute-force exact trace."""

    def __init__(self, w: Workload) -> None:
        self.module = RefCNF(w.dim, w.hidden, w.rtol, w.atol)
        self.forward_evals = 0

    def log_prob(self, x: Tensor) -> Tensor:
        out = self.module.log_prob(x)
        self.forward_evals = self.module.odefunc.num_evals
        return out

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        func = self.module.odefunc
        func.divergence_fn = ref_divergence_bf
        try:
            yield
        finally:
            func.divergence_fn = ref_divergence_approx

    def nfe(self) -> tuple[int | None, int | None]:
        return self.forward_evals, self.module.odefunc.num_evals - self.forward_evals


class Zuko(Contender):
    """:class:`zuko.flows.CNF`: Hutchinson (Gaussian noise) in training, exact in evaluation."""

    def __init__(self, w: Workload) -> None:
        try:
            import zuko
        except ImportError as error:
            raise ImportError("the zuko contender needs zuko: pip install -e '.[bench]'") from error
        self.module = zuko.flows.CNF(
            w.dim, hidden_features=w.hidden, activation=nn.Tanh, rtol=w.rtol, atol=w.atol, exact=False
        )
        self.module.transform.ode.register_forward_hook(self._count)
        self.evals = self.forward_evals = 0

    def _count(self, *_: Any) -> None:
        self.evals += 1

    def log_prob(self, x: Tensor) -> Tensor:
        self.evals = 0
        out = self.module().log_prob(x)
        self.forward_evals = self.evals
        return out

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        transform = self.module.transform
        transform.exact = True
        self.module.eval()
        try:
            yield
        finally:
            transform.exact = False
            self.module.train()

    def nfe(self) -> tuple[int | None, int | None]:
        return self.forward_evals, self.evals - self.forward_evals


class PyroDiscrete(Contender):
    """Four Pyro flow layers with reversing permutations between them."""

    def __init__(self, w: Workload, kind: str, device: torch.device) -> None:
        reverse = Permute(torch.arange(w.dim - 1, -1, -1, device=device))
        layers = []
        for _ in range(4):
            if kind == "spline_coupling":
                layers.append(spline_coupling(w.dim, hidden_dims=list(w.hidden), bound=w.spline_bound))
            else:
                layers.append(affine_autoregressive(w.dim, hidden_dims=list(w.hidden)))
        self.module = nn.ModuleList(layers)
        # affine_autoregressive is an IAF (fast base -> data); its inverse is a MAF, fast on data.
        self.transforms = [t.inv if kind == "affine_autoregressive" else t for t in layers]
        self.transforms = [part for t in self.transforms for part in (t, reverse)][:-1]
        self.w = w

    def log_prob(self, x: Tensor) -> Tensor:
        return dist.TransformedDistribution(_standard_normal(self.w.dim, x), self.transforms).log_prob(x)


CONTENDERS: dict[str, str] = {
    "pf_hutchinson": "(a) pyro_ffjord, Hutchinson, dopri5, adjoint",
    "pf_exact": "(a) pyro_ffjord, exact trace, dopri5, adjoint",
    "pf_rnode": "(a) pyro_ffjord, Hutchinson, dopri5, adjoint, RNODE (--rnode)",
    "pf_backprop": "(a) pyro_ffjord, Hutchinson, dopri5, backprop through the solver",
    "pf_compiled": "(a) pyro_ffjord, Hutchinson, dopri5, backprop through the solver, compiled dynamics",
    "pf_compiled_adjoint": "(a) pyro_ffjord, Hutchinson, dopri5, adjoint, compiled dynamics",
    "pf_fast": f"(a) pyro_ffjord, rk4 x{FAST_STEPS}, learned T, no adjoint (toy config)",
    "reference": "(b) reference-style FFJORD, Hutchinson, dopri5, adjoint",
    "zuko": "(c) zuko.flows.CNF, Hutchinson, dopri5, ACA adjoint",
    "spline_coupling": "(d) Pyro spline_coupling x4",
    "affine_autoregressive": "(d) Pyro affine_autoregressive x4 (MAF)",
}


def build(
    name: str, w: Workload, device: torch.device, seed: int, rnode: float = 0.01, compile_backend: str = "inductor"
) -> Contender:
    """Builds contender ``name`` with the weights drawn from ``seed`` (``rnode``: pf_rnode's penalty weights,
    ``compile_backend``: the ``torch.compile`` backend of the compiled contenders)."""
    torch.manual_seed(seed)
    compiled = {"backend": compile_backend}
    if name == "pf_hutchinson":
        model = PyroFFJORD(w)
    elif name == "pf_backprop":
        model = PyroFFJORD(w, adjoint=False)
    elif name == "pf_compiled":
        model = PyroFFJORD(w, adjoint=False, compile=compiled)
    elif name == "pf_compiled_adjoint":
        model = PyroFFJORD(w, compile=compiled)
    elif name == "pf_exact":
        model = PyroFFJORD(w, divergence="exact")
    elif name == "pf_rnode":
        model = PyroFFJORD(w, regularization={"kinetic": rnode, "jacobian": rnode})
    elif name == "pf_fast":
        model = PyroFFJORD(
            w,
            method="rk4",
            options={"step_size": T_END / FAST_STEPS},
            divergence="exact" if w.dim <= 2 else "hutchinson",
            train_T=True,
            adjoint=False,
        )
    elif name == "reference":
        model = Reference(w)
    elif name == "zuko":
        model = Zuko(w)
    else:
        model = PyroDiscrete(w, name, device)
    model.module.to(device)
    return model


# --------------------------------------------------------------------------------------------
# Measurements (each run in a child process)
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory increase (MiB) inside a ``with`` block: CUDA allocator peak, else max-RSS delta."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = math.nan

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *_: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        self.mib = (peak - self.start) / 2**20


def train_step(model: Contender, optimizer: torch.optim.Optimizer, x: Tensor) -> float:
    """One maximum-likelihood step (plus the contender's penalty); returns the mean training NLL."""
    nll = -model.log_prob(x).mean()
    optimizer.zero_grad(set_to_none=True)
    (nll + model.penalty()).backward()
    optimizer.step()
    return nll.item()


def batch(w: Workload, n: int, seed: int, device: torch.device) -> Tensor:
    """A fresh float32 batch of the workload's data."""
    return w.sample(n, seed).float().to(device)


@torch.no_grad()
def test_nll(model: Contender, x: Tensor) -> tuple[float, int | None]:
    """Mean test NLL with the exact evaluation, and the forward NFE of its first chunk."""
    with model.evaluation():
        nll, nfe = [], None
        for chunk in x.split(EVAL_CHUNK):
            nll.append(-model.log_prob(chunk))
            nfe = model.nfe()[0] if nfe is None else nfe
    return torch.cat(nll).mean().item(), nfe


def _mean(values: list[int | None]) -> float | None:
    return None if values[0] is None else statistics.fmean(values)


def measure_contender(name: str, w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Timing, NFE and peak memory from a common initialization, then the fixed-budget NLL race."""
    device = torch.device(args.device)
    batch_size = args.batch_size or w.batch_size
    model = build(name, w, device, args.seed, args.rnode, args.compile_backend)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=args.lr)
    # Warm-up: one-time allocations, compilation, and (first full-size step) a compiled net's recompilation
    # for dynamic shapes; outside the memory measurement, whose CPU figure is a high-water mark.
    start = time.perf_counter()
    train_step(model, optimizer, batch(w, 4, args.seed - 1, device))
    train_step(model, optimizer, batch(w, batch_size, args.seed, device))
    warmup = time.perf_counter() - start
    seconds, forward, backward = [], [], []
    with PeakMemory(device) as memory:
        for i in range(1, args.timing_iters + 1):
            x = batch(w, batch_size, args.seed + i, device)
            _sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, x)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            nfe = model.nfe()
            forward.append(nfe[0])
            backward.append(nfe[1])

    model = build(name, w, device, args.seed, args.rnode, args.compile_backend)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=args.lr)
    iters, loss, elapsed, race_forward, race_backward = 0, math.nan, 0.0, [], []
    start = time.perf_counter()
    while elapsed < args.budget:
        for group in optimizer.param_groups:  # cosine decay over the wall-clock budget
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * elapsed / args.budget))
        loss = train_step(model, optimizer, batch(w, batch_size, 10**6 + args.seed + iters, device))
        iters += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        nfe = model.nfe()
        race_forward.append(nfe[0])
        race_backward.append(nfe[1])
    test = batch(w, args.num_test, 10**9 + args.seed, device)
    start = time.perf_counter()
    nll, eval_nfe = test_nll(model, test)
    return {
        "description": CONTENDERS[name],
        "warmup_seconds": warmup,
        "sec_per_iter": statistics.median(seconds),
        "nfe_forward": _mean(forward),
        "nfe_backward": _mean(backward),
        "peak_memory_mib": memory.mib,
        "race_iters": iters,
        "race_sec_per_iter": elapsed / iters,
        "race_nfe_forward": _mean(race_forward),
        "race_nfe_backward": _mean(race_backward),
        "race_final_train_nll": loss,
        "test_nll": nll,
        "eval_nfe_forward": eval_nfe,
        "eval_seconds": time.perf_counter() - start,
    }


def measure_exact_cost(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one exact-trace evaluation relative to one Hutchinson evaluation (same batch, init weights)."""
    device = torch.device(args.device)
    x = batch(w, args.batch_size or w.batch_size, args.seed, device)
    results: dict[str, Any] = {}
    for name in ("pf_hutchinson", "reference"):
        model = build(name, w, device, args.seed)
        row = {}
        for mode, context in (("hutchinson", nullcontext), ("exact", model.evaluation)):
            with torch.no_grad(), context():
                model.log_prob(x.clone())  # warm-up; a new tensor each time defeats pyro_ffjord's cache
                seconds = []
                for _ in range(args.timing_iters):
                    fresh = x.clone()
                    _sync(device)
                    start = time.perf_counter()
                    model.log_prob(fresh)
                    _sync(device)
                    seconds.append(time.perf_counter() - start)
            row[f"{mode}_seconds"] = statistics.median(seconds)
            row[f"{mode}_nfe"] = model.nfe()[0]
        row["exact_over_hutchinson"] = row["exact_seconds"] / row["hutchinson_seconds"]
        row["per_nfe_ratio"] = row["exact_over_hutchinson"] * row["hutchinson_nfe"] / row["exact_nfe"]
        results[name] = row
    return results


def measure_adjoint_memory(w: Workload, T: float, adjoint: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory and NFE of one pyro_ffjord training step for integration time T.

    The solver is rk4 with a fixed step in units of t, so that the number of steps grows with T.
    """
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = PyroFFJORD(w, T=T, method="rk4", options={"step_size": T_END / MEMORY_STEPS}, adjoint=adjoint)
    model.module.to(device)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=args.lr)
    train_step(model, optimizer, batch(w, 4, args.seed - 1, device))
    with PeakMemory(device) as memory:
        train_step(model, optimizer, batch(w, args.batch_size or w.batch_size, args.seed, device))
    forward, backward = model.nfe()
    return {"T": T, "adjoint": adjoint, "peak_memory_mib": memory.mib, "nfe_forward": forward, "nfe_backward": backward}


def _child(conn: Any, threads: int, fn: Callable[..., dict[str, Any]], fn_args: tuple) -> None:
    torch.set_num_threads(threads)
    try:
        conn.send(fn(*fn_args))
    except Exception as error:  # report a failed contender instead of losing the whole run
        conn.send({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
    conn.close()


def in_child(args: argparse.Namespace, fn: Callable[..., dict[str, Any]], *fn_args: Any) -> dict[str, Any]:
    """Runs ``fn(*fn_args)`` in a fresh child process (fork on CPU, spawn with CUDA) and returns its dict."""
    context = mp.get_context("spawn" if args.device.startswith("cuda") else "fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, args.threads, fn, fn_args))
    process.start()
    send.close()
    result = receive.recv()
    process.join()
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Adds ratios to the reference: time and memory as quotients, NLL as a difference (nats)."""
    ref = rows.get("reference", {"error": "not run"})
    for row in rows.values():
        if "error" in row or "error" in ref:
            continue
        row["sec_per_iter_vs_ref"] = row["sec_per_iter"] / ref["sec_per_iter"]
        row["race_sec_per_iter_vs_ref"] = row["race_sec_per_iter"] / ref["race_sec_per_iter"]
        # a CPU max-RSS increase can be 0 when the child's start-up already set the high-water mark
        row["memory_vs_ref"] = row["peak_memory_mib"] / ref["peak_memory_mib"] if ref["peak_memory_mib"] else None
        row["test_nll_minus_ref"] = row["test_nll"] - ref["test_nll"]


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_report(results: dict[str, Any]) -> None:
    """Prints the markdown tables of ``results``."""
    header = (
        "| contender | warm-up s | sec/iter @init | ×(b) | NFE @init | peak MiB | ×(b) | iters in budget "
        "| sec/iter in race | ×(b) | mean NFE in race | test NLL | −(b) | eval NFE |"
    )
    for name, workload in results["workloads"].items():
        print(f"\n### {name} (true NLL {workload['true_nll']:.3f}, budget {results['config']['budget']} s)\n")
        print(header)
        print("|" + " --- |" * (header.count("|") - 1))
        for key, r in workload["contenders"].items():
            if "error" in r:
                print(f"| {key} | failed: {r['error'][:80]} |")
                continue
            nfe = f"{_fmt(r['nfe_forward'], '.0f')}/{_fmt(r['nfe_backward'], '.0f')}"
            race_nfe = f"{_fmt(r['race_nfe_forward'], '.0f')}/{_fmt(r['race_nfe_backward'], '.0f')}"
            print(
                f"| {key} | {r['warmup_seconds']:.1f} | {r['sec_per_iter']:.4f} "
                f"| {_fmt(r.get('sec_per_iter_vs_ref'), '.2f')} | {nfe} "
                f"| {r['peak_memory_mib']:.1f} | {_fmt(r.get('memory_vs_ref'), '.2f')} | {r['race_iters']} "
                f"| {r['race_sec_per_iter']:.4f} | {_fmt(r.get('race_sec_per_iter_vs_ref'), '.2f')} | {race_nfe} "
                f"| {r['test_nll']:.3f} | {_fmt(r.get('test_nll_minus_ref'), '+.3f')} "
                f"| {_fmt(r['eval_nfe_forward'])} |"
            )
    if "exact_vs_hutchinson" in results:
        print("\n### exact-trace evaluation cost relative to one Hutchinson evaluation\n")
        print("| model | Hutchinson s (NFE) | exact s (NFE) | exact/Hutchinson | per NFE |")
        print("| --- | --- | --- | --- | --- |")
        for key, r in results["exact_vs_hutchinson"].items():
            if "error" in r:
                print(f"| {key} | failed: {r['error'][:80]} |")
                continue
            print(
                f"| {key} | {r['hutchinson_seconds']:.4f} ({r['hutchinson_nfe']}) | {r['exact_seconds']:.4f} "
                f"({r['exact_nfe']}) | {r['exact_over_hutchinson']:.2f} | {r['per_nfe_ratio']:.2f} |"
            )
    if "adjoint_memory" in results:
        print(f"\n### peak memory of one pyro_ffjord training step vs T (D=16, rk4, step {T_END / MEMORY_STEPS})\n")
        print("| T | adjoint | peak MiB | NFE fwd/bwd |")
        print("| --- | --- | --- | --- |")
        for r in results["adjoint_memory"]:
            if "error" in r:
                print(f"| failed: {r['error'][:80]} |")
                continue
            nfe = f"{r['nfe_forward']}/{r['nfe_backward']}"
            print(f"| {r['T']} | {r['adjoint']} | {r['peak_memory_mib']:.1f} | {nfe} |")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every measurement, prints the tables and writes ``args.out``; returns the results."""
    results: dict[str, Any] = {"config": vars(args), "torch": torch.__version__, "workloads": {}}
    for name in args.workloads:
        w = WORKLOADS[name]
        rows = {}
        for contender in args.contenders:
            print(f"[{name}] {contender} ...", flush=True)
            rows[contender] = in_child(args, measure_contender, contender, w, args)
        add_ratios(rows)
        true_nll = -w.log_density(w.sample(args.num_test, 10**9 + args.seed)).mean().item()
        results["workloads"][name] = {"workload": _describe(w), "true_nll": true_nll, "contenders": rows}
    if not args.no_extras:
        tabular = WORKLOADS["mixture16"]
        print("[extra] exact vs Hutchinson evaluation at D=16 ...", flush=True)
        results["exact_vs_hutchinson"] = in_child(args, measure_exact_cost, tabular, args)
        print("[extra] adjoint memory vs T ...", flush=True)
        results["adjoint_memory"] = [
            in_child(args, measure_adjoint_memory, tabular, T, adjoint, args)
            for adjoint in (True, False)
            for T in (0.5, 1.0, 2.0)
        ]
    print_report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")
    return results


def _describe(w: Workload) -> dict[str, Any]:
    return {k: v for k, v in asdict(w).items() if not callable(v)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per contender in the NLL race")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="outputs/bench_cnf.json", help="JSON results")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS), help="(ratios need 'reference')"
    )
    parser.add_argument("--no-extras", action="store_true", help="skip the exact-cost and memory measurements")
    parser.add_argument("--timing-iters", type=int, default=5, help="timed training steps from the initialization")
    parser.add_argument("--batch-size", type=int, default=0, help="override the workloads' batch size (512)")
    parser.add_argument("--num-test", type=int, default=4096, help="test points for the NLL")
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-2,
        help="Adam learning rate of every contender, cosine-decayed over the budget (on toy2d the best of "
        "3e-3, 5e-3, 1e-2, 2e-2 for both pf_fast and spline_coupling)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rnode", type=float, default=0.01, help="pf_rnode's kinetic and Jacobian penalty weights")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of pf_compiled and pf_compiled_adjoint"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
