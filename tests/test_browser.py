"""A real browser: JupyterLab in headless Chromium opens notebook 7, runs it, moves a slider, clicks Run, and sees
the plot and the table change. Saves a screenshot to `artifacts/browser/`.

Uses Debian's chromium (/usr/bin/chromium, or $MOELAB_CHROMIUM) driven by the `playwright` Python package;
`playwright install` is never needed. Without chromium the test skips with the reason, unless
MOELAB_REQUIRE_BROWSER=1 (set by `.ci/run`), where it fails instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "07_compare_backends.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = os.environ.get("MOELAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("MOELAB_REQUIRE_BROWSER") == "1"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _unavailable() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium, or set MOELAB_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download)"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    reason = _unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"MOELAB_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then SIGTERM / SIGKILL its process group."""
    try:
        _request(f"{base}/api/shutdown?token={token}", "POST", timeout=5)
        proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the server's pid
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def lab(tmp_path, browser_ready):
    """A throw-away JupyterLab serving a copy of notebook 7 (so the repository's copy is never autosaved)."""
    root = tmp_path / "root"
    root.mkdir()
    # a copy without stored outputs or widget state: everything the test sees comes from this run's kernel
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (root / NOTEBOOK.name).write_text(json.dumps(nb), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    dirs = {}
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTERLAB_SETTINGS_DIR",
                "JUPYTERLAB_WORKSPACES_DIR"):
        dirs[var] = tmp_path / var.lower()
        dirs[var].mkdir()
        env[var] = str(dirs[var])
    # no news / update pop-up over the page
    notification = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (dirs["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json").write_text(
        json.dumps({"FileContentsManager": {"delete_to_trash": False}}))
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    jupyter = Path(sys.executable).with_name("jupyter")
    log_path = tmp_path / "lab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
             "--ServerApp.port_retries=0", "--allow-root", f"--IdentityProvider.token={token}",
             "--LabApp.expose_app_in_browser=True", "--ServerApp.root_dir", str(root)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = _request(f"{base}/api/status?token={token}", timeout=2)
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200, f"JupyterLab did not start:\n{log_path.read_text(errors='replace')[-3000:]}"
        yield {"base": base, "token": token, "log": log_path, "notebook": NOTEBOOK.name}
    finally:
        _stop(proc, base, token)


KERNEL_IDLE = """() => {
    const app = window.jupyterapp;
    const w = app && app.shell.currentWidget;
    const ctx = w && w.sessionContext;
    return !!(ctx && ctx.session && ctx.session.kernel && ctx.session.kernel.status === 'idle');
}"""

# textContent, not innerText: JupyterLab may skip rendering cells outside the viewport, and innerText of an
# unrendered element is empty
RESULTS_STATE = """() => {
    const table = document.querySelector('.widget-output table.moelab-results');
    const img = document.querySelector('.widget-output img');
    const status = [...document.querySelectorAll('.widget-html')].map(e => e.textContent).join(' | ');
    return {table: table ? table.textContent : null, img: img ? img.src.length + ':' + img.src.slice(-64) : null,
            status};
}"""

STATUS_SAYS = """(text) => [...document.querySelectorAll('.widget-html')].some(e => e.textContent.includes(text))"""


def test_notebook_7_in_jupyterlab_slider_and_run_change_plot_and_table(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = f"{lab['base']}/lab/tree/{lab['notebook']}?token={lab['token']}&reset"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=60_000)
            page.wait_for_function("() => !!(window.jupyterapp && window.jupyterapp.shell.currentWidget)",
                                   timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            # fire run-all without awaiting its promise (awaiting it hangs), then wait on the widgets' DOM
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            page.wait_for_selector(".widget-slider .noUi-handle", timeout=90_000)
            page.wait_for_function("() => !!document.querySelector('.widget-output table.moelab-results') && "
                                   "!!document.querySelector('.widget-output img')", timeout=90_000)
            # the explorer's own status line says it ran
            page.wait_for_function(STATUS_SAYS, arg="ran eager, batched_mm, grouped_mm", timeout=90_000)
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            page.locator(".widget-slider").filter(has_text="top_k").first.scroll_into_view_if_needed()
            before = page.evaluate(RESULTS_STATE)
            assert "top_k=2" in before["status"], before
            page.screenshot(path=str(ARTIFACTS / "explorer_before.png"), full_page=False)

            # move the top_k slider one step right: 2 -> 3
            top_k = page.locator(".widget-slider").filter(has_text="top_k").first
            top_k.scroll_into_view_if_needed()
            handle = top_k.locator(".noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-slider')].some(s => "
                "s.textContent.includes('top_k') && s.querySelector('.widget-readout').textContent.trim() === '3')",
                timeout=10_000)

            page.locator(".widget-button", has_text="Run").first.click()
            page.wait_for_function(
                "(old) => { const t = document.querySelector('.widget-output table.moelab-results');"
                " const img = document.querySelector('.widget-output img');"
                " return t && img && t.textContent !== old.table"
                " && (img.src.length + ':' + img.src.slice(-64)) !== old.img; }",
                arg=before, timeout=60_000)
            after = page.evaluate(RESULTS_STATE)
            assert "top_k=3" in after["status"], after
            # the top_k column of every table row now reads 3
            rows = page.evaluate("""() => {
                const t = document.querySelector('.widget-output table.moelab-results');
                const head = [...t.querySelectorAll('thead th')].map(th => th.textContent.trim());
                const col = head.indexOf('top_k');
                return [...t.querySelectorAll('tbody tr')].map(tr => tr.children[col].textContent.trim());
            }""")
            assert rows and set(rows) == {"3"}, rows
            page.locator(".widget-output img").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "explorer_after.png"), full_page=False)
        finally:
            browser.close()
    assert (ARTIFACTS / "explorer_after.png").stat().st_size > 10_000
