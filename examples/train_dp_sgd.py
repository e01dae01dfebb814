#!/usr/bin/env python3
"""Train a small MLP with DP-SGD against a live privacy ledger.

The ledger plans the run (fixing the noise multiplier σ for a target ε and
holding the plan's budget), charges every epoch just before it is trained,
and refuses what would exceed the dataset's cap. The data are synthetic
(Gaussian blobs made here with torch, no downloads).

    python3 dev.py serve                        # in another terminal; note the admin key
    export LEDGER_API_KEY=pl_...                # or pass --api-key
    .venv/bin/python examples/train_dp_sgd.py --create-dataset-cap 4 --epochs 5

With ``--beyond-plan`` it keeps training past the planned epochs for as long
as the ledger admits more, and stops cleanly at the first refusal.

``--seed`` fixes the synthetic data and the model's initial weights only
(neither is private). The batches and the noise always come from the
operating system's CSPRNG: a seed that reached them would let whoever knows
it regenerate the noise, and the privacy with it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import torch
from torch import nn

from trainer_client import BudgetExhausted, Conflict, Epoch, LedgerClient, LedgerError, Run
from trainer_client.torch import DPSGDStep, poisson_loader

FEATURES, CLASSES = 16, 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ledger = parser.add_argument_group("ledger")
    ledger.add_argument("--url", default="http://127.0.0.1:8000", help="the ledger's base URL")
    ledger.add_argument(
        "--api-key",
        default=os.environ.get("LEDGER_API_KEY"),
        help="a trainer (or admin) key; default $LEDGER_API_KEY",
    )
    ledger.add_argument("--dataset", default="synthetic-blobs", help="the ledger's dataset id")
    ledger.add_argument(
        "--create-dataset-cap",
        type=float,
        metavar="EPSILON",
        help="create the dataset with this ε cap first if it does not exist (admin key)",
    )
    ledger.add_argument("--delta", type=float, default=1e-5, help="δ of a created dataset")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--epochs", type=int, default=5, help="planned epochs")
    noise = plan.add_mutually_exclusive_group()
    noise.add_argument("--target-epsilon", type=float, help="the plan's own ε (default 2.0)")
    noise.add_argument("--noise-multiplier", type=float, help="σ instead of a target ε")
    plan.add_argument("--sample-rate", type=float, default=0.02, help="Poisson sampling rate q")
    plan.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    plan.add_argument(
        "--beyond-plan", action="store_true", help="keep going past the plan while admitted"
    )
    training = parser.add_argument_group("training")
    training.add_argument("--records", type=int, default=4000, help="synthetic training records")
    training.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    training.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the synthetic data and the initial weights only; never the noise or "
        "the batches, which come from os.urandom",
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("an API key is needed: --api-key or $LEDGER_API_KEY")
    if args.target_epsilon is None and args.noise_multiplier is None:
        args.target_epsilon = 2.0
    return args


def blob_centres(seed: int) -> torch.Tensor:
    """The task: CLASSES Gaussian blob centres in FEATURES dimensions."""
    return torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(seed)) * 1.5


def synthetic_blobs(
    centres: torch.Tensor, records: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`records` labelled points drawn around `centres` (unit-variance noise)."""
    labels = torch.randint(0, CLASSES, (records,), generator=generator)
    points = centres[labels] + torch.randn(records, FEATURES, generator=generator)
    return points, labels


def mlp() -> nn.Module:
    """A small multi-layer perceptron (no BatchNorm: DP-SGD needs per-example gradients)."""
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def initial_model(seed: int) -> nn.Module:
    """The MLP with initial weights fixed by `seed` (public: they depend on no record)."""
    # fork_rng: the seed sets torch's global generator for the initialisation only, and the
    # caller's global state comes back afterwards. The noise never reads that generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mlp()


class ProgressBar:
    """A one-line progress bar redrawn in place with a carriage return."""

    def __init__(self, out: TextIO, width: int = 24) -> None:
        self.out = out
        self.width = width

    def draw(self, epoch: Epoch, total_epochs: int, step: int, loss: float | None) -> None:
        """Redraw the line for `step` of `epoch`."""
        done = int(self.width * step / max(epoch.steps, 1))
        bar = "#" * done + "." * (self.width - done)
        shown_loss = "  -  " if loss is None else f"{loss:.3f}"
        extra = " (beyond plan)" if epoch.beyond_plan else ""
        self.out.write(
            f"\repoch {epoch.index}/{total_epochs}{extra} [{bar}] step {step}/{epoch.steps} "
            f"loss {shown_loss} | σ {epoch.noise_multiplier:.3f} | "
            f"dataset ε {epoch.epsilon_spent:.3f} of {epoch.epsilon_cap:.3f}"
        )
        self.out.flush()

    def finish(self) -> None:
        """End the line."""
        self.out.write("\n")
        self.out.flush()


def ensure_dataset(client: LedgerClient, args: argparse.Namespace, out: TextIO) -> None:
    """Create the dataset when asked to and it is not there yet."""
    if args.create_dataset_cap is None:
        return
    cap, delta = args.create_dataset_cap, args.delta
    try:
        client.create_dataset(args.dataset, epsilon_cap=cap, delta=delta)
        print(f"created dataset {args.dataset!r}: ε cap {cap}, δ {delta}", file=out)
    except Conflict:
        print(f"dataset {args.dataset!r} exists already; using it", file=out)


def accuracy(model: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correctly classified points."""
    with torch.no_grad():
        return float((model(points).argmax(dim=1) == labels).double().mean())


def train(run: Run, args: argparse.Namespace, out: TextIO) -> nn.Module:
    """The DP-SGD loop: every epoch's σ, q and steps come from the ledger.

    `args.seed` makes the data and the initial weights; the batches and the
    noise are drawn from os.urandom by `poisson_loader` and `DPSGDStep`.
    """
    data_generator = torch.Generator().manual_seed(args.seed)
    points, labels = synthetic_blobs(blob_centres(args.seed), args.records, data_generator)
    model = initial_model(args.seed)
    step = DPSGDStep(
        model,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(model.parameters(), lr=args.lr),
        dataset_size=args.records,
        max_grad_norm=args.max_grad_norm,
    )
    bar = ProgressBar(out)
    total = run.epochs
    epochs = run.iterate(epochs=sys.maxsize if args.beyond_plan else None)
    for epoch in epochs:
        total = max(total, epoch.index)
        loss: float | None = None
        bar.draw(epoch, total, 0, loss)
        batches = poisson_loader((points, labels), epoch.sample_rate, epoch.steps)
        for number, batch in enumerate(batches, start=1):
            stats = step(batch, epoch)
            if stats.mean_loss is not None:
                loss = stats.mean_loss if loss is None else 0.9 * loss + 0.1 * stats.mean_loss
            bar.draw(epoch, total, number, loss)
        bar.finish()
    return model


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Run the example; the exit status (0 also when the ledger refuses budget)."""
    args = parse_args(argv)
    steps_per_epoch = max(1, math.ceil(1 / args.sample_rate))  # one pass in expectation
    try:
        with LedgerClient(args.url, args.api_key) as client:
            ensure_dataset(client, args, out)
            try:
                run = client.start_run(
                    args.dataset,
                    sample_rate=args.sample_rate,
                    steps_per_epoch=steps_per_epoch,
                    epochs=args.epochs,
                    target_epsilon=args.target_epsilon,
                    noise_multiplier=args.noise_multiplier,
                    max_grad_norm=args.max_grad_norm,
                    name="examples/train_dp_sgd.py",
                )
            except BudgetExhausted as refusal:
                print(f"the ledger refused the plan: {refusal.detail}", file=out)
                return 0
            print(
                f"run {run.id}: {run.epochs} epochs × {run.steps_per_epoch} steps at "
                f"q={run.sample_rate}, σ={run.noise_multiplier:.4f} (the plan alone is "
                f"ε={run.epsilon:.3f})",
                file=out,
            )
            started = time.monotonic()
            with run:
                model = train(run, args, out)
            if run.stopped_reason is not None:
                print(f"stopped: the ledger refused the next epoch: {run.stopped_reason}", file=out)
            held_out = torch.Generator().manual_seed(args.seed + 1)
            points, labels = synthetic_blobs(blob_centres(args.seed), 2000, held_out)
            dataset = client.dataset(args.dataset)
            print(
                f"run {run.status} after {run.epochs_charged} epochs in "
                f"{time.monotonic() - started:.1f} s; held-out accuracy "
                f"{accuracy(model, points, labels):.3f}; dataset ε spent "
                f"{dataset.epsilon_spent:.3f} of {dataset.epsilon_cap:.3f} (δ={dataset.delta:g})",
                file=out,
            )
    except LedgerError as error:
        print(f"ledger error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
