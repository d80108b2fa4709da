"""The README's figures quote the committed files they come from: the benchmark targets
(benchmarks/results.json) and the study rows about the generators' learning rate
(docs/results/study_recipe.json)."""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(REPO, *parts), encoding="utf-8") as f:
        return f.read()


def _signed(value):
    return f"{value:+.1f}".replace("-", "−")


@pytest.mark.parametrize("run, edge", [("dk_lr0.1", "13-27 %"), ("dk_s4_lr0.1", "27-44 %")])
def test_the_learning_rate_notes_quote_each_study_row(run, edge):
    """Scope 5 and scope 4 at 0.1x are two rows (edge taps, box AP); no sentence merges them."""
    row = json.loads(_read("docs", "results", "study_recipe.json"))["summary"][run]["bbox/AP - dw"]
    quoted = f"{_signed(row['mean'])} ± {row['std']:.1f}"
    readme = _read("README.md")
    assert any(edge in line and quoted in line for line in readme.splitlines()), (edge, quoted)
    assert edge in _read("docs", "results_shapes.md")
    for path in (("README.md",), ("configs", "shapes", "Base-Shapes.yaml"),
                 ("dk_detectron2", "config.py")):
        assert "13-44 %" not in _read(*path), path


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
