"""Private prediction with a teacher ensemble (PATE's GNMax): votes here, noisy argmax there.

`PrivateLabeler` asks each teacher for its predictions on a batch of inputs,
counts the votes per class, and sends the histograms to the ledger
(`LedgerClient.private_argmax`), which adds exact noise to every count, charges
the batch to the dataset and answers only the labels. Only the vote counts
leave this process; the teachers and the inputs stay here. No torch needed:
a teacher is any callable from a batch of inputs to one class index per input
(a scikit-learn model's ``predict``, a torch model's argmax, …).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from trainer_client.client import LedgerClient

__all__ = ["PrivateLabeler", "Teacher", "vote_histograms"]

#: A teacher: a batch of inputs → one class index per input.
Teacher = Callable[[Sequence[Any]], Sequence[int]]

_BAR_WIDTH = 30


def vote_histograms(
    teachers: Sequence[Teacher], inputs: Sequence[Any], classes: int
) -> list[list[int]]:
    """One histogram per input: how many teachers predict each of `classes` classes."""
    histograms = [[0] * classes for _ in inputs]
    for number, teacher in enumerate(teachers):
        predictions = list(teacher(inputs))
        if len(predictions) != len(inputs):
            raise ValueError(
                f"teacher {number} gave {len(predictions)} predictions for {len(inputs)} inputs"
            )
        for histogram, label in zip(histograms, predictions, strict=True):
            index = int(label)
            if not 0 <= index < classes:
                raise ValueError(
                    f"teacher {number} predicted class {index}, not in 0..{classes - 1}"
                )
            histogram[index] += 1
    return histograms


class PrivateLabeler:
    """Labels inputs by the noisy argmax of a teacher ensemble's votes, charged to a dataset.

    Every teacher must have been trained on its own disjoint part of the
    dataset: that is what makes one record move at most one vote, the
    sensitivity the ledger charges (docs/accounting.md §10). Give `noise_scale`
    (the std of the noise on each count) or `epsilon` and `delta` per query.
    Queries go to the ledger `batch_size` at a time (one admission and one
    ledger entry per batch); a batch that does not fit the dataset's budget
    raises ``BudgetExhausted`` and none of its queries is answered (the batches
    before it stay labelled and charged: see `labelled`).
    """

    def __init__(
        self,
        client: LedgerClient,
        dataset_id: str,
        teachers: Sequence[Teacher],
        *,
        classes: int,
        noise_scale: float | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
        batch_size: int = 100,
        progress: TextIO | None = sys.stderr,
        name: str | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("a PrivateLabeler needs at least one teacher")
        if classes < 2:
            raise ValueError("classes must be at least 2")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.client = client
        self.dataset_id = dataset_id
        self.teachers = list(teachers)
        self.classes = classes
        self.noise_scale = noise_scale
        self.epsilon = epsilon
        self.delta = delta
        self.batch_size = batch_size
        self.progress = progress
        self.name = name
        #: The labels answered so far by the last `label` call (kept if a batch is refused).
        self.labelled: list[int] = []

    def label(self, inputs: Sequence[Any]) -> list[int]:
        """The private label of every input, in order; shows progress with the dataset's ε."""
        self.labelled = []
        total = len(inputs)
        for start in range(0, total, self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            votes = vote_histograms(self.teachers, chunk, self.classes)
            self.labelled += self.client.private_argmax(
                self.dataset_id,
                votes,
                teachers=len(self.teachers),
                epsilon=self.epsilon,
                delta=self.delta,
                noise_scale=self.noise_scale,
                name=self.name,
            )
            self._show(len(self.labelled), total)
        if self.progress is not None and total:
            self.progress.write("\n")
            self.progress.flush()
        return list(self.labelled)

    def _show(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        dataset = self.client.dataset(self.dataset_id)
        filled = _BAR_WIDTH * done // total
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self.progress.write(
            f"\rlabelled {done}/{total} [{bar}] ε spent {dataset.epsilon_spent:.4g} "
            f"of {dataset.epsilon_cap:g} on {self.dataset_id}"
        )
        self.progress.flush()
