"""A pytest plugin `dev.py test` loads (``-p tests.skip_summary``): one line per skip reason.

pytest's own ``-rs`` prints one line per skipped test location, so a suite run
without PostgreSQL printed the same reason about 45 times. This prints each
distinct reason once, with how many tests it skipped, and leaves pass/fail
reporting to pytest.
"""

from __future__ import annotations

from collections import Counter

import pytest


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skipped test's report gives (without pytest's "Skipped: " prefix)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_lines(reports: list[pytest.TestReport]) -> list[str]:
    """ "SKIPPED N tests: reason" for each distinct reason, most frequent first."""
    reasons = Counter(skip_reason(r) for r in reports if r.skipped)
    return [
        f"SKIPPED {n} test{'s' if n != 1 else ''}: {reason}" for reason, n in reasons.most_common()
    ]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the folded skip reasons in the short test summary's place."""
    lines = skip_lines(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.section("skipped, by reason", sep="-")
        for line in lines:
            terminalreporter.line(line)
