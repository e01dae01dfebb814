#!/usr/bin/env python3
"""PATE end to end on scikit-learn's digits: private labels from the ledger, a student on them.

The private part of the data is split into N disjoint partitions and one
teacher (a logistic regression) is trained on each. M public, unlabelled
inputs are then labelled through the ledger: the teachers' votes go to
`noisy_argmax`, which adds exact discrete Gaussian noise to every count,
charges the queries to the dataset and answers only the labels (GNMax,
Papernot et al. 2018). A student trained on those M labels alone is what a
team would deploy; its accuracy on held-out digits is printed beside the ε the
dataset spent, for a few noise levels (one dataset per level, so each ε is that
level's own).

    python3 dev.py serve                             # in another terminal; note the admin key
    export LEDGER_API_KEY=pl_...                     # an admin key: it creates the datasets
    .venv/bin/python examples/private_prediction.py --teachers 25 --queries 300

Needs scikit-learn (`pip install -e '.[examples]'`). The split and the models'
fitting are seeded (`--seed`: neither is private); the noise is the service's,
from its CSPRNG, and never seeded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from trainer_client import Conflict, LedgerClient, PrivateLabeler
from trainer_client.inference import Teacher, vote_histograms

CLASSES = 10
TEST_SHARE = 0.2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the ledger's base URL")
    parser.add_argument("--teachers", type=int, default=25, help="N: teachers (disjoint parts)")
    parser.add_argument("--queries", type=int, default=300, help="M: public inputs to label")
    parser.add_argument(
        "--noise-scales",
        default="2,5,10",
        help="comma-separated σ of the noise on each vote count, one dataset each",
    )
    parser.add_argument("--dataset", default="digits-pate", help="dataset id prefix")
    parser.add_argument("--cap", type=float, default=200.0, help="ε cap of each created dataset")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of each created dataset")
    parser.add_argument("--batch-size", type=int, default=100, help="queries per ledger request")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the fits only")
    args = parser.parse_args(argv)
    args.noise_scales = [float(s) for s in args.noise_scales.split(",") if s]
    if args.teachers < 1 or args.queries < 1 or not args.noise_scales:
        parser.error("--teachers and --queries must be ≥ 1, and give at least one noise scale")
    return args


def split(seed: int, queries: int) -> tuple[np.ndarray, ...]:
    """(private X, private y, public X, test X, test y): the digits shuffled and cut in three."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x, y = digits.data[order] / 16.0, digits.target[order]
    tests = int(len(y) * TEST_SHARE)
    if queries > len(y) - tests - CLASSES:
        raise SystemExit(f"--queries {queries} leaves no private data (digits has {len(y)})")
    public_end = tests + queries
    return x[public_end:], y[public_end:], x[tests:public_end], x[:tests], y[:tests]


def _constant_teacher(label: int) -> Teacher:
    """A teacher that always votes `label`."""

    def predict(inputs: Any) -> list[int]:
        return [label] * len(inputs)

    return predict


def _fitted_teacher(model: Any) -> Teacher:
    """A teacher that votes what a fitted scikit-learn classifier predicts."""

    def predict(inputs: Any) -> list[int]:
        return [int(label) for label in model.predict(np.asarray(inputs))]

    return predict


def train_teachers(x: np.ndarray, y: np.ndarray, teachers: int, seed: int) -> list[Teacher]:
    """One logistic regression per disjoint partition (what makes one record move one vote)."""
    if teachers > len(y):
        raise SystemExit(f"--teachers {teachers}: only {len(y)} private examples to share")
    models: list[Teacher] = []
    for part_x, part_y in zip(
        np.array_split(x, teachers), np.array_split(y, teachers), strict=True
    ):
        if len(set(part_y.tolist())) < 2:
            # A partition of one class cannot fit a classifier: it votes that class.
            models.append(_constant_teacher(int(part_y[0])))
            continue
        model = LogisticRegression(max_iter=500, random_state=seed).fit(part_x, part_y)
        models.append(_fitted_teacher(model))
    return models


def student_accuracy(
    x: np.ndarray, labels: Sequence[int], test_x: np.ndarray, test_y: np.ndarray
) -> float:
    """Accuracy on the test digits of a student trained on `labels` only."""
    if len(set(labels)) < 2:
        return float(np.mean(np.asarray(test_y) == labels[0]))
    student = LogisticRegression(max_iter=1000).fit(x, np.asarray(labels))
    return float(student.score(test_x, test_y))


def ensure_dataset(client: LedgerClient, dataset_id: str, cap: float, delta: float) -> None:
    """Create the dataset, or keep it if it exists (its history then counts too)."""
    with contextlib.suppress(Conflict):
        client.create_dataset(
            dataset_id, epsilon_cap=cap, delta=delta, description="examples/private_prediction.py"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; print one line per noise level."""
    args = parse_args(argv)
    key = os.environ.get("LEDGER_API_KEY")
    if not key:
        print("set LEDGER_API_KEY to an admin key of the ledger at --url", file=sys.stderr)
        return 2
    private_x, private_y, public_x, test_x, test_y = split(args.seed, args.queries)
    teachers = train_teachers(private_x, private_y, args.teachers, args.seed)
    public = list(public_x)
    plain = [int(np.argmax(h)) for h in vote_histograms(teachers, public, CLASSES)]
    rows = [("none (not private)", "-", student_accuracy(public_x, plain, test_x, test_y))]
    with LedgerClient(args.url, key) as client:
        for sigma in args.noise_scales:
            dataset_id = f"{args.dataset}-sigma-{sigma:g}"
            ensure_dataset(client, dataset_id, args.cap, args.delta)
            labeler = PrivateLabeler(
                client,
                dataset_id,
                teachers,
                classes=CLASSES,
                noise_scale=sigma,
                batch_size=args.batch_size,
                name=f"pate digits σ={sigma:g}",
            )
            labels = labeler.label(public)
            spent = client.dataset(dataset_id).epsilon_spent
            accuracy = student_accuracy(public_x, labels, test_x, test_y)
            rows.append((f"{sigma:g}", f"{spent:.4g}", accuracy))
    print(f"{args.teachers} teachers, {args.queries} queries, δ = {args.delta:g}")
    print(f"{'noise σ':>20}  {'ε spent':>10}  {'student accuracy':>16}")
    for sigma_text, spent_text, accuracy in rows:
        print(f"{sigma_text:>20}  {spent_text:>10}  {accuracy:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
