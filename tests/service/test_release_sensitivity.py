"""A release's charge honours its sensitivity Δ, for every mechanism and form, over HTTP.

Each release (no `values`: the caller adds the noise) goes to a fresh dataset; its ledger entry's
own ε and the dataset's spent ε are recomputed here independently of `accountant`: the RDP
curve from its closed form (Laplace: Mironov 2017, Prop. 6, at 60 digits; Gaussian:
α Δ²/(2σ²), Prop. 7; pure ε-DP: Bun & Steinke 2016, Prop. 3.3), converted by
dp_accounting over the dataset's own orders, at δ for the entry and at δ/|Λ| for the filter's
spent figure (docs/accounting.md §3). The analytic Gaussian σ for (ε, δ) is checked against
Balle & Wang's published figures scaled by Δ.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from tests.accountant.accountant_reference import (
    analytic_gaussian_delta,
    bun_steinke_pure_dp_rdp,
    laplace_rdp,
)
from tests.service.conftest import ADMIN_KEY, Api, LiveServer

DELTA = 1e-5
SENSITIVITIES = (0.5, 3.0, 17.0)
# Balle & Wang 2018 at Δ = 1 (/work/shared/reference/published-figures.md), 4 decimals.
PUBLISHED_SIGMA = {
    (1.0, 1e-5): 3.7306,
    (0.5, 1e-5): 7.0318,
    (2.0, 1e-5): 1.9938,
    (1.0, 1e-6): 4.2247,
}

# (name, the request without its sensitivity)
FORMS: list[tuple[str, dict[str, Any]]] = [
    ("laplace+epsilon", {"mechanism": "laplace", "epsilon": 0.7}),
    ("laplace+noise_scale", {"mechanism": "laplace", "noise_scale": 2.5}),
    ("gaussian+epsilon+delta", {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5}),
    ("gaussian+epsilon+delta-2", {"mechanism": "gaussian", "epsilon": 0.5, "delta": 1e-5}),
    ("gaussian+epsilon+delta-3", {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6}),
    ("gaussian+noise_scale", {"mechanism": "gaussian", "noise_scale": 20.0}),
    ("gaussian+noise_scale+delta", {"mechanism": "gaussian", "noise_scale": 20.0, "delta": 1e-6}),
    ("pure_dp+epsilon", {"mechanism": "pure_dp", "epsilon": 0.3}),
]


def _curve(release: dict[str, Any], orders: list[float]) -> list[float]:
    """The release's RDP curve on `orders`, from its closed form (not from `accountant`)."""
    sensitivity, scale = release["sensitivity"], release["noise_scale"]
    if release["mechanism"] == "pure_dp":
        return [bun_steinke_pure_dp_rdp(release["epsilon"], a) for a in orders]
    if release["mechanism"] == "laplace":
        return [laplace_rdp(scale / sensitivity, a) for a in orders]
    # Mironov 2017, Prop. 7: the Gaussian mechanism of std σ and L2 sensitivity Δ.
    return [a * sensitivity**2 / (2 * scale**2) for a in orders]


def _epsilon(curve: list[float], orders: list[float], delta: float) -> float:
    return float(rdp_privacy_accountant.compute_epsilon(orders, curve, delta)[0])


def _check_release_form(admin: Api, trainer: Api, name: str, sensitivity: float) -> None:
    form = dict(FORMS)[name]
    label = f"{name}, Δ={sensitivity}"
    dataset_id = f"{name.replace('+', '-')}-{sensitivity:g}".replace(".", "_")
    # Uniform shares: the spent figure below is recomputed at δ/|Λ| on every order.
    admin.create_dataset(dataset_id, 1000.0, DELTA, shares={"profile": "uniform"})
    response = trainer.post(
        f"/v1/datasets/{dataset_id}/releases", {**form, "sensitivity": sensitivity}
    )
    assert response.status_code == 201, (label, response.text)
    release = response.json()
    assert release["sensitivity"] == sensitivity, label

    # The noise scale and the release's own ε, against closed forms and published figures.
    mechanism, scale = form["mechanism"], release["noise_scale"]
    if mechanism == "laplace" and "epsilon" in form:
        assert scale == pytest.approx(sensitivity / form["epsilon"], rel=1e-12), label
    elif mechanism == "laplace":
        assert release["epsilon"] == pytest.approx(sensitivity / form["noise_scale"]), label
    elif mechanism == "gaussian" and "epsilon" in form:
        published = PUBLISHED_SIGMA[(form["epsilon"], form["delta"])] * sensitivity
        assert scale == pytest.approx(published, abs=5e-5 * sensitivity), label
    elif mechanism == "gaussian":
        used_delta = form.get("delta", DELTA)
        assert release["delta"] == used_delta, label
        # ε is the analytic Gaussian's: at it, σ gives exactly δ (Balle & Wang, Thm. 8).
        achieved = analytic_gaussian_delta(scale, release["epsilon"], sensitivity)
        assert achieved == pytest.approx(used_delta, rel=1e-6), label
    else:
        assert scale is None and release["epsilon"] == form["epsilon"], label

    entries = admin.get(f"/v1/datasets/{dataset_id}/ledger").json()["data"]
    orders = [float(a) for a in entries[0]["details"]["orders"]]
    charge = entries[-1]
    assert charge["kind"] == "charge" and charge["release_id"] == release["id"], label
    curve = _curve(release, orders)
    # A pure ε-DP release (Laplace, pure_dp) is also counted by the filter's pure-sum member,
    # exactly: its own ε and the dataset's spent are then the lesser of that and the RDP figure.
    pure = release["epsilon"] if mechanism in ("laplace", "pure_dp") else math.inf
    own = min(_epsilon(curve, orders, DELTA), pure)
    assert charge["epsilon"] == pytest.approx(own, rel=1e-9), label
    spent = min(_epsilon(curve, orders, DELTA / len(orders)), pure)
    dataset = admin.get(f"/v1/datasets/{dataset_id}").json()
    assert dataset["epsilon_spent"] == pytest.approx(spent, rel=1e-9), label
    assert release["dataset"]["epsilon_spent"] == dataset["epsilon_spent"], label
    assert np.isfinite(charge["epsilon"]) and charge["epsilon"] > 0, label


def test_every_release_form_is_charged_for_its_sensitivity(live_server: LiveServer) -> None:
    base = live_server()
    with httpx.Client(base_url=base, timeout=30) as http:
        admin = Api(http, ADMIN_KEY)
        trainer = admin.as_key(admin.new_key("trainer"))
        for name, _ in FORMS:
            for sensitivity in SENSITIVITIES:
                _check_release_form(admin, trainer, name, sensitivity)
