"""The ``steerlab`` command line: one place where arguments are parsed."""

from __future__ import annotations

import argparse
import json
import sys


def _print_json(data: dict, path: str | None) -> None:
    from core.io import write_json

    print(json.dumps(data, indent=2))
    if path:
        write_json(path, data)
        print(f"wrote {path}")


def cmd_demos(args) -> None:
    from envs import get_suite
    from envs.dataset import summarize

    write = get_suite(args.suite).write_demos
    if write is None:
        raise ValueError(f"--suite: suite {args.suite!r} has no demonstration writer")
    print(summarize(write(args.task, args.episodes, args.mix or None, args.seed, args.out,
                          variant=args.variant, segment=args.segment)))


def cmd_train_policy(args) -> None:
    from experiments.run import train_policy_cli

    train_policy_cli(args.config, args.overrides, args.out)


def cmd_fit_verifier(args) -> None:
    from experiments.run import fit_cli

    fit_cli("verifier", args.name, args.policy, args.demos, args.out, args.overrides)


def cmd_adapt(args) -> None:
    import os

    from algos.base import learns
    from algos.registry import ADAPTERS
    from experiments.run import adapt_online_cli, fit_cli

    if args.name in ADAPTERS.known() and learns(ADAPTERS.lookup(args.name).adapter):
        from analysis.plots import plot_learning_curves

        comparison = adapt_online_cli(args.name, args.policy, args.out, args.overrides)
        path = plot_learning_curves(  # within-episode progress, adapted vs frozen
            [{"curves": {"decision": list(range(len(c))), "progress": c, "method": arm}}
             for arm, c in comparison["curves"].items() if c],
            os.path.join(args.out, "adaptation.png"))
        print(f"wrote {path}")
        return
    fit_cli("adapter", args.name, args.policy, args.demos, args.out, args.overrides)
    curve = os.path.join(args.out, "curve.json")
    if os.path.isfile(curve):  # an adapter's learning curve: success vs environment steps
        from analysis.plots import plot_learning_curves
        from core.io import read_json

        points = read_json(curve)["curve"]
        path = plot_learning_curves(
            [{"curves": {"env_steps": [p["env_steps"] for p in points],
                         "success": [p["success"] for p in points], "method": args.name}}],
            os.path.join(args.out, "curve.png"))
        print(f"wrote {path}")


def cmd_fit_progress(args) -> None:
    import os

    from experiments.fit_progress import fit_progress_run, progress_table

    # --eval-demos takes one or more directories, so field=value overrides written after it
    # land in its list: move those that are not existing paths to the overrides.
    eval_demos, overrides = [], list(args.overrides)
    for item in args.eval_demos:
        (overrides if "=" in item and not os.path.exists(item) else eval_demos).append(item)
    record = fit_progress_run(args.demos, args.out, eval_demos, overrides)
    print(progress_table(record))
    print(f"fit {record['fit_s']:.1f} s; wrote {os.path.join(args.out, 'progress.json')}")


def cmd_check_policy(args) -> None:
    from experiments.run import check_policy_cli

    check_policy_cli(args.policy, args.demos, args.episodes)


def cmd_eval(args) -> None:
    from experiments.run import eval_cli

    eval_cli(args.config, args.overrides, args.out)


def cmd_scaling(args) -> None:
    from experiments.run import scaling_cli

    scaling_cli(args.policy, args.demos, args.out, args.overrides)


def cmd_bench(args) -> None:
    if args.what == "env":
        from envs import get_suite
        from envs.bench import bench_env

        suite = get_suite(args.suite)
        if suite.bench is None:
            _print_json(bench_env(num_envs=args.num_envs, task=args.task or "pick_place"),
                        args.json)
        else:
            tasks = (args.task,) if args.task else suite.tasks
            for t in tasks:
                suite.validate(t, suite.variants[0])
            _print_json(suite.bench(tasks=tasks), args.json)
    elif args.what == "sac":
        from algos.sac_bench import bench_sac

        _print_json(bench_sac(task=args.task or "pick_place", num_updates=args.updates),
                    args.json)
    else:
        from experiments.run import bench_sampling_cli

        try:
            Ms = [int(m) for m in args.Ms.split(",")]
        except ValueError:
            raise ValueError(f"--Ms: give comma-separated integers such as 1,4,16; got "
                             f"{args.Ms!r}") from None
        _print_json(bench_sampling_cli(args.policy, args.verifier, Ms, args.repeats), args.json)


def cmd_report(args) -> None:
    from analysis.report import make_report

    print(make_report(args.dirs, out_dir=args.out))


def cmd_grid(args) -> None:
    from experiments.grid import GridOptions, grid_run_cli, grid_status_cli

    if args.grid_cmd == "run":
        options = GridOptions(workers=args.workers, backend=args.backend, address=args.address,
                              cpus_per_cell=args.cpus_per_cell)
        code = grid_run_cli(args.spec, out=args.out, options=options, stages=args.stages,
                            cfg_cls=args.config, dry_run=args.dry_run)
    else:
        code = grid_status_cli(args.out)
    if code:
        raise SystemExit(code)


def cmd_quickstart(args) -> None:
    from analysis.report import make_report
    from experiments.quickstart import quickstart

    out = quickstart(args.out, fast=args.fast, workers=args.workers)
    print(f"[quickstart] report: {make_report([str(out)])}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steerlab",
        description="Steer robot action-chunk policies with verifiers and adapters; measure "
        "success, latency and scaling.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("quickstart", help="demos → policy SFT → verifier sweep → scaling → report")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--workers", type=int, default=2,
                   help="evaluation cells run in parallel (default 2: one per core; the cells' "
                        "latency figures then share the machine)")
    s.add_argument("--fast", action="store_true", help="a tiny smoke-sized run (seconds)")
    s.set_defaults(fn=cmd_quickstart)

    s = sub.add_parser("demos", help="write a scripted-expert demonstration dataset")
    s.add_argument("--suite", default="tabletop", help="a registered env suite (tabletop: "
                   "scripted experts; maniskill: motion planning)")
    s.add_argument("--task", default="pick_place")
    s.add_argument("--variant", default="nominal")
    s.add_argument("--episodes", type=int, default=1000)
    s.add_argument("--mix", default="", help="premise (default), counter_premise, or "
                   "mode=weight,... e.g. optimal=0.6,hesitant=0.2,detour=0.1,sloppy=0.1")
    s.add_argument("--segment", type=int, default=4,
                   help="steps per expert-mode segment (0 = one mode per episode)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_demos)

    s = sub.add_parser("train-policy", help="SFT a base policy on a demonstration dataset")
    s.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    s.add_argument("--out", required=True, help="run directory (resumes if it has checkpoints)")
    s.add_argument("overrides", nargs="*", help="field.path=value")
    s.set_defaults(fn=cmd_train_policy)

    for command, kind, fn in (("fit-verifier", "verifier", cmd_fit_verifier),
                              ("adapt", "adapter", cmd_adapt)):
        learner = (" (a test-time learner is deployed with and without its learning on the same"
                   " episodes)" if kind == "adapter" else "")
        s = sub.add_parser(command, help=f"fit a registered {kind} for a trained policy{learner}")
        s.add_argument("name", help=f"a registered {kind} that has a fit"
                       + (" or learns at test time" if learner else ""))
        s.add_argument("--policy", required=True, help="policy run directory")
        s.add_argument("--demos", default=None, help="dataset (default: the policy's own)")
        s.add_argument("--out", required=True)
        s.add_argument("overrides", nargs="*", help="field.path=value")
        s.set_defaults(fn=fn)

    s = sub.add_parser("fit-progress", help="fit a task-progress estimator on demonstrations "
                       "(a dense reward where a simulator gives no progress)")
    s.add_argument("--demos", required=True, help="dataset to train on (episodes are split "
                   "into training and held out)")
    s.add_argument("--out", required=True, help="directory for the estimator and progress.json")
    s.add_argument("--eval-demos", nargs="+", default=[], metavar="DIR",
                   help="more datasets to measure accuracy on, e.g. other variants")
    s.add_argument("overrides", nargs="*", help="ProgressConfig field=value, e.g. steps=2000")
    s.set_defaults(fn=cmd_fit_progress)

    s = sub.add_parser("check-policy", help="does a trained policy reproduce its data? "
                       "(M=1 success, mode shares, wrong-block rate vs the dataset)")
    s.add_argument("--policy", required=True, help="policy run directory")
    s.add_argument("--demos", default=None, help="dataset (default: the policy's own)")
    s.add_argument("--episodes", type=int, default=256)
    s.set_defaults(fn=cmd_check_policy)

    s = sub.add_parser("eval", help="evaluate policy + verifier at M candidates in the harness")
    s.add_argument("--config", default=None, help="YAML file with run-config fields")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="field.path=value, e.g. eval.M=16")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("scaling", help="offline action-error vs N study with power-law fits")
    s.add_argument("--policy", required=True)
    s.add_argument("--demos", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_scaling)

    s = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    s.add_argument("what", choices=["env", "sampling", "sac"])
    s.add_argument("--json", default=None, help="write the figures to this file")
    s.add_argument("--num-envs", type=int, default=1024)
    s.add_argument("--suite", default="tabletop", help="env: a registered env suite (a "
                   "host-stepped one is timed per task, with state and with images)")
    s.add_argument("--task", default=None, help="default: pick_place (tabletop), every task "
                   "(a host-stepped suite)")
    s.add_argument("--policy", default=None, help="policy run directory (default: fresh init)")
    s.add_argument("--verifier", default=None, help="a registered verifier to time as well "
                   "(e.g. cfn; learned ones unfitted, at their fitted size)")
    s.add_argument("--Ms", default="1,4,8,16,32,64", help="candidate counts to time (sampling)")
    s.add_argument("--repeats", type=int, default=20, help="timed repeats per M (median)")
    s.add_argument("--updates", type=int, default=10, help="RLPD updates per timed call (sac)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("report", help="markdown report with plots from run or grid directories")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("grid", help="run or inspect an ablation grid")
    gsub = s.add_subparsers(dest="grid_cmd", required=True)
    g = gsub.add_parser("run", help="run a grid spec (resumes; retries failed cells)")
    g.add_argument("spec", help="grid spec YAML (base, axes, zip, exclude)")
    g.add_argument("--out", default=None, help="grid directory (default: runs/<spec name>)")
    g.add_argument("--workers", type=int, default=1,
                   help="cells run in parallel (local: spawn processes, 1 = inline)")
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local process pool or Ray tasks")
    g.add_argument("--address", default=None,
                   help="existing Ray cluster address (default: start a local Ray)")
    g.add_argument("--cpus-per-cell", type=float, default=1.0,
                   help="Ray CPUs reserved per cell")
    g.add_argument("--stages", default=None,
                   help="module:ATTR of the stage list (default: the spec's pipeline:, else "
                        "experiments.pipeline:STAGES)")
    g.add_argument("--config", default=None,
                   help="module:Class of the run config (default: the spec's config:, else "
                        "experiments.config:RunConfig)")
    g.add_argument("--dry-run", action="store_true",
                   help="list the cells and exit without running")
    g = gsub.add_parser("status", help="done / running / failed / pending cells")
    g.add_argument("out", help="grid directory")
    s.set_defaults(fn=cmd_grid)
    return p


# Errors that mean the inputs are wrong (a bad value, a missing, unreadable or misplaced
# path): one line on stderr and exit 2. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                FileExistsError, PermissionError)


def one_line(e: BaseException) -> str:
    """An error's message on one line (some carry a library's multi-line text)."""
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # field=value overrides may come before or after the options (argparse stops a trailing
    # positional list at the first option), so collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        args.fn(args)
    except INPUT_ERRORS as e:
        print(f"steerlab {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
