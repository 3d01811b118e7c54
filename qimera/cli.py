"""Console script: ``qimera run CONFIG.yaml [--set section.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qimera", description="Data-free quantization (Qimera and baselines).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="teacher → naive baseline → method → evaluation; prints a JSON summary last")
    r.add_argument("config", help="YAML config (see configs/README.md)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), repeatable")
    c = sub.add_parser("check", help="validate a config, load teacher and data, and print the resolved config")
    c.add_argument("config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()
    from .api import prepare, run
    from .config import ConfigError
    from .data import DataError
    from .evaluate import NonFiniteError
    from .export import ExportError
    from .runtime import machine_fault
    from .teachers import TeacherError
    from .trainer import CheckpointError, TrainingDiverged

    try:
        if args.command == "check":
            prep = prepare(args.config, args.overrides)
            print(json.dumps(prep.cfg.resolved(), indent=2))
            return 0
        result = run(args.config, args.overrides)
    except (ConfigError, TeacherError, DataError, CheckpointError, TrainingDiverged, NonFiniteError,
            ExportError) as exc:
        print(f"qimera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qimera: interrupted; rerun the same command to resume from the last epoch", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError, OSError) as exc:
        message = machine_fault(exc)
        if message is None:
            raise
        print(f"qimera: error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary()), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
