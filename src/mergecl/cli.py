"""The `mergecl` command line: merge, run, bench, report, combine, export, eval, learn, list, completion.

Errors a user can cause (MergeclError) print one line, ``mergecl: error: ...``, and exit 2. A run
(or bench) in which a method failed -- its model broke: a non-finite loss, weight or output -- still
reports the others, prints ``failed: ...`` per method and exits 1.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import signal
import sys
import threading
import time

from mergecl.errors import MergeclError
from mergecl.launch import hand_over, launched, say


def _merge_help() -> str:
    from mergecl.merging.registry import all_rules

    lines = ["merge rules (default lam in brackets; their own options after them):"]
    for name, rule in all_rules().items():
        lam = "computed" if rule.lam is None else f"{rule.lam:g}"
        lines.append(f"  {name:<16} [{lam}] {rule.summary}")
        for option, spec in rule.options.model_fields.items():
            lines.append(
                f"  {'':<16}   --{option.replace('_', '-')} (default {spec.default}): {spec.description or ''}"
            )
        for option in rule.inputs:
            lines.append(f"  {'':<16}   --{option.replace('_', '-')} FILE: needed")
    lines.append("dare: --dare P drops each task-vector entry with probability P and rescales by 1/(1-P),")
    lines.append("      in front of any rule (DARE-TA: --method task_arithmetic --dare 0.9)")
    return "\n".join(lines)


def _flag_bool(text: str) -> bool:
    """A yes/no merge option as typed: true/false (also yes/no, on/off, 1/0)."""
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]


def _option_flags() -> dict[str, tuple[str, dict]]:
    """argparse flags for every merge option, derived from the schemas (the engine's, then each
    rule's, then each rule's inputs): dest -> (flag, keyword arguments). Unset flags stay None, so
    only what the user typed reaches the merge, which checks it against the chosen rule."""
    import typing

    from mergecl.merging.engine import EngineOptions
    from mergecl.merging.registry import all_rules

    flags: dict[str, tuple[str, dict]] = {}
    schemas = [("every rule", EngineOptions)] + [(name, rule.options) for name, rule in all_rules().items()]
    for owner, schema in schemas:
        for option, spec in schema.model_fields.items():
            if option in flags:
                continue
            kind = [a for a in typing.get_args(spec.annotation) if a is not type(None)] or [spec.annotation]
            choices = typing.get_args(kind[0]) if typing.get_origin(kind[0]) is typing.Literal else None
            kwargs = {"default": None, "help": f"{spec.description or option} (default {spec.default}; {owner})"}
            if choices:
                kwargs["choices"] = list(choices)
            elif kind[0] is bool:  # strict options take no text: true/false become a bool here
                kwargs.update(metavar="true|false", type=_flag_bool)
            else:
                kwargs["metavar"] = option.upper()
                if kind[0] in (int, float):
                    kwargs["type"] = kind[0]
            flags[option] = (f"--{option.replace('_', '-')}", kwargs)
    for name, rule in all_rules().items():
        for option, spec in rule.inputs.items():
            if option not in flags:
                count = "repeat per FT" if spec.per_task else "one"
                kwargs = {"action": "append" if spec.per_task else "store", "default": None, "metavar": "FILE"}
                flags[option] = (
                    f"--{option.replace('_', '-')}",
                    {**kwargs, "help": f"{option} checkpoint ({name}; {count})"},
                )
    return flags


def _add_merge(sub) -> None:
    from mergecl.merging.continual import running_rules

    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints into a base checkpoint (out of core)",
        description="Merge fine-tuned checkpoints FT1 FT2 ... into BASE by a merge rule; task vectors are "
        "tau_t = FT_t - BASE. Inputs: .safetensors, sharded HF directories, .pt/.bin (weights_only=True).",
        epilog=_merge_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("finetuned", nargs="+", metavar="FT", help="fine-tuned checkpoints, in task order")
    p.add_argument("--method", required=True, help="merge rule (see below)")
    p.add_argument("--base", required=True, help="the base (pretrained) checkpoint theta_0")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="output: X.safetensors, or a directory (HF layout, sharded); with --continual a directory of "
        "step1, step2, ...",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing OUT (only an earlier mergecl output, never an input)"
    )
    p.add_argument(
        "--task-vectors",
        action="store_true",
        help="the FT files are task vectors tau_t (e.g. a run's seedN/STREAM/task_T.safetensors), not weights",
    )
    p.add_argument("--max-shard-size", default="5GB", help="directory output: shard size (default 5GB)")
    p.add_argument(
        "--continual",
        action="store_true",
        help="the continual-merging protocol: merge FT1..FTs for every step s and write each to OUT/stepS "
        f"(OUT a directory). Rules with a running form ({', '.join(running_rules())}) go on from a running "
        "state: O(1) reads per step, whatever the number of checkpoints; every other rule merges FT1..FTs "
        "from scratch at step s (O(T^2) reads in all)",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="with --continual: merge from scratch at every step even where the rule has a running form "
        "(random_mix then draws exactly as a plain merge of FT1..FTs does)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = p.add_argument_group("merge options (from the rules' declarations)")
    for dest, (flag, kwargs) in _option_flags().items():
        group.add_argument(flag, dest=f"option_{dest}", **kwargs)


def _run_merge(args) -> int:
    from mergecl.merging.engine import merge_checkpoints

    started = time.perf_counter()
    options = {k.removeprefix("option_"): v for k, v in vars(args).items() if k.startswith("option_") and v is not None}
    if args.recompute and not args.continual:
        raise MergeclError("--recompute goes with --continual")
    # the output and the reading of the inputs, as a plain and a continual merge take them
    options.update(out=args.out, force=args.force, task_vectors=args.task_vectors, progress=not args.quiet)
    options["max_shard_size"] = args.max_shard_size
    if args.continual:
        return _run_continual_merge(args, options, started)
    result = merge_checkpoints(args.base, args.finetuned, args.method, **options)
    extra = f", lambda*={result.info['lambda']:.4f}" if "lambda" in result.info else ""
    print(
        f"wrote {result.path} ({args.method}, {len(args.finetuned)} checkpoints, "
        f"{time.perf_counter() - started:.1f}s{extra})"
    )
    return 0


def _run_continual_merge(args, options: dict, started: float) -> int:
    from mergecl.merging.continual import continual_merges, uses_running

    how = "running state" if uses_running(args.method, args.recompute) else "merged from scratch each step"
    steps = continual_merges(args.base, args.finetuned, args.method, recompute=args.recompute, **options)
    for step, result in enumerate(steps, 1):
        extra = f", lambda*={result.info['lambda']:.4f}" if "lambda" in result.info else ""
        print(f"wrote {result.path} ({args.method}, step {step}/{len(args.finetuned)}{extra})")
    seconds = time.perf_counter() - started
    print(f"continual {args.method} over {len(args.finetuned)} checkpoints ({how}): {seconds:.1f}s")
    return 0


def _one_line(message: str) -> str:
    """Every error is one line: names read from a file's header may hold line breaks."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


DEFAULT_RUN_TIME = "about 1.4 minutes on 2 CPU cores"  # the README's measured 1 min 24 s (a test compares them)


def _run_description() -> str:
    """`mergecl run`'s description: what the embedded default runs is read from its config."""
    from mergecl.experiment.config import DEFAULT_CONFIG, read_yaml

    default = read_yaml(DEFAULT_CONFIG)
    domains = len(default["data"]["options"]["domains"])
    return (
        "Train task by task, merge, evaluate every step; writes a run directory with results.json, task "
        f"vectors, logs and a report. With no CONFIG: the embedded default, {DEFAULT_CONFIG.stem} (the real "
        f"all-MiniLM-L6-v2 fine-tuned on {domains} CLINC150 domains shipped with mergecl, one after the other; "
        f"methods {', '.join(default['methods'])}; {len(default['seeds'])} seeds; {DEFAULT_RUN_TIME}). "
        "`mergecl run digits`: a seconds-long smoke run (an MLP from scratch on sklearn digits). A bar shows "
        "the whole run's training steps and the time left, with the bars of each task and evaluation under "
        "it (none with --quiet, $MERGECL_QUIET=1, $CI, or when stderr is not a terminal)."
    )


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a continual-learning config (no CONFIG: the embedded default)",
        description=_run_description(),
        epilog="Methods, merge rules, presets, sources and backbones with their options: mergecl list. "
        "Shell completion: mergecl completion bash|zsh.",
    )
    p.add_argument(
        "config", nargs="?", default=None, help="YAML config or packaged config name (default: clinc150-mini-cil)"
    )
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory (default runs/NAME-TIME)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="with --resume: add seeds to the run (keep its own)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-step lines")
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="processes on this machine (DDP or FSDP; one per GPU)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and print the plan (seeds, tasks, trainings, steps, evaluations, a rough cost); "
        "loads the data, trains nothing, creates no run directory",
    )


def _run_run(args) -> int:
    from mergecl.experiment.runner import run

    if args.resume and args.config:
        raise MergeclError("give either a CONFIG or --resume RUN_DIR, not both")
    if args.seeds is not None and not args.resume:
        raise MergeclError("--seeds goes with --resume RUN_DIR (a config sets its seeds in `seeds:`)")
    if args.dry_run:
        from mergecl.experiment.plan import dry_run, format_plan

        if args.resume:
            raise MergeclError("--dry-run goes with a CONFIG, not --resume RUN_DIR")
        print(format_plan(dry_run(args.config, out=args.out)))
        return 0
    echo = _quiet(args.quiet)
    started = time.perf_counter()
    status = _distributed(args)  # --nproc: the launched processes' exit status
    if status is not None:
        return status
    results, path = run(args.config, out=args.out, resume=args.resume, echo=echo, seeds=args.seeds)
    return _summary(results, path, started)


def _os_error(err: OSError) -> str:
    """An operating-system failure in the user's words: the file and the reason."""
    return (f"{err.filename}: " if err.filename else "") + (err.strerror or str(err))


def _add_bench(sub) -> None:
    from mergecl.experiment.bench import SUITES

    p = sub.add_parser("bench", help="run a benchmark suite (real data, real pretrained model)")
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--quick", action="store_true", help="one seed, tiny data, five methods (<= 3 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the suite's seeds")
    p.add_argument(
        "--orders", type=int, default=None, metavar="K", help="override the suite's task orders per seed (data.orders)"
    )
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory (default runs/NAME-TIME)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-step lines")
    p.add_argument(
        "--nproc", type=int, default=1, metavar="N", help="processes on this machine (DDP or FSDP; one per GPU)"
    )


def _run_bench(args) -> int:
    from mergecl.experiment.bench import bench

    echo = _quiet(args.quiet)
    started = time.perf_counter()
    status = _distributed(args)  # --nproc: the launched processes' exit status
    if status is not None:
        return status
    results, path = bench(args.suite, quick=args.quick, seeds=args.seeds, out=args.out, orders=args.orders, echo=echo)
    return _summary(results, path, started)


def _distributed(args) -> int | None:
    """Under torchrun (or ``--nproc``'s launcher): join the process group, None (this process runs
    the command). With --nproc N: run this very command as N processes (launch.py), wait for them and
    return their exit status."""
    from mergecl import distributed
    from mergecl.launch import launch

    if distributed.init_from_env():
        return None
    if args.nproc <= 1:
        if args.nproc < 1:
            raise MergeclError(f"--nproc: expected a positive number of processes, got {args.nproc}")
        return None
    argv, skip = [], False  # the same command without --nproc (the processes find WORLD_SIZE set)
    for arg in args.argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        argv.append(arg)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env = dict(os.environ, OMP_NUM_THREADS=threads)  # oversubscribed cores spin-wait: 5-10x slower
    return launch([sys.executable, "-m", "mergecl", *argv], args.nproc, env)


def _summary(results, path, started: float) -> int:
    """Print the table; the exit status: 1 when a method failed (its model broke), else 0."""
    from mergecl import distributed
    from mergecl.evaluation.report import format_table

    main = distributed.is_main()
    distributed.shutdown()
    failed = [entry["failed"] for entry in results["methods"].values() if "failed" in entry]
    clean = f", not clean: {len(failed)} of {len(results['methods'])} methods failed" if failed else ""
    if main:
        print(format_table(results))
        for message in failed:
            print(f"failed: {message}", file=sys.stderr)
        print(f"\nrun directory: {path} ({time.perf_counter() - started:.0f}s{clean}); report: {path / 'report.md'}")
    return 1 if failed else 0


def _quiet(quiet: bool):
    """--quiet: no bars (mergecl.progress decides, also under CI) and no per-step lines; return the
    per-step printer."""
    from mergecl import progress

    progress.set_quiet(quiet)
    return (lambda msg: None) if quiet else progress.write


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables and plots of a finished or half-finished run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--format",
        default="png,svg",
        metavar="FMT[,FMT]",
        help="figure formats, comma-separated among png, svg, pdf (default: png,svg); PNG (300 dpi) is "
        "always written, report.md shows it; SVG and PDF are vector, for papers",
    )


def _run_report(args) -> int:
    from pathlib import Path

    from mergecl.evaluation.report import format_table, parse_formats, write_report
    from mergecl.experiment.rundir import RunDir

    formats = parse_formats(args.format)  # a bad format: one error, before anything is read
    rundir = RunDir(args.run_dir)
    results = rundir.read_json("results.json")
    if results is None:
        raise MergeclError(f"{Path(args.run_dir) / 'results.json'}: no such file (is this a run directory?)")
    try:
        written = write_report(results, rundir.path, formats)
    except OSError as err:  # e.g. a read-only run directory: the tables still print
        print(format_table(results))
        raise MergeclError(f"the report could not be written ({_os_error(err)})") from None
    print(format_table(results))
    print(f"\nwrote {', '.join(p.name for p in written)} in {rundir.path}")
    return 0


def _add_combine(sub) -> None:
    p = sub.add_parser(
        "combine",
        help="one run from runs of the same config made side by side with different seeds",
        description="Gather the seeds of runs of one config (e.g. one process or machine per seed) into a "
        "new run directory, with results and report. The inputs are left as they are.",
    )
    p.add_argument("out", metavar="OUT", help="the new run directory")
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="the runs to gather (disjoint seeds)")


def _run_combine(args) -> int:
    from mergecl.evaluation.report import format_table
    from mergecl.experiment.combine import combine

    results, path = combine(args.runs, args.out)
    print(format_table(results))
    print(f"\nrun directory: {path} (seeds {results['run']['seeds']}); report: {path / 'report.md'}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's model (a method after a step) as a directory that loads without mergecl",
        description="Write the model METHOD of the run RUN_DIR has after a step as a directory: for Hugging Face "
        "backbones a model transformers loads (AutoModel + AutoTokenizer; sentence-transformers too when the "
        "base was one), for others the encoder's weights; plus the head (mergecl_head.safetensors + "
        "mergecl_head.json: class names, head) and a model card. LoRA adapters are folded in.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--method", required=True, help="a method of the run (e.g. magmax)")
    p.add_argument("--seed", type=int, default=None, help="a seed of the run (default: its first)")
    p.add_argument(
        "--step", type=int, default=None, metavar="T", help="the model after step T, 1-based (default: the last)"
    )
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the output directory")
    p.add_argument("--force", action="store_true", help="replace DIR if it is an earlier mergecl output")


def _run_export(args) -> int:
    from mergecl.experiment.export import export

    started = time.perf_counter()
    done = export(args.run_dir, args.method, args.out, seed=args.seed, step=args.step, force=args.force)
    print(f"wrote {done} ({time.perf_counter() - started:.1f}s)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the accuracy of a model directory on each task of a config's scenario",
        description="Evaluate MODEL (a directory written by mergecl export, or a Hugging Face model directory: its "
        "zero-shot head is then built from the config's class names) on the test split of every task of CONFIG's "
        "scenario for one seed, with a run's metrics and table.",
    )
    p.add_argument("model", metavar="MODEL", help="the model directory")
    p.add_argument("config", metavar="CONFIG", help="YAML config or packaged config name (its data and model)")
    p.add_argument("--seed", type=int, default=None, help="the scenario of this seed (default: the config's first)")
    p.add_argument(
        "--step",
        type=int,
        default=None,
        metavar="T",
        help="columns of step T, 1-based (default: the export's, else the last)",
    )


def _run_eval(args) -> int:
    from mergecl.experiment.evaluate import evaluate

    print(evaluate(args.model, args.config, seed=args.seed, step=args.step).table())
    return 0


def _add_list(sub) -> None:
    from mergecl.experiment.plan import SECTIONS

    p = sub.add_parser(
        "list",
        help="what this mergecl offers: methods, merge rules, packaged configs, data sources, backbones",
        description="List each method, merge rule, packaged config (preset), data source or backbone with a "
        "one-line summary and its options (type, default, range), read from their declarations; plugins "
        "loaded with --plugin (before the command) are listed too.",
    )
    p.add_argument("section", nargs="?", choices=SECTIONS, default=None, help="one section (default: all)")
    p.add_argument("--json", action="store_true", help="print the same as JSON")


def _run_list(args) -> int:
    import json

    from mergecl.experiment.plan import SECTIONS, catalogue, format_catalogue

    listing = catalogue([args.section] if args.section else SECTIONS)
    print(json.dumps(listing, indent=2) if args.json else format_catalogue(listing))
    return 0


LEARN_REFUSED = 3  # the exit status of a learn add whose model the gate kept as a candidate


def _add_learn(sub) -> None:
    p = sub.add_parser(
        "learn",
        help="keep one model up to date as tasks arrive: init, add, promote, reject, status",
        description="A model directory learns one task per `add`: it trains on the new task from its current "
        "state, updates the merge, evaluates the new model on the held-out data of every task learned so far, "
        "writes a report and exports the model (DIR/model, a loadable directory). If an earlier task drops "
        f"more than max_drop points, the model is kept as DIR/candidate and add exits with status {LEARN_REFUSED}: "
        "`promote` accepts it, `reject` drops it.",
    )
    learn = p.add_subparsers(dest="learn_command", required=True)
    init = learn.add_parser(
        "init",
        help="make a model directory",
        description="Make DIR with LEARN.yaml's model, method, training settings, data columns and promotion "
        "policy. Without --config: the packaged all-MiniLM-L6-v2 with a zero-shot head, Seq-FT + MagMax at lam "
        "0.5, the embedded default's training settings, max_drop 5 points. The keys: docs/guides/learn.md.",
    )
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--config", metavar="LEARN.yaml", default=None, help="the learn config (default: the defaults)")
    add = learn.add_parser(
        "add",
        help="learn one more task from a file",
        description="Train task NAME from FILE (CSV, TSV, JSON lines, Parquet: columns text and label by default, "
        "config data: to change; an optional split column train/validation/test, else a seeded 20%% test carve), "
        "merge, evaluate every task learned so far, report, and promote the model unless the gate refuses it "
        f"(exit status {LEARN_REFUSED}).",
    )
    add.add_argument("directory", metavar="DIR")
    add.add_argument("--task", required=True, metavar="NAME", help="the new task's name")
    add.add_argument("--data", required=True, metavar="FILE", help="the new task's examples")
    add.add_argument(
        "--max-drop", type=float, default=None, metavar="POINTS", help="this add's gate (default: the policy's)"
    )
    add.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    for name, text in (("promote", "accept the candidate model"), ("reject", "drop the candidate model")):
        learn.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".").add_argument(
            "directory", metavar="DIR"
        )
    status = learn.add_parser("status", help="tasks, metrics, models and state size of a model directory")
    status.add_argument("directory", metavar="DIR")
    status.add_argument("--json", action="store_true", help="print the same as JSON")


def _run_learn(args) -> int:
    import dataclasses
    import json

    from mergecl.experiment import learn

    if args.learn_command == "init":
        print(learn.init(args.directory, args.config))
        return 0
    if args.learn_command == "add":
        done = learn.add(args.directory, args.task, args.data, max_drop=args.max_drop, echo=_quiet(args.quiet))
        print(done)
        return 0 if done.promoted else LEARN_REFUSED
    if args.learn_command in ("promote", "reject"):
        print(getattr(learn, args.learn_command)(args.directory))
        return 0
    found = learn.status(args.directory)
    if args.json:
        fields = {f.name: getattr(found, f.name) for f in dataclasses.fields(found) if f.name != "config"}
        fields.update(config=found.config.model_dump(mode="json"), acc=found.acc, bwt=found.bwt)
        print(json.dumps(fields, indent=1, default=str))
    else:
        print(found)
    return 0


SHELLS = ("bash", "zsh")


def _add_completion(sub) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for SHELL: subcommands, their options, method and merge rule "
        "names, packaged config names, list sections. The names are those of now (plugins loaded with --plugin "
        "included), so the shell runs no Python when it completes: save it once, e.g. mergecl completion bash > "
        "~/.mergecl-completion.bash, source that file from ~/.bashrc, and generate it again after adding plugins. "
        "For zsh the script loads bashcompinit (and compinit, unless the shell has loaded it).",
    )
    p.add_argument("shell", choices=SHELLS)


def _completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash completion function (zsh: through bashcompinit) with the names of now: no Python runs
    when the shell completes."""
    import shlex

    from mergecl.experiment.bench import SUITES
    from mergecl.experiment.config import packaged_configs
    from mergecl.experiment.plan import SECTIONS
    from mergecl.merging.registry import all_rules
    from mergecl.methods.registry import cl_rules
    from mergecl.methods.trainings import plain_methods

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = lambda names: shlex.quote(" ".join(names))  # noqa: E731
    cases = []
    for command, p in sub.choices.items():
        flags = [flag for action in p._actions for flag in action.option_strings]
        cases.append(f"        {command}) opts={words(flags)} ;;")
    rules = cl_rules()
    methods = [*plain_methods(), *rules, *(f"ind_ft+{r}" for r in rules)]
    globals_ = [flag for action in parser._actions for flag in action.option_strings]
    script = f"""# mergecl completion ({shell}); generated by `mergecl completion {shell}`
_mergecl() {{
    local cur prev cmd i opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --plugin) ((i++)) ;;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        case "$prev" in --plugin) COMPREPLY=($(compgen -f -- "$cur")); return ;; esac
        COMPREPLY=($(compgen -W {words([*sub.choices, *globals_])} -- "$cur"))
        return
    fi
    case "$prev" in
        --method)
            if [[ "$cmd" == merge ]]; then
                COMPREPLY=($(compgen -W {words(all_rules())} -- "$cur"))
            else
                COMPREPLY=($(compgen -W {words(methods)} -- "$cur"))
            fi
            return ;;
        -o|--out|--resume|--base|--plugin) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    opts=""
    case "$cmd" in
{chr(10).join(cases)}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case "$cmd" in
        run|eval) COMPREPLY=($(compgen -W {words(packaged_configs())} -- "$cur") $(compgen -f -- "$cur")) ;;
        list) COMPREPLY=($(compgen -W {words(SECTIONS)} -- "$cur")) ;;
        bench) COMPREPLY=($(compgen -W {words(SUITES)} -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W {words(SHELLS)} -- "$cur")) ;;
        *) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}}
"""
    if shell == "zsh":  # compinit first where the user's zshrc has not run it (bashcompinit needs compdef)
        script += "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }\n"
        script += "autoload -U +X bashcompinit && bashcompinit\n"
    return script + "complete -o filenames -F _mergecl mergecl\n"


class _Parser(argparse.ArgumentParser):
    """Options only as spelled: ``--scop`` is an error, not ``--scope`` (argparse's default takes any
    unambiguous prefix, and an option added later would change what a user's prefix means). The
    subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from mergecl import __version__

    parser = _Parser(prog="mergecl", description="Continual learning by model merging.")
    parser.add_argument("--version", action="version", version=f"mergecl {__version__}")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (a module name or a .py file) first: it may register merge rules, methods, "
        "backbones or sources (also: $MERGECL_PLUGINS, entry points 'mergecl.plugins'); repeatable",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    _add_run(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_combine(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_learn(sub)
    _add_list(sub)
    _add_completion(sub)
    return parser


def _load_plugins(argv: list[str]) -> None:
    """Plugins register what the parser lists (rules and their flags): load them before it is built,
    from the ``--plugin`` options in front of the command."""
    from mergecl.plugins import load_plugins

    named = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            named.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            named.append(arg.split("=", 1)[1])
        elif not arg.startswith("-") and (i == 0 or argv[i - 1] != "--plugin"):
            break  # the command: what follows is its own
    load_plugins(named)


def _exit_interrupted(signum, frame) -> None:
    say("mergecl: interrupted")
    os._exit(130)  # nothing is written yet: leave at once


def main(argv: list[str] | None = None) -> int:
    # build_parser imports torch (the merge rules' help): seconds in which Ctrl-C may come, and a
    # KeyboardInterrupt inside a C extension's import surfaces as an ImportError traceback. So
    # during start-up Ctrl-C exits directly (main thread only: signal handlers live there).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _exit_interrupted) if in_main_thread else None
    # As the program (no argv given): no garbage collection while torch and the rules are imported
    # (collections over a heap that only grows were 0.2 s of a 1.5 s start), and what the imports
    # built is then frozen out of every later collection (a run's, a merge's).
    as_program = argv is None and gc.isenabled()
    if as_program:
        gc.disable()
    try:
        _load_plugins(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
    except MergeclError as err:  # a plugin that cannot be loaded
        say(f"mergecl: error: {_one_line(str(err))}")
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
        if as_program:
            gc.freeze()
            gc.enable()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for --nproc: relaunched as is
    try:
        handlers = {
            "merge": _run_merge,
            "run": _run_run,
            "bench": _run_bench,
            "report": _run_report,
            "combine": _run_combine,
            "export": _run_export,
            "eval": _run_eval,
            "learn": _run_learn,
            "list": _run_list,
            "completion": lambda args: print(_completion_script(parser, args.shell), end="") or 0,
        }
        return handlers[args.command](args)
    except MergeclError as err:
        say(f"mergecl: error: {_one_line(str(err))}")
        return 2
    except OSError as err:  # any command: a full disk, a read-only or forbidden place (writes are atomic)
        say(f"mergecl: error: {_one_line(_os_error(err))}")
        return 2
    except KeyboardInterrupt:
        say("mergecl: interrupted")
        return 130
    except Exception:  # a crash: its traceback as Python prints it, once for --nproc's processes
        if not launched():
            raise
        import traceback

        hand_over(traceback.format_exc())
        return 1


def program() -> None:
    """The ``mergecl`` command (and ``python -m mergecl``): ``main()``, then the process ends without
    tearing the interpreter down. Python's teardown frees every object of every module one by one,
    torch's too: 0.3 s of every command on this machine (a third of ``mergecl merge --help``).
    What a normal exit must still do is done first: the ``atexit`` handlers (loggers, plugins)
    and the flush of stdout and stderr. With another Python thread still running (a logger's),
    the normal exit runs instead, which waits for it."""
    try:
        code = main()
    except SystemExit as leaving:  # argparse's --help and usage errors (their message is out)
        if not isinstance(leaving.code, int | None):
            raise
        code = leaving.code or 0
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if threading.active_count() > 1 or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``mergecl list | head -1``): nothing to save
            pass
    os._exit(code)
