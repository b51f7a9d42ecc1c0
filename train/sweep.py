"""Sweeps: many student runs from one teacher cache (methods x seeds x hyperparameters).

    python -m train.sweep --cache runs/demo/cache --data runs/demo/data --student gfl-nano \\
        --methods none frs icd maskd ld defeat --seeds 2 --out runs/sweep \\
        --set epochs=6 --grid frs.feat_weight=0.1,0.2

Layout of ``--out``:

    sweep.json          what the latest invocation asked for, and the cache's manifest id
    runs/<name>/        one student run each: run.json (its TrainConfig and grid point), train.log
                        (its output), and the trainer's files: config.json, log.csv, eval.csv,
                        last.pt, student.pt, results.json, tensorboard/
    results.csv, results.md, runs.csv, figures/*.png     the report (python -m train.report)

Resumable: a run with results.json is finished and skipped; a run with last.pt continues exactly
where it stopped (the trainer's resume); the others start. Rerunning an interrupted sweep
therefore finishes only the missing runs, and adding seeds, methods or grid values to a sweep runs
only the new ones. A finished run configured differently from what the sweep now asks for is
refused, never silently reused.

Every --set and --grid value is parsed and checked against its field's type and range before any
run starts (trainer options: TrainConfig and ``train.config.TRAIN_LIMITS``; METHOD.KEY: the
method's config): an empty, non-numeric or non-finite number, 2.5 for an int, a negative weight,
an unknown key, or a METHOD.KEY for a method no run trains is an error (exit status 2).

With ``--recipe NAME`` (``python -m train.recipes``) the sweep trains the recipe's method and
student with its trainer options and method weights as --set settings; --methods, --student and
every --set/--grid key given explicitly override the recipe's (a --student other than the
recipe's gets none of the recipe's student config). ``--recipe list`` prints the recipes.

Each run is a child process (``python -m train.sweep --run DIR``), so one crash does not end the
sweep and memory is returned between runs; a method registered in the calling process from a file
of its own (``train.methods.register_method``) is registered in the child from that file. Runs go
one per GPU (``--jobs``: all visible GPUs by
default); on a CPU one at a time, or ``--jobs N`` runs side by side with the cores split between
them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from train.checkpoint import RESUME_FREE_KEYS
from train.config import TrainConfig, train_option_rules
from train.methods import (METHODS, MethodSpec, ValueRule, check_overrides, method_sources, override_rule,
                           register_method_sources)
from train.options import split_assignments
from train.recipes import RECIPE_HELP
from train.run import run_training

SWEEP_FILE = "sweep.json"
RUN_FILE = "run.json"
# TrainConfig fields the sweep decides itself; the others can be --set or --grid.
SWEEP_OWNED = ("data", "out", "method", "cache", "teacher", "seed", "overrides", "resume", "progress",
               "stop_after")


@dataclass(frozen=True)
class RunSpec:
    """One student run of the sweep."""

    name: str
    method: str
    seed: int
    grid: dict[str, Any]          # the grid point's values that apply to this run
    config: TrainConfig

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def status(self) -> str:
        """finished | partial (resumable) | new."""
        if (self.out / "results.json").is_file():
            return "finished"
        return "partial" if (self.out / "last.pt").is_file() else "new"


def setting_rule(key: str) -> ValueRule:
    """What a --set/--grid key accepts: a trainer option's or a METHOD.KEY's rule. ValueError for a
    key the sweep owns or does not know, listing the valid keys."""
    if "." in key:
        return override_rule(key)
    if key in SWEEP_OWNED:
        raise ValueError(f"{key!r} is set by the sweep itself (use its own flag: --methods, --seeds, --cache, "
                         "--data, --out)")
    rules = train_option_rules()
    if key not in rules:
        raise ValueError(f"unknown setting {key!r}: expected a trainer option ("
                         + ", ".join(sorted(set(rules) - set(SWEEP_OWNED))) + ") or METHOD.KEY (e.g. frs.feat_weight)")
    return rules[key]


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"epochs": 4, "frs.feat_weight": 0.2}`` -> (trainer options, method hyperparameters), every
    key and value checked (:func:`setting_rule`)."""
    options, method_keys = {}, {}
    for key, value in settings.items():
        setting_rule(key).check(value, key)
        (method_keys if "." in key else options)[key] = value
    return options, method_keys


def applies(key: str, spec: MethodSpec) -> bool:
    """A ``frs.feat_weight`` setting applies to runs whose method includes frs."""
    return "." not in key or key.split(".", 1)[0] in spec


def run_name(method: str, grid: dict[str, Any], seed: int) -> str:
    point = "".join(f"_{key}={_text(value)}" for key, value in sorted(grid.items()))
    return f"{method}{point}_s{seed}"


def _text(value: Any) -> str:
    return "-".join(_text(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def check_settings(methods: list[str], settings: dict[str, Any], grid: dict[str, list]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks the methods, every --set and --grid key and value, and that each METHOD.KEY applies to
    some run; returns the settings split into (trainer options, method hyperparameters)."""
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or len(values) < 1:
            raise ValueError(f"--grid {key}: expected one or more comma-separated values")
        if len(set(map(_text, values))) != len(values):
            raise ValueError(f"--grid {key}: the values {list(values)} repeat")
        for value in values:  # the same key and value checks as --set
            split_settings({key: value})
    options, method_keys = split_settings(settings)
    if not methods:
        raise ValueError("no methods to sweep")
    swept = {name for method in methods for name in MethodSpec.parse(method).names}
    idle = [key for key in [*method_keys, *grid] if "." in key and key.split(".", 1)[0] not in swept]
    if idle:
        raise ValueError(f"{idle} would apply to no run: none of the methods {methods} includes "
                         + ", ".join(sorted({key.split('.', 1)[0] for key in idle})))
    return options, method_keys


def plan_runs(out: str | Path, methods: list[str], seeds: list[int], data: str, cache: str, student: str,
              settings: dict[str, Any] | None = None, grid: dict[str, list] | None = None) -> list[RunSpec]:
    """Every (method, grid point, seed) run, with its TrainConfig (validated now, before any run starts)."""
    settings, grid = dict(settings or {}), dict(grid or {})
    options, method_keys = check_settings(methods, settings, grid)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat")
    runs, names = [], set()
    for method in methods:
        spec = MethodSpec.parse(method)
        axes = {key: values for key, values in grid.items() if applies(key, spec)}
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            run_options = {**options, **{k: v for k, v in point.items() if "." not in k}}
            overrides = {k: v for k, v in {**method_keys, **point}.items() if "." in k and applies(k, spec)}
            check_overrides(spec, overrides)
            for seed in seeds:
                name = run_name(method, point, seed)
                if name in names:
                    raise ValueError(f"two runs are named {name}: a method is listed twice")
                names.add(name)
                config = TrainConfig(data=str(data), cache=str(cache), student=student, method=method, seed=seed,
                                     out=str(Path(out) / "runs" / name), overrides=overrides, resume=True,
                                     progress=False, **run_options)
                runs.append(RunSpec(name, method, seed, point, config))
    # Seed-major: the first pass over every method and grid point completes before the second seed.
    return sorted(runs, key=lambda run: seeds.index(run.seed))


def check_reusable(run: RunSpec) -> None:
    """A run directory written for another configuration is refused, naming the difference."""
    path = run.out / RUN_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())["config"]
    now = json.loads(json.dumps(run.config.to_dict()))  # tuples as lists, as stored
    differ = [f"{key}: was {before.get(key)!r}, now {value!r}" for key, value in now.items()
              if key not in RESUME_FREE_KEYS and before.get(key) != value]  # what resuming tolerates, reuse does
    if differ:
        raise ValueError(f"{run.out} holds a run configured differently (" + "; ".join(differ) + "). Use a new "
                         "--out, or make the changed setting a --grid axis so each value gets its own run")


def write_run_file(run: RunSpec) -> None:
    """run.json: the run's config, and where its methods registered outside train.methods are
    defined (the child process registers them from there)."""
    run.out.mkdir(parents=True, exist_ok=True)
    names = MethodSpec.parse(run.method).names
    data = {"name": run.name, "method": run.method, "seed": run.seed, "grid": run.grid,
            "config": run.config.to_dict(),
            "method_sources": {name: source for name, source in method_sources().items() if name in names}}
    (run.out / RUN_FILE).write_text(json.dumps(data, indent=2))


def cuda_devices() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install means no GPU for the sweep's purposes
        return 0


def child_environment(slot: int, jobs: int, gpus: int) -> tuple[dict[str, str], str | None]:
    """Environment and device of the child in ``slot``: one GPU each, or a share of the CPU cores."""
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        return env, "cuda"
    if jobs > 1:  # side by side, each takes its share (one run alone keeps what the environment says)
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    return env, None


def latest_iteration(run: RunSpec) -> str:
    """The last logged iteration of a running run (for the progress bar)."""
    try:
        with (run.out / "log.csv").open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 512))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return last.split(",", 1)[0] if last[:1].isdigit() else "0"
    except (OSError, IndexError):
        return "0"


def execute(runs: list[RunSpec], jobs: int | None = None, progress: bool = True,
            on_finish=None) -> dict[str, list[str]]:
    """Run every unfinished run (children ``python -m train.sweep --run DIR``); returns names by outcome."""
    for run in runs:
        check_reusable(run)
    outcome: dict[str, list[str]] = {"skipped": [], "finished": [], "failed": []}
    pending = []
    for run in runs:
        if run.status() == "finished":
            outcome["skipped"].append(run.name)
        else:
            pending.append(run)
    gpus = cuda_devices() if all(run.config.device in ("auto", "cuda") for run in runs) else 0
    jobs = jobs or max(1, gpus)
    bar = tqdm(total=len(runs), initial=len(outcome["skipped"]), desc="sweep", unit="run", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    running: dict[int, tuple[RunSpec, subprocess.Popen, Any, float]] = {}
    try:
        while pending or running:
            for slot in range(jobs):
                if slot in running or not pending:
                    continue
                run = pending.pop(0)
                write_run_file(run)
                env, device = child_environment(slot, jobs, gpus)
                command = [sys.executable, "-m", "train.sweep", "--run", str(run.out)]
                if device:
                    command += ["--device", device]
                log = (run.out / "train.log").open("a")
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[slot] = (run, process, log, time.time())
                tqdm.write(f"start  {run.name} ({run.status()}) -> {run.out}/train.log")
            time.sleep(0.5)
            bar.set_postfix_str(" ".join(f"{run.name}@{latest_iteration(run)}" for run, *_ in running.values()),
                                refresh=False)
            bar.update(0)  # redraws at most every mininterval
            for slot, (run, process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[slot]
                bar.update(1)
                if process.returncode == 0 and run.status() == "finished":
                    outcome["finished"].append(run.name)
                    final = json.loads((run.out / "results.json").read_text()).get("final") or {}
                    ap = f"AP {final['AP']:.1f}" if final.get("AP") is not None else "no eval"
                    tqdm.write(f"done   {run.name}: {ap} in {time.time() - started:.0f} s")
                    if on_finish is not None:
                        on_finish(run)
                else:
                    outcome["failed"].append(run.name)
                    tail = (run.out / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
                    tqdm.write(f"FAILED {run.name} (exit {process.returncode}); {run.out}/train.log ends:\n  "
                               + "\n  ".join(tail))
    except BaseException:  # Ctrl-C or a crash of the sweep: stop the children; their last.pt resumes them
        for run, process, log, _ in running.values():
            process.terminate()
        for run, process, log, _ in running.values():
            process.wait()
            log.close()
        raise
    finally:
        bar.close()
    return outcome


def run_child(run_dir: Path, device: str | None) -> int:
    """The child process: train one run from its run.json (resuming its last.pt when there is one)."""
    run_file = json.loads((run_dir / RUN_FILE).read_text())
    register_method_sources(run_file["method_sources"])
    config = dict(run_file["config"])
    if device and config.get("device", "auto") == "auto":
        config["device"] = device
    return run_training(config)


def sweep(out: str | Path, methods: list[str], seeds: list[int], data: str, cache: str, student: str,
          settings: dict[str, Any] | None = None, grid: dict[str, list] | None = None, jobs: int | None = None,
          report: bool = True, progress: bool = True) -> dict[str, Any]:
    """Plan, run what is missing, write the report. Returns the outcome and the report's paths."""
    from store import load_manifest
    from train.sources import manifest_id

    out = Path(out)
    runs = plan_runs(out, methods, seeds, data, cache, student, settings, grid)  # checks every setting first
    manifest = load_manifest(str(cache))
    if manifest is None:
        raise FileNotFoundError(f"{cache} is not a teacher cache (no manifest.json); make one with python -m "
                                "precompute (make cache)")
    if not manifest["complete"]:
        raise ValueError(f"{cache} is an unfinished cache: rerun the precompute command that wrote it (it resumes)")
    cache_id = manifest_id(manifest)
    previous = out / SWEEP_FILE
    if previous.is_file():
        before = json.loads(previous.read_text())
        if before.get("cache_manifest_id") not in (None, cache_id):
            raise ValueError(f"{out} is a sweep over another cache ({before.get('cache')}, manifest "
                             f"{before['cache_manifest_id'][:12]}); the runs of one sweep share one cache. "
                             "Use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_FILE).write_text(json.dumps({
        "methods": methods, "seeds": seeds, "data": str(data), "cache": str(cache), "cache_manifest_id": cache_id,
        "student": student, "settings": settings or {}, "grid": grid or {}, "runs": [r.name for r in runs]},
        indent=2))
    outcome = execute(runs, jobs=jobs, progress=progress)
    result: dict[str, Any] = {"outcome": outcome, "runs": [r.name for r in runs]}
    if report:
        from train.report import write_report
        result["report"] = write_report(out)
    return result


def parse_settings(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["epochs=6", "frs.feat_weight=0.2"]`` -> ``{"epochs": 6, "frs.feat_weight": 0.2}``, each value
    parsed by its key's rule; ValueError (one line, naming the key and value) otherwise."""
    settings = {}
    for key, text in split_assignments(items, flag).items():
        settings[key] = _rule_for(key, text, flag).parse(text, key, flag)
    return settings


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["frs.feat_weight=0.1,0.2", "milestones=(4,5),(6,7)"]`` -> ``{"frs.feat_weight": [0.1, 0.2],
    "milestones": [(4, 5), (6, 7)]}``: values split at the commas outside brackets, each parsed by
    the key's rule."""
    grid = {}
    for key, text in split_assignments(items, "--grid").items():
        rule = _rule_for(key, text, "--grid")
        grid[key] = [rule.parse(value, key, "--grid") for value in split_outside_brackets(text)]
    return grid


def _rule_for(key: str, text: str, flag: str) -> ValueRule:
    try:
        return setting_rule(key)
    except ValueError as error:
        raise ValueError(f"{flag} {key}={text!r}: {error}") from None


def split_outside_brackets(text: str) -> list[str]:
    """``"(4,5),(6,7)"`` -> ``["(4,5)", "(6,7)"]``; ``"0.1,0.2"`` -> ``["0.1", "0.2"]``; ``""`` -> ``[""]``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]; ValueError otherwise."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if seeds and min(seeds) >= 0:
                return seeds
            raise ValueError
        count = int(text)
    except ValueError:
        raise ValueError(f"--seeds {text!r}: a count (3 means seeds 0 1 2) or a list of seeds >= 0 (0,5,7)") from None
    if count < 1:
        raise ValueError(f"--seeds {text!r}: the count must be at least 1")
    return list(range(count))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help=RECIPE_HELP)
    p.add_argument("--cache", help="the teacher cache every run reads (python -m precompute)")
    p.add_argument("--data", help="COCO-layout root the cache was written for")
    p.add_argument("--student", default="gfl-nano", help="student zoo name [gfl-nano]")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"methods (and combinations such as ld+frs) [{' '.join(METHODS)}]")
    p.add_argument("--seeds", default="1", help="a count (2: seeds 0 and 1) or a list (0,5,7) [1]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="for every run: a trainer option (epochs=6, lr=0.02, batch_size=8, milestones=(4,5)) or a "
                        "method hyperparameter (frs.feat_weight=0.2, applied to the runs of that method); repeatable")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept axis, same keys as --set: one run per value (names carry KEY=VALUE); repeatable")
    p.add_argument("--jobs", type=int, help="runs side by side [one per GPU; 1 on a CPU]")
    p.add_argument("--out", help="sweep directory [runs/sweep]", default="runs/sweep")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--run", help=argparse.SUPPRESS)      # child process: one run directory
    p.add_argument("--device", help=argparse.SUPPRESS)   # child process: its device
    return p


def apply_recipe(args: argparse.Namespace, settings: dict[str, Any], grid: dict[str, list], argv=None
                 ) -> dict[str, Any]:
    """With --recipe: sets the recipe's methods and student on ``args`` where the command line gives
    none, and returns the recipe's settings with the command line's ``settings`` over them."""
    from train.recipes import explicit_dests, get_recipe
    recipe = get_recipe(args.recipe)
    explicit = explicit_dests(build_parser(), argv)
    if "methods" not in explicit:
        args.methods = [recipe.method]
    if "student" not in explicit:
        args.student = recipe.student
    return recipe.sweep_settings(args.methods, args.student, settings, grid)


def main(argv=None) -> int:
    from train.recipes import print_if_listing
    if print_if_listing(argv):
        return 0
    args = build_parser().parse_args(argv)
    if args.run:
        return run_child(Path(args.run), args.device)
    if not args.cache or not args.data:
        print("error: --cache and --data are required", file=sys.stderr)
        return 2
    try:  # every value checked before anything is read or run
        seeds, settings, grid = parse_seeds(args.seeds), parse_settings(args.settings), parse_grid(args.grid)
        if args.recipe:
            settings = apply_recipe(args, settings, grid, argv)
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: expected an int >= 1")
        plan_runs(args.out, args.methods, seeds, args.data, args.cache, args.student, settings, grid)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = sweep(args.out, args.methods, seeds, args.data, args.cache, args.student, settings=settings,
                       grid=grid, jobs=args.jobs, report=not args.no_report, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    outcome = result["outcome"]
    print(f"sweep {args.out}: {len(outcome['finished'])} runs trained, {len(outcome['skipped'])} already finished, "
          f"{len(outcome['failed'])} failed")
    if "report" in result:
        print(Path(result["report"]["markdown"]).read_text())
        print("\n".join(f"{kind}: {path}" for kind, path in result["report"]["paths"].items()))
    if outcome["failed"]:
        print("failed: " + ", ".join(outcome["failed"]) + " (see their train.log; rerun to retry)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
