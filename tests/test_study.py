"""The seeded study runner (``python -m dk_detectron2.tools.study``): planning, resuming,
dependencies between runs, statistics and the written report. A stand-in training script writes
``eval_results.json`` from its seed and overrides, so the runner is tested without training."""
import json
import math
import os
import sys
import textwrap

import pytest

from dk_detectron2.tools import study as study_tool
from dk_detectron2.tools.study import Study, StudyConfig, load_spec, plan_runs, summarize

FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, sys
    args = sys.argv[1:]
    opts = dict(zip(args[2::2], args[3::2]))  # after --config-file CONFIG
    out, seed = opts["OUTPUT_DIR"], int(opts["SEED"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(os.path.dirname(out), "..", "calls.txt"), "a") as f:
        f.write(f"{os.path.basename(os.path.dirname(out))} {seed}\\n")
    if opts.get("FAIL") == str(seed):
        sys.exit(3)
    if "MODEL.WEIGHTS" in opts:
        assert os.path.exists(opts["MODEL.WEIGHTS"]), opts["MODEL.WEIGHTS"]
    box = 40.0 + seed + float(opts.get("GAIN", 0))
    with open(os.path.join(out, "eval_results.json"), "w") as f:
        json.dump({"bbox": {"AP": box, "AP50": box + 10, "AP75": box - 5},
                   "segm": {"AP": box + 1, "AP50": box + 11}}, f)
    open(os.path.join(out, "model_final.pth"), "w").close()
    """
)


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    monkeypatch.setattr(Study, "poll_seconds", 0.05)
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return str(path)


def _calls(root):
    with open(os.path.join(root, "calls.txt")) as f:
        return [tuple(line.split()) for line in f.read().splitlines()]


def test_plan_is_seed_major_and_respects_per_config_seeds(tmp_path):
    configs = [StudyConfig("a", "a.yaml"), StudyConfig("b", "b.yaml", seeds=[2])]
    runs = plan_runs(configs, [1, 2, 3], str(tmp_path))
    assert [(r.config.name, r.seed) for r in runs] == [("a", 1), ("a", 2), ("b", 2), ("a", 3)]
    assert runs[2].output_dir == os.path.join(str(tmp_path), "b", "seed_2")
    with pytest.raises(ValueError, match="unique"):
        plan_runs([StudyConfig("a", "x"), StudyConfig("a", "y")], [0], str(tmp_path))


def test_command_substitutes_seed_and_root(tmp_path):
    config = StudyConfig("ft", "c.yaml", ["MODEL.WEIGHTS", "{root}/base/seed_{seed}/m.pth"])
    (run,) = plan_runs([config], [7], str(tmp_path))
    command = run.command("python", "train_net.py")
    assert command[:6] == ["python", "train_net.py", "--config-file", "c.yaml", "SEED", "7"]
    assert command[-2:] == ["MODEL.WEIGHTS", f"{tmp_path}/base/seed_7/m.pth"]
    assert run.dependencies == ["base"]


def test_bad_configs_are_rejected_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        StudyConfig("a", "a.yaml", ["MODEL.DK.SCOPE_SIZE"])
    with pytest.raises(ValueError, match="plain folder name"):
        StudyConfig("a/b", "a.yaml")
    spec = tmp_path / "spec.yaml"
    spec.write_text("- name: a\n  config: a.yaml\n  lr: 3\n")
    with pytest.raises(ValueError, match="each entry needs"):
        load_spec(str(spec))
    spec.write_text("{}\n")
    with pytest.raises(ValueError, match="non-empty list"):
        load_spec(str(spec))
    with pytest.raises(ValueError, match="--baseline"):
        Study([StudyConfig("a", "a.yaml")], [0], str(tmp_path), baseline="zzz")
    with pytest.raises(ValueError, match="baseline 'zzz' of 'a'"):
        Study([StudyConfig("a", "a.yaml", baseline="zzz")], [0], str(tmp_path))


def test_summary_has_mean_sample_std_and_paired_differences():
    def record(name, seed, box):
        return {"name": name, "seed": seed,
                "metrics": {"bbox/AP": box, "bbox/AP50": None, "bbox/AP75": None,
                            "segm/AP": box / 2, "segm/AP50": None}}

    records = [record("base", 1, 10.0), record("base", 2, 14.0), record("base", 3, 12.0),
               record("dk", 1, 13.0), record("dk", 2, 15.0)]  # dk seed 3 unfinished
    summary = summarize(records, "base")
    assert summary["base"]["bbox/AP"]["mean"] == pytest.approx(12.0)
    assert summary["base"]["bbox/AP"]["std"] == pytest.approx(2.0)  # sample std (n - 1)
    diff = summary["dk"]["bbox/AP - base"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(2.0)  # paired: (3 + 1) / 2
    assert diff["std"] == pytest.approx(math.sqrt(2.0))
    assert summary["dk"]["seeds"] == [1, 2]
    assert "bbox/AP - base" not in summary["base"] and summary["base"]["baseline"] is None
    per_config = summarize(records, {"dk": "dk", "base": "dk"})  # each row its own baseline
    assert per_config["base"]["bbox/AP - dk"]["mean"] == pytest.approx(-2.0)
    assert per_config["dk"]["baseline"] is None


def test_study_runs_resumes_and_reports(tmp_path, fake_train):
    root = str(tmp_path / "study")
    configs = [
        StudyConfig("base", "base.yaml"),
        StudyConfig("dk", "dk.yaml", ["GAIN", "2.5"]),
        StudyConfig("ft", "dk.yaml", ["MODEL.WEIGHTS", "{root}/base/seed_{seed}/model_final.pth",
                                      "GAIN", "3"], baseline="dk"),
    ]
    study = Study(configs, [1, 2], root, baseline="base", jobs=2, train_script=fake_train)
    assert study.run() == 0
    calls = _calls(root)
    assert sorted(calls) == sorted((n, s) for n in ("base", "dk", "ft") for s in ("1", "2"))
    for seed in ("1", "2"):  # a run that reads another's checkpoint starts after it finished
        assert calls.index(("ft", seed)) > calls.index(("base", seed))

    with open(os.path.join(root, "study.json")) as f:
        report = json.load(f)
    assert report["summary"]["dk"]["bbox/AP - base"]["mean"] == pytest.approx(2.5)
    assert report["summary"]["dk"]["bbox/AP"]["mean"] == pytest.approx(44.0)
    assert report["summary"]["ft"]["bbox/AP - dk"]["mean"] == pytest.approx(0.5)
    assert len(report["runs"]) == 6 and all(r["seconds"] is not None for r in report["runs"])
    assert report["runs"][0]["command"].startswith("OMP_NUM_THREADS=1 ")
    markdown = open(os.path.join(root, "study.md")).read()
    assert "| `dk` | 1 2 | 44.0 ± 0.7 (n=2)" in markdown and "`base` | +2.5 ± 0.0 (n=2)" in markdown
    assert "`dk` | +0.5 ± 0.0 (n=2)" in markdown
    assert os.path.getsize(os.path.join(root, "study.png")) > 1000

    # Started again with one more seed: only the new seed's runs train; the old times are kept.
    study = Study(configs, [1, 2, 3], root, baseline="base", train_script=fake_train)
    assert study.run() == 0
    assert _calls(root)[len(calls):] == [("base", "3"), ("dk", "3"), ("ft", "3")]
    with open(os.path.join(root, "study.json")) as f:
        assert all(r["seconds"] is not None for r in json.load(f)["runs"])
    # An invocation that plans one seed still reports the finished runs of the others (as when
    # one-seed invocations run side by side), seed-major, each with its time.
    Study(configs, [3], root, baseline="base", train_script=fake_train).write_report()
    with open(os.path.join(root, "study.json")) as f:
        report = json.load(f)
    assert [(r["name"], r["seed"]) for r in report["runs"]] == [
        (n, s) for s in (1, 2, 3) for n in ("base", "dk", "ft")]
    assert all(r["seconds"] is not None for r in report["runs"])
    assert report["summary"]["dk"]["bbox/AP - base"]["n"] == 3
    # report_seeds names exactly the seeds reported; its unfinished runs are listed as such.
    Study(configs, [3], root, baseline="base", train_script=fake_train,
          report_seeds=[2, 4]).write_report()
    with open(os.path.join(root, "study.json")) as f:
        runs = json.load(f)["runs"]
    assert [(r["name"], r["seed"], r["metrics"] is None) for r in runs] == [
        (n, s, s == 4) for s in (2, 4) for n in ("base", "dk", "ft")]


def test_an_unfinished_run_starts_over_and_failures_are_reported(tmp_path, fake_train):
    root = tmp_path / "study"
    stale = root / "base" / "seed_1"
    stale.mkdir(parents=True)
    (stale / "half_written.pth").write_text("x")
    configs = [StudyConfig("base", "base.yaml", ["FAIL", "2"]),
               StudyConfig("ft", "x.yaml", ["MODEL.WEIGHTS", "{root}/base/seed_{seed}/model_final.pth"])]
    study = Study(configs, [1, 2], str(root), train_script=fake_train)
    assert study.run() == 1  # base seed 2 failed, so ft seed 2 never started
    assert not (stale / "half_written.pth").exists()
    assert (stale / "eval_results.json").exists()
    assert ("ft", "2") not in _calls(str(root))
    assert "—" in open(root / "study.md").read()


def test_command_line_builds_the_study(tmp_path, fake_train):
    spec = tmp_path / "spec.yaml"
    spec.write_text("- name: base\n  config: base.yaml\n- name: dk\n  config: dk.yaml\n"
                    "  opts: [GAIN, 1]\n  seeds: [0]\n")
    root = tmp_path / "out"
    rc = study_tool.main(["--spec", str(spec), "--config", "extra", "x.yaml", "GAIN", "3",
                          "--seeds", "0", "1", "--output", str(root), "--baseline", "base",
                          "--train-script", fake_train, "--only", "base", "dk"])
    assert rc == 0
    assert sorted(_calls(str(root))) == [("base", "0"), ("base", "1"), ("dk", "0")]
    with open(root / "study.json") as f:
        names = [r["name"] for r in json.load(f)["runs"]]
    assert names == ["base", "dk", "extra", "base", "extra"]  # the report keeps every run
    # A one-seed invocation reports the other seed's finished runs too, unless told otherwise.
    common = ["--spec", str(spec), "--output", str(root), "--baseline", "base"]
    assert study_tool.main(common + ["--seeds", "1", "--summarize-only"]) == 0
    with open(root / "study.json") as f:
        assert [(r["name"], r["seed"]) for r in json.load(f)["runs"]] == [
            ("base", 0), ("dk", 0), ("base", 1)]
    assert study_tool.main(common + ["--seeds", "1", "--report-seeds", "1", "--summarize-only"]) == 0
    with open(root / "study.json") as f:
        assert [(r["name"], r["seed"]) for r in json.load(f)["runs"]] == [("base", 1)]
    with pytest.raises(SystemExit, match="not in the study"):
        study_tool.main(["--spec", str(spec), "--output", str(root), "--only", "nope"])
    with pytest.raises(FileNotFoundError, match="--train-script"):
        study_tool.main(["--spec", str(spec), "--output", str(root),
                         "--train-script", str(tmp_path / "missing.py")])
