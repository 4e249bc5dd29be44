"""Check the MLflow run page of ``heatmark ui`` in a real headless browser (a check, not a benchmark).

Starts ``heatmark ui STORE`` on a free port, opens the metrics page of the newest finished run of
the store in headless Chromium, and writes what the browser rendered: a screenshot
(``run_page.png``) and the DOM after JavaScript ran (``run_page.html``). The check passes when the
page names the training loss (``train_loss``) and the validation MRE (``val_mre``) and has drawn
at least that many plotly charts (the browser is driven over the DevTools protocol and waits, up to
two minutes, until they are drawn). Then it stops ``heatmark ui`` with SIGTERM and checks that
the port is free again.

Without ``--store`` it first trains a tiny tracked run (tests/bundles/synthetic_dots on 8
synthetic images, 2 epochs; about a minute on 2 CPU cores) in a temporary folder.

Needs Chromium (Debian: ``apt-get install chromium``; or ``--browser PATH``); the test suite does
not. Usage::

    python bench/ui_check.py [--store BUNDLE/runs] [--out ui_check] [--browser chromium] [--port N]

Exit status 0 when the page shows both charts, 1 otherwise, 2 when no browser is found.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "val_mre")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def tiny_run(root: Path) -> Path:
    """Train tests/bundles/synthetic_dots for 2 epochs with MLflow tracking; returns its runs folder."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_bundle_synthetic as synthetic  # the test data writer (known dots on 2D images)

    synthetic.SPLITS.update({"train": 8, "val": 2, "eval": 2})
    data = synthetic.write_dots_dataset(root / "data")
    bundle = root / "synthetic_dots"
    shutil.copytree(synthetic.BUNDLE, bundle)
    from heatmark.bundle import bundle_command

    cmd = bundle_command(bundle, "training", [], tracking="mlflow", dataset_dir=str(data), max_epochs=2,
                         val_interval=1, batch_size=4)
    print("training a tiny tracked run ...", flush=True)
    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return bundle / "runs"


def newest_run(store: Path) -> tuple[str, str]:
    """(experiment id, run id) of the newest finished run in the store."""
    from mlflow import MlflowClient

    from heatmark.training.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(store))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"no finished MLflow run in {store}")
    return runs[0].info.experiment_id, runs[0].info.run_id


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ended by a NUL byte on file descriptors 3 and 4; no extra Python package)."""

    def __init__(self, executable: str, profile: Path, size: tuple[int, int] = (1600, 1400)) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes the answers
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_browser, from_browser, 3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


#: what the page shows: the metric names in its text, and drawn plots (plotly SVG charts)
PROBE = """(() => { const t = document.body ? document.body.innerText : '';
  return {names: %s.filter(m => t.includes(m)),
          plots: document.querySelectorAll('.js-plotly-plot .main-svg, .js-plotly-plot canvas').length}; })()"""


def browse(executable: str, url: str, out: Path, wait_s: float = 120.0) -> dict:
    """Open ``url``, wait until the metric names and plots are there (or ``wait_s``), then write
    the screenshot and the rendered DOM; returns the last probe ``{"names": [...], "plots": n}``."""
    browser = Browser(executable, out / "chromium-profile")
    try:
        browser.page("Page.enable")
        browser.page("Page.navigate", url=url)
        deadline = time.monotonic() + wait_s
        probe = {"names": [], "plots": 0}
        while time.monotonic() < deadline:
            probe = browser.evaluate(PROBE % json.dumps(list(METRICS))) or probe
            if len(probe["names"]) == len(METRICS) and probe["plots"] >= len(METRICS):
                time.sleep(2)  # let the last charts finish drawing
                probe = browser.evaluate(PROBE % json.dumps(list(METRICS))) or probe
                break
            time.sleep(1)
        shot = browser.page("Page.captureScreenshot", format="png")["data"]
        (out / "run_page.png").write_bytes(base64.b64decode(shot))
        (out / "run_page.html").write_text(browser.evaluate("document.documentElement.outerHTML") or "")
    finally:
        browser.close()
        shutil.rmtree(out / "chromium-profile", ignore_errors=True)
    return probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="folder holding mlruns.db (default: train a tiny run)")
    parser.add_argument("--out", type=Path, default=Path("ui_check"), help="output folder (default ./ui_check)")
    parser.add_argument("--browser", default="chromium", help="Chromium executable (default: chromium)")
    parser.add_argument("--port", type=int, default=0, help="port of heatmark ui (default: a free one)")
    args = parser.parse_args()
    browser = shutil.which(args.browser)
    if browser is None:
        print(f"no browser {args.browser!r} found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="heatmark_ui_check_") as tmp:
        store = args.store or tiny_run(Path(tmp))
        experiment, run = newest_run(store)
        port = args.port or free_port()
        ui = subprocess.Popen([sys.executable, "-m", "heatmark", "ui", str(store), "--port", str(port)])
        try:
            deadline = time.monotonic() + 300
            while not answers(port):
                if ui.poll() is not None or time.monotonic() > deadline:
                    print("heatmark ui did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{run}/model-metrics"
            print(f"opening {url}", flush=True)
            probe = browse(browser, url, args.out)
        finally:
            ui.send_signal(signal.SIGTERM)
            ui.wait(timeout=60)
    found = {m: m in probe["names"] for m in METRICS}
    charts = probe["plots"]
    port_free = not answers(port)
    print(f"metrics named on the page: {found}; plotly charts drawn: {charts}")
    print(f"screenshot: {args.out / 'run_page.png'}; DOM: {args.out / 'run_page.html'}")
    print(f"after SIGTERM: heatmark ui exit {ui.returncode}, port {port} {'free' if port_free else 'STILL IN USE'}")
    ok = all(found.values()) and charts >= len(METRICS) and port_free and ui.returncode == 0
    print("ui check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
