"""The notebooks in a real browser: JupyterLab on localhost, driven in headless Chromium.

nbval proves that every cell runs; it cannot see whether a widget renders and answers in
JupyterLab. For each notebook this test opens a copy in JupyterLab, runs all cells, checks
that none raised, then changes one control of the notebook's explorer the way a student
would (a key press on a slider, a choice in a dropdown, typing in a box) and waits until the
explorer's output area shows what the new value should produce: text computed here with the
same library functions, or the new value's label, and a redrawn figure.

Needs Debian's ``chromium`` and the ``playwright`` package (no browser download: it drives
/usr/bin/chromium). ``.ci/run`` installs both; elsewhere the test is skipped without them
(and fails under CI=true). Screenshots: ``browser-artifacts/`` (after each widget change,
and on failure). Select it alone with ``pytest -m browser tests/test_browser.py``.
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
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import tvlab

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = Path(os.environ.get("TVLAB_BROWSER_ARTIFACTS", ROOT / "browser-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_S = 900       # one notebook, all cells (the slowest takes a few minutes on 2 cores)
WIDGET_TIMEOUT_S = 180        # one widget change (05 runs a small experiment)


def _missing() -> list[str]:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright; no browser download needed)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    root: Path


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on 127.0.0.1 over a temporary copy of the notebooks; always stopped."""
    missing = _missing()
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="tvlab-lab-") as tmp:
        tmp = Path(tmp)
        root, config = tmp / "notebooks", tmp / "config"
        root.mkdir()
        for nb in NOTEBOOKS.glob("*.ipynb"):  # copies without outputs (JupyterLab saves what it runs)
            content = json.loads(nb.read_text())
            for cell in content["cells"]:
                if cell["cell_type"] == "code":
                    cell["outputs"], cell["execution_count"] = [], None
            (root / nb.name).write_text(json.dumps(content))
        settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                               "checkForUpdates": False}))
        env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # Agg would turn figures into text
        env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(tmp / "data"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
                   MPLCONFIGDIR=str(tmp / "mpl"), HF_HUB_OFFLINE="1")
        port, token = _free_port(), secrets.token_hex(16)
        log = open(tmp / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
             "--expose-app-in-browser"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                    if urllib.request.urlopen(request, timeout=5).status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start:\n{(tmp / 'server.log').read_text()[-3000:]}", pytrace=False)
                time.sleep(0.5)
            yield Lab(url, token, root)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


# ---------------------------------------------------------------------------------------------
# What to change in each notebook, and what the explorer must then show.

@dataclass
class Case:
    notebook: str
    title: str                                   # the explorer's bold title
    change: Callable                             # (explorer locator) -> None: what the student does
    expect: Callable = lambda: []                # () -> strings the new text output must contain
    figure: bool = False                         # the output holds a figure that must be redrawn
    ids: list = field(default_factory=list)


def _slider_right(label: str):
    def change(box):
        handle = box.locator(f".widget-slider:has(label:text-is('{label}')) .noUi-handle")
        handle.focus()
        handle.press("ArrowRight")
    return change


def _choose(label: str, option: str):
    return lambda box: box.locator(f".widget-dropdown:has(label:text-is('{label}')) select").select_option(label=option)


def _type_prompt(text: str):
    def change(box):
        area = box.locator(".widget-textarea textarea")
        area.fill(text)
        area.blur()  # continuous_update=False: the value is sent when the box loses focus
    return change


def _select_tasks(*tasks: str):
    return lambda box: box.locator(".widget-select-multiple select").select_option(list(tasks))


_PROMPT = "example:hot->cold\nexample:up->down\nexample:fast->"


def _first_query(task: str) -> str:
    return tvlab.get_task(task).pairs[0].input


CASES = [
    Case("00_welcome", "What comes next?", _type_prompt(_PROMPT),
         lambda: [f"Most likely next token: {tvlab.explore.next_token_probs(_lm(), _PROMPT, k=8)['token'].iloc[0]!r}"],
         figure=True),
    Case("01_icl_basics", "In-context learning, live", _slider_right("demos"),
         lambda: ["Prompt:\n" + tvlab.explore.icl_prompt(_lm(), "antonyms", 6, _first_query("antonyms"))],
         figure=True),
    Case("02_extracting_task_vectors", "Three ways to answer one query", _slider_right("layer"),
         lambda: [tvlab.explore.three_predictions(_lm(), "antonyms", _first_query("antonyms"), 11).table()
                  .to_string(index=False)]),
    Case("03_layer_sweep", "Task-vector accuracy by layer", _select_tasks("to_upper", "prev_letter"), figure=True),
    Case("04_task_vector_geometry", "Task vectors by layer", _slider_right("layer"),
         lambda: ["layer 11: within"], figure=True),
    Case("05_conflicting_tasks", "Who wins", _choose("B (vector)", "en_es"),
         lambda: ["With θ of en_es patched at layer"]),
    Case("06_inspecting_task_vectors", "Top tokens of a task", _choose("task", "country_capital"),
         lambda: ["rank", "token", "logit"]),
    Case("07_comparing_models", "One task, one model", _choose("model", "smollm2-135m"),
         lambda: ["smollm2-135m, to_upper: baseline"], figure=True),
    Case("08_beyond_the_paper", "A bank of task vectors", _choose("vector", "antonyms"),
         lambda: ["with θ of antonyms at layer"]),
]

_MODEL = {}


def _lm():
    if "lm" not in _MODEL:
        _MODEL["lm"] = tvlab.load_model()
    return _MODEL["lm"]


def test_every_notebook_has_a_case():
    assert sorted(c.notebook for c in CASES) == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


_KERNEL_IDLE = "() => { const w = window.jupyterapp.shell.currentWidget; " \
               "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel; " \
               "return !!(k && w.sessionContext.isReady && k.connectionStatus === 'connected' && k.status === 'idle'); }"
_ALL_RUN = "() => { const w = window.jupyterapp.shell.currentWidget; " \
           "const cells = w.content.widgets.filter(c => c.model.type === 'code'); " \
           "return w.sessionContext.session.kernel.status === 'idle' " \
           "&& cells.every(c => c.model.executionCount !== null); }"
_PENDING = "() => window.jupyterapp.shell.currentWidget.content.widgets" \
           ".map((c, i) => [c, i]).filter(([c, i]) => c.model.type === 'code' && c.model.executionCount === null)" \
           ".map(([c, i]) => i)"
_ERRORS = "() => window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code')" \
          ".flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error')" \
          ".map(o => o.ename + ': ' + o.evalue)"


def _text(out) -> str:
    return "\n".join(out.locator("[data-mime-type='application/vnd.jupyter.stdout']").all_inner_texts())


def _image_src(out) -> str | None:
    img = out.locator("[data-mime-type='image/png'] img")
    return img.first.get_attribute("src") if img.count() else None


@pytest.mark.parametrize("case", CASES, ids=[c.notebook for c in CASES])
def test_notebook_runs_and_its_explorer_answers(case, lab, browser):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob(f"{case.notebook}-*.png"):  # screenshots of this run only
        old.unlink()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        # A workspace of its own: no tabs of earlier notebooks restored next to this one.
        page.goto(f"{lab.url}/lab/workspaces/{case.notebook}/tree/{case.notebook}.ipynb?reset&token={lab.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        page.wait_for_function(_KERNEL_IDLE, timeout=120_000)
        page.locator(".jp-NotebookPanel .jp-Cell").first.click()  # the notebook commands act on the focused one
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        deadline, idle_since, reruns = time.monotonic() + RUN_ALL_TIMEOUT_S, None, 0
        while not page.evaluate(_ALL_RUN):  # a cell that raises stops run-all: fail at once, with its error
            errors = page.evaluate(_ERRORS)
            assert not errors, f"a cell raised in JupyterLab: {errors}"
            assert time.monotonic() < deadline, f"the cells did not finish in {RUN_ALL_TIMEOUT_S} s"
            if page.evaluate(_KERNEL_IDLE):  # idle with cells never run: run-all was lost; ask once more
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 20:
                    pending = page.evaluate(_PENDING)
                    assert reruns == 0, f"cells {pending} never ran, although the kernel is idle"
                    print(f"{case.notebook}: cells {pending} did not run; running all cells again")
                    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
                    idle_since, reruns = None, 1
            else:
                idle_since = None
            page.wait_for_timeout(1000)
        assert page.evaluate(_ERRORS) == [], "a cell raised in JupyterLab"

        box = page.locator(".widget-vbox").filter(has=page.locator(".widget-html", has_text=case.title)).last
        box.scroll_into_view_if_needed()
        out = box.locator(".widget-output")
        expect(out.locator("[data-mime-type]").first).to_be_visible(timeout=60_000)  # drawn on display
        before_text, before_src = _text(out), _image_src(out)

        case.change(box)
        wanted = case.expect()
        deadline = time.monotonic() + WIDGET_TIMEOUT_S
        while True:
            text, src = _text(out), _image_src(out)
            redrawn = src not in (None, before_src) if case.figure else text != before_text
            if (redrawn and all(w in text for w in wanted)) or time.monotonic() > deadline:
                break
            page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / f"{case.notebook}-after-change.png"), full_page=False)
        missing = [w for w in wanted if w not in text]
        assert not missing, f"after the change the explorer shows:\n{text}\n\nmissing: {missing}"
        if case.figure:
            assert src is not None and src != before_src, "the figure was not redrawn"
            assert out.locator("[data-mime-type='image/png'] img").first.evaluate("i => i.complete && i.naturalWidth > 0")
        else:
            assert text != before_text, "the output did not change"
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / f"{case.notebook}-failure.png"), full_page=True)
        raise
    finally:
        page.close()
        _shut_down_kernels(lab)  # each holds a model: never let them pile up


def _shut_down_kernels(lab: Lab) -> None:
    def call(method: str, path: str):
        request = urllib.request.Request(f"{lab.url}{path}", method=method,
                                         headers={"Authorization": f"token {lab.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    for session in call("GET", "/api/sessions"):
        call("DELETE", f"/api/sessions/{session['id']}")
