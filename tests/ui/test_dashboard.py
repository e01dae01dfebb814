"""The auditor dashboard in a real browser against a real server.

Set LEDGER_UI_SCREENSHOTS=docs to (re)write docs/ui-*.png from this run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.service.conftest import ADMIN_KEY, ROOT, Api, LiveServer
from tests.ui.conftest import Browser

PLAN = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": 3, "noise_multiplier": 1.5}
SCREENSHOTS = os.environ.get("LEDGER_UI_SCREENSHOTS")


def _populate(admin: Api) -> None:
    """Two datasets; `mnist` gets a finished run, releases, a cap change and a live hold,
    written by the bootstrap admin, a named trainer key and an unnamed one."""
    body = {"id": "mnist", "epsilon_cap": 5.0, "delta": 1e-5, "description": "handwritten digits"}
    assert admin.post("/v1/datasets", body).status_code == 201
    admin.create_dataset("census", 2.0)
    census_release = {"mechanism": "laplace", "epsilon": 0.5}
    assert admin.post("/v1/datasets/census/releases", census_release).status_code == 201
    named = {"role": "trainer", "datasets": ["mnist"], "name": "mnist notebook"}
    trainer = admin.as_key(admin.post("/v1/keys", named).json()["key"])
    unnamed = admin.as_key(admin.new_key("trainer", ["mnist"]))

    run = trainer.post("/v1/datasets/mnist/runs", PLAN).json()
    for _ in range(2):
        assert trainer.post(f"/v1/runs/{run['id']}/epochs").status_code == 201
    assert trainer.post(f"/v1/runs/{run['id']}/complete").status_code == 200
    release = {"mechanism": "gaussian", "epsilon": 0.3, "delta": 1e-6, "name": "mean age"}
    assert unnamed.post("/v1/datasets/mnist/releases", release).status_code == 201
    assert admin.post("/v1/datasets/mnist/releases", census_release).status_code == 201
    cap = {"epsilon_cap": 4.0, "reason": "tighter policy"}
    assert admin.patch("/v1/datasets/mnist", cap).status_code == 200
    second = admin.post("/v1/datasets/mnist/runs", {**PLAN, "epochs": 4}).json()
    assert admin.post(f"/v1/runs/{second['id']}/epochs").status_code == 201


def _eps(value: float) -> str:
    """The page's ε format (common.js formatEpsilon)."""
    if value == 0:
        return "0"
    return f"{value:.3f}" if abs(value) >= 0.001 else f"{value:.3g}"


def _tab_to(browser: Browser, element_id: str, presses: int = 40) -> int:
    """Press Tab until `element_id` has focus; how many presses it took (fails if never)."""
    for count in range(1, presses + 1):
        browser.page.keyboard.press("Tab")
        if browser.page.evaluate("document.activeElement && document.activeElement.id") == (
            element_id
        ):
            return count
    raise AssertionError(f"Tab never reached #{element_id} in {presses} presses")


def _screenshot(browser: Browser, name: str) -> None:
    if SCREENSHOTS:
        browser.page.screenshot(path=str(ROOT / SCREENSHOTS / name), full_page=True)


def _visible_row_seqs(browser: Browser) -> list[int]:
    seqs = browser.page.locator("#ledger tbody tr:visible").evaluate_all(
        "rows => rows.map(row => Number(row.dataset.seq))"
    )
    return [int(seq) for seq in seqs]


def test_dashboard(live_server: LiveServer, browser: Browser) -> None:
    from playwright.sync_api import expect

    base = live_server()
    page = browser.page
    with httpx.Client(base_url=base, timeout=30) as http:
        admin = Api(http, ADMIN_KEY)
        _populate(admin)
        auditor = admin.as_key(admin.new_key("auditor"))
        datasets = {d["id"]: d for d in auditor.get("/v1/datasets").json()["data"]}
        entries: list[dict[str, Any]] = auditor.get(
            "/v1/datasets/mnist/ledger", params={"limit": 1000}
        ).json()["data"]
        api_csv = auditor.get("/v1/datasets/mnist/ledger", params={"format": "csv"}).text
    seqs = [e["seq"] for e in entries]
    assert len(seqs) >= 10 and seqs == list(range(1, len(seqs) + 1))

    # Sign in with the keyboard alone: Tab reaches the key field, Enter submits.
    page.goto(f"{base}/ui")
    expect(page.locator("#sign-in-section")).to_be_visible()
    _tab_to(browser, "api-key")
    page.keyboard.type(auditor.key or "")
    page.keyboard.press("Enter")

    # The list: one card per dataset, a bar whose figures are the API's.
    cards = page.locator(".dataset-card")
    expect(cards).to_have_count(2)
    assert page.evaluate("sessionStorage.getItem('privacy-ledger.api-key')") == auditor.key
    mnist = datasets["mnist"]
    card = page.locator('.dataset-card[data-dataset="mnist"]')
    bar = card.locator(".bar")
    label = (
        f"ε spent {_eps(mnist['epsilon_spent'])}, reserved {_eps(mnist['epsilon_reserved'])}, "
        f"cap {_eps(mnist['epsilon_cap'])}"
    )
    expect(bar).to_have_attribute("aria-label", label)
    assert 0 < mnist["epsilon_spent"] < mnist["epsilon_reserved"] <= mnist["epsilon_cap"]
    spent_width = bar.locator(".bar-spent").evaluate("node => node.getBoundingClientRect().width")
    track_width = bar.evaluate("node => node.clientWidth")
    ratio = mnist["epsilon_spent"] / mnist["epsilon_cap"]
    assert abs(spent_width / track_width - ratio) < 0.01
    for figure in (mnist["epsilon_spent"], mnist["epsilon_reserved"], mnist["epsilon_cap"]):
        expect(card.locator(".figures")).to_contain_text(_eps(figure))
    expect(card).to_contain_text("handwritten digits")
    _screenshot(browser, "ui-datasets.png")

    # The dataset page: one chart mark and one table row per entry, in seq order.
    card.get_by_role("link", name="mnist").click()
    expect(page).to_have_url(re.compile(r"/ui/datasets/mnist$"))
    points = page.locator("#chart svg [data-seq]")
    expect(points).to_have_count(len(entries))
    # The shares: fixed by the run's hold, the dataset's first admission (the default profile).
    fixing = next(e["seq"] for e in entries if e["kind"] != "dataset_created")
    assert mnist["shares"]["fixed_at_seq"] == fixing
    expect(page.locator("p.shares")).to_contain_text(
        f"first_admission shares of δ over {len(mnist['shares']['orders'])} Rényi orders"
    )
    expect(page.locator("p.shares")).to_contain_text(
        f"fixed by the first admission (ledger entry #{fixing})"
    )
    assert points.evaluate_all("ps => ps.map(p => Number(p.dataset.seq))") == seqs
    rows = page.locator("#ledger tbody tr")
    expect(rows).to_have_count(len(entries))
    assert _visible_row_seqs(browser) == seqs
    kinds = rows.locator("td:nth-child(4)").all_inner_texts()
    assert kinds == [e["kind"] for e in entries]
    # Who: the key's name (the key id where the entry has none) and its role at write time.
    actors = rows.locator("td:nth-child(3)").all_inner_texts()
    assert actors == [
        "\n".join(filter(None, [e["actor_name"] or e["actor"], e["actor_role"]])) for e in entries
    ]
    names = {(e["actor_name"], e["actor_role"]) for e in entries}
    assert {("mnist notebook", "trainer"), ("LEDGER_ADMIN_KEY", "admin"), (None, "trainer")} <= (
        names
    )
    unnamed = next(e for e in entries if e["actor_name"] is None)
    assert actors[unnamed["seq"] - 1] == f"{unnamed['actor']}\ntrainer"
    last = rows.nth(len(entries) - 1)
    expect(last.locator("td").nth(8)).to_have_text(_eps(entries[-1]["epsilon_reserved_after"]))
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    expect(page.locator("#integrity")).to_have_attribute("data-state", "ok")
    expect(page.locator("#integrity .verdict")).to_contain_text("OK")

    # Hover a point: its tooltip; click it: its table row is highlighted.
    cap_change = next(e for e in entries if e["kind"] == "cap_change")
    point = page.locator(f'#chart svg [data-seq="{cap_change["seq"]}"]')
    point.hover()
    tooltip = page.locator("#chart-tooltip")
    expect(tooltip).to_be_visible()
    expect(tooltip).to_contain_text(f"#{cap_change['seq']} cap_change")
    expect(tooltip).to_contain_text("actor LEDGER_ADMIN_KEY (admin), key bootstrap")
    point.click()
    expect(page.locator("#ledger tbody tr.selected")).to_have_attribute(
        "data-seq", str(cap_change["seq"])
    )

    # Filters: by kind, then by run; table rows and chart points follow.
    page.select_option("#filter-kind", "charge")
    charges = [e["seq"] for e in entries if e["kind"] == "charge"]
    expect(page.locator("#ledger tbody tr:visible")).to_have_count(len(charges))
    assert _visible_row_seqs(browser) == charges
    expect(page.locator("#chart svg [data-seq]:visible")).to_have_count(len(charges))
    expect(page).to_have_url(re.compile(r"\?kind=charge$"))
    run_id = entries[1]["run_id"]
    page.select_option("#filter-kind", "")
    page.select_option("#filter-run", run_id)
    in_run = [e["seq"] for e in entries if e["run_id"] == run_id]
    expect(page.locator("#ledger tbody tr:visible")).to_have_count(len(in_run))
    assert _visible_row_seqs(browser) == in_run
    page.click("#filter-reset")
    expect(page.locator("#ledger tbody tr:visible")).to_have_count(len(entries))

    points.nth(len(entries) - 1).hover()
    expect(tooltip).to_contain_text(f"#{entries[-1]['seq']} {entries[-1]['kind']}")
    _screenshot(browser, "ui-dataset.png")

    # Keyboard: from the top of the page, Tab reaches the CSV button; Enter downloads.
    page.evaluate("document.activeElement && document.activeElement.blur()")
    _tab_to(browser, "export-csv")
    with page.expect_download() as csv_download:
        page.keyboard.press("Enter")
    download = csv_download.value
    assert download.suggested_filename == "mnist-ledger.csv"
    downloaded = Path(download.path()).read_bytes().decode()
    assert downloaded == api_csv
    exported = list(csv.DictReader(io.StringIO(downloaded)))
    assert [int(row["seq"]) for row in exported] == seqs
    assert [row["hash"] for row in exported] == [e["hash"] for e in entries]

    with page.expect_download() as json_download:
        page.click("#export-json")
    document = json.loads(Path(json_download.value.path()).read_text())
    assert [e["seq"] for e in document["data"]] == seqs

    # Phone width: the page fits, the table scrolls sideways inside its own box.
    page.set_viewport_size({"width": 375, "height": 800})
    expect(page.locator("#chart svg")).to_have_attribute("width", re.compile(r"^3\d\d$"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.locator(".table-scroll").evaluate("node => node.scrollWidth > node.clientWidth")
    expect(points).to_have_count(len(entries))
    _screenshot(browser, "ui-dataset-phone.png")

    assert browser.errors == []


def test_pages_are_static_and_locked_down(api: Api) -> None:
    """No key needed for the pages; a strict CSP; only the listed files are served."""
    client = api.client
    assert isinstance(client, TestClient)
    for path in ("/ui", "/ui/datasets/mnist"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        # No inline script or style, and nothing from another origin.
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
        assert "style=" not in response.text and "<style" not in response.text
        assert "http://" not in response.text and "https://" not in response.text
    script = client.get("/ui/static/dataset.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text
    assert client.get("/ui/static/../app.py").status_code == 404
    missing = client.get("/ui/static/nothing.js")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    assert client.get("/v1/datasets").status_code == 401  # the data itself still needs a key
