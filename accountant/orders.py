"""The fixed grids of Rényi orders α the ledger accounts on.

`DEFAULT_ORDERS` is the grid Λ every stored cost curve and the cap filter use.
The filter pays a union bound over Λ (δ/|Λ| per order), so Λ is kept small
(35 orders) yet dense where the optimal order lies for budgets from ε≈0.1
(large α) to ε≈50 (α just above 1).

`CALIBRATION_ORDERS` is a denser grid used only to compute the ε of one plan
on its own (calibrating σ for a target ε, the stateless calculators). Any
order gives a valid bound, so a denser grid only makes that ε tighter; it is
never used to enforce a cap.
"""

from __future__ import annotations

import numpy as np

from accountant._checks import FloatArray

# fmt: off
DEFAULT_ORDERS: FloatArray = np.array([
    1.125, 1.25, 1.375, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0,
    10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0, 80.0, 96.0,
    128.0, 160.0, 192.0, 256.0, 384.0, 512.0,
])
# fmt: on
DEFAULT_ORDERS.setflags(write=False)

CALIBRATION_ORDERS: FloatArray = np.union1d(
    DEFAULT_ORDERS,
    np.concatenate(
        [
            np.round(np.arange(1.1, 11.0, 0.1), 1),
            np.arange(11.0, 64.0),
            np.array([72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0]),
        ]
    ),
)
CALIBRATION_ORDERS.setflags(write=False)

# Where the default shares may put their heavy share (accountant.members.heavy_order): the
# dense calibration grid, so the heavy order sits within a step of 0.1 (α < 11) or 1 (α < 64)
# of the continuous optimum. Only the one chosen order joins a dataset's grid.
SHARE_CANDIDATE_ORDERS: FloatArray = CALIBRATION_ORDERS
