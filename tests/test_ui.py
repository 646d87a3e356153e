"""The MLflow UI as a user sees it: Debian's chromium driven by Playwright against `scripts/mlflow_ui.sh`
on 127.0.0.1, over a store holding a 2-job sweep. Screenshots are kept in the test's temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, free_port, live_group_members, loopback_server, run_cli, store_overrides
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")
# as the workplace's own probe runs it: no sandbox as root, nothing that calls out to the network
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # never skipped in CI
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("ui")
    sweep = [o for o in TINY_RUN if not o.startswith("trainer.epochs")] + ["trainer.epochs=2"]
    result = run_cli(["-m", *sweep, *store_overrides(tmp), "trainer.seed=1,2", "tracking.system_metrics_interval=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    runs = MlflowClient(uri).search_runs(["1"])
    [parent] = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    port = free_port()
    with loopback_server([str(ROOT / "scripts" / "mlflow_ui.sh"), str(port), uri],
                         f"http://127.0.0.1:{port}/health") as server:
        yield {"base": f"http://127.0.0.1:{port}", "parent": parent, "children": children, "tmp": tmp,
               "server": server}


@pytest.fixture
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_ui_is_light(ui):
    """One web worker and no job runner: at most 3 processes and 600 MB resident in all."""
    members = live_group_members(ui["server"].pid)
    resident = sum(_rss_mb(pid) for pid in members)
    assert 1 <= len(members) <= 3, members
    assert resident < 600, f"{resident:.0f} MB"


def test_runs_page_nests_the_jobs_under_the_sweep_with_datasets_and_val_auc(ui, page):
    page.goto(f"{ui['base']}/#/experiments/1?workflowType=machine_learning", wait_until="load")
    page.get_by_text("matching runs").wait_for()
    assistant = page.get_by_role("button", name="Close")  # MLflow's chat panel: room for the table
    if assistant.count():
        assistant.first.click()
    children = [page.locator(f'a[href$="/runs/{run_id}"]') for run_id in ui["children"]]
    assert [link.count() for link in children] == [0, 0]  # folded under their parent
    parent_row = page.locator('[role="row"]', has_text=ui["parent"].info.run_name[:20])
    parent_row.locator("button[data-component-id*=runnamecellrenderer]").click()  # unfold
    for link in children:
        link.wait_for()
    datasets = page.locator('[role="gridcell"][col-id="attributes.`Dataset`"]').all_inner_texts()
    assert sum("synthetic-training" in cell and "synthetic-validation" in cell for cell in datasets) == 2
    page.get_by_test_id("column-selection-dropdown").first.click()
    page.get_by_placeholder("Search columns").fill("val_auc")
    matches = page.locator("strong", has_text="val_auc")  # the search marks its match in each name
    matches.first.wait_for()
    [exact] = [m for m in matches.all() if m.evaluate("e => e.parentElement.innerText.trim()") == "val_auc"]
    exact.click()
    page.keyboard.press("Escape")
    header = page.locator('[role="columnheader"][col-id="metrics.`val_auc`"]')
    header.scroll_into_view_if_needed()  # the grid draws only the columns in view
    cells = page.locator('[role="gridcell"][col-id="metrics.`val_auc`"]')
    cells.first.wait_for()
    values = [text for text in cells.all_inner_texts() if text.strip() not in ("", "-")]
    assert len(values) == 2 and all(0 <= float(v) <= 1 for v in values)
    page.screenshot(path=str(ui["tmp"] / "runs_page.png"))


def test_a_childs_training_curves_render(ui, page):
    run_id = ui["children"][0]
    page.goto(f"{ui['base']}/#/experiments/1/runs/{run_id}/artifacts/plots/training_curves.png", wait_until="load")
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") == 800  # the figure's own width
    page.screenshot(path=str(ui["tmp"] / "training_curves.png"))


def test_system_metrics_tab_shows_charts(ui, page):
    run_id = ui["children"][0]
    page.goto(f"{ui['base']}/#/experiments/1/runs/{run_id}/system-metrics", wait_until="load")
    page.get_by_text("cpu_utilization_percentage").first.wait_for()
    page.locator("svg.main-svg").first.wait_for()
    assert page.locator("svg.main-svg").count() >= 3
    page.screenshot(path=str(ui["tmp"] / "system_metrics.png"))


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
