"""Independent references for the accountant tests: mpmath integrals and published grids.

Nothing here imports `accountant`: these are the yardsticks it is measured against.
"""

from __future__ import annotations

import functools

import mpmath as mp
import numpy as np

# dp_accounting's DEFAULT_RDP_ORDERS (the grid the published "improved" figures used).
DP_ACCOUNTING_ORDERS = np.array(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024],
    dtype=np.float64,
)

# Working precisions of the quadrature, tried in turn: 20 digits is usually ~1e-18
# relative on A_α - 1 with the expm1/log1p form below (checked against 40 digits).
_DPS = (20, 30, 40)


@functools.cache
def sampled_gaussian_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP at order α of one Poisson-subsampled Gaussian step, by numerical integration.

    Mironov, Talwar, Zhang 2019, Sec. 3: A_α = E_{z~N(0,σ²)}[((1-q) + q·e^{(2z-1)/(2σ²)})^α]
    and RDP = log(A_α)/(α-1). We integrate A_α - 1 (expm1/log1p throughout) so that
    tiny RDP values keep full relative precision, and refuse a result whose quadrature
    error estimate is not negligible (raising the working precision first).
    """
    for dps in _DPS:
        with mp.workdps(dps):
            a_minus_1, error = _a_minus_1(mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha))
            if abs(error) <= abs(a_minus_1) * mp.mpf("1e-15"):
                return float(mp.log1p(a_minus_1) / (alpha - 1))
    raise AssertionError(f"mpmath quadrature did not converge: {error} vs {a_minus_1}")


def _a_minus_1(q: mp.mpf, s: mp.mpf, a: mp.mpf) -> tuple[mp.mpf, mp.mpf]:
    """(A_α - 1, quadrature error estimate) at the current working precision."""
    inv = 1 / (2 * s * s)
    norm = 1 / (s * mp.sqrt(2 * mp.pi))

    def integrand(z: mp.mpf) -> mp.mpf:
        ratio_m1 = q * mp.expm1((2 * z - 1) * inv)  # (1-q) + q·L(z) - 1
        return mp.expm1(a * mp.log1p(ratio_m1)) * mp.exp(-z * z * inv) * norm

    # The mass sits around 0 (the Gaussian) and around α (where L(z)^α peaks).
    points = sorted({-mp.inf, -10 * s, mp.mpf(0), a, a + 10 * s, mp.inf})
    result, error = mp.quad(integrand, points, error=True)
    return result, error


def randomized_response_rdp(epsilon: float, alpha: float) -> float:
    """D_α(RR_ε(0) ‖ RR_ε(1)) of binary randomized response, straight from the definition."""
    with mp.workdps(60):
        eps, a = mp.mpf(epsilon), mp.mpf(alpha)
        p = mp.exp(eps) / (1 + mp.exp(eps))
        return float(mp.log(p**a * (1 - p) ** (1 - a) + (1 - p) ** a * p ** (1 - a)) / (a - 1))


def bun_steinke_pure_dp_rdp(epsilon: float, alpha: float) -> float:
    """Bun & Steinke 2016, Prop. 3.3 proof: 1/(α-1)·log((sinh(αε) - sinh((α-1)ε))/sinh(ε))."""
    with mp.workdps(60):
        eps, a = mp.mpf(epsilon), mp.mpf(alpha)
        ratio = (mp.sinh(a * eps) - mp.sinh((a - 1) * eps)) / mp.sinh(eps)
        return float(mp.log(ratio) / (a - 1))


def laplace_rdp(scale: float, alpha: float) -> float:
    """Mironov 2017, Prop. 6 closed form, at 60 digits."""
    with mp.workdps(60):
        b, a = mp.mpf(scale), mp.mpf(alpha)
        inside = a / (2 * a - 1) * mp.exp((a - 1) / b) + (a - 1) / (2 * a - 1) * mp.exp(-a / b)
        return float(mp.log(inside) / (a - 1))


def analytic_gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Balle & Wang 2018, Thm. 8: δ(σ) = Φ(Δ/(2σ) - εσ/Δ) - e^ε Φ(-Δ/(2σ) - εσ/Δ), at 50 digits."""
    with mp.workdps(50):
        s, eps, d = mp.mpf(sigma), mp.mpf(epsilon), mp.mpf(sensitivity)
        a, b = d / (2 * s), eps * s / d
        return float(mp.ncdf(a - b) - mp.exp(eps) * mp.ncdf(-a - b))


def balle_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. 2020, Prop. 12, minimised over orders, written out independently."""
    eps = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(max(0.0, np.nanmin(eps)))
