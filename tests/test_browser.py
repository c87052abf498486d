"""The notebooks in a real browser: JupyterLab in headless Chromium, driven by Playwright.

One JupyterLab server (a free 127.0.0.1 port, a random token, temporary settings, workspaces,
config, data and runtime folders, so no user configuration leaks in) and one Chromium serve every
``notebooks/*.ipynb``, each in its own page. Its kernel is this interpreter's, in smoke mode
(``CTXSEG_SMOKE=1``). The test opens the notebook, runs all cells and asserts that

* no cell raised (an ``error`` output in the notebook model) and no other kernel message was an
  error either: an interact callback that raises shows its traceback inside its Output widget,
  which is not a cell output; every IOPub ``error`` message is caught on the way in;
* no widget shows "Error displaying widget", none is left at "Loading widget...", and at least
  one widget view is rendered (a notebook without widgets opts out with
  ``"ctxseg": {"expects_widgets": false}`` in its metadata, as for ``test_notebooks.py``);
* every interactive control of every widget (sliders, integer or float, dropdowns, toggle
  buttons, checkboxes, multiple selections; an input of any other kind fails the test) is
  changed as a user would change it (a focused slider handle and a key, an option chosen, a
  button clicked), from the notebook's own state, and each must redraw the figure of its cell:
  a change after which the kernel sends no figure, or that raises, fails. The test looks for a
  visible change (``<img>`` sources and ``<canvas>`` pixels, so ipympl figures count too): a
  slider is moved one step, then to either end, a dropdown or toggle tries up to three other
  options, until the figure changes; a control all of whose changes redraw the same picture (a
  threshold below every score of a smoke-mode model) passes and is reported. A control with a
  single option has nothing to change. Across the notebooks at least one control must have
  redrawn (``test_a_control_redrew_a_figure``).

Screenshots (the whole notebook, and after a control that failed) go to the test's
``tmp_path``; their paths are printed (``pytest -s``).

The browser is Chromium from the system (Debian's ``chromium`` package; no browser download):
``$CTXSEG_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH. Without one the tests
skip, unless ``CTXSEG_REQUIRE_BROWSER=1`` (CI), where a missing browser fails them.

The server's root is a temporary folder, never the checkout: it holds a copy of the notebook,
links to the repository's top-level entries (so the notebooks find ``ROOT`` by its ``ctxseg/``
folder as usual) and its own ``runs/``. The committed notebooks stay byte-identical (asserted).
"""

import json
import os
import re
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
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))

SERVER_TIMEOUT = 180  # s for JupyterLab to answer its API
LOAD_TIMEOUT = 120  # s for the Lab page to start and the notebook's kernel to be ready
RUN_TIMEOUT = 300  # s for all cells of one notebook (smoke notebooks take 10-60 s under nbclient)
RENDER_TIMEOUT = 60  # s for widget views to render after the run
REDRAW_TIMEOUT = 90  # s for the kernel to handle a control's change
SETTLE_MS = 1000  # ms without a change, once the kernel has handled the change, before trying another
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SHOT_HEIGHT = 12000  # px: the whole-notebook screenshot grows the viewport up to this height

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Lab settings for a quiet, deterministic page: no news or update toasts, no autosave, every
# cell kept in the DOM (the default windowing skips rendering cells out of view).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/sessionDialogs": {"skipKernelRestartDialog": True},
}


def _ids(paths):
    return [p.name for p in paths]


def find_chromium() -> tuple[str | None, str]:
    """The Chromium executable to use, or None and why none was found."""
    tried = []
    env = os.environ.get("CTXSEG_CHROMIUM")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, ""
        tried.append(f"CTXSEG_CHROMIUM={env!r} (not an executable file)")
    else:
        tried.append("$CTXSEG_CHROMIUM (unset)")
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found, ""
        tried.append(f"{name!r} on PATH")
    return None, ("no Chromium found: tried " + ", ".join(tried)
                  + "; install Debian's `chromium` or set CTXSEG_CHROMIUM to a Chromium executable")


def _unavailable(reason: str) -> None:
    """Skip, or fail where CI demands the browser test (``CTXSEG_REQUIRE_BROWSER=1``)."""
    if os.environ.get("CTXSEG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CTXSEG_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _require_module(name: str) -> None:
    """``pytest.importorskip`` that fails instead where CI demands the browser test."""
    try:
        __import__(name)
    except ImportError as err:
        _unavailable(f"{name} is not importable ({err}); `pip install -e '.[dev]'`")


def test_a_missing_browser_or_package_skips_or_fails_where_ci_requires_it(monkeypatch):
    monkeypatch.delenv("CTXSEG_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        _unavailable("no Chromium found")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_ctxseg is not importable"):
        _require_module("no_such_module_ctxseg")
    monkeypatch.setenv("CTXSEG_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="CTXSEG_REQUIRE_BROWSER=1 but no Chromium found"):
        _unavailable("no Chromium found")
    with pytest.raises(pytest.fail.Exception, match="CTXSEG_REQUIRE_BROWSER=1 but no_such_module_ctxseg"):
        _require_module("no_such_module_ctxseg")
    _require_module("json")  # present: neither


def test_find_chromium_reports_why(monkeypatch, tmp_path):
    """Without a browser the finder says what it tried (so the skip reason is useful)."""
    monkeypatch.setenv("CTXSEG_CHROMIUM", str(tmp_path / "no-such-chromium"))
    monkeypatch.setenv("PATH", str(tmp_path))
    path, reason = find_chromium()
    assert path is None
    assert "no-such-chromium" in reason and "'chromium' on PATH" in reason
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_chromium() == (str(fake), "")


# ------------------------------------------------------------------------------------------------
# Fixtures: the browser, the server, one page per notebook.


@pytest.fixture(scope="module")
def chromium() -> str:
    path, reason = find_chromium()
    if path is None:
        _unavailable(reason)
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        _unavailable(f"playwright is not importable ({err}); `pip install playwright` (no browser download needed)")
    pw = sync_playwright().start()
    try:
        # Loopback only: never a proxy. Playwright passes --no-sandbox itself (we may run as root).
        b = pw.chromium.launch(executable_path=chromium, args=["--no-proxy-server", "--disable-dev-shm-usage"],
                               timeout=120_000)
    except Exception as err:
        pw.stop()
        pytest.fail(f"Chromium at {chromium} did not start: {err}", pytrace=False)
    print(f"\nChromium {b.version} at {chromium}")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, token: str, method: str = "GET", timeout: float = 5):
    """A request to the server, bypassing any proxy settings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"},
                                 data=b"" if method == "POST" else None)
    with opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, url: str, token: str) -> None:
    """Shut the server down with its kernels; then signal its process group if it lingers."""
    if proc.poll() is None:
        try:
            _api(f"{url}/api/shutdown", token, method="POST")
        except (OSError, urllib.error.URLError, ValueError):
            pass
    for sig, wait in ((None, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Kernels left behind in the server's group (it is its own session) go too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory):
    """JupyterLab on a free loopback port; yields ``url``, ``token`` and ``root`` (served folder)."""
    _require_module("jupyterlab")
    _require_module("ipywidgets")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    (root / "notebooks").mkdir(parents=True)
    # The notebooks find ROOT by walking up to a folder holding ctxseg/: link the checkout's
    # top-level entries (not notebooks/, runs/ or dot-folders), so ROOT is this folder and the
    # runs the notebooks train are written to its own runs/.
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("notebooks", "runs"):
            continue
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())

    dirs = {name: base / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir()
    for plugin, values in LAB_SETTINGS.items():
        f = dirs["settings"] / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))

    env = dict(os.environ)
    for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTERLAB_DIR", "JUPYTER_PREFER_ENV_PATH",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),  # no user kernelspecs: python3 is this interpreter's
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PLATFORM_DIRS="1",
        # What test_notebooks' _kernel_env sets; kernels inherit the server's environment.
        CTXSEG_SMOKE="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    port, token = _free_port(), secrets.token_hex(24)
    url = f"http://127.0.0.1:{port}"
    log = base / "jupyterlab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp
        "--LabApp.news_url=None",
        "--LabApp.extension_manager=readonly",  # never asks PyPI
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode} before answering:\n{_tail(log)}",
                            pytrace=False)
            try:
                _api(f"{url}/api/status", token)
                break
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer {url}/api within {SERVER_TIMEOUT} s:\n{_tail(log)}",
                            pytrace=False)
            time.sleep(0.5)
        print(f"\nJupyterLab at {url} serving {root} (log: {log})")
        yield {"url": url, "token": token, "root": root, "log": log}
    finally:
        _stop(proc, url, token)


# ------------------------------------------------------------------------------------------------
# Browser-side helpers (JavaScript run in the page; the notebook panel lives in window.__ctxseg).

OPEN_JS = """
async ([path, ms]) => {
  // page.evaluate waits for ever: bound every wait.
  const bounded = (promise, what) => Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`${what} took more than ${ms / 1000} s`)), ms))]);
  const app = window.jupyterapp;
  await bounded(app.started.then(() => app.restored), 'starting JupyterLab');
  const panel = await bounded(app.commands.execute('docmanager:open', {path, factory: 'Notebook'}),
                              `opening ${path}`);
  await bounded(panel.context.ready.then(() => panel.sessionContext.ready), `starting the kernel of ${path}`);
  app.shell.activateById(panel.id);
  // comms: widget messages sent to the kernel (count) and those it has not finished handling
  // yet (its IOPub 'idle' status for them not received): quiet when every one is handled.
  // frames: figures the kernel sent (a PNG displayed, or an ipympl canvas frame).
  const state = {panel, sent: {}, errors: [], kernels: [], comms: 0, pending: new Set(), frames: 0};
  window.__ctxseg = state;
  const watch = (kernel) => {
    if (!kernel) return;
    state.kernels.push(kernel.name);
    // Every message to and from the kernel: execute requests (to name the cell of an error)
    // and every IOPub error, wherever it is displayed (cell output or an Output widget).
    kernel.anyMessage.connect((_, args) => {
      const msg = args.msg;
      const type = msg.header.msg_type;
      if (args.direction === 'send' && type === 'execute_request') {
        state.sent[msg.header.msg_id] = msg.content.code;
      } else if (args.direction === 'send' && type === 'comm_msg') {
        state.comms += 1;
        state.pending.add(msg.header.msg_id);
      } else if (args.direction === 'recv' && type === 'status' && msg.content.execution_state === 'idle') {
        state.pending.delete((msg.parent_header || {}).msg_id);
      } else if (args.direction === 'recv' && ((type.endsWith('display_data') && 'image/png' in (msg.content.data || {}))
                                              || (type === 'comm_msg' && (msg.buffers || []).length))) {
        state.frames += 1;
      } else if (args.direction === 'recv' && type === 'error') {
        const parent = msg.parent_header || {};
        state.errors.push({parent_type: parent.msg_type || null, code: state.sent[parent.msg_id] ?? null,
                           ename: msg.content.ename, evalue: msg.content.evalue,
                           traceback: msg.content.traceback});
      }
    });
  };
  watch(panel.sessionContext.session?.kernel);
  panel.sessionContext.kernelChanged.connect((_, change) => watch(change.newValue));
  return panel.sessionContext.session?.kernel?.name ?? null;
}
"""

RUN_ALL_JS = """
() => {
  const {panel} = window.__ctxseg;
  window.jupyterapp.shell.activateById(panel.id);
  window.jupyterapp.commands.execute('notebook:run-all-cells');
}
"""

STATE_JS = """
() => {
  const s = window.__ctxseg;
  const model = s.panel.content.model;
  const cells = [];
  for (let i = 0; i < model.cells.length; i++) {
    const c = model.cells.get(i);
    if (c.type !== 'code') continue;
    const source = c.sharedModel.getSource();
    cells.push({index: i, source, count: c.executionCount, running: c.executionState === 'running',
                outputs: c.outputs.toJSON().map(o => ({output_type: o.output_type, ename: o.ename,
                                                       evalue: o.evalue, traceback: o.traceback,
                                                       mimes: Object.keys(o.data || {})}))});
  }
  const dialogs = [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText.trim());
  return {kernel: s.panel.sessionContext.session?.kernel?.status ?? null, cells, errors: s.errors, dialogs};
}
"""

# Widget views rendered in the notebook's output areas, ones still loading, and broken ones.
# (A widget renderer's output node carries no data-mime-type; the view is its child.)
WIDGETS_JS = """
() => {
  const node = window.__ctxseg.panel.node;
  const outputs = [...node.querySelectorAll('.jp-OutputArea-output')];
  return {
    views: node.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets').length,
    loading: outputs.filter(o => o.textContent.trim().startsWith('Loading widget')).length,
    broken: outputs.filter(o => o.textContent.includes('Error displaying widget')).length,
  };
}
"""

# Every interactive control of the notebook's widgets (in its cells' outputs; ipympl's own
# figure toolbars aside): each gets data-ctxseg-control=k and its cell's output area
# data-ctxseg-outputs=k. Kinds: slider (IntSlider, FloatSlider: a noUi handle), dropdown, toggle
# (ToggleButtons), checkbox, select (SelectMultiple, Select). Any other input, select, textarea or
# button in a widget is listed as unknown, for the test to fail on: a control nobody moves.
CONTROLS_JS = """
() => {
  const panel = window.__ctxseg.panel;
  const cells = panel.content.widgets;
  const mpl = '.jupyter-matplotlib, .jupyter-matplotlib-toolbar';
  const kinds = [
    ['slider', '.widget-hslider, .widget-vslider', (el) => el.querySelector('.noUi-handle')],
    ['dropdown', '.widget-dropdown', (el) => el.querySelector('select')],
    ['toggle', '.widget-toggle-buttons', (el) => el.querySelector('button')],
    ['checkbox', '.widget-checkbox', (el) => el.querySelector('input[type=checkbox]')],
    ['select', '.widget-select', (el) => el.querySelector('select')],
  ];
  const claimed = new Set();
  const found = [];
  const areas = [...panel.node.querySelectorAll('.jp-Cell-outputArea')];
  for (const [kind, selector, part] of kinds) {
    panel.node.querySelectorAll(selector).forEach((el) => {
      if (claimed.has(el) || el.closest(mpl) || !el.closest('.jp-Cell-outputArea') || !part(el)) return;
      claimed.add(el);
      const k = found.length;
      const area = el.closest('.jp-Cell-outputArea');
      el.dataset.ctxsegControl = String(k);
      area.dataset.ctxsegOutputs = String(areas.indexOf(area));
      const text = (e) => (e ? e.textContent.replace(/\\u200b/g, '').trim() : '') || null;
      const label = text(el.querySelector('.widget-label')) ?? text(el.querySelector('label span'));
      const cell = cells.findIndex((c) => c.node.contains(el));
      found.push({k, kind, cell, label, area: areas.indexOf(area),
                  figures: area.querySelectorAll('img, canvas').length});
    });
  }
  // In page order (a cell's controls top to bottom), renumbered.
  const els = found.map((c) => document.querySelector(`[data-ctxseg-control="${c.k}"]`));
  const order = found.map((_, i) => i).sort((a, b) =>
    els[a].compareDocumentPosition(els[b]) & Node.DOCUMENT_POSITION_FOLLOWING ? -1 : 1);
  const sorted = order.map((i, k) => { els[i].dataset.ctxsegControl = String(k); return {...found[i], k}; });
  const unknown = [];
  panel.node.querySelectorAll('.jp-Cell-outputArea .jupyter-widgets').forEach((view) => {
    view.querySelectorAll('input, select, textarea, button').forEach((e) => {
      if (e.closest(mpl) || [...claimed].some((c) => c.contains(e))) return;
      unknown.push(`${e.tagName.toLowerCase()} in ${[...view.classList].join('.')}`);
    });
  });
  return {controls: sorted, unknown: [...new Set(unknown)]};
}
"""

# The state of control k: the slider's value and bounds, the options and the chosen ones.
CONTROL_STATE_JS = """
(k) => {
  const el = document.querySelector(`[data-ctxseg-control="${k}"]`);
  const h = el.querySelector('.noUi-handle');
  if (h) return {now: h.getAttribute('aria-valuenow'), min: h.getAttribute('aria-valuemin'),
                 max: h.getAttribute('aria-valuemax')};
  const select = el.querySelector('select');
  if (select) return {options: [...select.options].map((o) => o.text), multiple: select.multiple,
                      chosen: [...select.selectedOptions].map((o) => o.index)};
  const box = el.querySelector('input[type=checkbox]');
  if (box) return {checked: box.checked};
  const buttons = [...el.querySelectorAll('button')];
  return {options: buttons.map((b) => b.textContent.trim()),
          chosen: buttons.flatMap((b, i) => (b.classList.contains('mod-active') ? [i] : []))};
}
"""

# What the figures in output area k look like now: <img> sources, <canvas> pixels.
FIGURES_JS = """
(k) => {
  const out = document.querySelector(`[data-ctxseg-outputs="${k}"]`);
  if (!out) return '';
  const parts = [...out.querySelectorAll('img, canvas')].map(e => {
    if (e.tagName === 'IMG') return e.complete ? e.src : '';
    try { return e.width && e.height ? e.toDataURL() : ''; } catch (err) { return 'tainted'; }
  });
  return parts.filter(Boolean).join('|');
}
"""

# Every ipympl figure (a canvas widget, e.g. notebook 05's explorer) has a size and drawn pixels:
# an ipympl figure closed by a backend switch renders as an empty box without any error.
MPL_FIGURES_JS = """
() => [...document.querySelectorAll('.jupyter-matplotlib-figure')].map(fig => {
  const c = fig.querySelector('canvas');
  if (!c || !c.width || !c.height) return {w: c ? c.width : 0, h: c ? c.height : 0, drawn: false};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let drawn = false;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] && (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250)) { drawn = true; break; }
  }
  return {w: c.width, h: c.height, drawn};
})
"""

# After a control changed (the widget message sent): until the figures of output area k differ
# from ``before`` (changed), an error arrives, or the kernel has handled every widget message sent
# since and ``settle`` ms passed without a change: then ``same`` when it sent a figure meanwhile
# (redrawn, the same picture) and ``quiet`` when it sent none (not redrawn); or ``limit`` ms.
WAIT_REDRAW_JS = """
async ([k, before, errors, comms, frames, settle, limit]) => {
  const s = window.__ctxseg;
  const figures = (FIGURES);
  const start = Date.now();
  let quietSince = null;
  while (Date.now() - start < limit) {
    const now = figures(k);
    if (now && now !== before) return {outcome: 'changed', ms: Date.now() - start};
    if (s.errors.length > errors) return {outcome: 'error', ms: Date.now() - start};
    if (s.comms > comms && s.pending.size === 0) {
      quietSince = quietSince ?? Date.now();
      if (Date.now() - quietSince > settle) {
        return {outcome: s.frames > frames ? 'same' : 'quiet', ms: Date.now() - start};
      }
    } else {
      quietSince = null;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return {outcome: 'timeout', ms: Date.now() - start};
}
""".replace("(FIGURES)", "(" + FIGURES_JS.strip() + ")")

KERNEL_CHECK_JS = """
async ([code, ms]) => {
  const kernel = window.__ctxseg.panel.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, silent: false, store_history: false});
  let text = '';
  future.onIOPub = (msg) => { if (msg.header.msg_type === 'stream') text += msg.content.text; };
  await Promise.race([future.done, new Promise((resolve) => setTimeout(resolve, ms))]);
  return text;
}
"""

# The notebook's full height (its scrolling element), with the file browser collapsed.
SCROLL_HEIGHT_JS = """
() => {
  window.jupyterapp.shell.collapseLeft();
  const node = window.__ctxseg.panel.content.node;
  return Math.max(node.scrollHeight, ...[...node.querySelectorAll('*')].slice(0, 5).map(n => n.scrollHeight));
}
"""

SCROLL_TOP_JS = """
() => {
  const node = window.__ctxseg.panel.content.node;
  for (const n of [node, ...node.querySelectorAll('.jp-WindowedPanel-outer')]) n.scrollTop = 0;
}
"""

SHUTDOWN_JS = """
async (ms) => {
  const s = window.__ctxseg;
  if (!s) return;
  await Promise.race([s.panel.sessionContext.shutdown(), new Promise((resolve) => setTimeout(resolve, ms))]);
  s.panel.dispose();
}
"""


def _first_line(source: str) -> str:
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "%"))]
    return (lines[0] if lines else source.strip())[:80]


def _describe_error(err: dict) -> str:
    tb = ANSI.sub("", "\n".join(err.get("traceback") or []))
    tail = "\n".join(tb.strip().splitlines()[-6:])
    return f"{err.get('ename')}: {err.get('evalue')}\n{tail}"


def _where(err: dict, cells: list[dict]) -> str:
    """The cell an IOPub error came from (by its execute request), or the widget event."""
    if err["parent_type"] == "execute_request":
        for c in cells:
            if err["code"] is not None and c["source"] == err["code"]:
                return f"cell {c['index']} ({_first_line(c['source'])!r})"
        return "a kernel request outside the cells"
    return f"a widget callback (kernel message {err['parent_type']!r})"


def _screenshot(page, path: Path, whole_notebook: bool = False) -> None:
    """Save a screenshot; the whole notebook grows the viewport to the notebook's height first."""
    if whole_notebook:
        height = page.evaluate(SCROLL_HEIGHT_JS)
        page.set_viewport_size({"width": VIEWPORT["width"],
                                "height": max(VIEWPORT["height"], min(MAX_SHOT_HEIGHT, height + 300))})
        page.evaluate(SCROLL_TOP_JS)
        page.wait_for_timeout(500)
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        if whole_notebook:
            page.set_viewport_size(VIEWPORT)
    print(f"screenshot: {path}")


def _wait_run(page, name: str) -> dict:
    """Poll until every non-empty code cell ran and the kernel is idle (or a cell failed)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    settled = 0
    while True:
        state = page.evaluate(STATE_JS)
        todo = [c for c in state["cells"] if c["source"].strip() and (c["count"] is None or c["running"])]
        failed = any(o["output_type"] == "error" for c in state["cells"] for o in c["outputs"])
        if state["kernel"] == "idle" and (not todo or failed):
            settled += 1  # idle twice in a row: not a gap between two queued cells
            if settled >= 2:
                return state
        else:
            settled = 0
        if state["kernel"] in ("dead", "autorestarting", "restarting"):
            pytest.fail(f"{name}: the kernel died ({state['kernel']}); cells not run: "
                        f"{[c['index'] for c in todo]}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: not done within {RUN_TIMEOUT} s; kernel {state['kernel']}; cells not run: "
                        f"{[(c['index'], _first_line(c['source'])) for c in todo]}; dialogs: {state['dialogs']}",
                        pytrace=False)
        time.sleep(0.25)


def _wait_widgets(page, name: str) -> dict:
    deadline = time.monotonic() + RENDER_TIMEOUT
    while True:
        w = page.evaluate(WIDGETS_JS)
        if not w["loading"] or time.monotonic() > deadline:
            return w
        time.sleep(0.5)


def _changes(kind: str, state: dict, shown: set[str] = frozenset()) -> list[tuple[str, object]]:
    """The changes to try on a control, in order, until one redraws its figure: a slider one step,
    then to either end; another option of a dropdown, select or toggle buttons (up to three; first
    those that another dropdown of the cell shows, ``shown``, whose figure is often computed
    already: notebook 05's run pickers); a checkbox flipped; a multiple selection cut to the first
    option, to the last, or all."""
    if kind == "slider":
        step = "ArrowLeft" if float(state["now"]) >= float(state["max"]) else "ArrowRight"
        return [("key", step), ("key", "End"), ("key", "Home")]
    if kind == "checkbox":
        return [("click", None)]
    n, chosen = len(state["options"]), state["chosen"]
    if kind == "select" and state.get("multiple"):
        subsets = [[0], [n - 1], list(range(n))]
        return [("choose", sub) for k, sub in enumerate(subsets) if sub != chosen and sub not in subsets[:k]]
    first = chosen[0] if chosen else -1
    others = sorted(((first + d) % n for d in range(1, n)), key=lambda i: state["options"][i] not in shown)
    return [("choose" if kind != "toggle" else "click", i) for i in others[:3]]


def _value(state: dict) -> str:
    """A control's value, for messages: a slider's number, the chosen options, a box's state."""
    if "now" in state:
        return state["now"]
    if "checked" in state:
        return "checked" if state["checked"] else "unchecked"
    return "/".join(state["options"][i] for i in state["chosen"]) or "(none)"


def _apply(page, control, kind: str, action: str, arg) -> None:
    """One user action on a control: a key on its focused slider handle, a readout typed in and
    Enter (``"type"``), an option chosen, a button or checkbox clicked."""
    if action == "key":
        handle = control.locator(".noUi-handle").first
        handle.focus()
        handle.press(arg)
    elif action == "type":
        readout = control.locator(".widget-readout").first
        readout.fill(arg)
        readout.press("Enter")
    elif action == "choose":
        control.locator("select").first.select_option(index=arg)
    elif kind == "toggle":
        control.locator("button").nth(arg).click()
    else:
        control.locator("input[type=checkbox]").first.click()


def _set_back(page, control, kind: str, state: dict, now: dict) -> None:
    """The action that returns a control from ``now`` to ``state`` (its value before the test)."""
    if kind == "slider":
        if not control.locator(".widget-readout").first.is_visible():
            pytest.fail(f"a slider without a readout ({state}): this test cannot set it back", pytrace=False)
        _apply(page, control, kind, "type", state["now"])
    elif kind == "checkbox":
        _apply(page, control, kind, "click", None)
    elif kind == "select" and state.get("multiple"):
        _apply(page, control, kind, "choose", state["chosen"])
    else:
        _apply(page, control, kind, "click" if kind == "toggle" else "choose", state["chosen"][0])


def _counters(page) -> list[int]:
    return page.evaluate("() => [window.__ctxseg.errors.length, window.__ctxseg.comms, window.__ctxseg.frames]")


def _wait_kernel(page, area: int, before: str, counts: list[int], where: str, change: str, stem: str,
                 tmp_path: Path, k: int) -> str:
    """Wait for the kernel to handle a change (WAIT_REDRAW_JS); fail on an error or the time
    limit. Returns ``changed`` (the figure differs from ``before``), ``same`` (the kernel sent a
    figure, the same picture) or ``quiet`` (it sent none)."""
    errors = counts[0]
    result = page.evaluate(WAIT_REDRAW_JS, [area, before, *counts, SETTLE_MS, REDRAW_TIMEOUT * 1000])
    if result["outcome"] in ("error", "timeout"):
        _screenshot(page, tmp_path / f"{stem}-control{k}-after.png")
        late = page.evaluate("() => window.__ctxseg.errors")[errors:]
        assert not late, (f"{where}: changing it {change} raised:\n"
                          + "\n\n".join(f"{_where(e, [])}: {_describe_error(e)}" for e in late))
        pytest.fail(f"{where}: changing it {change}, the kernel did not finish within {REDRAW_TIMEOUT} s",
                    pytrace=False)
    return result["outcome"]


def _exercise_controls(page, name: str, stem: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """Change every interactive control of the notebook, in page order, as a user would (a focused
    slider handle and a key, an option chosen, a button clicked) until its cell's figure changes;
    a control that raises, whose changes all leave the figure as it was, or whose cell has no
    figure fails the test. A change after which the kernel sends no figure fails it at once; one
    after which it sends the same picture again (a value with no visible effect, as a threshold
    below every score of a smoke-mode model) leads to the next change, and a control whose
    changes all redraw the same picture passes, reported as such. Each control starts from the
    notebook's own state: it is set back (a slider's value typed into its readout) before the
    next control of its cell. Returns (the controls that redrew, those with nothing to change: a
    single option)."""
    found = page.evaluate(CONTROLS_JS)
    assert not found["unknown"], f"{name}: widget inputs this test does not know how to change: {found['unknown']}"
    controls = found["controls"]
    redrew, fixed = [], []
    for n, c in enumerate(controls):
        k, area, kind = c["k"], c["area"], c["kind"]
        where = f"{name}: cell {c['cell']}, {kind} {c['label'] or f'#{k} (no label)'!r}"
        control = page.locator(f'[data-ctxseg-control="{k}"]').first
        control.scroll_into_view_if_needed()
        initial = page.evaluate(CONTROL_STATE_JS, k)
        shown = {o["options"][i] for o in (page.evaluate(CONTROL_STATE_JS, other["k"]) for other in controls
                                           if other["area"] == area and other["k"] != k and other["kind"] == "dropdown")
                 for i in o["chosen"]}
        changes = _changes(kind, initial, shown)
        if not changes:
            fixed.append(where)
            continue
        before = page.evaluate(FIGURES_JS, area)
        assert before, f"{where}: its cell shows no figure for the control to redraw"
        tried, same, tic = [], [], time.perf_counter()
        for action, arg in changes:
            was = page.evaluate(CONTROL_STATE_JS, k)
            if action == "key" and ((arg == "End" and was["now"] == was["max"])
                                    or (arg == "Home" and was["now"] == was["min"])):
                continue
            counts = _counters(page)
            _apply(page, control, kind, action, arg)
            now = page.evaluate(CONTROL_STATE_JS, k)
            change = f"{_value(was)} -> {_value(now)}"
            tried.append(change)
            if now == was:
                continue  # the key or click did not change the value: nothing was sent
            outcome = _wait_kernel(page, area, before, counts, where, change, stem, tmp_path, k)
            if outcome == "changed":
                print(f"{where}: {change} redrew the figure ({time.perf_counter() - tic:.1f} s)")
                break
            if outcome == "quiet":
                _screenshot(page, tmp_path / f"{stem}-control{k}-after.png")
                pytest.fail(f"{where}: changing it {change} did not redraw its cell's figure (the kernel sent "
                            "no figure)", pytrace=False)
            same.append(change)
        else:
            if not same:
                pytest.fail(f"{where}: no change of it could be made (tried: {'; '.join(tried)})", pytrace=False)
            print(f"{where}: {'; '.join(same)} each redrew the same picture")
        redrew.append(where)
        if any(other["area"] == area for other in controls[n + 1:]):
            counts = _counters(page)
            after = page.evaluate(FIGURES_JS, area)
            _set_back(page, control, kind, initial, now)
            back = page.evaluate(CONTROL_STATE_JS, k)
            assert back == initial, f"{where}: set back to {_value(initial)}, it shows {_value(back)}"
            _wait_kernel(page, area, after, counts, where, f"{_value(now)} -> {_value(initial)}", stem, tmp_path, k)
            # The figure is back, but the kernel may still be finishing that request: the next
            # control's change must not be read against its trailing messages (a race that once
            # reported a toggle as sending no figure).
            page.wait_for_function("() => window.__ctxseg.pending.size === 0", timeout=REDRAW_TIMEOUT * 1000)
    return redrew, fixed


CONTROLS_SEEN: list[str] = []  # controls whose change redrew a figure, over the notebooks run so far
NOTEBOOKS_PASSED: list[str] = []


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_in_browser(path, browser, lab, tmp_path):
    import nbformat

    name, stem = path.name, path.stem
    committed = path.read_bytes()
    nb = nbformat.reads(committed.decode(), as_version=4)
    served = lab["root"] / "notebooks" / name
    served.write_bytes(committed)
    expects_widgets = nb.metadata.get("ctxseg", {}).get("expects_widgets", True)

    context = browser.new_context(viewport=VIEWPORT, extra_http_headers={"Authorization": f"token {lab['token']}"})
    context.set_default_timeout(LOAD_TIMEOUT * 1000)
    page = context.new_page()
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    start = time.perf_counter()
    try:
        page.goto(f"{lab['url']}/lab/workspaces/ctxseg-{stem}?token={lab['token']}", wait_until="domcontentloaded")
        page.wait_for_function("() => !!window.jupyterapp", timeout=LOAD_TIMEOUT * 1000)
        kernel = page.evaluate(OPEN_JS, [f"notebooks/{name}", LOAD_TIMEOUT * 1000])
        assert kernel == "python3", f"{name}: the notebook opened with kernel {kernel!r}, expected python3"
        page.evaluate(RUN_ALL_JS)
        state = _wait_run(page, name)
        print(f"{name}: ran in the browser in {time.perf_counter() - start:.1f} s")
        widgets = _wait_widgets(page, name)
        _screenshot(page, tmp_path / f"{stem}.png", whole_notebook=True)

        cell_errors = [f"cell {c['index']} ({_first_line(c['source'])!r}): {_describe_error(o)}"
                       for c in state["cells"] for o in c["outputs"] if o["output_type"] == "error"]
        assert not cell_errors, f"{name}: cells raised in the browser:\n" + "\n\n".join(cell_errors)
        not_run = [c["index"] for c in state["cells"] if c["source"].strip() and c["count"] is None]
        assert not not_run, f"{name}: cells without an execution count after the run: {not_run} (kernel {state['kernel']})"
        kernel_errors = [f"{_where(e, state['cells'])}: {_describe_error(e)}" for e in state["errors"]]
        assert not kernel_errors, (f"{name}: errors shown outside cell outputs (e.g. in a widget Output area):\n"
                                   + "\n\n".join(kernel_errors))
        assert not widgets["broken"], f"{name}: a widget shows 'Error displaying widget' (console: {console[-5:]})"
        assert not widgets["loading"], f"{name}: {widgets['loading']} widget(s) still 'Loading widget...' after {RENDER_TIMEOUT} s"
        if expects_widgets:
            n_widgets = sum(WIDGET_MIME in o["mimes"] for c in state["cells"] for o in c["outputs"])
            assert n_widgets, f"{name}: no cell displayed an ipywidget ({WIDGET_MIME})"
            assert widgets["views"], (f"{name}: none of the {n_widgets} widget outputs rendered a view; "
                                      "a notebook without widgets sets metadata ctxseg.expects_widgets = false")

        figures = page.evaluate(MPL_FIGURES_JS)
        if figures and not all(f["drawn"] for f in figures):
            page.wait_for_timeout(RENDER_TIMEOUT * 1000 // 4)
            figures = page.evaluate(MPL_FIGURES_JS)
        blank = [f for f in figures if not f["drawn"]]
        assert not blank, f"{name}: {len(blank)} of {len(figures)} ipympl figures drew nothing: {blank}"

        # The kernel was this interpreter, in smoke mode (a request outside the cells: no history).
        probe = page.evaluate(KERNEL_CHECK_JS, ["import os, sys; print(sys.executable); "
                                                "print(os.environ.get('CTXSEG_SMOKE'))", LOAD_TIMEOUT * 1000])
        executable, smoke = (probe.splitlines() + ["", ""])[:2]
        assert Path(executable).resolve() == Path(sys.executable).resolve(), f"{name}: kernel ran {executable}"
        assert smoke == "1", f"{name}: CTXSEG_SMOKE in the kernel is {smoke!r}"

        redrew, fixed = _exercise_controls(page, name, stem, tmp_path)
        CONTROLS_SEEN.extend(redrew)
        if fixed:
            print(f"{name}: nothing to change (one option): {fixed}")
        late = [f"{_where(e, state['cells'])}: {_describe_error(e)}"
                for e in page.evaluate("() => window.__ctxseg.errors")]
        assert not late, f"{name}: errors after changing the controls:\n" + "\n\n".join(late)
        print(f"{name}: checked in {time.perf_counter() - start:.1f} s")
        NOTEBOOKS_PASSED.append(name)
    except Exception:
        if console:
            print(f"{name}: browser console errors:\n  " + "\n  ".join(console[-20:]))
        try:
            _screenshot(page, tmp_path / f"{stem}-failure.png")
            (tmp_path / f"{stem}-failure.html").write_text(page.content())
        except Exception:
            pass
        print(f"server log tail:\n{_tail(lab['log'], 2000)}")
        raise
    finally:
        try:
            page.evaluate(SHUTDOWN_JS, 30_000)
        except Exception:
            pass
        context.close()
        assert path.read_bytes() == committed, (f"{name}: the committed notebook changed during the browser run "
                                                f"(the browser only had the copy {served})")


def test_a_control_redrew_a_figure():
    """Across the notebooks, controls were found and changed (runs after them): a selector that
    stopped finding ipywidgets' controls would otherwise leave nothing to check."""
    if not NOTEBOOKS_PASSED:
        pytest.skip("no browser notebook test passed in this session")
    assert CONTROLS_SEEN, f"none of {NOTEBOOKS_PASSED} has a widget control that redraws a figure"


def test_report_results_table_fits_at_1400px(browser, tmp_path):
    """The demo report's results table (five methods, a column per class, the WSSS columns at the
    right) and its caption fit a 1400 px window: no page overflow, the table's right edge and
    the caption within the page (settings shared by all runs are stated once above the table)."""
    from ctxseg.viz.compare import RunTable
    from ctxseg.viz.report import html_page, table_html

    classes = ("sky", "water", "ground", "tree", "car", "boat", "bird", "person")
    columns = ["run", "method", "variant", "data", "encoder", "weights", "length", "seed", "split", "mIoU",
               "boundary IoU", "boundary px", "pixel acc", "CAM mIoU", "pseudo mIoU"] + [f"IoU {c}" for c in classes]
    shared = {"data": "synthetic", "encoder": "tf_efficientnet_lite0", "weights": "ImageNet", "length": "300 it",
              "seed": 0, "split": "val", "boundary px": 3}
    rows = [{"run": f"demo/{m}", "method": m, "variant": "dual_stream=A" if m == "dscnet" else "", **shared,
             **{c: 0.123456 for c in columns if c.startswith("IoU") or c in ("mIoU", "boundary IoU", "pixel acc")},
             "CAM mIoU": 0.5 if m in ("wsss_cam", "dscnet") else None,
             "pseudo mIoU": 0.5 if m in ("wsss_cam", "dscnet") else None}
            for m in ("ce", "pixel_contrast", "contextrast", "wsss_cam", "dscnet")]
    caption = "CAM and pseudo-label mIoU are measured on the train split (the WSSS protocol); " * 3
    (tmp_path / "report.html").write_text(html_page("report", table_html(RunTable(columns, rows, caption))))
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto((tmp_path / "report.html").as_uri())
        geo = page.evaluate("""() => {
            const right = (q) => Math.max(...[...document.querySelectorAll(q)].map(e => e.getBoundingClientRect().right));
            return {page: document.documentElement.scrollWidth, view: window.innerWidth,
                    table: right('table'), cells: right('th'), caption: right('.caption'),
                    headers: [...document.querySelectorAll('th')].map(e => e.textContent)};
        }""")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        print(tmp_path / "report.png")
    finally:
        page.close()
    assert geo["page"] <= geo["view"], geo  # no horizontal page overflow
    assert max(geo["table"], geo["cells"], geo["caption"]) <= geo["view"], geo
    assert "pseudo mIoU" in geo["headers"] and "IoU person" in geo["headers"]
