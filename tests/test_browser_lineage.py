"""The Dagster web UI and the explorer in a real browser (headless Chromium, Playwright): after a real pipeline
run, the asset graph shows the stages, the lineage job launched from its launchpad shows a pair's whole chain
(ids and links to the runs and asset partitions) as rendered markdown in the run's event log, and the explorer
finds a pair by one search, goes to its document and back, and follows a link into the Dagster run that made it.

Screenshots go to artifacts/browser/ (CI keeps them): asset_graph.png, lineage.png, explore_pair.png,
explore_document.png, explore_shard.png, and <test>-failure.png when a test fails."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import copy_pipeline_run, smoke_env
from tests.servers import LOCATION, REPO, DagsterDev, free_port, start_dagster_dev, stop_group

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = "FINEINSTRUCTIONS_REQUIRE_BROWSER"  # set in CI: a missing browser fails instead of skipping
# Without the background-networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "artifacts" / "browser"
WAIT_MS = 60_000  # per wait: the first loads of a page are slow on 2 cores
RUN_MS = 300_000  # a launched run: queued, picked up by the daemon, started in a process of its own

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get(REQUIRE_BROWSER),
                       reason=f"no Chromium at {CHROMIUM} (set {REQUIRE_BROWSER}=1 to make this a failure)"),
]


@pytest.fixture(scope="module")
def ui(tmp_path_factory, pipeline_run, smoke_model, sample_inputs) -> Iterator[tuple[DagsterDev, Path]]:
    """A copy of the session's real pipeline run (its root and instance), then `dagster dev` over both with the
    instance configuration `make dev` uses."""
    root, home = copy_pipeline_run(pipeline_run, tmp_path_factory.mktemp("ui"))
    shutil.copy(REPO / "deploy" / "dagster.local.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), **smoke_env(root, smoke_model, sample_inputs)}
    with start_dagster_dev(env, home / "dagster_dev.log") as server:
        yield server, root


@pytest.fixture(scope="module")
def pair(ui) -> dict:
    _, root = ui
    pairs = pl.read_parquet(root / "fineinstructions" / "*.parquet")
    assert pairs.height > 0, f"the pipeline produced no pairs under {root}"
    return pairs.sort("pair_id").row(0, named=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{REQUIRE_BROWSER} is set but there is no Chromium at {CHROMIUM}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    # Dagster's first-visit "Join the Dagster community" dialog covers every page until dismissed: mark it
    # seen (its localStorage key), and should it show anyway, press its Skip button whenever it is in the way.
    context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.set_default_navigation_timeout(WAIT_MS)
    page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                             lambda: page.get_by_role("button", name="Skip").click())
    yield page
    context.close()


@contextmanager
def screenshot_on_failure(page, name: str, server: DagsterDev):
    try:
        yield
    except Exception as e:
        shot = ARTIFACTS / f"{name}-failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception:  # noqa: BLE001 (the page may be gone; the original error matters)
            shot = None
        raise AssertionError(f"{e}\n\npage: {page.url}\nscreenshot: {shot}\n"
                             f"dagster dev log ({server.log_path}):\n{server.log_tail(2000)}") from e


def graph_groups() -> dict[str, list[str]]:
    """The code location's groups and their assets (the dbt models aside: their labels repeat table names)."""
    from fineinstructions_dagster.definitions import defs

    groups: dict[str, list[str]] = {}
    for node in defs.resolve_asset_graph().asset_nodes:
        if len(node.key.path) == 1:
            groups.setdefault(node.group_name, []).append(node.key.path[0])
    return groups


def test_asset_graph_shows_every_stage(ui, page):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    server, _ = ui
    with screenshot_on_failure(page, "asset_graph", server):
        page.goto(f"{server.url}/asset-groups")  # "Global asset lineage": one box per group until expanded
        expect(page.get_by_text("Global asset lineage")).to_be_visible()
        expect(page.get_by_role("button", name="pairs").first).to_be_visible()
        # The graph's own settings button (the gear at its bottom right), not the navigation's "Settings".
        gear = page.get_by_role("button").filter(has=page.get_by_role("img", name="settings", exact=True)) \
            .filter(has_not_text="Settings")
        gear.click()
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
        page.keyboard.press("Escape")
        expect(page.get_by_role("menuitem")).to_have_count(0)  # the settings menu is closed
        # Expanded, the whole graph fits the window only below the scale at which Dagster draws nodes (it then
        # draws the groups' outlines alone), so each group is opened as a user would: a double click zooms to it.
        for group, assets in graph_groups().items():
            page.get_by_role("button", name=re.compile(rf"^asset_group {group}\b")).first.dblclick()
            for asset in assets:
                expect(page.get_by_text(asset, exact=True).filter(visible=True).first,
                       f"asset {asset} in group {group}").to_be_visible()
            if group == "judging":  # the middle of the graph, at a scale that shows its nodes: the picture
                try:
                    page.wait_for_load_state("networkidle")  # node colours (materialized: green) load after
                except PlaywrightTimeoutError:
                    pass  # the picture may show grey nodes; the checks do not depend on it
                page.mouse.move(0, 0)  # no hover highlight in the picture
                page.screenshot(path=str(ARTIFACTS / "asset_graph.png"))
            page.mouse.dblclick(5, page.viewport_size["height"] // 2)  # the background: back to the whole graph
        # The pipeline's materializations are in the instance: the pairs asset, both shards materialized.
        page.get_by_role("button", name=re.compile(r"^asset_group pairs\b")).first.dblclick()
        page.get_by_text("fineinstructions", exact=True).filter(visible=True).first.click()
        expect(page.get_by_role("heading", name="fineinstructions", exact=True)).to_be_visible()
        expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
        expect(page.get_by_text("2/2", exact=True).first).to_be_visible()


def test_lineage_job_from_the_launchpad_shows_the_chain(ui, pair, page):
    from playwright.sync_api import expect

    server, _ = ui
    pair_id = pair["pair_id"]
    with screenshot_on_failure(page, "lineage", server):
        page.goto(f"{server.url}/locations/{LOCATION}/jobs/lineage_job/playground")
        expect(page.get_by_role("button", name="Launch Run")).to_be_visible()
        # The config editor is CodeMirror 5 (no accessible role). Typing line by line fights its auto-indent
        # and autocompletion; one insertText event puts the YAML in verbatim, replacing the default config.
        editor = page.locator(".CodeMirror").first
        editor.click()
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.insert_text(f"ops:\n  trace_pair_lineage:\n    config:\n      pair_id: {pair_id}\n")
        expect(editor).to_contain_text(f"pair_id: {pair_id}")
        expect(page.get_by_text("No errors", exact=True)).to_be_visible()  # validated against the job's schema
        expect(page.get_by_text("No missing config", exact=True)).to_be_visible()
        page.get_by_role("button", name="Launch Run").click()

        page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}$"))
        run_id = page.url.rsplit("/", 1)[1]
        status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
        expect(status, f"run {run_id} to finish").to_be_visible(timeout=RUN_MS)
        assert status.inner_text() == "Success", f"lineage_job run {run_id} ended {status.inner_text()}"

        # Only the observation in the event log (a virtualized list), then its markdown metadata.
        page.get_by_placeholder("Filter").fill("type:ASSET_OBSERVATION")
        page.get_by_text("[Show Markdown]").first.click()
        dialog = page.get_by_role("dialog").filter(has_text=pair_id)
        expect(dialog.get_by_role("table")).to_be_visible()
        for step_id in (pair_id, pair["template_id"], pair["doc_id"], pair["judgement_id"],
                        pair["instantiation_id"], pair["match_id"], pair["query_id"]):
            expect(dialog.get_by_role("cell", name=step_id, exact=True)).to_be_visible()
        shot = ARTIFACTS / "lineage.png"
        dialog.screenshot(path=str(shot))
        text = dialog.inner_text()
        for step_id in (pair_id, pair["template_id"], pair["doc_id"]):
            assert step_id in text, f"{step_id} not in the rendered lineage (see {shot}):\n{text}"
        hrefs = dialog.get_by_role("link").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert any(h and h.startswith("/runs/") for h in hrefs), f"no /runs/ link in the lineage ({shot}): {hrefs}"
        assert f"/runs/{pair['run_id']}" in hrefs, f"no link to the pair's run {pair['run_id']} ({shot}): {hrefs}"
        partition = f"/assets/fineinstructions?view=partitions&partition={pair['shard']}"
        assert partition in hrefs, f"no link to {partition} ({shot}): {hrefs}"

        # The pair step's run link opens the run that wrote the pair.
        dialog.get_by_role("link", name=pair["run_id"][:8], exact=True).first.click()
        page.wait_for_url(re.compile(rf"/runs/{pair['run_id']}"))
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()


@pytest.fixture(scope="module")
def explorer(ui) -> Iterator[str]:
    """`fineinstructions explore` over the same root, linking to the same Dagster UI."""
    import subprocess
    import time
    import urllib.request

    server, root = ui
    port = free_port()
    cli = Path(sys.executable).with_name("fineinstructions")
    log = ARTIFACTS.parent / "explore.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(cli), "--root", str(root), "explore", "--port", str(port), "--dagster-url",
                                 server.url], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"the explorer did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, grace=10)


def test_explorer_finds_a_pair_goes_to_its_document_and_back_then_into_its_dagster_run(ui, pair, page, explorer):
    from playwright.sync_api import expect

    server, _ = ui
    with screenshot_on_failure(page, "explore", server):
        page.goto(explorer)
        page.get_by_label("search").fill(pair["pair_id"])
        page.get_by_label("search").press("Enter")
        page.wait_for_url(f"{explorer}/pair/{pair['pair_id']}")
        for section in ("Pair", "Query", "Template", "Match", "Document", "Instantiation", "Judgement"):
            expect(page.get_by_role("heading", name=re.compile(f"^{section} "))).to_be_visible()
        expect(page.locator(".slot").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "explore_pair.png"), full_page=True)

        page.locator("#document").get_by_role("link", name=pair["doc_id"], exact=True).click()
        page.wait_for_url(f"{explorer}/document/{pair['doc_id']}")
        expect(page.get_by_role("link", name=pair["pair_id"], exact=True)).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "explore_document.png"), full_page=True)
        page.go_back()
        page.wait_for_url(f"{explorer}/pair/{pair['pair_id']}")

        page.goto(f"{explorer}/shard/{pair['shard']}")
        expect(page.locator("svg")).to_have_count(3)
        page.screenshot(path=str(ARTIFACTS / "explore_shard.png"), full_page=True)
        page.go_back()

        # into the Dagster UI: the run that wrote the pair
        page.locator("#pair").get_by_role("link", name="run", exact=True).click()
        page.wait_for_url(re.compile(rf"/runs/{pair['run_id']}"))
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
