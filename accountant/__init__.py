"""Rényi-DP accounting for the privacy ledger: pure functions, no I/O.

- `accountant.rdp`: RDP curves of the mechanisms we charge, and the ε conversion.
- `accountant.Filter`: the cap filter with uniform shares (valid under fully adaptive composition).
- `accountant.members`: the filter of members with fixed shares of δ and the exact pure-sum member.
- `accountant.calibrate`: noise for a target ε (DP-SGD σ, analytic Gaussian, Laplace).
- `accountant.mechanisms`: the mechanisms as immutable values the ledger stores.
- `accountant.exact`: exact integer arithmetic on curves, for the ledger's cached sums.
- `accountant.pld`: the PLD ε of one DP-SGD plan alone (shown beside the RDP ε, never a filter).
"""

from accountant import calibrate, exact, mechanisms, members, pld, rdp
from accountant._checks import MIN_PROBABILITY
from accountant.filter import Filter
from accountant.orders import CALIBRATION_ORDERS, DEFAULT_ORDERS

__all__ = [
    "CALIBRATION_ORDERS",
    "DEFAULT_ORDERS",
    "MIN_PROBABILITY",
    "Filter",
    "calibrate",
    "exact",
    "mechanisms",
    "members",
    "pld",
    "rdp",
]
