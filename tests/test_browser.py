"""The MLflow UI as a user meets it, in a real browser: Playwright driving Debian's chromium.

``tuneval ui`` serves a store filled by a tiny two-seed run; the test opens the URL it prints on
a fresh profile at 1600x1000 and checks the runs table (not MLflow's GenAI overview), each run's
name, the seed group's mean, the primary metric without scrolling sideways, the run page's Logged
models and artifacts, then the report's HTML chart. Screenshots land in the test's tmp dir (the
runs table also in ``$TUNEVAL_SCREENSHOTS`` when set: ``docs/mlflow-runs.png`` is made that way).

Not in the default run (``-m browser``; ``make test-browser``): it needs a browser. Playwright's own
browser download needs the network, so the system's chromium is used (``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_cli import children_of, free_port, group_alive
from test_logged_model import run_plain

from tuneval.cli.main import main

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1600, "height": 1000}
CHROMIUM = os.environ.get("TUNEVAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 60_000


@pytest.fixture
def browser():
    if CHROMIUM is None:
        why = "needs Debian's chromium: `apt-get install chromium` (or set TUNEVAL_CHROMIUM=/path/to/chrome)"
        if os.environ.get("TUNEVAL_REQUIRE_BROWSER"):  # CI installed it: a skip would hide its absence
            pytest.fail(why)
        pytest.skip(why)
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: chromium refuses to run as root with its sandbox (CI containers).
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield b
        b.close()


@pytest.fixture
def ui(project: Path):
    """A two-seed tiny run, then `tuneval ui` on its store: yields the runs-table URL it prints."""
    cfg = project / "pipelines.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["pipelines"]["smoke"]["seeds"] = [1, 2]
    cfg.write_text(yaml.safe_dump(raw))
    results = run_plain(project)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneval.cli", "ui", "--config", str(cfg), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    groups: list[int] = []
    try:
        deadline = time.time() + 90
        while not any(x.startswith("  smoke: http") for x in list(lines)):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.3)
        groups = [os.getpgid(c) for c in children_of(proc.pid)]
        [link] = [x.split(": ", 1)[1].strip() for x in lines if x.startswith("  smoke: ")]
        yield link, results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for g in groups:
            if group_alive(g):
                os.killpg(g, signal.SIGKILL)


def shoot(page, tmp_path: Path, name: str, publish: bool = False) -> None:
    """A screenshot in the test's tmp dir; ``publish``: also in $TUNEVAL_SCREENSHOTS (the README's)."""
    page.screenshot(path=str(tmp_path / name))
    if publish and (folder := os.environ.get("TUNEVAL_SCREENSHOTS")):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(folder) / name)


def js_number(x: float) -> str:
    """How the UI prints a metric (JavaScript's Number#toString): 1 for 1.0, else Python's repr."""
    return str(int(x)) if float(x).is_integer() else repr(x)


def row_text(page, run_name: str) -> str:
    """The whole row of a run: the grid renders pinned (name) and scrolling (metrics) parts apart."""
    name = page.locator("[role=row][row-index]").filter(has=page.get_by_text(run_name, exact=True)).first
    index = name.get_attribute("row-index")
    return " | ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())


def test_a_new_user_lands_on_the_runs_table_and_finds_model_and_report(
    ui, browser, project: Path, tmp_path: Path
) -> None:
    start = time.perf_counter()
    link, results = ui
    page = browser.new_context(viewport=VIEWPORT).new_page()  # a fresh profile
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(link)
    page.get_by_text("tiny__toy__seed1", exact=True).first.wait_for()
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    assert page.get_by_text("No data available for the selected time range").count() == 0  # not GenAI's overview
    for name in ("tiny__toy", "tiny__toy__seed1", "tiny__toy__seed2"):
        assert page.get_by_text(name, exact=True).count() >= 1, name
    mean = sum(r["metrics"]["accuracy"] for r in results) / 2
    assert js_number(mean) in row_text(page, "tiny__toy")  # the parent row carries the seed mean
    best = max(results, key=lambda r: r["metrics"]["accuracy"])
    assert js_number(best["metrics"]["accuracy"]) in row_text(page, f"tiny__toy__seed{best['seed']}")
    # The primary metric sorts the table and is on screen without scrolling sideways.
    header = page.get_by_role("columnheader", name="test_accuracy_mean").first.bounding_box()
    assert header and header["x"] + header["width"] <= VIEWPORT["width"]
    assert page.get_by_text("Sort: test_accuracy_mean").count() == 1
    close = page.locator("button[aria-label=Close]")  # MLflow's assistant panel opens on a first visit
    if close.count():
        close.first.click()
    shoot(page, tmp_path, "mlflow-runs.png", publish=True)

    # The run page: its Logged models entry and its artifacts.
    page.get_by_text(f"tiny__toy__seed{best['seed']}", exact=True).first.click()
    from playwright.sync_api import expect

    page.get_by_text("Logged models (1)").first.wait_for()
    section = page.get_by_text("Logged models (1)").first.locator("xpath=ancestor::*[4]")
    expect(section).to_contain_text(f"tiny__toy__seed{best['seed']}")  # the LoggedModel, by its name
    expect(section).to_contain_text("Ready")
    shoot(page, tmp_path, "mlflow-run.png")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("predictions", exact=True).first.wait_for()
    shoot(page, tmp_path, "mlflow-artifacts.png")

    # The report's HTML, with its chart loaded.
    out = tmp_path / "reports"
    assert main(["report", "--config", str(project / "pipelines.yaml"), "--out", str(out)]) == 0
    page.goto((out / "smoke" / "report.html").as_uri())
    page.wait_for_function("() => [...document.images].length > 0 && [...document.images].every(i => i.complete)")
    assert page.evaluate("() => document.images[0].naturalWidth") > 0
    shoot(page, tmp_path, "report.png")
    print(f"browser part: {time.perf_counter() - start:.1f} s")
