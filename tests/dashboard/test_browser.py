"""The dashboard in a real browser: headless Chromium (the system's, Debian package
``chromium``) driven by Playwright, against three real nodes on loopback.

One page, opened once with a token, watches the whole module: the nodes and their states,
a ``map`` of 50 tasks in the task stream and its progress, a failed task's traceback and
auction record, a screenshot under load, and a node stopped with SIGSTOP going suspect,
then dead. Every wait has a deadline (Playwright's ``expect``).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client.local import LocalMesh
from tests.dashboard.conftest import need, token_url

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WAIT_MS = 30_000
ARTIFACTS = Path(os.environ.get("MESH_ARTIFACTS", "artifacts"))


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    need(os.path.exists(CHROMIUM), "system Chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser: sync_api.Browser, dash_mesh: LocalMesh) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(token_url(dash_mesh))
    yield pg
    context.close()
    assert not errors, f"the page raised: {errors}"


def test_without_token_no_data(browser: sync_api.Browser, dash_mesh: LocalMesh) -> None:
    context = browser.new_context()
    pg = context.new_page()
    resp = pg.goto(dash_mesh.nodes["node-1"].url + "/dashboard")
    assert resp is not None
    assert resp.status == 401
    sync_api.expect(pg.locator("input[name=token]")).to_be_visible()
    assert pg.locator("#peers").count() == 0
    feed = pg.request.get(dash_mesh.nodes["node-1"].url + "/dashboard/feed")
    assert feed.status == 401
    context.close()


def test_lists_three_nodes(page: sync_api.Page) -> None:
    assert page.url.endswith("/dashboard"), "the token must leave the address bar"
    for name in ("node-1", "node-2", "node-3"):
        row = page.locator(f"#peers tr[data-node='{name}']")
        sync_api.expect(row).to_have_attribute("data-state", "alive", timeout=WAIT_MS)
    sync_api.expect(page.locator("#conn")).to_have_text("live")


def test_map_streams_and_completes(page: sync_api.Page, dash_mesh: LocalMesh) -> None:
    with dash_mesh.client("node-2") as c:
        assert c.gather(c.map("sleep", [0.05] * 50)) == [0.05] * 50
    group = page.locator(".group", has_text="sleep (batch")
    sync_api.expect(group.locator(".count")).to_have_text("50/50", timeout=WAIT_MS)
    bars = page.locator("#stream rect.task[data-name='sleep']")
    sync_api.expect(bars).to_have_count(50, timeout=WAIT_MS)
    ran_on = {bars.nth(i).get_attribute("data-node") for i in range(50)}
    assert len(ran_on) >= 2, f"50 tasks should spread over the mesh, ran on {ran_on}"


def test_failed_task_shows_traceback(page: sync_api.Page, dash_mesh: LocalMesh) -> None:
    with dash_mesh.client("node-3") as c, pytest.raises(Exception, match="dashboard-boom"):
        c.submit("fail", "dashboard-boom").result(timeout=30)
    bar = page.locator("#stream rect.task[data-name='fail'][data-state='failed']")
    sync_api.expect(bar).to_have_count(1, timeout=WAIT_MS)
    bar.dispatch_event("click")
    error = page.locator("#detail-error")
    sync_api.expect(error).to_contain_text("dashboard-boom", timeout=WAIT_MS)
    sync_api.expect(error).to_contain_text("Traceback")
    sync_api.expect(page.locator("#detail-why .why")).to_contain_text("winner", timeout=WAIT_MS)
    sync_api.expect(page.locator("#events")).to_contain_text("failed")


def test_screenshot_under_load(page: sync_api.Page, dash_mesh: LocalMesh) -> None:
    with dash_mesh.client("node-1") as c:
        futures = c.map("sleep", [0.2] * 60)
        page.locator(".group", has_text="running").first.wait_for(timeout=WAIT_MS)
        page.locator("#stream rect.task[data-state='running']").first.wait_for(timeout=WAIT_MS)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = (ARTIFACTS / "dashboard.png").resolve()
        page.screenshot(path=str(shot), full_page=True)
        c.gather(futures)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_hung_node_turns_suspect_then_dead(page: sync_api.Page, dash_mesh: LocalMesh) -> None:
    # Stopped, not killed: its port still takes connections, so only the silence tells
    # (a killed node's port refuses them, and the node is dead at once).
    node = dash_mesh.nodes["node-3"]
    node.signal(signal.SIGSTOP)
    try:
        events = page.locator("#events")
        sync_api.expect(events).to_contain_text("node-3 is suspect", timeout=WAIT_MS)
        sync_api.expect(events).to_contain_text("node-3 is dead", timeout=WAIT_MS)
        row = page.locator("#peers tr[data-node='node-3']")
        sync_api.expect(row).to_have_attribute("data-state", "dead", timeout=WAIT_MS)
    finally:
        node.kill()
