"""Console script: ``qimera run CONFIG.yaml [--set section.key=value ...]`` (also ``check``,
``experiment run|report`` and ``figure pca|samples``)."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other qimera error."""

    def error(self, message: str):
        self.exit(2, f"qimera: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _on_signal(signum, frame):  # noqa: ARG001
    """SIGTERM and SIGHUP end a run like Ctrl-C: the checkpoint of the last epoch stays."""
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qimera", description="Data-free quantization (Qimera and baselines).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="teacher → naive baseline → method → evaluation; prints a JSON summary last")
    r.add_argument("config", help="YAML config (see configs/README.md)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), repeatable")
    c = sub.add_parser("check", help="validate a config, load teacher and data, and print the resolved config")
    c.add_argument("config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    e = sub.add_parser("experiment", help="a grid of runs from experiments/*.yaml: run it, or report it")
    esub = e.add_subparsers(dest="action", required=True)
    er = esub.add_parser("run", help="run the cells that are not finished, then write the report")
    er.add_argument("experiment", help="experiment file (see experiments/README.md)")
    er.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                    help="run seeds 1..N instead of the file's")
    er.add_argument("--jobs", type=_positive_int, default=1, metavar="J", help="cells run at once (default 1)")
    er.add_argument("--grid", dest="grids", action="append", default=[], metavar="LABEL",
                    help="run only the grid of this label, repeatable (the report still covers every finished cell)")
    er.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config value for every cell, repeatable")
    ep = esub.add_parser("report", help="write report.md/.csv/.png from the finished cells")
    ep.add_argument("experiment")
    ep.add_argument("--seeds", type=_positive_int, default=None, metavar="N")
    ep.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    _figure_parser(sub)
    return p


def _figure_parser(sub) -> None:
    """``qimera figure pca|samples RUN_DIR``: the paper's Figures 3/5 and 6 for a trained run."""
    f = sub.add_parser("figure", help="the paper's figures for a trained run: pca (Figures 3, 5), samples (Figure 6)")
    fsub = f.add_subparsers(dest="figure", required=True, parser_class=_Parser)
    fp = fsub.add_parser("pca", help="PCA of the teacher's penultimate features per class pair, with the λ path")
    fs = fsub.add_parser("samples", help="the class x class grid (K=2, λ=0.5), rows of plain samples per class")
    for q in (fp, fs):
        q.add_argument("run_dir", help="a run's train.out_dir (holds checkpoint.pt)")
        q.add_argument("--out", default=None, metavar="DIR", help="where to write (default RUN_DIR/figures)")
        q.add_argument("--config", default=None, metavar="FILE",
                       help="the run's config, when its checkpoint does not hold one")
        q.add_argument("--seed", type=int, default=None, help="noise seed (default the run's train.seed)")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default auto)")
    fp.add_argument("--pairs", default=None, metavar="A-B,C-D,...", help="class pairs (default 0-1,1-2,...,8-9)")
    fp.add_argument("--samples", type=_positive_int, default=64, metavar="N",
                    help="generated samples per class and per boundary cloud (default 64)")
    fs.add_argument("--classes", default=None, metavar="I,J,...",
                    help="classes of the rows (default all when C <= 10, else 0, C/10, ...)")
    fs.add_argument("--per-class", type=_positive_int, default=8, metavar="N", help="samples per row (default 8)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer of 1 or more")
    return value


def _experiment(args) -> int:
    from .experiments import check_experiment_dir, load_experiment, report, run_experiment

    exp = load_experiment(args.experiment, seeds=args.seeds, overrides=tuple(args.overrides))
    check_experiment_dir(exp)
    counts = {"failed": 0}
    if args.action == "run":
        counts = run_experiment(exp, jobs=args.jobs, grids=args.grids)  # an unknown --grid fails before any cell
    paths = report(exp)
    print(paths["md"].read_text())
    print(f"report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if counts["failed"]:
        print(f"qimera: error: {counts['failed']} cell(s) failed (their cell.json says why); rerun to retry them",
              file=sys.stderr)
        return 1
    return 0


def _figure(args) -> int:
    """Draw one figure command's files and list them; its bad input is one line, status 2."""
    from . import figures

    try:
        common = dict(out=args.out, config=args.config, seed=args.seed, device=args.device)
        if args.figure == "pca":
            pairs = figures.parse_pairs(args.pairs) if args.pairs is not None else None
            paths = figures.pca_figures(args.run_dir, pairs, samples=args.samples, **common)
        else:
            classes = figures.parse_classes(args.classes) if args.classes is not None else None
            paths = figures.sample_figures(args.run_dir, classes, per_class=args.per_class, **common)
    except figures.FigureError as exc:
        print(f"qimera: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


#: what a stopped command leaves, said after "qimera: stopped by SIGTERM; "
_AFTER_STOP = {
    "run": "rerun the same command to resume from the last epoch",
    "check": "nothing was written",
    "experiment": "finished cells are kept; rerun the same command to resume the stopped ones from their last epoch",
    "figure": "the figures were not finished; run the command again",
}


def main(argv: list[str] | None = None) -> int:
    from .runtime import signal_of, stop_with_parent

    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
    try:
        stop_with_parent()  # an experiment's cell: stop (as on SIGTERM) when the runner dies
        return _main(args)
    except KeyboardInterrupt as exc:
        signum = signal_of(exc)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"qimera: {how}; {_AFTER_STOP[args.command]}", file=sys.stderr)
        return 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    except MemoryError:
        print("qimera: error: out of memory while starting; free memory on this machine and rerun", file=sys.stderr)
        return 1


def _main(args) -> int:
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()
    from . import experiments, export  # noqa: F401 - their errors count as bad input below
    from .api import epoch_hook_from_env, prepare, run
    from .errors import input_errors
    from .runtime import machine_fault

    try:
        if args.command == "experiment":
            return _experiment(args)
        if args.command == "figure":
            return _figure(args)
        if args.command == "check":
            prep = prepare(args.config, args.overrides)
            text = json.dumps(prep.cfg.resolved(), indent=2)
        else:
            hook = epoch_hook_from_env()
            text = json.dumps(run(args.config, args.overrides, callbacks=(hook,) if hook else ()).summary())
        print(text, flush=True)
    except input_errors() as exc:
        print(f"qimera: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError, OSError) as exc:
        message = machine_fault(exc)
        if message is None and isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ENOSPC, errno.EBADF):
            message = f"cannot write the summary to standard output ({exc.strerror}); the run's files are complete"
        if message is None:
            raise
        print(f"qimera: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
