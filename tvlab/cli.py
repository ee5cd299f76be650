"""Command line: ``tvlab reproduce`` (the paper's main experiment) and ``tvlab tasks``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

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


def _batch_size(text: str) -> int | None:
    """``--batch-size``: a whole number >= 1, or ``auto`` (None: chosen from the device's free memory)."""
    return None if text == "auto" else _positive(text)


def _out_folder(text: str) -> str:
    """``--out``: a folder that exists or can be created, and can be written."""
    path = Path(text).absolute()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder: name a folder for the results "
                                         "(it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create the folder {text!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {str(existing)!r} (no permission): pass a folder you can write to")
    return text


def _task_specs(values: list[str] | None) -> list[str]:
    """``--tasks a b`` or ``--tasks a,b``: names and paths, split on commas (a path that exists stays whole)."""
    if values is None:
        return list_tasks(include_extra=False)
    specs = [piece.strip() for v in values for piece in ([v] if Path(v).exists() else v.split(",")) if piece.strip()]
    if not specs:
        raise TaskError(f"--tasks {' '.join(values)!r} names no task; give task names or task files, e.g. --tasks antonyms,fr_en.")
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvlab", description="Explore how in-context learning creates task vectors.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = ExperimentConfig()
    rep = sub.add_parser("reproduce", help="run the paper's main experiment (ICL, task vector, baseline) on many tasks",
                         description="Reproduce the main result of Hendel, Geva & Globerson (2023) on a model.")
    rep.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model id or local folder (default: the bundled {DEFAULT_MODEL})")
    rep.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                     help="task names or paths of your own .json/.jsonl/.csv/.tsv task files, separated by spaces or commas "
                          "(default: the paper's 18 tasks)")
    rep.add_argument("--scoring", choices=["exact", "prefix"], default=None,
                     help="how answers to your task files are scored: exact (default, the paper's rule; a JSON file in "
                          "tvlab's own format keeps its category's rule) or prefix (the paper's rule for knowledge tasks, "
                          "e.g. 'Buenos' for 'Buenos Aires'); built-in tasks keep their own rule")
    rep.add_argument("--n-test", type=_positive, default=d.n_test, help=f"test sets per task (default {d.n_test})")
    rep.add_argument("--n-dev", type=_positive, default=d.n_dev, help=f"dev sets per task, for choosing the layer (default {d.n_dev})")
    rep.add_argument("--n-baseline", type=_positive, default=d.n_baseline, help=f"zero-shot baseline queries per task (default {d.n_baseline})")
    rep.add_argument("--n-demos", type=_non_negative, default=d.n_demos, help=f"demonstrations per prompt (default {d.n_demos})")
    rep.add_argument("--seed", type=_non_negative, default=d.seed, help=f"random seed (default {d.seed}, as in the paper's code)")
    rep.add_argument("--format", choices=sorted(FORMATS), default=d.format,
                     help="prompt format: paper = 'example:x->y' (default), arrow = 'x -> y', qa = 'Q: x / A: y'")
    rep.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                     help="model dtype; auto: bfloat16 where this CPU/GPU computes it fast, else float32 "
                          "(default: the environment variable TVLAB_DTYPE if set, else float32)")
    rep.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    rep.add_argument("--backend", choices=["tvlab", "nnsight"], default="tvlab",
                     help="what runs the forward passes: tvlab's own engine (default) or nnsight traces "
                          '(pip install "tvlab[remote]"); same predictions')
    rep.add_argument("--remote", action="store_true",
                     help="with --backend nnsight: run on NDIF's hosted copy of --model (a Hugging Face id; needs "
                          "NDIF_API_KEY, see docs/scaling.md)")
    rep.add_argument("--batch-size", type=_batch_size, default=d.batch_size, metavar="N|auto",
                     help="prompts per forward pass; auto (the default): as many as fit in 60%% of a GPU's free memory, "
                          "on a CPU up to 6144 tokens (and 256 prompts where their logits are kept whole). Lower it if memory runs out")
    rep.add_argument("--out", type=_out_folder, default="tvlab-results", help="folder for CSV, JSON and PNG results (default ./tvlab-results)")
    rep.add_argument("--overwrite", action="store_true",
                     help="replace the results of another run (other tasks, settings or model) found in --out")
    rep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub.add_parser("tasks", help="list the built-in tasks")
    sub.add_parser("course", add_help=False,
                   help="release the notebooks as nbgrader assignments and grade submissions (tvlab course -h)")
    return parser


def _check_out(args, tasks, config, model: str | None = None) -> None:
    """Stop before any work if saving into ``--out`` would replace another run's results (unless --overwrite)."""
    from . import reproduce

    reason = None if args.overwrite else reproduce.replaces_other_run(args.out, tasks, config, model)
    if reason:
        raise ValueError(f"--out {args.out}: {reason}. Saving this run would replace its files. Pass another --out "
                         "folder, or --overwrite to replace them (earlier runs' per-task predictions stay in "
                         f"{Path(args.out) / '.partial'}: running an earlier command again resumes from them).")


def _reproduce(args) -> int:
    from . import engine, experiments, reproduce
    from .models import _resolve_device, load_model

    config = ExperimentConfig(n_demos=args.n_demos, n_test=args.n_test, n_dev=args.n_dev, n_baseline=args.n_baseline,
                              seed=args.seed, format=args.format, batch_size=args.batch_size)
    # Everything that can be checked without the model is checked before loading it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        tasks = reproduce.resolve_tasks(_task_specs(args.tasks), args.scoring)
    for warning in caught:
        print(f"tvlab: warning: {warning.message}", file=sys.stderr)
    _check_out(args, tasks, config)
    if args.device is not None:
        _resolve_device(args.device)
    start = time.perf_counter()
    dtype = args.dtype or os.environ.get("TVLAB_DTYPE") or "float32"
    how = "on NDIF, through nnsight" if args.remote else dtype + (", through nnsight" if args.backend == "nnsight" else "")
    print(f"Loading {args.model} ({how}) ...", file=sys.stderr, flush=True)
    backend = None if args.backend == "tvlab" else args.backend
    lm = load_model(None if args.model == DEFAULT_MODEL else args.model, dtype=args.dtype, device=args.device,
                    backend=backend, remote=args.remote)
    if lm.backend is not None:
        lm.backend.progress = not args.no_progress
    print(f"Loaded {lm} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    _check_out(args, tasks, config, lm.name)
    results = reproduce.run_main(lm, tasks, config, out=args.out, progress=not args.no_progress, scoring=args.scoring)
    if lm.backend is not None:
        print(f"tvlab: {lm.backend.log}", file=sys.stderr)
    print(reproduce.report(results))
    if config.batch_size is not None:
        chosen = "--batch-size"
    elif lm.device.type == "cuda":
        chosen = "auto: from the GPU's free memory"
    else:
        most = "" if engine.slices_unembedding(lm) else f" and {engine.CPU_BATCH_SIZE} prompts"
        chosen = f"auto: at most {engine.CPU_BATCH_TOKENS} tokens{most} per pass on a CPU"
    ran = len(tasks) - len(results.resumed)
    per_call = min(experiments.tasks_per_call(lm, config), ran)
    if ran:
        print(f"\nBatch size: at most {results.stats.largest_batch} prompts per forward pass ({chosen}); "
              f"{results.stats.forwards} forward passes; {per_call} task{'s' if per_call > 1 else ''} per engine call.")
    written = reproduce.save(results, args.out)
    resumed = f" ({len(results.resumed)} tasks resumed from an earlier run)" if results.resumed else ""
    print(f"\nDone in {time.perf_counter() - start:.0f} s{resumed}. Wrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["course"]:  # the course tooling keeps its own parser (tvlab course -h)
        from .course import main as course_main

        return course_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reproduce" and args.remote and args.backend != "nnsight":
        parser.error("--remote runs the model on NDIF through nnsight: add --backend nnsight")
    if args.command == "reproduce" and args.remote and (args.dtype or args.device):
        parser.error("--remote: NDIF decides the dtype and the devices of its models; leave out --dtype and --device")
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
