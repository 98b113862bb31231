"""CircuitsVis views in saved notebooks (issue 22, part 1): every view renders after the ways
people run cells -- Run All twice, a view's cell re-run, cells out of order -- once the
notebook is saved and reopened or exported with ``jupyter nbconvert --to html``, and the saved
file holds the CircuitsVis bundle at most once.

* (a) nbclient executes a small notebook of views in one kernel, cell by cell in each
  scenario's order; it is saved, exported to HTML, and the export opened in headless Chromium
  (every request blocked and recorded: none may leave the machine);
* (b) a real JupyterLab served on 127.0.0.1 (token disabled, a temporary root), driven with
  playwright and the system Chromium: Run All, Run All again, re-run one cell, save, reload,
  check every view; then export the file it saved and check again.

The kernel runs offline (``HF_HUB_OFFLINE``); nothing here downloads.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")
pytest.importorskip("circuitsvis", reason="pip install 'tlprisms[viz]'")

from tlprisms.render._views_base import CV_GLOBAL  # noqa: E402

#: a saved output carries the bundle iff its HTML holds this (the guarded definition)
BUNDLE_MARK = f"window.{CV_GLOBAL}=(function(){{"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}

#: the notebook: an optional init cell, a set-up cell, then cells that display views in each
#: way a user does (a view as a cell's value, show(), a group of two, a Report); 5 widgets
INIT = "import tlprisms as tp\n\ntp.render.init_notebook()"
SETUP = (
    "import torch\nimport tlprisms as tp\n\n"
    "def view(n):\n"
    "    return tp.render.Widget('ColoredTokens', {'tokens': ['a', 'b', f'v{n}'],\n"
    "                            'values': [1.0, -0.5, float(n)]}, title=f'view {n}')"
)
VIEW_CELLS = [
    "view(1)",
    "tp.render.show(view(2))",
    "pattern = torch.tril(torch.ones(3, 3)); pattern = pattern / pattern.sum(-1, keepdim=True)\n"
    "tp.render.show([view(3), tp.render.attention_pattern(pattern, ['a', 'b', 'c'])])",
    "tp.render.Report('a report').add(view(5))",
    # an attribution graph: its own inline SVG and script (not a CircuitsVis mount)
    "from tlprisms.demo import load_demo_model\n"
    "tp.LogitPrism.run(load_demo_model(), 'The capital of France is').graph(' Paris',"
    " max_nodes=20)",
]
N_VIEWS = 5
#: graph views in the notebook (each drawn once however often its cell ran)
N_GRAPHS = 1


def _notebook(init: bool):
    cells = ([INIT] if init else []) + [SETUP] + VIEW_CELLS
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _bundles(nb) -> int:
    """How many outputs of the saved notebook carry the bundle."""
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            html = out.get("data", {}).get("text/html", "")
            html = "".join(html) if isinstance(html, list) else html
            n += html.count(BUNDLE_MARK)
    return n


def _exporter_urls() -> tuple[str, ...]:
    """The URLs nbconvert's own HTML template loads (require.js, MathJax, the widget
    manager): blocked like every other request; the views themselves may make none."""
    from nbconvert import HTMLExporter

    e = HTMLExporter()
    return tuple(
        u.split("?")[0] for u in (e.require_js_url, e.mathjax_url, e.jupyter_widgets_base_url)
    )


def _export(paths: list[Path]) -> list[Path]:
    """``jupyter nbconvert --to html`` on the saved notebooks (one call for all)."""
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "nbconvert", "--to", "html", *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [p.with_suffix(".html") for p in paths]


#: JavaScript: (mounts, mounts with rendered children, pages' bundle scripts)
COUNT_JS = """() => {
  const m = [...document.querySelectorAll('.tlprisms-cv-mount')];
  return [m.length, m.filter(x => x.firstElementChild).length,
          m.filter(x => !x.firstElementChild).map(x => x.textContent.slice(0, 120))];
}"""


def _look(page, log: dict, html_path: Path) -> dict:
    """Open an export in the (offline) page; what it shows: views, views rendered, the
    unrendered views' text, page errors, requests other than the exporter's own."""
    log["errors"].clear()
    log["requests"].clear()
    page.goto(html_path.as_uri())
    try:
        page.wait_for_function(
            "() => [...document.querySelectorAll('.tlprisms-cv-mount')]"
            ".every(m => m.firstElementChild)",
            timeout=15000,
        )
    except Exception:  # noqa: BLE001 - reported by the counts below
        pass
    total, drawn, texts = page.evaluate(COUNT_JS)
    allowed = _exporter_urls()
    graphs = page.evaluate("() => document.querySelectorAll('.tlprisms-graph svg circle').length")
    return {
        "graphs": graphs,
        "views": total,
        "rendered": drawn,
        "bundles": html_path.read_text(encoding="utf-8").count(BUNDLE_MARK),
        "blank": texts,
        "errors": list(log["errors"]),
        "stray": [u for u in log["requests"] if not u.startswith(allowed)],
    }


def _assert_seen(seen: dict, n_views: int, what: str) -> None:
    assert seen["views"] == n_views, f"{what}: {seen['views']} views, expected {n_views}"
    assert seen["rendered"] == seen["views"], (
        f"{what}: {seen['rendered']} of {seen['views']} views rendered: {seen['blank']}"
    )
    assert not seen["errors"], f"{what}: page errors {seen['errors'][:3]}"
    assert not seen["stray"], f"{what}: requests that would leave the machine: {seen['stray']}"
    assert seen["bundles"] <= 1, f"{what}: {seen['bundles']} bundles in the export"


def _execute(nb, order: list[int], workdir: Path) -> None:
    """Execute ``nb``'s cells in ``order`` (indices, repeats allowed) in one fresh kernel."""
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.reset_execution_trackers()
    with client.setup_kernel(env=dict(os.environ, **OFFLINE_ENV)):
        for i in order:
            client.execute_cell(nb.cells[i], i)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell {i}: {out.get('ename')}: {out.get('evalue')}"


def _all(init: bool) -> list[int]:
    return list(range(len(VIEW_CELLS) + 1 + int(init)))


def _order(scenario: str, init: bool) -> list[int]:
    cells = _all(init)
    setup = int(init)  # the set-up cell's index
    views = cells[setup + 1 :]
    if scenario == "run all twice":
        return cells + cells
    if scenario == "re-run the first view's cell":
        return cells + [views[0]]
    if scenario == "re-run every view cell, last first":
        return cells + views[::-1]
    if scenario == "out of order":  # the last view first, then the others
        return [*cells[: setup + 1], views[-1], *views[:-1]]
    if scenario == "a view before the init cell, then its cell again":
        # the view carries a copy (nothing else did yet) and init_notebook() always emits
        # one; running the view's cell again drops the view's copy
        return [setup, views[-1], *cells[:setup], *views[:-1], views[-1]]
    if scenario == "run all, re-run the first cell, run all":
        return cells + [0] + cells
    raise AssertionError(scenario)


SCENARIOS = [
    "run all twice",
    "re-run the first view's cell",
    "re-run every view cell, last first",
    "out of order",
    "a view before the init cell, then its cell again",
    "run all, re-run the first cell, run all",
]


CASES = [(scenario, init) for scenario in SCENARIOS for init in (True, False)]


def _name(scenario: str, init: bool) -> str:
    return f"{scenario} ({'init_notebook' if init else 'no init'})"


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict:
    """Every scenario run in its own kernel and saved, all exported in one nbconvert call
    and opened in one offline Chromium: {(scenario, init): (saved notebook, seen)}."""
    if not shutil.which("chromium"):
        pytest.skip("no chromium on the PATH (apt-get install chromium)")
    from tlprisms.render._browser import open_page

    root = tmp_path_factory.mktemp("scenarios")
    saved = {}
    for k, (scenario, init) in enumerate(CASES):
        nb = _notebook(init)
        _execute(nb, _order(scenario, init), root)
        path = root / f"case{k}.ipynb"
        nbformat.write(nb, path)
        saved[scenario, init] = path
    exports = dict(zip(saved, _export(list(saved.values()))))
    out = {}
    with open_page(width=1000) as (page, log):
        for case, html in exports.items():
            out[case] = (nbformat.read(saved[case], as_version=4), _look(page, log, html))
    for case, (_, seen) in out.items():
        print(
            f"{_name(*case)}: {seen['rendered']}/{seen['views']} views rendered, "
            f"{seen['bundles']} bundle(s)"
        )
    return out


@pytest.mark.browser
@pytest.mark.notebook
@pytest.mark.parametrize(("scenario", "init"), CASES, ids=[_name(*c) for c in CASES])
def test_saved_notebook_renders_every_view(scenarios, scenario, init):
    saved, seen = scenarios[scenario, init]
    n_bundles = _bundles(saved)
    assert n_bundles == 1, f"{scenario}: {n_bundles} bundles in the saved file"
    if init:  # the init cell carries it, whatever ran after
        assert _bundles(nbformat.from_dict({"cells": [saved.cells[0]]})) == 1
    _assert_seen(seen, N_VIEWS, _name(scenario, init))
    assert seen["graphs"] > 0, f"{_name(scenario, init)}: the graph view drew no nodes"


def test_view_waits_for_a_later_bundle_and_says_what_is_missing(tmp_path):
    """A view whose script runs before the bundle waits for it; with no bundle on the page
    it says to run init_notebook() or re-run the cell (never to trust the notebook)."""
    if not shutil.which("chromium"):
        pytest.skip("no chromium on the PATH (apt-get install chromium)")
    from tlprisms import render
    from tlprisms.render._browser import open_page
    from tlprisms.render._views_base import bundle_script

    w = render.Widget("ColoredTokens", {"tokens": ["x"], "values": [1.0]})
    late = tmp_path / "late.html"
    late.write_text(w.fragment(bundle=False) + bundle_script(), encoding="utf-8")
    none = tmp_path / "none.html"
    none.write_text(w.fragment(bundle=False), encoding="utf-8")
    with open_page() as (page, log):
        page.goto(late.as_uri())
        page.wait_for_function(
            "() => document.querySelector('.tlprisms-cv-mount').firstElementChild", timeout=10000
        )
        page.goto(none.as_uri())
        page.wait_for_function(
            "() => /init_notebook/.test(document.querySelector('.tlprisms-cv-mount').textContent)",
            timeout=10000,
        )
        text = page.evaluate("() => document.querySelector('.tlprisms-cv-mount').textContent")
    assert "re-run this cell" in text and "trust" not in text
    assert not log["errors"] and not log["requests"]


# ------------------------------------------------------------------ (b) a real JupyterLab
#: JupyterLab configuration: no news, no update check, no extension manager querying PyPI
#: (they would fetch from the web); the app exposed as ``window.jupyterapp`` to run commands
LAB_CONFIG = (
    "c.LabApp.news_url = None\n"
    "c.LabApp.extension_manager = 'readonly'\n"
    "c.LabApp.check_for_updates_class = 'jupyterlab.NeverCheckForUpdate'\n"
    "c.LabApp.expose_app_in_browser = True\n"
)
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
#: seconds: the server to answer, a notebook's cells to run
LAB_START_S, LAB_RUN_S = 60, 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Lab:
    """``jupyter lab`` on 127.0.0.1 (token disabled, a temporary root, config and settings),
    stopped by its PID."""

    def __init__(self, root: Path, home: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config, settings = home / "config", home / "settings"
        config.mkdir()
        (config / "jupyter_server_config.py").write_text(LAB_CONFIG)
        for name, value in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = dict(
            os.environ,
            **OFFLINE_ENV,
            JUPYTER_CONFIG_DIR=str(config),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTER_PLATFORM_DIRS="1",
        )
        cmd = [
            str(Path(sys.executable).parent / "jupyter"),
            "lab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={home / 'workspaces'}",
        ] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
        self.log = open(home / "lab.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + LAB_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/status", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise AssertionError(
                        "jupyter lab did not start: " + (home / "lab.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the server shuts its kernels down
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _lab_command(page, command: str, args: dict | None = None) -> None:
    """Start a JupyterLab command (not awaited: a command may wait on a dialog)."""
    page.evaluate(
        "([c, a]) => { window.jupyterapp.commands.execute(c, a); }", [command, args or {}]
    )


def _wait_ran(page, runs: int) -> None:
    """Wait until every code cell shows an execution count and the highest is ``runs``."""
    page.wait_for_function(
        """(runs) => {
          const nb = window.jupyterapp.shell.currentWidget;
          const p = [...nb.node.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
            .map(x => x.textContent);
          const n = p.map(t => (/\\[(\\d+)\\]/.exec(t) || [])[1]).map(Number);
          return p.length && n.every(x => x > 0) && Math.max(...n) === runs
            && nb.sessionContext.session.kernel.status === 'idle';
        }""",
        arg=runs,
        timeout=LAB_RUN_S * 1000,
    )


def _open_notebook(page, url: str) -> None:
    """Open ``url`` and wait for the notebook's cells and an idle kernel."""
    page.goto(url)
    page.wait_for_function(
        """() => { const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
          const k = nb && nb.sessionContext && nb.sessionContext.session
            && nb.sessionContext.session.kernel;
          return k && k.status === 'idle' && nb.node.querySelector('.jp-CodeCell'); }""",
        timeout=LAB_START_S * 1000,
    )


def _lab_views(page) -> tuple[int, int, list]:
    try:
        page.wait_for_function(
            "() => { const m = [...document.querySelectorAll('.tlprisms-cv-mount')];"
            " return m.length && m.every(x => x.firstElementChild); }",
            timeout=20000,
        )
    except Exception:  # noqa: BLE001 - reported by the counts
        pass
    return tuple(page.evaluate(COUNT_JS))


@pytest.mark.browser
@pytest.mark.notebook
def test_jupyterlab_run_save_reload_export(tmp_path):
    """In a real JupyterLab: Run All, Run All again, re-run the first view's cell, save with
    Ctrl+S, reload the page: every view renders; the file it saved holds one bundle, and its
    nbconvert export renders every view too. With and without an init_notebook() cell."""
    if not shutil.which("chromium"):
        pytest.skip("no chromium on the PATH (apt-get install chromium)")
    pytest.importorskip("jupyterlab", reason="pip install -e '.[test]'")
    from playwright.sync_api import sync_playwright

    from tlprisms.render._browser import CHROMIUM_ARGS

    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    books = {"no-init.ipynb": _notebook(False), "init.ipynb": _notebook(True)}
    for name, nb in books.items():
        nbformat.write(nb, root / name)
    lab = _Lab(root, home)
    stray: list[str] = []
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS
            )
            context = browser.new_context(viewport={"width": 1200, "height": 1400})

            def block(r) -> None:
                stray.append(r.request.url)
                r.abort()

            # every request not to the server is aborted and recorded (the server's own pass
            # untouched: a saved notebook is a 1.3 MB request)
            context.route(re.compile(rf"^(?!{re.escape(lab.url)}/)"), block)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            for name, nb in books.items():
                first_view = len(nb.cells) - len(VIEW_CELLS)
                n_code = len(nb.cells)
                _open_notebook(page, f"{lab.url}/lab/tree/{name}?reset")  # only this one open
                _lab_command(page, "notebook:run-all-cells")
                _wait_ran(page, n_code)
                _lab_command(page, "notebook:run-all-cells")
                _wait_ran(page, 2 * n_code)
                page.evaluate(
                    "(i) => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = i; }",
                    first_view,
                )
                _lab_command(page, "notebook:run-cell")
                _wait_ran(page, 2 * n_code + 1)
                before = _lab_views(page)
                page.locator(".jp-Notebook").first.click()
                page.keyboard.press("Control+s")
                path = root / name
                deadline = time.time() + 30
                while _bundles(nbformat.read(path, as_version=4)) == 0:
                    if time.time() > deadline:
                        page.screenshot(path="/tmp/lab-fail.png")
                    assert time.time() < deadline, f"{name}: Ctrl+S saved no outputs"
                    time.sleep(0.5)
                page.wait_for_function(
                    "() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                    timeout=30000,
                )
                page.reload()
                _open_notebook(page, page.url)
                page.wait_for_function(
                    "(n) => window.jupyterapp.shell.currentWidget.context.path === n", arg=name
                )
                after = _lab_views(page)
                saved = nbformat.read(path, as_version=4)
                print(
                    f"JupyterLab {name}: {before[1]}/{before[0]} views before saving, "
                    f"{after[1]}/{after[0]} after the reload, {_bundles(saved)} bundle(s) saved"
                )
                assert before[:2] == (N_VIEWS, N_VIEWS), f"{name} before saving: {before}"
                assert after[:2] == (N_VIEWS, N_VIEWS), f"{name} after reloading: {after}"
                assert _bundles(saved) == 1, f"{name}: {_bundles(saved)} bundles saved"
            browser.close()
    finally:
        lab.stop()
    assert not errors, f"page errors in JupyterLab: {errors[:3]}"
    assert not stray, f"requests that would leave the machine: {stray}"
    from tlprisms.render._browser import open_page

    paths = [root / name for name in books]
    with open_page(width=1000) as (page, log):
        for html in _export(paths):
            seen = _look(page, log, html)
            print(f"JupyterLab {html.name} exported: {seen['rendered']}/{seen['views']} views")
            _assert_seen(seen, N_VIEWS, f"{html.name} (saved by JupyterLab)")
