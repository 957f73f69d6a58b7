"""MNIST at equal wall-clock: the images example's two models, trained by flow matching and by likelihood.

* ``fm``: one CNF over the whole image whose field is a U-Net, fit by flow matching on standardized logits of
  the pixels (``examples/images.py --objective fm``, the example's default);
* ``ml``: the paper's multiscale CNF, fit by maximum likelihood on a fixed rk4 grid with Hutchinson's trace and
  the RNODE penalties (``examples/images.py --objective ml``).

Each is the example's model with the example's defaults for its objective (network, batch size, step size,
warm-up, ``--num-train`` training images), trained in its own process on one CPU thread for ``--budget``
seconds by Adam, the learning rate decaying along a cosine over the budget (so a short run is not a long run
cut short). Both are then scored the example's way: the bits/dim of the first ``--num-test`` test images, each
dequantized with the same seeded noise, by dopri5 at rtol = atol = 1e-5 with Hutchinson's trace, ± the standard
error over the images.

    python benchmarks/bench_images.py --budget 600 --jobs 2 --out outputs/bench_images.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pyro_ffjord.datasets.images import load_image_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import images as example  # noqa: E402
from common import training  # noqa: E402

CONTENDERS = ("fm", "ml")


def run_contender(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Trains the example's ``name`` model for ``args.budget`` seconds on one thread and scores it."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    flags = ["--objective", name, "--num-train", str(args.num_train), "--num-test", str(args.num_test)]
    flags += ["--seed", str(args.seed)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    settings = example.parse_args(flags)
    data = load_image_dataset(settings.dataset, settings.data_dir)
    train, test = data.train[: settings.num_train or None], data.test[: settings.num_test or None]
    flow = example.build_flow(settings, train)
    optimizer = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    steps, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < args.budget:
        warmup = min((steps + 1) / max(settings.warmup, 1), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warmup * 0.5 * (1 + math.cos(math.pi * elapsed / args.budget))
        x = example.training_batch(train, settings.batch_size, args.seed * 1_000_003 + steps, torch.device("cpu"))
        if name == "fm":
            loss = training.flow_matching_loss(flow.cnf, flow.scaling.inv(x), settings)
        else:  # the RNODE penalty is read after the solve of this step's log-density
            loss = -example.distribution(flow, x).log_prob(x).mean()
            loss = loss + flow.regularization_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    result: dict[str, Any] = {"contender": name, "budget_s": args.budget, "steps": steps}
    result["train_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    with training.evaluation_solver(flow, settings):
        procs = training.Processes(0, 1, torch.device("cpu"))
        result["bits_per_dim"], result["bits_per_dim_se"] = example.evaluate_bits_per_dim(flow, test, settings, procs)
    result.update(eval_s=round(time.perf_counter() - started, 1), eval_nfe=flow.nfe.forward, num_test=len(test))
    return result


def _run(job: tuple[str, argparse.Namespace]) -> dict[str, Any]:
    try:
        return run_contender(*job)
    except Exception as e:  # a failed contender is reported, the other goes on
        return {"contender": job[0], "budget_s": job[1].budget, "error": f"{type(e).__name__}: {e}"}


def main(args: argparse.Namespace) -> dict[str, Any]:
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {list(CONTENDERS)}")
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.map(_run, [(name, args) for name in contenders], chunksize=1)
    print(f"\nMNIST, {args.num_train} training images, {args.budget:.0f} s of training each, one thread each")
    print(f"{'contender':<10}{'bits/dim':>9}{'± SE':>7}{'steps':>7}{'train s':>9}{'eval s':>8}{'eval NFE':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['contender']:<10} failed: {r['error']}")
            continue
        print(
            f"{r['contender']:<10}{r['bits_per_dim']:>9.3f}{r['bits_per_dim_se']:>7.3f}{r['steps']:>7}"
            f"{r['train_s']:>9.1f}{r['eval_s']:>8.1f}{r['eval_nfe']:>9}"
        )
    report = {"task": "mnist", "settings": vars(args), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per contender")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, from fm,ml")
    parser.add_argument("--jobs", type=int, default=1, help="contenders trained at once (one thread each)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images (0: all)")
    parser.add_argument("--num-test", type=int, default=500, help="first test images scored (0: all)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $PYRO_FFJORD_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON report path")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
