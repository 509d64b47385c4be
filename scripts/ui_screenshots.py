"""Screenshots of cdi's runs in the MLflow UI, taken with headless Chromium.

    python scripts/ui_screenshots.py                     # PNGs in ./ui-screenshots
    python scripts/ui_screenshots.py --output DIR --n-trials 8

In a temporary folder it starts `mlflow server` on 127.0.0.1 (free port, SQLite backend store, local proxied
artifacts), runs the demo audit (`cdi audit --model demo/model --suspect demo/members --control demo/heldout`)
and then a small demo search (`cdi search --n-trials N`) against it with a feature cache in that folder, and
photographs the UI:

    04-search-live.png     the search's run list while it runs: parent run without duration, first trials nested
    01-audit-runs.png      the audit in cdi-audits' run list: run name, Dataset and Models columns
    02-audit-run.png       the audit run's overview: name, Datasets, stats.p_value linked to target-<fingerprint>
    03-audit-models.png    the experiment's Models tab: the logged model target-<fingerprint> and its source run
    05-search-trials.png   the finished search, its parent run expanded to all N nested trial runs
    06-search-run.png      the search's parent run: Child runs, best metrics, Finished
    07-search-optimization_history.png, 08-search-param_importances.png   Optuna's figures among its artifacts

The live shot comes first: once the search has logged a few trial runs (3, at most half), the script pauses it
(SIGSTOP to its process group) for the shot and continues it (SIGCONT) afterwards, because on the demo each trial
takes well under a second, less than a page load. Beside the page checks it asks the REST API: the audit run is
named audit-..., has dataset inputs with context suspect and control and a logged model target-... linked to
it; the search's parent run was RUNNING before and after the live shot, ends FINISHED with N nested trial runs
and has both figures as artifacts. The server, the audit, the search and Chromium run in their own process
groups and are ended whatever happens (exception, Ctrl-C, SIGTERM, SIGHUP); the temporary folder is deleted
(--keep keeps it).

Chromium is driven over the DevTools protocol (stdlib only: a minimal WebSocket client), so that each shot
waits until the page shows what it must show instead of a fixed delay. MLflow 3's UI opens in GenAI mode and,
on a local server, with its Assistant panel open; the script preselects the model-training view
(`#/experiments/ID/runs?workflowType=machine_learning`, the same choice as the toggle at the top left) and marks
the Assistant as already shown. The search's nested trial runs are collapsed under their parent by default: the
script clicks the parent's expander (+) before the shot.

Exit status: 0 when every shot and check showed what it should, 1 when one did not (the PNGs are written anyway;
one line per failed check on stderr), 2 when Chromium is missing, 3 when the server, the audit or the search
fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ML_VIEW = "workflowType=machine_learning"  # MLflow 3 UI: the model-training view, not GenAI
# The UI's own localStorage entries (useLocalStorage: `<key>_v<version>`, JSON values): model-training view,
# and the Assistant panel already auto-opened once, so that it does not cover a third of each shot.
LOCAL_STORAGE = {"mlflow.workflowType_v1": "machine_learning",
                 "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}


class Failure(Exception):
    """The server, the audit or the search did not work: exit 3 with this message."""


def find_chromium(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    for name in ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + ["/usr/bin/chromium",
                                                                                      *CHROMIUM_NAMES]:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The caller's environment without MLFLOW_* (a stray MLFLOW_RUN_ID or tracking URI must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _answers(url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status == 200
    except OSError:
        return False


def _end(proc: subprocess.Popen | None) -> None:
    """End a process started in its own session, with its children: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            os.killpg(proc.pid, signal.SIGCONT)  # a paused search (see paused) handles SIGTERM only once continued
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 180):
    """`mlflow server` on 127.0.0.1 (SQLite store and proxied artifacts under root), its URL; always stopped."""
    port = free_port()
    env = {**_clean_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner and its workers
    log_path = root / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts")], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=root, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
        while not _answers(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"mlflow server did not start: {log_path.read_text()[-1500:]}")
            time.sleep(0.5)
        yield url
    finally:
        _end(proc)


def _cdi(*args: str) -> list[str]:
    """The `cdi` command of this interpreter (the run's Source then reads `cdi`, as for users), else -m cdi."""
    script = Path(sys.executable).parent / "cdi"
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "cdi", *args]


def run_audit(url: str, tmp: Path) -> None:
    print("running the demo audit (about a minute on 2 cores) ...", flush=True)
    command = _cdi("audit", "--model", "demo/model", "--suspect", "demo/members", "--control", "demo/heldout",
                   "--tracking-uri", url, "--cache-dir", str(tmp / "cache"), "--no-progress",
                   "--output", str(tmp / "audit_result.json"))
    log_path = tmp / "audit.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait()
    finally:
        _end(proc)  # on Ctrl-C or SIGTERM: the audit and whatever it started
    if code != 0:
        raise Failure(f"cdi audit failed ({code}): {log_path.read_text().strip()[-1500:]}")


def start_search(url: str, tmp: Path, n_trials: int) -> subprocess.Popen:
    print(f"running a demo search with {n_trials} trials ...", flush=True)
    command = _cdi("search", "--n-trials", str(n_trials), "--tracking-uri", url, "--cache-dir",
                   str(tmp / "cache"), "--no-progress", "--output", str(tmp / "best_config.yaml"))
    with open(tmp / "search.log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def paused(proc: subprocess.Popen):
    """The search stopped (SIGSTOP to its process group) while the live shot is taken, continued afterwards:
    its trials take well under a second each on the demo, too fast for a page load and a click otherwise."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.killpg(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# MLflow look-ups


def _client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def experiment_id(url: str, name: str) -> str | None:
    found = _client(url).get_experiment_by_name(name)
    return found.experiment_id if found else None


def latest_run(url: str, experiment: str, parent: bool | None = None):
    """The newest run of an experiment (parent=True: without a parent run; False: a nested run)."""
    exp = experiment_id(url, experiment)
    if exp is None:
        return None
    for run in _client(url).search_runs([exp], order_by=["attributes.start_time DESC"], max_results=200):
        nested = "mlflow.parentRunId" in run.data.tags
        if parent is None or parent != nested:
            return run
    return None


def trial_runs(url: str, exp: str, parent_id: str) -> list:
    return _client(url).search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                    max_results=1000)


# ---------------------------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol, with a minimal WebSocket client (RFC 6455, client side)


class WebSocket:
    def __init__(self, ws_url: str, timeout: float = 60):
        parts = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping / pong: DevTools does not ping; nothing to answer
                continue
            message += data
            if first & 0x80:
                return message.decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    """One headless Chromium with a fresh profile, and its first page's DevTools session."""

    def __init__(self, binary: str, profile: Path, width: int, height: int):
        self.width, self.height, self.ids = width, height, 0
        profile.mkdir(parents=True, exist_ok=True)
        with open(profile.parent / "chromium.log", "w") as log:
            self.proc = subprocess.Popen(
                [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.ws = None
        try:
            port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise Failure(f"chromium did not start: {(profile.parent / 'chromium.log').read_text()[-800:]}")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.load(answer) if t.get("type") == "page"]
            self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"])
            self.call("Page.enable")
            self.call("Runtime.enable")
            # the page itself, not the window (whose size includes the headless browser's frame), is WIDTHxHEIGHT
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params):
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def prepare_origin(self, origin: str) -> None:
        """Set the UI's localStorage entries on the server's origin before the SPA first reads them."""
        self.call("Page.navigate", url=f"{origin}/health")
        self._wait_loaded()
        sets = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                       for k, v in LOCAL_STORAGE.items())
        self.evaluate(sets)

    def _wait_loaded(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate("document.readyState") == "complete":
                return
            time.sleep(0.2)

    def shot(self, url: str, path: Path, expect: list[str], images: list[str] = (), click: str | None = None,
             timeout: float = 60, settle: float = 1.5) -> list[str]:
        """Open url; until the JavaScript expression click (if any) returns true, evaluate it; wait until the
        page's text holds every string of expect and each image named in images has loaded; save a PNG.
        Returns what was not shown before the timeout."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        check = (f"(() => {{ const t = document.body ? document.body.innerText : '';"
                 f" const imgs = [...document.images].filter(i => i.complete && i.naturalWidth > 0);"
                 f" return {json.dumps(expect)}.filter(s => !t.includes(s)).concat("
                 f"{json.dumps(list(images))}.filter(s => !imgs.some(i => (i.src + ' ' + i.alt).includes(s))));"
                 f" }})()")
        missing, deadline, clicked = list(expect) + list(images), time.monotonic() + timeout, click is None
        while time.monotonic() < deadline:
            if not clicked:
                clicked = bool(self.evaluate(click))
            missing = self.evaluate(check) or []
            if not missing and clicked:
                break
            time.sleep(0.3)
        if not clicked:
            missing = ["(the nested runs, expanded)", *missing]
        time.sleep(settle)  # let charts, tables and images finish laying out
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return missing

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        _end(self.proc)


# ---------------------------------------------------------------------------------------------------------------


def expand(run_name: str, child: str) -> str:
    """JavaScript that clicks the expander (+) of the run list's row of run_name, unless its child run is shown
    (the UI keeps rows expanded in localStorage: a second click would fold them); true once they are shown."""
    return ("(() => { const links = [...document.querySelectorAll('a')].map(a => [a, a.innerText.trim()]);"
            f" if (links.some(([a, t]) => t === {json.dumps(child)})) return true;"
            " if (Date.now() - (window.cdiExpandedAt || 0) < 5000) return false;"  # one click at a time
            f" const a = (links.find(([a, t]) => t === {json.dumps(run_name)}) || [])[0];"
            " const cell = a && a.closest('.ag-cell-wrapper');"
            " const b = cell && cell.querySelector('button[data-component-id*=runnamecellrenderer]');"
            " if (b) { b.click(); window.cdiExpandedAt = Date.now(); } return false; })()")


def check_audit(url: str, run) -> list[str]:
    """What the REST API must say of the audit run: its name, both image sets as datasets, its logged model."""
    problems, client, name = [], _client(url), run.info.run_name
    if not (name or "").startswith("audit-"):
        problems.append(f"the audit run is named {name!r}, not audit-<model>-<fingerprint>")
    contexts = {next((t.value for t in d.tags if t.key == "mlflow.data.context"), None): d.dataset.name
                for d in run.inputs.dataset_inputs}
    for context in ("suspect", "control"):
        if context not in contexts:
            problems.append(f"the audit run has no dataset input with context {context} (has {contexts})")
    models = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
              if m.source_run_id == run.info.run_id or any(x.run_id == run.info.run_id for x in m.metrics or [])]
    if not any(m.name.startswith("target-") for m in models):
        problems.append("no logged model target-<fingerprint> is linked to the audit run")
    return problems


def live_search(url: str, search: subprocess.Popen, n_trials: int, timeout: float = 900):
    """Wait until the running search has written a few trial runs (3, at most half of them); return (experiment
    id, parent run), or None if the search ended first."""
    deadline, wanted = time.monotonic() + timeout, max(1, min(3, n_trials // 2))
    while time.monotonic() < deadline and search.poll() is None:
        exp = experiment_id(url, "cdi-search")
        parent = latest_run(url, "cdi-search", parent=True) if exp else None
        if parent is not None and len(trial_runs(url, exp, parent.info.run_id)) >= wanted:
            return exp, parent
        time.sleep(0.3)
    return None


def take_shots(browser: Browser, url: str, out: Path, start_search, n_trials: int) -> list[str]:
    """All screenshots; one line per shot or REST check that did not show what it should. start_search (None
    with --server) starts the search, whose live state is photographed first, before the audit's pages."""
    problems: list[str] = []

    def shot(name: str, route: str, expect: list[str], **kwargs) -> None:
        path = out / name
        sep = "&" if "?" in route else "?"
        missing = browser.shot(f"{url}/#{route}{sep}{ML_VIEW}", path, expect, **kwargs)
        print(path, flush=True)
        if missing:
            problems.append(f"{path.name}: not shown: {', '.join(missing)}")

    audit = latest_run(url, "cdi-audits", parent=True)
    if audit is None:
        raise Failure("no audit run found in experiment cdi-audits")
    exp, run_id, name = audit.info.experiment_id, audit.info.run_id, audit.info.run_name
    problems += check_audit(url, _client(url).get_run(run_id))
    browser.prepare_origin(url)

    search = start_search() if start_search else None
    if search is not None:  # while it runs: the trials arrive one by one under the parent run
        found = live_search(url, search, n_trials)
        if found is None:
            problems.append("04-search-live.png: the search ended before a trial run was seen while it ran")
        else:
            search_exp, parent = found
            with paused(search):
                client = _client(url)
                before = client.get_run(parent.info.run_id).info.status
                shot("04-search-live.png", f"/experiments/{search_exp}/runs", [parent.info.run_name, "trial-0"],
                     click=expand(parent.info.run_name, "trial-0"))
                after = client.get_run(parent.info.run_id).info.status
                count = len(trial_runs(url, search_exp, parent.info.run_id))
            print(f"  (shot while the search's parent run was {after.lower()}, {count} of {n_trials} trial runs "
                  "logged)", flush=True)
            if before != "RUNNING" or after != "RUNNING":
                problems.append(f"04-search-live.png: the search's parent run was {before}/{after}, not RUNNING")

    shot("01-audit-runs.png", f"/experiments/{exp}/runs", [name, "Dataset", "suspect: members", "target-"])
    shot("02-audit-run.png", f"/experiments/{exp}/runs/{run_id}",
         [name, "Datasets", "suspect: members", "target-", "stats.p_value"])
    shot("03-audit-models.png", f"/experiments/{exp}/models", ["target-", "Source run", name])

    if search is not None:
        try:
            code = search.wait(900)
        except subprocess.TimeoutExpired:
            raise Failure("cdi search did not end within 15 minutes") from None
        if code != 0:
            raise Failure(f"cdi search failed ({code}); see its log")
    search_exp = experiment_id(url, "cdi-search")
    parent = latest_run(url, "cdi-search", parent=True) if search_exp else None
    if parent is None:
        raise Failure("no search run found in experiment cdi-search")
    pid, client = parent.info.run_id, _client(url)
    trials = sorted(r.info.run_name for r in trial_runs(url, search_exp, pid))
    if search is not None and len(trials) != n_trials:
        problems.append(f"the search's parent run has {len(trials)} nested trial runs, not {n_trials}")
    status = client.get_run(pid).info.status
    if status != "FINISHED":
        problems.append(f"the search's parent run is {status}, not FINISHED")
    figures = ("optimization_history.png", "param_importances.png")
    logged = {f.path for f in client.list_artifacts(pid)}
    problems += [f"the search run has no artifact {f}" for f in figures if f not in logged]
    shot("05-search-trials.png", f"/experiments/{search_exp}/runs", [parent.info.run_name, *trials],
         click=expand(parent.info.run_name, "trial-0"))
    shot("06-search-run.png", f"/experiments/{search_exp}/runs/{pid}",
         [parent.info.run_name, "Child runs", "trial-0", "stats.best_strength", "Finished"])
    for i, figure in enumerate(figures, start=7):
        shot(f"{i:02d}-search-{figure}", f"/experiments/{search_exp}/runs/{pid}/artifacts/{figure}", [figure],
             images=[figure.rsplit(".", 1)[0]])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("ui-screenshots"),
                        help="folder for the PNGs (default ./ui-screenshots)")
    parser.add_argument("--n-trials", type=int, default=8, help="trials of the demo search (default 8)")
    parser.add_argument("--chromium", help="Chromium binary (default $CHROMIUM, else chromium on the PATH)")
    parser.add_argument("--window-size", default="1600,1000", help="WIDTH,HEIGHT (default 1600,1000)")
    parser.add_argument("--server", help="photograph this running MLflow server's latest cdi-audits and cdi-search "
                                         "runs instead of starting one and running cdi")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, store)")
    args = parser.parse_args(argv)

    binary = find_chromium(args.chromium)
    if binary is None:
        print("ui_screenshots: Chromium not found: apt-get install chromium (or pass --chromium PATH)",
              file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.window_size.split(","))
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def interrupted(signum, frame):  # SIGTERM and SIGHUP as Ctrl-C: the finally blocks stop server and browser
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    tmp = Path(tempfile.mkdtemp(prefix="cdi-ui-"))
    search = browser = None
    try:
        with (contextmanager(lambda: (yield args.server))() if args.server else mlflow_server(tmp)) as url:
            print(f"MLflow server: {url}", flush=True)
            if not args.server:
                run_audit(url, tmp)
            browser = Browser(binary, tmp / "profile", width, height)

            def begin_search() -> subprocess.Popen:
                nonlocal search
                search = start_search(url, tmp, args.n_trials)
                return search

            problems = take_shots(browser, url, out, None if args.server else begin_search, args.n_trials)
    except Failure as exc:
        log = tmp / "search.log"
        tail = f"\n{log.read_text()[-1500:]}" if log.exists() and "search" in str(exc) else ""
        print(f"ui_screenshots: {exc}{tail}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("ui_screenshots: interrupted; server stopped", file=sys.stderr)
        return 130
    finally:
        if browser is not None:
            browser.close()
        _end(search)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for line in problems:
        print(f"ui_screenshots: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
