"""The README's figures quote the committed files they come from: the benchmark targets
(benchmarks/results.json), the study rows about the generators' learning rate
(docs/results/study_recipe.json, docs/results/edge_taps/), the export table
(docs/results/export/) and the classification and pipeline studies."""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(REPO, *parts), encoding="utf-8") as f:
        return f.read()


def _signed(value):
    return f"{value:+.1f}".replace("-", "−")


@pytest.mark.parametrize("run", ["dk_lr0.1", "dk_s4_lr0.1"])
def test_the_learning_rate_notes_quote_each_study_row(run):
    """Scope 5 and scope 4 at 0.1x are two rows (edge taps, box AP); no sentence merges them, and
    each edge share is the one ``kernel_samples --stats-json`` wrote (docs/results/edge_taps/)."""
    row = json.loads(_read("docs", "results", "study_recipe.json"))["summary"][run]["bbox/AP - dw"]
    quoted = f"{_signed(row['mean'])} ± {row['std']:.1f}"
    stats = json.loads(_read("docs", "results", "edge_taps", f"{run}_seed11.json"))
    assert stats["command"].startswith("python -m dk_detectron2.tools.kernel_samples --stats")
    assert f"/{run}/seed_11/" in stats["weights"]
    edge = f"{100 * stats['mean_over_layers']['taps_on_scope_edge']:.1f} %"
    readme = _read("README.md")
    assert any(edge in line and quoted in line for line in readme.splitlines()), (edge, quoted)
    assert edge in _read("docs", "results_shapes.md")
    for path in (("README.md",), ("configs", "shapes", "Base-Shapes.yaml"),
                 ("dk_detectron2", "config.py")):
        text = _read(*path)
        assert edge in text, path
        for unsourced in ("13-44 %", "13-27 %", "27-44 %"):
            assert unsourced not in text, (path, unsourced)


@pytest.mark.parametrize("metric, label", [
    ("model/inference", "Mask R-CNN DK-R50-FPN inference / plain R50-FPN"),
    ("ops/deform_kernel2d/forward", "`deform_kernel2d` fwd / fastest depthwise `conv2d`"),
    ("ops/deform_kernel2d/forward_backward", "`deform_kernel2d` fwd+bwd / depthwise `conv2d`"),
])
def test_the_benchmark_table_quotes_the_committed_targets(metric, label):
    target = next(t for t in json.loads(_read("benchmarks", "results.json"))["targets"]
                  if t["metric"] == metric)
    low, high = target["measured_range"]
    quoted = f"{target['measured']:.2f}× ({low:.2f}–{high:.2f}×)"
    (line,) = [line for line in _read("README.md").splitlines() if line.startswith(f"| {label} |")]
    assert quoted in line, (quoted, line)
    assert ("miss" in line) == (target["status"] == "MISS"), line


_EXPORT_LABELS = {
    "torchscript": "`torchscript` (whole model)",
    "torchscript_script": "`torchscript_script` (whole model)",
    "export": "`export` (trunk)",
    "aoti": "`aoti` (trunk)",
    "onnx": "`onnx` (trunk, ONNX Runtime 1.32)",
}


def _export_row(name, report):
    """The README's row of one export format, from the JSON ``python -m
    dk_detectron2.tools.export`` wrote (docs/results/export/export_<format>.json)."""
    if report["max_abs"] == 0:
        whole = report["part"] == "model" and report["integers_equal"] == 1.0
        difference = "0 (boxes, classes, masks, scores identical)" if whole else "0"
    else:
        difference = f"{report['max_abs']:.1e} ({report['max_rel']:.1e})"
    batched = report.get("batched")
    one_batch = ("-" if batched is None else "0" if batched["max_rel"] == 0
                 else f"{batched['max_rel']:.1e} relative")
    eager, exported = 1e3 * report["eager_seconds"], 1e3 * report["exported_seconds"]
    tool = f"{report['tool_seconds']:.0f} s" + (" (C++ compilation)" if name == "aoti" else "")
    return (f"| {_EXPORT_LABELS[name]} | yes | yes | {difference} | {one_batch} | "
            f"{eager:.1f} / {exported:.1f} ({exported / eager:.2f}×) | {tool} |")


@pytest.mark.parametrize("name", sorted(_EXPORT_LABELS))
def test_the_export_table_quotes_the_tools_json(name):
    report = json.loads(_read("docs", "results", "export", f"export_{name}.json"))
    assert report["format"] == name and report["samples"] == 8 and report["repeats"] == 5
    assert report["shapes_equal"] == report["finite_equal"] == 1.0
    assert _export_row(name, report) in _read("README.md").splitlines()


def _mean_std(stats, signed=False):
    mean = _signed(stats["mean"]) if signed else f"{stats['mean']:.1f}"
    return f"{mean} ± {stats['std']:.1f}"


def _spread(values):
    """{"mean", "std"} of ``values`` (sample std), the form the studies' summaries use."""
    import statistics

    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}


def _metric_by_seed(study, row, metric="top1"):
    """The final ``metric`` (default top-1) per seed of ``row``'s finished runs in the committed
    ``study`` (docs/results/)."""
    runs = json.loads(_read("docs", "results", study))["runs"]
    return {run["seed"]: run["metrics"][metric] for run in runs
            if run["name"] == row and run["metrics"]}


def _paired_difference(row, reference, study="study_cls.json", reference_study=None,
                       metric="top1"):
    """Mean, std and the per-seed ``differences`` (seed order) over the committed runs of
    metric[row] (in ``study``) - metric[reference] (in ``reference_study``, default the same
    study), paired by seed, and the number of seeds both have."""
    top1 = _metric_by_seed(study, row, metric)
    base = _metric_by_seed(reference_study or study, reference, metric)
    seeds = sorted(set(top1) & set(base))
    differences = [top1[s] - base[s] for s in seeds]
    return {**_spread(differences), "differences": differences}, len(seeds)


@pytest.mark.parametrize("study, row, metric, signed", [
    ("study_cls.json", "rigid3", "top1", False),
    ("study_cls.json", "dk", "top1", False),
    ("study_cls.json", "dk", "top1 - rigid3", True),
    ("study_cls.json", "rigid5", "top1 - rigid3", True),
    ("study_cls.json", "rigid3_wide", "top1 - rigid3", True),
    ("study_cls.json", "condconv", "top1 - rigid3", True),
    ("study_cls.json", "dk_frozen", "top1", False),
    ("study_cls.json", "dcn", "top1 - rigid3", True),
    ("study_cls.json", "dk_s4", "top1 - rigid3", True),
    ("study_cls.json", "dk_sep", "top1 - rigid3", True),
    ("study_cls.json", "dkdcn", "top1 - rigid3", True),
    ("study_cls_mbv2.json", "mbv2_rigid3", "top1", False),
    ("study_cls_mbv2.json", "mbv2_dk", "top1", False),
    ("study_cls_mbv2.json", "mbv2_dk", "top1 - mbv2_rigid3", True),
    ("study_cls_mbv2_recipe.json", "mbv2_rigid3_sgd01", "top1", False),
    ("study_cls_mbv2_recipe.json", "mbv2_dk_sgd01", "top1", False),
    ("study_cls_mbv2_recipe.json", "mbv2_dk_sgd01", "top1 - mbv2_rigid3_sgd01", True),
    ("study_cls_mbv2_recipe.json", "mbv2_rigid5_sgd01", "top1 - mbv2_rigid3_sgd01", True),
    ("study_cls_mbv2_recipe.json", "mbv2_rigid3_w075_sgd01", "top1 - mbv2_rigid3_sgd01", True),
    ("study_cls_mbv2_recipe.json", "mbv2_condconv19_sgd01", "top1 - mbv2_rigid3_sgd01", True),
    ("study_cls_lr01.json", "rigid3_sgd01", "top1", False),
    ("study_cls_lr01.json", "dk_sgd01", "top1", False),
    ("study_cls_lr01.json", "dk_sgd01", "top1 - rigid3_sgd01", True),
    ("study_cls_lr01.json", "rigid5_sgd01", "top1 - rigid3_sgd01", True),
    ("study_cls_upgrade.json", "rigid3_more", "top1", False),
    ("study_cls_upgrade.json", "dk_from_rigid3", "top1", False),
    ("study_cls_upgrade.json", "dk_from_rigid3", "top1 - rigid3_more", True),
    ("study_cls_upgrade.json", "rigid5_from_rigid3", "top1 - rigid3_more", True),
    ("study_cls_upgrade.json", "dk_from_rigid3_g01", "top1 - rigid3_more", True),
    ("study_cls_upgrade5.json", "dk5_from_rigid5", "top1 - rigid5_more", True),
    ("study_cls_upgrade5.json", "rigid7_from_rigid5", "top1 - rigid5_more", True),
    ("study_cls_long.json", "rigid3", "top1", False),
    ("study_cls_long.json", "dk", "top1", False),
    ("study_cls_long.json", "dk", "top1 - rigid3", True),
    ("study_pretrained.json", "dw_pre", "bbox/AP", False),
    ("study_pretrained.json", "dk_pre", "bbox/AP", False),
    ("study_pretrained.json", "dk_pre", "bbox/AP - dw_pre", True),
    ("study_pretrained.json", "dk_rigidpre", "bbox/AP - dw_pre", True),
])
def test_the_classification_figures_quote_the_studies(study, row, metric, signed):
    """The README and docs/results_classification.md quote the five-seed rows of the committed
    classification studies (both networks, both learning rates, the upgrade) and the pipeline
    study, and the three-seed rows of the 20-epoch study (mean ± std, differences signed)."""
    stats = json.loads(_read("docs", "results", study))["summary"][row][metric]
    assert stats["n"] == (3 if study == "study_cls_long.json" else 5), (row, metric, stats["n"])
    quoted = _mean_std(stats, signed)
    assert quoted in _read("README.md"), quoted
    assert quoted in _read("docs", "results_classification.md"), quoted


def test_the_deformation_figures_quote_the_tools_json():
    report = json.loads(_read("docs", "results", "deformation_cls.json"))
    dk, fast = report["summary"]["dk"], report["summary"]["dk_g01"]
    assert dk["mean_abs_rotation"]["n"] == fast["mean_abs_rotation"]["n"] == 5
    ratio = fast["mean_abs_rotation"]["mean"] / dk["mean_abs_rotation"]["mean"]
    assert f"moves its taps {ratio:.1f} times as far" in _read("README.md")
    assert f"({fast['mean_abs_rotation']['mean']:.2f} cells" in _read("docs", "results_classification.md")
    readme = _read("README.md")
    assert f"move {dk['mean_abs_rotation']['mean']:.2f} cells" in readme
    assert f"grid grew to {dk['grid_abs_weight']['mean']:.3f}" in readme


def test_the_deformation_correlation_quotes_the_tools_json():
    """The rank correlation of top-1 with the taps' movement over the scope-5 variants, as the
    results page quotes it, is the one the tool's ``--correlate`` wrote."""
    report = json.loads(_read("docs", "results", "deformation_cls.json"))
    correlation = report["correlation"]
    assert "--correlate" in report["command"] and correlation["n"] == 35
    assert sorted(correlation["configs"]) == sorted(
        ["dk", "dk_g01", "dk_ring0", "dk_frozen", "gdk", "dk_sep", "dkdcn"])
    low, high = correlation["ci"]
    quoted = (f"**{correlation['rho']:.2f}** (95 % bootstrap interval over runs "
              f"[{low:.2f}, {high:.2f}]").replace("-", "−")
    assert quoted in " ".join(_read("docs", "results_classification.md").split()), quoted
    in_readme = (f"rank correlation {correlation['rho']:.2f} over {correlation['n']} runs, interval "
                 f"{low:.2f} to {high:.2f}").replace("-", "−")
    assert in_readme in " ".join(_read("README.md").split()), in_readme


@pytest.mark.parametrize("row, quoted_n", [("dk_frozen", 5), ("dk_ring0", 5), ("condconv", 5),
                                           ("dk_g01", 5), ("rigid3_wide", 5), ("rigid5", 5),
                                           ("condconv19", 5), ("dcn", 5), ("gdk", 5),
                                           ("dk_s4", 5), ("dk_s4_frozen", 5), ("dk_sep", 5),
                                           ("dkdcn", 5)])
def test_the_control_figures_quote_the_study_runs(row, quoted_n):
    """The controls' top-1 and their paired differences to DK (over the seeds both have, from the
    committed runs) as the README and the results page quote them."""
    difference, n = _paired_difference(row, "dk")
    assert n == quoted_n
    paired = _mean_std(difference, signed=True)
    study = json.loads(_read("docs", "results", "study_cls.json"))
    own = _mean_std(study["summary"][row]["top1"])
    texts = [_read("docs", "results_classification.md")]
    if row in ("dk_frozen", "dk_ring0", "condconv", "dk_g01", "dcn", "gdk"):  # quoted there too
        texts.append(_read("README.md"))
    for text in texts:
        flowing = " ".join(text.split())  # Markdown's line breaks are spaces
        # A gain may be quoted unsigned ("beats DK by 5.5 ± 2.3"), never with a minus before it.
        quotes = (paired, " " + paired[1:] if paired.startswith("+") else paired)
        assert any(q in flowing for q in quotes), (row, paired)
    assert own in _read("docs", "results_classification.md"), (row, own)


@pytest.mark.parametrize("row, reference, in_readme", [
    ("dk_s4_frozen", "dk_frozen", True),  # what scope 4's parametrisation costs
    ("dk_s4", "dk_s4_frozen", False),  # what its learned rotations cost on top
    ("dkdcn", "dcn", True),  # what DK's kernel deformation costs DCN
])
def test_the_scope_figures_quote_the_study_runs(row, reference, in_readme):
    """What ``row`` costs against ``reference`` (their paired difference), as the results page (and
    the README) quote it unsigned ("costs 4.5 ± 1.2 points")."""
    difference, n = _paired_difference(reference, row)
    assert n == 5
    quoted = _mean_std(difference)
    texts = [_read("docs", "results_classification.md")]
    if in_readme:
        texts.append(_read("README.md"))
    for text in texts:
        assert quoted in " ".join(text.split()), (row, reference, quoted)


@pytest.mark.parametrize("study, rigid, dk", [
    ("study_cls_upgrade.json", "rigid5_from_rigid3", "dk_from_rigid3"),
    ("study_cls_upgrade5.json", "rigid7_from_rigid5", "dk5_from_rigid5"),
])
def test_the_upgrade_control_figure_quotes_the_study_runs(study, rigid, dk):
    """How far the larger rigid kernel's upgrade is above DK's (paired over the five seeds of the
    committed upgrade study), as the results page quotes it."""
    difference, n = _paired_difference(rigid, dk, study=study)
    assert n == 5
    quoted = _mean_std(difference, signed=True)
    assert quoted in " ".join(_read("docs", "results_classification.md").split()), quoted


@pytest.mark.parametrize("control", ["mbv2_rigid5_sgd01", "mbv2_rigid3_w075_sgd01",
                                     "mbv2_condconv19_sgd01"])
def test_the_mobilenet_control_figures_quote_the_study_runs(control):
    """DK against MobileNet-V2's controls at lr 0.01 (rigid 5x5; the rigid width-0.75 network at
    DK's budget; CondConv at DK's parameters), paired over the seeds both have in the committed
    study, as the README and the results page quote it."""
    difference, n = _paired_difference("mbv2_dk_sgd01", control,
                                       study="study_cls_mbv2_recipe.json")
    assert n == 5
    quoted = _mean_std(difference, signed=True)
    for text in (_read("README.md"), _read("docs", "results_classification.md")):
        assert quoted in " ".join(text.split()), quoted


def test_the_dw_resnet_learning_rate_figures_quote_the_study_runs():
    """DK at lr 0.01 against the rigid 3x3 at lr 0.05 (each model at its better rate: paired by
    seed across the two committed studies) and against the rigid 5x5 at lr 0.01, as the README
    and the results page quote them."""
    across, n = _paired_difference("dk_sgd01", "rigid3", study="study_cls_lr01.json",
                                   reference_study="study_cls.json")
    assert n == 5
    below_rigid5, n = _paired_difference("rigid5_sgd01", "dk_sgd01", study="study_cls_lr01.json")
    assert n == 5
    for text in (_read("README.md"), _read("docs", "results_classification.md")):
        flowing = " ".join(text.split())
        assert _mean_std(across, signed=True) in flowing, across
        # "8.2 ± 5.6 above DK" (README) or "DK is −8.2 ± 5.6 below it" (results page)
        gap = _mean_std(below_rigid5)
        assert f"{gap} above DK" in flowing or f"−{gap} below it" in flowing, gap


def test_the_mobilenet_erf_figures_quote_the_tools_json():
    """The MobileNet-V2 ERF sizes and the paired slope difference (last stage, size10, five seeds)
    as the results page (and the README) quote them, from the committed erf_scale JSON."""
    report = json.loads(_read("docs", "results", "erf_scale_cls_mbv2.json"))
    assert report["headline"] == {"level": "res5", "metric": "size10"}
    configs = report["configs"]["res5/size10"]
    rigid, dk = configs["mbv2_rigid3_sgd01"], configs["mbv2_dk_sgd01"]
    assert rigid["seeds"] == dk["seeds"] == [0, 1, 2, 3, 4]
    sizes = f"{dk['mean_size']['mean']:.1f} against {rigid['mean_size']['mean']:.1f} px"
    assert sizes in " ".join(_read("README.md").split()), sizes
    page = " ".join(_read("docs", "results_classification.md").split())
    assert (f"{dk['mean_size']['mean']:.1f} px against the rigid model's "
            f"{rigid['mean_size']['mean']:.1f} px") in page
    paired = report["paired"]["res5/size10"]["mbv2_dk_sgd01"]["slope_diff"]
    low, high = paired["ci"]
    quoted = (f"paired difference {paired['mean']:+.3f} px/px (95 % interval {low:.3f} to "
              f"{high:.3f}").replace("-", "−")
    assert quoted in page, quoted


@pytest.mark.parametrize("report, config, phrase", [
    ("deformation_cls_mbv2.json", "mbv2_dk_sgd01", "The trained taps move {:.3f} cells on average"),
    ("deformation_cls_lr01.json", "dk_sgd01", "the trained taps move {:.3f} cells on average"),
])
def test_the_deformation_figures_of_the_lr_studies_quote_the_tools_json(report, config, phrase):
    stats = json.loads(_read("docs", "results", report))["summary"][config]["mean_abs_rotation"]
    assert stats["n"] == 5
    quoted = phrase.format(stats["mean"])
    assert quoted in " ".join(_read("docs", "results_classification.md").split()), quoted


@pytest.mark.parametrize("label, study, rigid3, dk, rigid5", [
    ("DW-ResNet (`resnet18_dw_050`), lr 0.05", "study_cls.json", "rigid3", "dk", "rigid5"),
    ("DW-ResNet, lr 0.01", "study_cls_lr01.json", "rigid3_sgd01", "dk_sgd01", "rigid5_sgd01"),
    ("MobileNet-V2 (`dk_mobilenetv2_050`), lr 0.01", "study_cls_mbv2_recipe.json",
     "mbv2_rigid3_sgd01", "mbv2_dk_sgd01", "mbv2_rigid5_sgd01"),
])
def test_the_readme_summary_table_quotes_the_studies(label, study, rigid3, dk, rigid5):
    """Each row of the README's table of where DK stands: the three models' top-1 and DK's paired
    differences to both rigid controls, over five seeds of the committed study."""
    summary = json.loads(_read("docs", "results", study))["summary"]
    cells = []
    for row in (rigid3, dk):
        assert summary[row]["top1"]["n"] == 5, row
        cells.append(_mean_std(summary[row]["top1"]))
    over3, n3 = _paired_difference(dk, rigid3, study=study)
    over5, n5 = _paired_difference(dk, rigid5, study=study)
    assert n3 == n5 == summary[rigid5]["top1"]["n"] == 5
    cells += [_mean_std(over3, signed=True), _mean_std(summary[rigid5]["top1"]),
              _mean_std(over5, signed=True)]
    assert f"| {label} | " + " | ".join(cells) + " |" in _read("README.md").splitlines(), cells


def _pooled_paired_difference(row, reference, studies):
    """top1[row] - top1[reference] paired by seed within each committed study and pooled over
    ``studies`` (the same experiment on different machines): mean, std, the smallest pair and
    how many are positive, and the number of pairs."""
    differences = [d for study in studies
                   for d in _paired_difference(row, reference, study=study)[0]["differences"]]
    return ({**_spread(differences), "min": min(differences),
             "positive": sum(d > 0 for d in differences)}, len(differences))


@pytest.mark.parametrize("label, study, rigid3, dk, rigid5, seeds", [
    ("DW-ResNet, lr 0.01, the same seeds on a second CPU", "study_cls_lr01_replica.json",
     "rigid3_sgd01", "dk_sgd01", None, 5),
    ("MobileNet-V2, lr 0.01, the same seeds on a second CPU", "study_cls_mbv2_replica.json",
     "mbv2_rigid3_sgd01", "mbv2_dk_sgd01", "mbv2_rigid5_sgd01", 5),
])
def test_the_second_cpu_rows_quote_their_studies(label, study, rigid3, dk, rigid5, seeds):
    """The README's table rows of the second-CPU reruns (with the rigid 5x5 control where it was
    rerun, "not run" where not) and the results page's DK rows come from the reruns' committed
    studies."""
    summary = json.loads(_read("docs", "results", study))["summary"]
    rigid_top1, dk_top1 = summary[rigid3]["top1"], summary[dk]["top1"]
    over, n = _paired_difference(dk, rigid3, study=study)
    assert rigid_top1["n"] == dk_top1["n"] == n == seeds
    control = "not run |"
    if rigid5 is not None:
        over5, n5 = _paired_difference(dk, rigid5, study=study)
        assert summary[rigid5]["top1"]["n"] == n5 == seeds
        control = f"{_mean_std(summary[rigid5]['top1'])} | {_mean_std(over5, signed=True)}"
    row = (f"| {label} | {_mean_std(rigid_top1)} | {_mean_std(dk_top1)} | "
           f"{_mean_std(over, signed=True)} | {control} |")
    assert row in _read("README.md").splitlines(), row
    page = " ".join(_read("docs", "results_classification.md").split())
    assert f"| `{dk}` | 0-{seeds - 1} | {_mean_std(dk_top1)} |" in page


def test_the_dw_resnet_rerun_does_not_replicate_and_pools_both():
    """The lr-0.01 DW-ResNet rerun: its verdict, the ten pairs of both machines pooled from both
    committed studies, and the per-seed moves between machines that the two JSONs hold."""
    replica = "study_cls_lr01_replica.json"
    over, _ = _paired_difference("dk_sgd01", "rigid3_sgd01", study=replica)
    page = " ".join(_read("docs", "results_classification.md").split())
    assert f"{_mean_std(over, signed=True)} (s.e. {over['std'] / 5 ** 0.5:.1f}; within 2 s.e.)" in page

    pooled, n = _pooled_paired_difference("dk_sgd01", "rigid3_sgd01",
                                          ("study_cls_lr01.json", replica))
    assert n == 10
    quoted, se = _mean_std(pooled, signed=True), pooled["std"] / n ** 0.5
    readme = " ".join(_read("README.md").split())
    assert f"ten pairs together give {quoted} (s.e. {se:.1f}" in readme
    assert f"ten pairs: **{quoted}** (s.e. {se:.1f}" in page

    for row_name, label in (("rigid3_sgd01", "for the rigid 3×3"), ("dk_sgd01", "for DK")):
        first, second = (_metric_by_seed(s, row_name) for s in ("study_cls_lr01.json", replica))
        moves = [second[s] - first[s] for s in range(5)]
        quoted = f"{_signed(min(moves))} to {_signed(max(moves))} points {label}"
        assert quoted in page, quoted


PIPELINE_FIGURES = [
    # (pipeline study, rigid row, DK row, classification study of the backbones and its output
    #  folder, rigid backbone row, DK backbone row, the sign of DK's difference on every seed)
    ("study_pretrained_lr01.json", "dw_pre01", "dk_pre01", "study_cls_lr01_replica.json",
     "study_cls_lr01", "rigid3_sgd01", "dk_sgd01", "lower"),
    ("study_pretrained_mbv2.json", "mbv2_pre01", "mbv2_dk_pre01", "study_cls_mbv2_replica.json",
     "study_cls_mbv2_recipe", "mbv2_rigid3_sgd01", "mbv2_dk_sgd01", "higher"),
]


@pytest.mark.parametrize("study_file, rigid_row, dk_row, backbone_study, folder, rigid_backbone, "
                         "dk_backbone, direction", PIPELINE_FIGURES,
                         ids=[p[0] for p in PIPELINE_FIGURES])
def test_the_pipeline_figures_quote_the_study(study_file, rigid_row, dk_row, backbone_study,
                                              folder, rigid_backbone, dk_backbone, direction):
    """The pipelines from the lr-0.01 DW-ResNet and MobileNet-V2 backbones (five paired seeds
    each): the results page's table rows and the README's sentence quote the committed study,
    each detector started from the same seed of the classification study (the second-CPU rerun)
    whose top-1 the table gives, and DK's difference has one sign on every seed, beyond two
    standard errors."""
    study = json.loads(_read("docs", "results", study_file))
    summary, runs = study["summary"], study["runs"]
    rigid, dk = summary[rigid_row], summary[dk_row]
    over = dk[f"bbox/AP - {rigid_row}"]
    assert rigid["bbox/AP"]["n"] == dk["bbox/AP"]["n"] == over["n"] == 5
    box = _metric_by_seed(study_file, dk_row, metric="bbox/AP")
    base = _metric_by_seed(study_file, rigid_row, metric="bbox/AP")
    sign = 1 if direction == "higher" else -1
    assert all(sign * (box[s] - base[s]) > 0 for s in box), f"{direction} on every seed"
    se = over["std"] / 5 ** 0.5
    assert abs(over["mean"]) > 2 * se, "beyond two standard errors"
    sources = {rigid_row: rigid_backbone, dk_row: dk_backbone}
    for run in runs:
        if run["name"] in sources:
            assert (f"/{folder}/{sources[run['name']]}/seed_{run['seed']}/last.pth.tar"
                    in run["command"])
    page = " ".join(_read("docs", "results_classification.md").split())
    for row, backbone in sources.items():
        top1 = _metric_by_seed(backbone_study, backbone)
        values = [top1[s] for s in range(5)]
        cells = [_mean_std(_spread(values)),
                 _mean_std(summary[row]["bbox/AP"]), _mean_std(summary[row]["segm/AP"])]
        assert f"| 0-4 | {' | '.join(cells)} |" in page, (row, cells)
    quoted = _mean_std(over, signed=True)
    assert f"**{quoted}** (s.e. {se:.1f}; {direction} on every seed)" in page
    readme = " ".join(_read("README.md").split())
    assert (f"{_mean_std(dk['bbox/AP'])} against {_mean_std(rigid['bbox/AP'])} box AP "
            f"(**{quoted}**, five paired seeds, beyond two standard errors, {direction} on every "
            "seed") in readme


def test_the_mobilenet_rerun_holds_and_pools_both():
    """MobileNet-V2's rerun on the second CPU: its verdict, and the ten pairs of both machines
    pooled from both committed studies, every one positive."""
    replica = "study_cls_mbv2_replica.json"
    over, _ = _paired_difference("mbv2_dk_sgd01", "mbv2_rigid3_sgd01", study=replica)
    page = " ".join(_read("docs", "results_classification.md").split())
    verdict = f"(s.e. {over['std'] / 5 ** 0.5:.1f}; higher on every seed)"
    assert f"**{_mean_std(over, signed=True)}** {verdict}" in page

    pooled, n = _pooled_paired_difference("mbv2_dk_sgd01", "mbv2_rigid3_sgd01",
                                          ("study_cls_mbv2_recipe.json", replica))
    assert n == 10 and pooled["min"] > 0
    quoted, se = _mean_std(pooled, signed=True), pooled["std"] / n ** 0.5
    assert f"ten pairs give **{quoted}** (s.e. {se:.1f}, beyond two standard errors" in page
    assert f"the ten pairs {quoted}, every one positive" in " ".join(_read("README.md").split())


@pytest.mark.parametrize("control, label, positive, count, quotes_lower_end, readme", [
    ("mbv2_rigid5_sgd01", "over the rigid 5×5", "nine of ten positive", 9, True, None),
    ("mbv2_rigid3_w075_sgd01", "over the width-0.75 network", "all ten positive", 10, False, None),
    ("mbv2_condconv19_sgd01", "DK over 19-expert CondConv", "eight of ten positive", 8, False,
     "on a second CPU {cpu}, and over ten pairs {pooled}, still within"),
])
def test_the_mobilenet_controls_on_both_cpus(control, label, positive, count, quotes_lower_end,
                                              readme):
    """MobileNet-V2's controls rerun on the second CPU: DK's paired difference to each on
    that CPU, and both machines' ten pairs pooled, as the results page (and the README, where
    ``readme`` gives its sentence) quotes them."""
    replica = "study_cls_mbv2_replica.json"
    over, n = _paired_difference("mbv2_dk_sgd01", control, study=replica)
    assert n == 5
    page = " ".join(_read("docs", "results_classification.md").split())
    quoted = f"DK is {_mean_std(over, signed=True)} above it (s.e. {over['std'] / 5 ** 0.5:.1f}"
    assert quoted in page, quoted

    pooled, n = _pooled_paired_difference("mbv2_dk_sgd01", control,
                                          ("study_cls_mbv2_recipe.json", replica))
    assert n == 10 and pooled["positive"] == count
    se = pooled["std"] / n ** 0.5
    quoted = f"{label} **{_mean_std(pooled, signed=True)}**"
    assert quoted in page and f"(s.e. {se:.1f}" in page.split(quoted, 1)[1][:40], quoted
    assert positive in page
    if quotes_lower_end:
        assert f"the lower end for the rigid 5×5 is {_signed(pooled['mean'] - 2 * se)}" in page
    if readme is not None:
        sentence = readme.format(cpu=_mean_std(over, signed=True),
                                 pooled=_mean_std(pooled, signed=True))
        assert sentence in " ".join(_read("README.md").split()), sentence


@pytest.mark.parametrize("control, backbone, beyond, readme", [
    ("mbv2_r5_pre01", "mbv2_rigid5_sgd01", True, "{box}) and DK is still above it by {quoted}"),
    ("mbv2_w075_pre01", "mbv2_rigid3_w075_sgd01", True,
     "detector ({box}) leaves DK {quoted} ahead (five paired seeds, beyond two standard errors"),
    ("mbv2_cc19_pre01", "mbv2_condconv19_sgd01", False,
     "makes a detector as good ({box}): DK is {quoted} above it (five paired seeds, within two "
     "standard errors)"),
    ("mbv2_dk_frozen_pre01", "mbv2_dk_frozen_sgd01", False,
     "makes a detector as good ({box}): DK is {quoted} from it (five paired seeds, within two "
     "standard errors"),
    ("mbv2_msra_pre01", "mbv2_rigid3_msra_sgd01", False,
     "makes a detector of {box}: DK is {quoted} above it (five paired seeds, within two standard "
     "errors)"),
])
def test_the_mobilenet_pipeline_controls_quote_the_study(control, backbone, beyond, readme):
    """A control row of the MobileNet-V2 pipeline: its backbone's top-1 (the second-CPU
    classification study), box / mask AP and difference to the rigid 3×3 row as the results
    page's table gives them, and DK's paired lead over it with its verdict (beyond two standard
    errors and on every seed, or within) and per-seed values, in the page and the README."""
    study_file = "study_pretrained_mbv2.json"
    summary = json.loads(_read("docs", "results", study_file))["summary"]
    row = summary[control]
    seeds = sorted(_metric_by_seed(study_file, control, metric="bbox/AP"))
    top1 = _metric_by_seed("study_cls_mbv2_replica.json", backbone)
    values = [top1[s] for s in seeds]
    cells = [_mean_std(_spread(values)),
             _mean_std(row["bbox/AP"]), _mean_std(row["segm/AP"]),
             _mean_std(row["bbox/AP - mbv2_pre01"], signed=True),
             _mean_std(row["segm/AP - mbv2_pre01"], signed=True)]
    page = " ".join(_read("docs", "results_classification.md").split())
    assert f"| `{control}` | " in page
    assert f"| {seeds[0]}-{seeds[-1]} | {' | '.join(cells)} |" in page, cells

    over, n = _paired_difference("mbv2_dk_pre01", control, study=study_file, metric="bbox/AP")
    lead = over["differences"]
    se = over["std"] / n ** 0.5
    assert (all(d > 0 for d in lead) and over["mean"] > 2 * se) == beyond
    assert beyond or abs(over["mean"]) < 2 * se
    quoted = f"**{_mean_std(over, signed=True)}** box AP"
    verdict = "beyond two standard errors; higher on every seed" if beyond else \
        "within two standard errors; per seed"
    per_seed = ", ".join(_signed(d) for d in lead)
    assert f"{quoted} (s.e. {se:.1f}, {verdict}: {per_seed})" in page
    readme_text = " ".join(_read("README.md").split())
    sentence = readme.format(box=_mean_std(row["bbox/AP"]), quoted=quoted)
    assert sentence in readme_text, sentence


SEVEN_SEED_REPORTS = [
    # (report over seeds 0-6, its five-seed report, DK row, rigid msra row, metric)
    ("study_pretrained_mbv2_seeds0-6.json", "study_pretrained_mbv2.json", "mbv2_dk_pre01",
     "mbv2_msra_pre01", "bbox/AP"),
    ("study_cls_mbv2_replica_seeds0-6.json", "study_cls_mbv2_replica.json", "mbv2_dk_sgd01",
     "mbv2_rigid3_msra_sgd01", "top1"),
]


@pytest.mark.parametrize("report, five_seed_report, dk_row, rigid_row, metric",
                         SEVEN_SEED_REPORTS, ids=[r[0] for r in SEVEN_SEED_REPORTS])
def test_the_seven_seed_mobilenet_reports_extend_the_five_seed_ones(report, five_seed_report,
                                                                     dk_row, rigid_row, metric):
    """Seeds 5 and 6 of DK and of the rigid 3x3 at the msra start: each report over seeds 0-6
    holds the five-seed report's runs of both rows unchanged plus the two new seeds, takes its
    paired difference against the rigid row, and the results page quotes it (within two
    standard errors) with the new seeds' differences."""
    summary = json.loads(_read("docs", "results", report))["summary"]
    for row in (dk_row, rigid_row):
        seven, five = (_metric_by_seed(r, row, metric) for r in (report, five_seed_report))
        assert sorted(seven) == list(range(7)) and all(seven[s] == five[s] for s in five)
    over, n = _paired_difference(dk_row, rigid_row, study=report, metric=metric)
    stored = summary[dk_row][f"{metric} - {rigid_row}"]
    assert n == stored["n"] == 7 and abs(over["mean"] - stored["mean"]) < 1e-9
    se = over["std"] / n ** 0.5
    assert abs(over["mean"]) < 2 * se, "within two standard errors"
    page = " ".join(_read("docs", "results_classification.md").split())
    readme = " ".join(_read("README.md").split())
    new_seeds = ", ".join(_signed(d) for d in over["differences"][5:])
    unit = "box AP" if metric == "bbox/AP" else "top-1"
    quoted = f"**{_mean_std(over, signed=True)}** {unit} from"
    assert quoted in page, quoted
    assert f"(s.e. {se:.1f}, within" in page
    own, rigid = (_mean_std(summary[r][metric]) for r in (dk_row, rigid_row))
    assert f"{own} against {rigid}" in page
    if metric == "bbox/AP":
        assert f"over seven (seeds 5 and 6: {new_seeds};" in page, new_seeds
        mask = _mean_std(summary[dk_row][f"segm/AP - {rigid_row}"], signed=True)
        assert f"mask {mask}," in page
        assert (f"DK is **{_mean_std(over, signed=True)}** box AP from it (seven paired seeds, "
                f"within two standard errors; seeds 5 and 6: {new_seeds})") in readme
    else:
        assert f"seeds 5 and 6: {new_seeds})" in page, new_seeds
        assert f"its backbone {_mean_std(over, signed=True)} top-1 from the rigid one" in readme


def _mobilenet_replica_control(row):
    """A second-CPU MobileNet-V2 classification row: its summary, its paired gain over the rigid
    3x3 and DK's paired difference to it (with the seed count), the table's gain cell, and the
    results page and README as single-spaced text."""
    replica = "study_cls_mbv2_replica.json"
    summary = json.loads(_read("docs", "results", replica))["summary"][row]
    over_rigid, n = _paired_difference(row, "mbv2_rigid3_sgd01", study=replica)
    dk_minus, n_dk = _paired_difference("mbv2_dk_sgd01", row, study=replica)
    assert n == n_dk == summary["top1"]["n"] == 5
    se = over_rigid["std"] / n ** 0.5
    gain = f"{_mean_std(over_rigid, signed=True)} (s.e. {se:.1f}; higher on every seed)"
    page = " ".join(_read("docs", "results_classification.md").split())
    readme = " ".join(_read("README.md").split())
    return summary, over_rigid, dk_minus, n, gain, page, readme


@pytest.mark.parametrize("row, dk_phrase, readme_sentence", [
    ("mbv2_dk_frozen_sgd01", "{} from it", None),
    ("mbv2_rigid3_msra_sgd01", "DK is {} above it",
     "the rigid 3×3 reaches {top1} on the second CPU, level with DK ({dk})"),
])
def test_the_mobilenet_frozen_and_msra_controls_quote_the_study(row, dk_phrase, readme_sentence):
    """MobileNet-V2's DK with its rotations frozen at zero, and the rigid 3x3 started at DK's
    initial scale (second CPU): the table row, the gain over the rigid 3x3 on every seed and DK's
    difference to the control (within two standard errors), as the results page and the README
    quote them."""
    summary, over_rigid, dk_minus, n, gain, page, readme = _mobilenet_replica_control(row)
    assert min(over_rigid["differences"]) > 0, "higher on every seed"
    assert abs(dk_minus["mean"]) < 2 * dk_minus["std"] / n ** 0.5
    assert f"| `{row}` | 0-4 | {_mean_std(summary['top1'])} | " in page
    assert f"| {gain} |" in page, gain
    for text in (page, readme):
        assert f"**{_mean_std(over_rigid, signed=True)}** over the rigid 3×3" in text
        phrase = dk_phrase.format(_mean_std(dk_minus, signed=True))
        assert phrase in text.replace("**", ""), phrase
    if readme_sentence is not None:
        sentence = readme_sentence.format(top1=_mean_std(summary["top1"]),
                                          dk=_mean_std(dk_minus, signed=True))
        assert sentence in readme, sentence


def test_the_mobilenet_rigid5_at_the_msra_start_is_above_dk():
    """The rigid 5x5 MobileNet-V2 at the msra start: its table row and DK's deficit to it (beyond
    two standard errors, lower on every seed), as the results page and the README quote them."""
    row = "mbv2_rigid5_msra_sgd01"
    summary, over_rigid, dk_minus, n, gain, page, readme = _mobilenet_replica_control(row)
    assert max(dk_minus["differences"]) < 0 and -dk_minus["mean"] > 2 * dk_minus["std"] / n ** 0.5
    assert f"| `{row}` | 0-4 | {_mean_std(summary['top1'])} | " in page and f"| {gain} |" in page
    per_seed = ", ".join(_signed(d) for d in dk_minus["differences"])
    assert f"DK is **{_mean_std(dk_minus, signed=True)}** below it (s.e. " in page
    assert f"lower on every seed: {per_seed})" in page
    assert (f"reaches {_mean_std(summary['top1'])} and DK is "
            f"**{_mean_std(dk_minus, signed=True)}** below it") in readme
