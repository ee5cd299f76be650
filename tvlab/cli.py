"""Command line: ``tvlab reproduce`` (the paper's main experiment) and ``tvlab tasks``."""

from __future__ import annotations

import argparse
import sys
import time

from .experiments import ExperimentConfig
from .models import DEFAULT_MODEL, ModelError
from .prompts import FORMATS
from .tasks import TaskError, list_tasks


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


_positive, _non_negative = _at_least(1), _at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvlab", description="Explore how in-context learning creates task vectors.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = ExperimentConfig()
    rep = sub.add_parser("reproduce", help="run the paper's main experiment (ICL, task vector, baseline) on many tasks",
                         description="Reproduce the main result of Hendel, Geva & Globerson (2023) on a model.")
    rep.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model id or local folder (default: the bundled {DEFAULT_MODEL})")
    rep.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                     help="task names or paths of your own .json/.csv task files (default: the paper's 18 tasks)")
    rep.add_argument("--n-test", type=_positive, default=d.n_test, help=f"test sets per task (default {d.n_test})")
    rep.add_argument("--n-dev", type=_positive, default=d.n_dev, help=f"dev sets per task, for choosing the layer (default {d.n_dev})")
    rep.add_argument("--n-baseline", type=_positive, default=d.n_baseline, help=f"zero-shot baseline queries per task (default {d.n_baseline})")
    rep.add_argument("--n-demos", type=_non_negative, default=d.n_demos, help=f"demonstrations per prompt (default {d.n_demos})")
    rep.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed}, as in the paper's code)")
    rep.add_argument("--format", choices=sorted(FORMATS), default=d.format,
                     help="prompt format: paper = 'example:x->y' (default), arrow = 'x -> y', qa = 'Q: x / A: y'")
    rep.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default float32)")
    rep.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    rep.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"prompts per forward pass; lower it if memory runs out (default {d.batch_size})")
    rep.add_argument("--out", default="tvlab-results", help="folder for CSV, JSON and PNG results (default ./tvlab-results)")
    rep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_parser("tasks", help="list the built-in tasks")
    return parser


def _reproduce(args) -> int:
    from . import reproduce
    from .models import load_model
    from .tasks import get_task

    config = ExperimentConfig(n_demos=args.n_demos, n_test=args.n_test, n_dev=args.n_dev, n_baseline=args.n_baseline,
                              seed=args.seed, format=args.format, batch_size=args.batch_size)
    tasks = [get_task(t) for t in (args.tasks or list_tasks(include_extra=False))]  # fail on a bad name before loading
    start = time.perf_counter()
    print(f"Loading {args.model} ({args.dtype}) ...", file=sys.stderr, flush=True)
    lm = load_model(None if args.model == DEFAULT_MODEL else args.model, dtype=args.dtype, device=args.device)
    print(f"Loaded {lm} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    results = reproduce.run_main(lm, tasks, config, out=args.out, progress=not args.no_progress)
    print(reproduce.report(results))
    written = reproduce.save(results, args.out)
    resumed = f" ({len(results.resumed)} tasks resumed from an earlier run)" if results.resumed else ""
    print(f"\nDone in {time.perf_counter() - start:.0f} s{resumed}. Wrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tasks":
            from .tasks import get_task

            for name in list_tasks():
                task = get_task(name)
                print(f"{name:28s} {task.category:12s} {len(task):4d} pairs  {task.description}")
            return 0
        return _reproduce(args)
    except (TaskError, ModelError, ValueError) as e:
        print(f"tvlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntvlab: interrupted. Finished tasks are saved; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
