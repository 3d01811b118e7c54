"""The MLflow UI in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) opens a tracking server on 127.0.0.1 that holds a tiny two-cell experiment
logged by ``python -m stages.experiment``, at the link that command prints.

The page must be the experiment's training runs (not MLflow 3's GenAI overview), list the
two cells by name with their top-1, method, bits and seed, and the compare view of the two
must render their metrics. Skipped where no Chromium is installed, except under
``QIMERA_REQUIRE_BROWSER=1`` (.ci/run sets it, after installing Debian's chromium).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.screenshot import VIEWPORT, chromium_path, close_assistant, launch_chromium

from servers import MlflowServer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

if os.environ.get("QIMERA_REQUIRE_BROWSER") != "1":
    if chromium_path() is None:
        pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM)", allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="Playwright is a dev extra: pip install -e '.[dev]'")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

#: the GenAI overview's texts (MLflow 3.17), which the training runs' page does not show
GENAI_OVERVIEW = ("Detect issues in your traces", "No data available", "Sessions")


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory, tiny_weights):
    """A tracking server holding a two-cell experiment (GDFQ and Qimera, one tiny run each,
    scored on 100 images), and what ``python -m stages.experiment`` printed."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    base = {"method": "qimera",
            "teacher": {"source": "checkpoint", "arch": "qimera.models.digits_cnn:DigitsCNN",
                        "weights": str(tiny_weights), "num_classes": 10, "input_size": [1, 8, 8],
                        "mean": [0.3], "std": [0.4]},
            "data": {"name": "digits", "batch_size": 256, "limit": 100},
            "quant": {"w_bits": 4, "a_bits": 4},
            "generator": {"p": 0.5, "k": 2, "dm_layers": 1, "embedding_init": "teacher_fc"},
            "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 16, "warmup_epochs": 0,
                      "calibration_epochs": 1, "lr_milestones": [1], "seed": 3, "progress": False},
            "naive": {"enabled": False}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "ui-cells", "title": "Two tiny cells: GDFQ against Qimera", "seeds": [1], "plot": "none",
            "compare": [["qimera", "gdfq"]],
            "grids": [{"label": "digits", "config": "base.yaml", "methods": ["gdfq", "qimera"], "row": "{method}",
                       "column": "{bits}"}]}
    (root / "ui-cells.yaml").write_text(yaml.safe_dump(spec))
    server = MlflowServer(root)
    server.start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "stages.experiment", "ui-cells.yaml", "--jobs", "2"], cwd=root,
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        cells = {}
        for name in ("digits-gdfq-w4a4-seed1", "digits-qimera-w4a4-seed1"):
            cells[name] = json.loads((root / "runs" / "ui-cells" / name / "summary.json").read_text())
        yield {"server": server, "stderr": res.stderr, "cells": cells, "root": root}
    finally:
        server.stop()


def _printed_link(stderr: str, server_url: str) -> str:
    found = re.search(r"to compare the cells: open (\S+)", stderr)
    assert found, stderr[-2000:]
    url = found.group(1)
    assert url.startswith(server_url + "/#/experiments/") and "workflowType=machine_learning" in url
    return url


def _row_text(page, name: str) -> str:
    """The text of the runs table's row that ``name`` heads: its pinned part (checkbox,
    name) and the scrolled part (metrics, params) are separate elements of one row index."""
    row = page.get_by_role("row").filter(has_text=name)
    expect(row).to_have_count(1)
    index = row.get_attribute("row-index")
    assert index is not None, row.inner_text()
    return "\n".join(part.inner_text() for part in page.locator(f'[role="row"][row-index="{index}"]').all())


def _compared(page, metric: str) -> list[str]:
    """The values the compare view shows for ``metric``, one per run: its metrics section is
    a grid of metric names beside a grid of their values, a value per run for each name."""
    grids = page.locator('[role="grid"]').filter(has=page.get_by_role("link", name=metric, exact=True))
    expect(grids).to_have_count(1)
    names = [n.strip() for n in grids.locator('[role="rowgroup"] > *').all_inner_texts()]
    values_grid = grids.locator("xpath=following::*[@role='grid'][1]")
    values = [v.strip() for v in values_grid.locator('[role="rowgroup"] > *').all_inner_texts()]
    assert metric in names and len(values) % len(names) == 0, (names, values)
    per_name = len(values) // len(names)
    i = names.index(metric)
    return values[i * per_name:(i + 1) * per_name]


def _shown(value: float) -> str:
    """A top-1 as the UI writes it (scored on 100 images: a whole number here)."""
    return f"{value:g}"


def test_the_printed_link_opens_the_cells_and_their_comparison(two_cells, tmp_path):
    server, cells = two_cells["server"], two_cells["cells"]
    url = _printed_link(two_cells["stderr"], server.url)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)  # a fresh profile: no earlier choice of view
            page.goto(url)
            names = list(cells)
            for name in names:
                expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=45_000)
            close_assistant(page)
            page.screenshot(path=str(tmp_path / "runs.png"))  # kept when the test fails
            # the training runs, not the GenAI overview
            assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
            body = page.inner_text("body")
            for text in GENAI_OVERVIEW:
                assert text not in body, f"the GenAI page's {text!r} is shown:\n{body[:2000]}"
            assert "Model training" in body and "Runs" in body
            # the cells side by side: each name's row has its top-1, method, bits and seed
            for name, summary in cells.items():
                text = _row_text(page, name)
                method = name.split("-")[1]
                for shown in (_shown(summary["student_top1"]), method, "4w4a", "1"):
                    assert re.search(rf"(^|\s){re.escape(shown)}(\s|$)", text), (shown, text)
            for header in ("student_top1", "bits", "method", "seed"):
                expect(page.get_by_role("columnheader").filter(has_text=header).first).to_be_visible()
            # the compare view of the two: tick both, press Compare
            for name in names:
                page.get_by_role("row").filter(has_text=name).get_by_role("checkbox").check()
            page.get_by_role("button", name="Compare").click()
            expect(page.get_by_text("Comparing 2 Runs")).to_be_visible(timeout=30_000)
            assert "compare-runs" in page.url
            assert sorted(_compared(page, "student_top1")) == sorted(_shown(c["student_top1"]) for c in cells.values())
            for name in names:
                expect(page.get_by_text(name).first).to_be_visible()
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        finally:
            browser.close()
