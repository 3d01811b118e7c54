"""``python -m stages.summary [metrics.json]``: the pipeline's accuracies as a table.

``make demo`` ends with it::

    model                                top-1   top-5
    teacher (full precision)             98.89  100.00
    naive 4w4a (noise calibration)       99.07  100.00
    Qimera 4w4a (final epoch)            98.52  100.00

The method and bit widths come from ``outputs/config/run.yaml`` when it is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import METRICS, RUN_CONFIG, read_json, read_yaml

METHOD_NAMES = {"qimera": "Qimera", "gdfq": "GDFQ"}


def table(metrics: dict, method: str = "qimera") -> str:
    bits = f"{metrics['w_bits']}w{metrics['a_bits']}a"
    rows = [("teacher (full precision)", metrics.get("teacher")),
            (f"naive {bits} (noise calibration)", metrics.get("naive")),
            (f"{METHOD_NAMES.get(method, method)} {bits} (final epoch)", metrics.get("student"))]
    lines = [f"{'model':<37}top-1   top-5"]
    lines += [f"{label:<37}{s['top1']:5.2f}{s['top5']:8.2f}" for label, s in rows if s is not None]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else METRICS
    if not path.is_file():
        print(f"{path} not found: run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    metrics = read_json(path)
    method = read_yaml(RUN_CONFIG).get("method", "qimera") if RUN_CONFIG.is_file() else "qimera"
    if metrics.get("mlflow_run_id"):
        print(f"MLflow run {metrics['mlflow_run_id']}; `dvc exp show` and `mlflow ui` list it")
    print(table(metrics, method))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
