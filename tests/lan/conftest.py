"""LAN test fixtures: skip with a reason where namespaces are unavailable; report figures."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.lan.harness import unavailable_reason

FIGURES: dict[str, Any] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = unavailable_reason()
    for item in items:
        if "tests/lan/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.lan)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_line("LAN figures: " + json.dumps(FIGURES, sort_keys=True))
