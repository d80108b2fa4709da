"""Seeded ablation studies: a grid of configs x seeds trained one after another, resumable.

Each run is ``train_net.py --config-file CONFIG SEED s OUTPUT_DIR ROOT/NAME/seed_s KEY VALUE ...``
in its own process (``OMP_NUM_THREADS`` fixed per run, so a seed always replays the same
trajectory on the same machine). A run counts as finished when its ``eval_results.json`` exists;
finished runs are skipped when the study is started again, so a killed study resumes where it
stopped (an unfinished run starts over). A finished run's wall time is kept beside its results
(``ROOT/NAME/seed_s/study_seconds.json``). After every run the study writes

* ``ROOT/study.json``: every planned run (config, seed, command, threads, seconds, metrics), every
  finished run of the study's configs found in ``ROOT`` for other seeds (so that invocations
  training one seed each, side by side or one after another, leave a report of all of them;
  ``--report-seeds`` reports exactly the seeds it names), and the summary;
* ``ROOT/study.md``: per config mean ± std (sample std over seeds) of box / mask AP, and the paired
  difference to ``--baseline`` over the seeds both have finished;
* ``ROOT/study.png``: box AP per config, every seed a point, mean and ± std marked.

Configs come from a YAML spec (``--spec``; a list of ``{name, config, opts}``) and/or the command
line (``--config NAME CONFIG.yaml [KEY VALUE ...]``, repeatable). Example::

    python -m dk_detectron2.tools.study --spec configs/studies/shapes_recipe.yaml \\
        --seeds 11 12 13 --output output/study --jobs 2 --threads 1
    python -m dk_detectron2.tools.study --spec configs/studies/shapes_recipe.yaml \\
        --seeds 11 12 13 --output output/study --summarize-only
"""
import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from ..checkpoint.atomic import atomic_write
from .study_report import METRICS, format_markdown, metric, plot_study, summarize

__all__ = ["Study", "StudyConfig", "StudyRun", "finished_seeds", "load_spec", "plan_runs",
           "summarize", "format_markdown"]

logger = logging.getLogger("dk_detectron2.study")

SPEC_KEYS = {"name", "config", "opts", "seeds", "baseline"}
_DEPENDENCY = re.compile(r"\{root\}/([^/]+)/seed_\{seed\}")
_SEED_FOLDER = re.compile(r"seed_(-?\d+)")


@dataclass
class StudyConfig:
    """One row of the study: a name, a Detectron2 config file, command-line overrides and,
    optionally, its own seeds (a subset of the study's, e.g. 2 seeds to screen a hypothesis) and
    its own baseline for the paired differences (default: the study's ``--baseline``)."""

    name: str
    config: str
    opts: List[str] = field(default_factory=list)
    seeds: Optional[List[int]] = None
    baseline: Optional[str] = None

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"study config name must be a plain folder name, got {self.name!r}")
        # Detectron2 overrides come as KEY VALUE pairs; a classification study's opts are trainer
        # flags ("--model-kwargs a=1 b=2"), passed as they are.
        flags = bool(self.opts) and str(self.opts[0]).startswith("--")
        if len(self.opts) % 2 and not flags:
            raise ValueError(
                f"opts of study config {self.name!r} must be KEY VALUE pairs, got {self.opts!r}"
            )
        self.opts = [str(v) for v in self.opts]
        if self.seeds is not None:
            self.seeds = [int(s) for s in self.seeds]


@dataclass
class StudyRun:
    config: StudyConfig
    seed: int
    root: str
    results_file: str = "eval_results.json"  # what a finished run leaves (the runner's)

    @property
    def output_dir(self) -> str:
        return os.path.join(self.root, self.config.name, f"seed_{self.seed}")

    def command(self, python: str, train_script: str) -> List[str]:
        """In an override, ``{seed}`` becomes the run's seed and ``{root}`` the study folder (e.g.
        ``MODEL.WEIGHTS {root}/dw/seed_{seed}/model_final.pth``: the same seed's run of another
        config)."""
        opts = [v.replace("{seed}", str(self.seed)).replace("{root}", self.root)
                for v in self.config.opts]
        return [python, train_script, "--config-file", self.config.config,
                "SEED", str(self.seed), "OUTPUT_DIR", self.output_dir, *opts]

    @property
    def dependencies(self) -> List[str]:
        """Configs whose run of the same seed this run reads (``{root}/NAME/seed_{seed}``)."""
        return sorted({m for v in self.config.opts for m in _DEPENDENCY.findall(v)})

    @property
    def results_path(self) -> str:
        return os.path.join(self.output_dir, self.results_file)

    @property
    def finished(self) -> bool:
        return os.path.exists(self.results_path)

    @property
    def seconds_path(self) -> str:
        """Where the study keeps the run's wall time, beside its results (so that a later
        invocation planning other seeds, or ``--summarize-only``, still reports it)."""
        return os.path.join(self.output_dir, "study_seconds.json")

    def saved_seconds(self) -> Optional[float]:
        try:
            with open(self.seconds_path) as f:
                return float(json.load(f)["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def load_spec_settings(path: str) -> Dict:
    """The study-wide settings of a spec written as a mapping: ``kind`` ("detection", the
    default, or "classification") and ``train_args`` (arguments every run of a classification
    study passes to its trainer)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    settings = {"kind": "detection", "train_args": []}
    if isinstance(data, dict):
        unknown = set(data) - {"configs", "kind", "train_args"}
        if unknown:
            raise ValueError(f"{path}: unknown spec keys {sorted(unknown)}; valid: configs, kind, "
                             "train_args")
        settings.update({k: data[k] for k in ("kind", "train_args") if k in data})
    if settings["kind"] not in ("detection", "classification"):
        raise ValueError(f"{path}: kind must be 'detection' or 'classification', "
                         f"got {settings['kind']!r}")
    return settings


def load_spec(path: str) -> List[StudyConfig]:
    """The configs of a YAML spec: a list (or ``{configs: [...]}``) of ``{name, config, opts}``
    (and optionally ``seeds``, a subset of the study's seeds for that config, and ``baseline``)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        data = data.get("configs")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{name, config, opts}}, got {data!r}")
    configs = []
    for entry in data:
        if not isinstance(entry, dict) or set(entry) - SPEC_KEYS \
                or not {"name", "config"} <= set(entry):
            raise ValueError(f"{path}: each entry needs name, config and optional opts, seeds, "
                             f"baseline; got {entry!r}")
        configs.append(StudyConfig(entry["name"], entry["config"], list(entry.get("opts") or []),
                                   entry.get("seeds"), entry.get("baseline")))
    return configs


def plan_runs(configs: Sequence[StudyConfig], seeds: Sequence[int], root: str,
              results_file: str = "eval_results.json") -> List[StudyRun]:
    """Seed-major order (every config on the first seed, then the second, ...), so that an
    interrupted study leaves complete pairs."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"study config names must be unique, got {names}")
    return [StudyRun(c, int(s), root, results_file)
            for s in seeds for c in configs if c.seeds is None or int(s) in c.seeds]


def finished_seeds(configs: Sequence[StudyConfig], root: str,
                   results_file: str = "eval_results.json") -> List[int]:
    """The seeds, sorted, for which some config of the study has a finished run in ``root``
    (a ``NAME/seed_S`` folder holding the runner's results file)."""
    seeds = set()
    for config in configs:
        folder = os.path.join(root, config.name)
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            match = _SEED_FOLDER.fullmatch(entry)
            if match and os.path.exists(os.path.join(folder, entry, results_file)):
                seeds.add(int(match.group(1)))
    return sorted(seeds)


class DetectionRunner:
    """What a study of Detectron2 runs needs to know: ``train_net.py --config-file CONFIG SEED s
    OUTPUT_DIR ... KEY VALUE ...`` per run, ``eval_results.json`` when finished, box / mask AP,
    and the report (``study.md``, ``study.png``). A runner for another kind of run (see
    :mod:`.study_classification`) provides the same members."""

    kind = "detection"
    results_file = "eval_results.json"
    metric_labels = tuple(f"{t}/{k}" for t, k in METRICS)

    def __init__(self, train_script: str = "train_net.py"):
        self.train_script = train_script

    def check(self) -> None:
        if not os.path.exists(self.train_script):
            raise FileNotFoundError(
                f"--train-script {self.train_script!r} not found (run from the repository root)")

    def command(self, run: StudyRun, python: str) -> List[str]:
        return run.command(python, self.train_script)

    def metrics(self, run: StudyRun) -> Dict:
        with open(run.results_path) as f:
            results = json.load(f)
        return {f"{t}/{k}": metric(results, t, k) for t, k in METRICS}

    def status(self, metrics: Dict) -> str:
        box = metrics.get("bbox/AP")
        return "box AP —" if box is None else f"box AP {box:.1f}"

    def write_report(self, root, configs, records, summary) -> None:
        _atomic_write(os.path.join(root, "study.md"), format_markdown(configs, records, summary))
        plot_study(configs, records, summary, os.path.join(root, "study.png"))


def _record(run: StudyRun, command: List[str], threads: int, seconds: Optional[float],
            runner=None) -> Dict:
    metrics = (runner or DetectionRunner()).metrics(run) if run.finished else None
    return {"name": run.config.name, "seed": run.seed, "config": run.config.config,
            "opts": run.config.opts, "output_dir": run.output_dir, "threads": threads,
            "command": f"OMP_NUM_THREADS={threads} " + shlex.join(command[1:]),
            "seconds": seconds, "metrics": metrics}


class Study:
    """Runs the planned runs (``jobs`` at a time), skipping finished ones, and writes the report."""

    poll_seconds = 5.0  # how often running runs are checked

    def __init__(self, configs, seeds, root, baseline=None, threads=1, jobs=1,
                 python=sys.executable, train_script="train_net.py", runner=None,
                 report_seeds=None):
        names = {c.name for c in configs}
        if baseline is not None and baseline not in names:
            raise ValueError(f"--baseline {baseline!r} is not one of the study's configs")
        for c in configs:
            if c.baseline is not None and c.baseline not in names:
                raise ValueError(f"baseline {c.baseline!r} of {c.name!r} is not a study config")
        for name, value in (("threads", threads), ("jobs", jobs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.configs, self.root, self.baseline = list(configs), root, baseline
        self.threads, self.jobs, self.python, self.train_script = threads, jobs, python, train_script
        self.runner = runner or DetectionRunner(train_script)
        self.runs = plan_runs(self.configs, seeds, root, self.runner.results_file)
        self.only = None  # config names to train (None: all); the report keeps every run
        # None: the planned runs and every finished run of other seeds in root; else exactly these
        self.report_seeds = None if report_seeds is None else [int(s) for s in report_seeds]
        self._previous_seconds = self._load_previous_seconds()  # runs timed before per-run files

    def _load_previous_seconds(self) -> Dict:
        path = os.path.join(self.root, "study.json")
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                return {(r["name"], r["seed"]): r.get("seconds") for r in json.load(f)["runs"]}
        except (OSError, ValueError, KeyError) as e:
            logger.warning(f"ignoring unreadable {path}: {e}")
            return {}

    def report_runs(self) -> List[StudyRun]:
        """The runs the report covers, seed-major: those of ``report_seeds`` when given, else the
        planned runs plus every finished run of the study's configs for another seed."""
        results_file = self.runner.results_file
        if self.report_seeds is not None:
            return plan_runs(self.configs, self.report_seeds, self.root, results_file)
        planned = {r.seed for r in self.runs}
        others = [s for s in finished_seeds(self.configs, self.root, results_file) if s not in planned]
        extra = [r for r in plan_runs(self.configs, others, self.root, results_file) if r.finished]
        order = {c.name: i for i, c in enumerate(self.configs)}
        return sorted(self.runs + extra, key=lambda r: (r.seed, order[r.config.name]))

    def records(self) -> List[Dict]:
        def seconds(run):
            saved = run.saved_seconds()
            key = (run.config.name, run.seed)
            return saved if saved is not None else self._previous_seconds.get(key)

        return [_record(r, self.runner.command(r, self.python), self.threads, seconds(r),
                        self.runner) for r in self.report_runs()]

    def write_report(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        records = self.records()
        baselines = {c.name: c.baseline or self.baseline for c in self.configs}
        summary = summarize(records, baselines, self.runner.metric_labels)
        payload = {"kind": self.runner.kind, "baseline": self.baseline,
                   "configs": [asdict(c) for c in self.configs], "runs": records,
                   "summary": summary}
        _atomic_write(os.path.join(self.root, "study.json"), json.dumps(payload, indent=2))
        self.runner.write_report(self.root, self.configs, records, summary)

    def _start(self, run: StudyRun) -> subprocess.Popen:
        if os.path.isdir(run.output_dir):  # an unfinished run starts over
            shutil.rmtree(run.output_dir)
        os.makedirs(run.output_dir)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED="1")
        log = open(os.path.join(run.output_dir, "stdout.log"), "w")
        proc = subprocess.Popen(self.runner.command(run, self.python), env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        proc.log, proc.run, proc.started = log, run, time.time()
        return proc

    def run(self) -> int:
        self.runner.check()
        todo = [r for r in self.runs
                 if not r.finished and (self.only is None or r.config.name in self.only)]
        finished = sum(r.finished for r in self.runs)
        logger.info(f"{len(self.runs)} runs in the study, {finished} finished, {len(todo)} to train now"
                    f" ({self.jobs} at a time, {self.threads} thread(s) each)")
        self.write_report()
        running: List[subprocess.Popen] = []
        failures, done, start = 0, 0, time.time()
        by_key = {(r.config.name, r.seed): r for r in self.runs}
        for run in todo:
            missing = [d for d in run.dependencies if (d, run.seed) not in by_key]
            if missing:
                raise ValueError(f"{run.config.name} reads the runs of {missing}, which are not "
                                 f"in the study for seed {run.seed}")

        def ready(run):
            return all(by_key[(d, run.seed)].finished for d in run.dependencies)

        while todo or running:
            while len(running) < self.jobs and any(ready(r) for r in todo):
                run = next(r for r in todo if ready(r))
                todo.remove(run)
                proc = self._start(run)
                running.append(proc)
                logger.info(f"started {run.config.name} seed {run.seed} -> {run.output_dir}")
            if not running:  # what is left reads runs that failed or are not in this invocation
                failures += len(todo)
                logger.error("not started (a run they read did not finish): " + ", ".join(
                    f"{r.config.name} seed {r.seed}" for r in todo))
                break
            time.sleep(self.poll_seconds)
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                proc.log.close()
                seconds = time.time() - proc.started
                done += 1
                run = proc.run
                if proc.returncode == 0 and run.finished:
                    _atomic_write(run.seconds_path, json.dumps({"seconds": seconds}))
                    self.write_report()
                    status = self.runner.status(self.runner.metrics(run))
                else:
                    failures += 1
                    status = f"FAILED (rc {proc.returncode}, see {run.output_dir}/stdout.log)"
                elapsed = time.time() - start
                eta = elapsed / done * (len(todo) + len(running))
                logger.info(f"[{done}/{done + len(todo) + len(running)}] {run.config.name} seed "
                            f"{run.seed}: {status} in {seconds / 60:.1f} min; ETA {eta / 60:.0f} min")
        self.write_report()
        logger.info(f"study written to {self.root}/study.md ({failures} failed)")
        return 1 if failures else 0


def _atomic_write(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", help="YAML list of {name, config, opts}")
    p.add_argument("--config", action="append", nargs="+", default=[],
                   metavar="NAME CONFIG [KEY VALUE]", help="a study config (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train")
    p.add_argument("--report-seeds", type=int, nargs="+",
                   help="report exactly these seeds (default: --seeds and every seed with a "
                        "finished run in --output)")
    p.add_argument("--output", required=True, help="study folder (runs, study.md/json/png)")
    p.add_argument("--baseline", help="config name the paired differences are taken against")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--only", nargs="+", help="run only these config names (the report keeps all)")
    p.add_argument("--train-script", default="train_net.py")
    p.add_argument("--summarize-only", action="store_true", help="rewrite the report, train nothing")
    return p


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s study] %(message)s",
                        datefmt="%H:%M:%S")
    configs = load_spec(args.spec) if args.spec else []
    for entry in args.config:
        if len(entry) < 2:
            raise SystemExit(f"--config needs NAME CONFIG [KEY VALUE ...], got {entry}")
        configs.append(StudyConfig(entry[0], entry[1], entry[2:]))
    if not configs:
        raise SystemExit("no configs: give --spec and/or --config")
    settings = load_spec_settings(args.spec) if args.spec else {"kind": "detection"}
    runner = None
    if settings["kind"] == "classification":
        from .study_classification import ClassificationRunner

        runner = ClassificationRunner(settings["train_args"])
    study = Study(configs, args.seeds, args.output, args.baseline, args.threads, args.jobs,
                  train_script=args.train_script, runner=runner, report_seeds=args.report_seeds)
    if args.only:
        unknown = set(args.only) - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"--only names not in the study: {sorted(unknown)}")
        study.only = set(args.only)
    if args.summarize_only:
        study.write_report()
        return 0
    return study.run()


if __name__ == "__main__":
    sys.exit(main())
