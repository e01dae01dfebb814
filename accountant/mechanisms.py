"""The mechanisms the ledger charges, as small immutable values.

Each value knows its RDP curve and round-trips through a plain dict
(`params()` / `from_params`), which is how ledger entries store them and how
a replay of the ledger rebuilds the cached curves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any, ClassVar

from accountant import _checks, rdp
from accountant._checks import FloatArray
from accountant.orders import DEFAULT_ORDERS
from accountant.rdp import Orders

__all__ = ["Gaussian", "Laplace", "Mechanism", "PureDP", "SubsampledGaussian", "from_params"]


class _Stored:
    """Shared by every mechanism: its kind plus its fields, as stored in a ledger entry."""

    __slots__ = ()
    kind: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """The parameters as a plain dict, with the mechanism's kind."""
        # Every field is a number: nothing nested to copy (dataclasses.asdict is slower).
        values = {field.name: getattr(self, field.name) for field in fields(self)}  # type: ignore[arg-type]
        return {"kind": self.kind, **values}


@dataclass(frozen=True, slots=True)
class SubsampledGaussian(_Stored):
    """`steps` DP-SGD steps: Poisson sampling at `sample_rate`, noise std `noise_multiplier`."""

    kind: ClassVar[str] = "subsampled_gaussian"
    sample_rate: float
    noise_multiplier: float
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "sample_rate", _checks.sample_rate("sample_rate", self.sample_rate)
        )
        object.__setattr__(
            self, "noise_multiplier", _checks.positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "steps", _checks.count("steps", self.steps))

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
        """RDP curve on `orders`."""
        return rdp.subsampled_gaussian(self.sample_rate, self.noise_multiplier, self.steps, orders)


@dataclass(frozen=True, slots=True)
class Gaussian(_Stored):
    """`steps` Gaussian releases; noise_multiplier = noise std / L2 sensitivity."""

    kind: ClassVar[str] = "gaussian"
    noise_multiplier: float
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "noise_multiplier", _checks.positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "steps", _checks.count("steps", self.steps))

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
        """RDP curve on `orders`."""
        return rdp.gaussian(self.noise_multiplier, self.steps, orders)


@dataclass(frozen=True, slots=True)
class Laplace(_Stored):
    """`steps` Laplace releases; scale = Laplace scale / L1 sensitivity."""

    kind: ClassVar[str] = "laplace"
    scale: float
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _checks.positive("scale", self.scale))
        object.__setattr__(self, "steps", _checks.count("steps", self.steps))

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
        """RDP curve on `orders`."""
        return rdp.laplace(self.scale, self.steps, orders)


@dataclass(frozen=True, slots=True)
class PureDP(_Stored):
    """`steps` releases of any ε-DP mechanism (exponential mechanism, randomized response…)."""

    kind: ClassVar[str] = "pure_dp"
    epsilon: float
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _checks.positive("epsilon", self.epsilon))
        object.__setattr__(self, "steps", _checks.count("steps", self.steps))

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
        """RDP curve on `orders`."""
        # ε means the decimal its repr spells (0.3 is 3/10, above the float 0.299…98): the curve is
        # taken at the smallest float not below that decimal, so it is never below the truth.
        return rdp.pure_dp(_decimal_up(self.epsilon), self.steps, orders)


def _decimal_up(value: float) -> float:
    """The smallest float ≥ both `value` and the decimal number its repr spells."""
    decimal = Fraction(repr(value))
    if Fraction(value) >= decimal:
        return value
    return math.nextafter(value, math.inf)


Mechanism = SubsampledGaussian | Gaussian | Laplace | PureDP

_KINDS: dict[str, type[Mechanism]] = {
    cls.kind: cls for cls in (SubsampledGaussian, Gaussian, Laplace, PureDP)
}


def from_params(params: Mapping[str, Any]) -> Mechanism:
    """Rebuild a mechanism from `params()` output; ValueError on anything unknown."""
    fields = dict(params)
    kind = fields.pop("kind", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown mechanism kind {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad parameters for {kind}: {exc}") from None
