"""Dashboard fixtures: the live server on SQLite only, and a headless system Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# The service fixtures, reused as they are; `database_url` below narrows them to SQLite.
from tests.service.conftest import api, live_server, migrated_url  # noqa: F401

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page

CHROMIUM = Path(os.environ.get("LEDGER_UI_CHROMIUM", "/usr/bin/chromium"))
# Never `playwright install`: the tests drive the system's Chromium, offline.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A SQLite file: the dashboard is storage-agnostic, so one backend is enough here."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@dataclass
class Browser:
    """One page in headless Chromium, with every console error and uncaught exception seen."""

    page: Page
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A fresh browser context at laptop width; skips when Playwright or Chromium is absent."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("dashboard tests need the `playwright` package (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"dashboard tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(
                viewport={"width": 1280, "height": 900}, accept_downloads=True
            )
            page = context.new_page()
            page.set_default_timeout(10_000)
            seen = Browser(page)

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    seen.errors.append(f"console: {message.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda error: seen.errors.append(f"page error: {error}"))
            yield seen
            context.close()
        finally:
            chromium.close()
