"""``python -m stages.screenshot [--out FILE]``: the MLflow UI's page of the demo ladder's
cells, as a new user sees it, taken by headless Chromium (the README's screenshot).

It serves the store ``make demo`` logged to (:func:`stages.tracking.tracking_uri`) with
``mlflow ui`` on 127.0.0.1 (a free port), opens the page ``outputs/ladder.json`` names (the
experiment's runs in the model-training view, the ladder's cells with their top-1, method,
bits and seed as the first columns), closes the MLflow Assistant panel that the UI opens on
a first visit, and writes a PNG. The server is stopped, with its process group, before the
command returns.

Needs Playwright (``pip install -e '.[dev]'``) and a Chromium: Debian's ``chromium``
(``apt-get install chromium``), found on PATH, or the one ``CHROMIUM`` names.
:func:`launch_chromium` is also what the browser test (tests/pipeline/test_mlflow_ui.py)
starts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .common import LADDER_METRICS, PipelineError, read_json, repo_root, run_stage

#: Chromium's switches for a headless run on a machine without a display, a GPU, a user
#: namespace sandbox or the internet (nothing is fetched in the background)
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
#: the window the pages are rendered in
VIEWPORT = {"width": 1600, "height": 900}
#: how long the UI may take to start (``mlflow ui`` on a 2-core machine: 10-40 s)
UI_START_S = 120
DEFAULT_OUT = Path("docs/images/mlflow-demo-ladder.png")


def chromium_path() -> str | None:
    """The Chromium to drive: ``CHROMIUM`` when set, else ``chromium`` (Debian) or
    ``chromium-browser`` on PATH; None when there is none."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright):
    """A headless Chromium browser (Playwright's ``Browser``) on the system's Chromium."""
    path = chromium_path()
    if path is None:
        raise PipelineError("no Chromium found: install Debian's chromium (apt-get install chromium) or set CHROMIUM "
                            "to a Chromium executable")
    return playwright.chromium.launch(executable_path=path, args=list(CHROMIUM_ARGS))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(uri: str, log: Path):
    """``mlflow ui`` on 127.0.0.1 for the store ``uri`` (a database file); yields its base
    URL once it answers, and stops its process group afterwards."""
    from qimera.runtime import stop_group

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runners: starts in seconds
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_S
        while True:
            if proc.poll() is not None:
                raise PipelineError(f"`mlflow ui` exited with status {proc.returncode}; its log: {log}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise PipelineError(f"`mlflow ui` did not answer within {UI_START_S} s; its log: {log}") from None
                time.sleep(0.5)
        yield base
    finally:
        stop_group(proc, ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)))


#: the close button of the MLflow Assistant side panel (MLflow 3.17 opens it on a first visit)
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
#: a cell's run name (``<grid>-<method>-w<b>a<b>-...-seed<n>``)
CELL_NAME = re.compile(r"-w\d+a\d+-(.*-)?seed\d+$")


def close_assistant(page) -> None:
    """Close the MLflow Assistant side panel, as a user would first, when it is open."""
    button = page.locator(ASSISTANT_CLOSE)
    if button.count():
        button.first.click()
        page.wait_for_timeout(300)


def main(argv: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    from . import tracking

    p = argparse.ArgumentParser(prog="python -m stages.screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the PNG to write (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if not LADDER_METRICS.is_file():
        raise PipelineError(f"{LADDER_METRICS} not found: run the demo first (make demo)")
    ladder = read_json(LADDER_METRICS)
    if not ladder.get("mlflow_url"):
        raise PipelineError(f"{LADDER_METRICS} names no MLflow page: rerun the ladder stage (dvc repro -f -s ladder)")
    uri = tracking.tracking_uri({}, repo_root())
    if not uri.startswith("sqlite:"):
        raise PipelineError(f"the store is {tracking.redact(uri)}: open {ladder['mlflow_url']} in a browser instead")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with serve(uri, Path(os.environ.get("TMPDIR", "/tmp")) / "qimera-mlflow-ui.log") as base:
        url = ladder["mlflow_url"].replace(tracking.DEFAULT_UI, base, 1)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.get_by_text(CELL_NAME).first.wait_for(timeout=60_000)
                close_assistant(page)
                page.wait_for_timeout(1000)  # the table's columns settle
                tmp = args.out.with_name(f".{args.out.name}.tmp.png")
                page.screenshot(path=str(tmp))
                tmp.replace(args.out)
            finally:
                browser.close()
    print(f"screenshot: {args.out} ({url})")


if __name__ == "__main__":
    run_stage("screenshot", main)
