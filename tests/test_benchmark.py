"""Smoke tests of the benchmark suite (``python -m benchmarks``).

The suite runs once in ``--quick`` mode (tiny shapes, one thread) and the tests check that the
JSON, Markdown and PNG it writes are complete and well formed. No test asserts on a timing: the
figures of a shared machine are noise at these sizes. The pieces (interleaved timer, memory
profiler, targets, bandwidth table) are tested on their own with known answers.
"""

import json
import math

import pytest
import torch

from benchmarks import SECTIONS, main, parse_args
from benchmarks.cases import headline_shape, op_shapes
from benchmarks.measure import Measurement, compare, linear_fit, measure_memory, ratio, \
    time_interleaved
from benchmarks.recompute import recompute
from benchmarks.report import TARGETS, evaluate_targets
from benchmarks.sections import peak_bandwidth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark")
    threads = torch.get_num_threads()
    argv = [
        "--quick",
        "--ops",
        "--scaling",
        "--model",
        "--threads",
        "1",
        "--no-progress",
        "--output",
        str(output),
    ]
    try:
        results = main(argv)
    finally:
        torch.set_num_threads(threads)
    return output, results


def _finite_positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_writes_json_markdown_and_png(quick_run):
    output, results = quick_run
    with open(output / "results.json") as f:
        saved = json.load(f)
    assert saved["config"]["quick"] is True
    assert saved["config"]["sections"] == ["ops", "full_dk", "memory", "scaling", "model"]
    machine = saved["machine"]
    assert machine["cpu_model"] and machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1 and machine["logical_cores"] >= 1
    assert "dk_ops" in machine
    png = (output / "results.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    from PIL import Image

    with Image.open(output / "results.png") as image:
        assert image.size[0] > 1000 and image.size[1] > 500
    markdown = (output / "results.md").read_text()
    assert "![ratio per shape](results.png)" in markdown
    assert "## Targets" in markdown and machine["cpu_model"] in markdown


def test_op_comparisons_cover_every_shape_op_and_pass(quick_run):
    _, results = quick_run
    rows = results["ops"]["comparisons"]
    shapes = {shape.label() for shape in op_shapes(quick=True)}
    assert {r["shape"]["label"] for r in rows} == shapes
    keys = {(r["shape"]["label"], r["op"], r["pass"]) for r in rows}
    assert len(keys) == len(rows) == len(shapes) * 3 * 2
    for row in rows:
        assert _finite_positive(row["ratio_min"]) and _finite_positive(row["ratio_median"])
        assert row["ratio_min"] <= row["ratio_max"]
        assert row["op_min_ms"] <= row["op_median_ms"] <= row["op_max_ms"]
        assert row["op_layout"] in ("nchw", "channels_last")
    for timing in results["ops"]["timings"]:
        assert timing["repeats"] >= 1 and timing["threads"] == 1
        assert timing["min_ms"] <= timing["median_ms"]


def test_full_dk_memory_scaling_and_model_sections(quick_run):
    _, results = quick_run
    assert len(results["full_dk"]["comparisons"]) == 2
    memory = results["memory"]
    assert memory["worst_extra_per_column_buffer"] >= 0 and memory["worst_extra_per_output"] >= 0
    measured = [r for r in memory["rows"] if "extra_bytes" in r]
    assert measured and all(r["peak_bytes"] >= r["extra_bytes"] >= 0 for r in measured)
    assert {r["op"] for r in measured} >= {"deform_kernel2d", "deform_kernel_conv2d", "conv2d"}
    fits = results["scaling"]["hw"]["fits"]
    assert len(fits) == 4 and all(r["r2"] <= 1.0 + 1e-9 for r in fits)
    assert results["scaling"]["threads"]["thread_counts"] == [1]
    model = results["model"]
    assert model["status"] == "measured", model.get("traceback")
    assert {r["task"] for r in model["comparisons"]} == {"inference", "training_step"}
    assert model["detections"]["dk"] == model["detections"]["plain"] > 0


def test_targets_are_evaluated(quick_run):
    _, results = quick_run
    targets = {t["name"]: t for t in results["targets"]}
    assert len(targets) == len(TARGETS)
    assert all(t["status"] in ("PASS", "MISS", "n/a") for t in targets.values())
    assert targets["CPU deform_kernel2d fwd / fastest dw conv2d"]["status"] != "n/a"
    assert targets["Mask R-CNN DK-R50-FPN inference / plain R50-FPN"]["status"] != "n/a"
    assert targets["CUDA float32 deform_kernel2d fwd / cuDNN dw conv2d"]["status"] == "n/a"


def test_targets_pass_and_miss_on_known_ratios():
    label = headline_shape(quick=False).label()

    def row(op, pass_name, ratio):
        return {
            "shape": {"label": label},
            "op": op,
            "pass": pass_name,
            "ratio_min": ratio * 0.9,
            "ratio_median": ratio,
            "ratio_max": ratio * 1.2,
        }

    results = {
        "ops": {
            "comparisons": [
                row("deform_kernel2d", "forward", 1.9),
                row("deform_kernel2d", "forward_backward", 3.2),
                row("deform_kernel_conv2d", "forward_backward", 1 / 150.0),
            ]
        },
        "memory": {"worst_extra_per_column_buffer": 8.65 / 9, "worst_extra_per_output": 8.65},
    }
    targets = {t["name"]: t for t in evaluate_targets(results, quick=False)}
    status = {name: t["status"] for name, t in targets.items()}
    assert status["CPU deform_kernel2d fwd / fastest dw conv2d"] == "PASS"  # judged on the median
    assert status["CPU deform_kernel2d fwd+bwd / fastest dw conv2d"] == "MISS"
    assert (
        status["CPU deform_kernel_conv2d speedup over torchvision deform_conv2d fwd+bwd"] == "PASS"
    )
    assert status["Mask R-CNN DK-R50-FPN inference / plain R50-FPN"] == "n/a"
    assert targets["CPU deform_kernel2d fwd / fastest dw conv2d"]["measured_range"] == \
        pytest.approx([1.9 * 0.9, 1.9 * 1.2])
    # Total extra memory of nearly a full column buffer is not "no column buffer".
    column = [t for name, t in targets.items() if name.startswith("No per-tap column buffer")]
    assert column[0]["status"] == "MISS"


def test_compare_uses_the_same_rounds_on_both_sides():
    # The op ran 7 rounds, the baseline 3: the ratio uses the op's first 3 rounds only, in which
    # the op's fastest late outlier (round 6) does not count. Per-round ratios 2.0/200, 2.2/210,
    # 2.1/190: their median is round 1's (the medians' ratio 2.1/200 pairs other rounds).
    op = {"nchw": Measurement("op", [2.0, 2.2, 2.1, 2.0, 2.0, 2.0, 0.5])}
    baseline = {"nchw": Measurement("base", [200.0, 210.0, 190.0])}
    row = compare(op, baseline)
    assert row["samples"] == 3
    assert row["ratio_median"] == pytest.approx(2.2 / 210.0)
    assert row["ratio_min"] == pytest.approx(2.0 / 200.0)
    assert row["ratio_max"] == pytest.approx(2.1 / 190.0)
    assert row["op_min_ms"] == pytest.approx(2000.0)


def test_time_interleaved_counts_repeats_and_calls():
    calls = {"fast": 0, "slow": 0}

    def bump(name):
        def run():
            calls[name] += 1

        return run

    measured = time_interleaved(
        {"fast": bump("fast"), "slow": bump("slow")},
        {"fast": 4, "slow": 2},
        sample_time_s=0.0,
        warmup=1,
    )
    assert len(measured["fast"].times_s) == 4 and len(measured["slow"].times_s) == 2
    assert calls == {"fast": 1 + 4, "slow": 1 + 2}  # warm-up + one call per repeat
    assert measured["fast"].min_ms <= measured["fast"].median_ms
    batched = time_interleaved({"fast": bump("fast")}, 3, sample_time_s=1e-3, max_number=50)
    assert 1 <= batched["fast"].number <= 50 and len(batched["fast"].times_s) == 3
    with pytest.raises(ValueError, match="repeats must be positive"):
        time_interleaved({"fast": bump("fast")}, 0)


def test_measure_memory_sees_a_temporary_buffer():
    x = torch.randn(64, 1024)  # 256 KiB

    def with_scratch():
        scratch = x.repeat(9, 1)  # 2.25 MiB temporary, as a 9-tap column buffer would be
        return scratch.sum(0)  # 4 KiB result

    record = measure_memory(with_scratch)
    assert record.returned_bytes == 1024 * 4
    assert record.largest_allocation_bytes >= 9 * x.numel() * 4
    assert record.extra_bytes >= 9 * x.numel() * 4 - record.returned_bytes
    lean = measure_memory(lambda: x * 2)
    assert lean.returned_bytes == x.numel() * 4 and lean.extra_bytes < x.numel() * 4


def test_peak_bandwidth_table(monkeypatch):
    for name, peak in (
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA A100-SXM4-80GB", 2.039e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_bandwidth()[0] == peak


def test_linear_fit_and_cli_defaults():
    intercept, slope, r2 = linear_fit([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert (intercept, slope, r2) == pytest.approx((1.0, 2.0, 1.0))
    args = parse_args(["--quick"])
    expected = ["ops", "full_dk", "memory", "scaling", "model"]
    assert args.sections == expected + (["cuda"] if torch.cuda.is_available() else [])
    assert args.repeats == 2 and args.slow_repeats == 1
    assert parse_args(["--scaling", "--repeats", "5"]).sections == ["scaling"]
    sections = {name for flag in SECTIONS.values() for name in flag}
    assert sections == set(expected + ["cuda"])
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


def test_cuda_section_on_a_stand_in_device(monkeypatch):
    """No GPU here: the CPU stands in for the CUDA device so that the section's code runs."""
    from benchmarks import progress_factory
    from benchmarks import sections as cuda_section

    monkeypatch.setattr(cuda_section, "benchmark_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    args = parse_args(["--quick", "--cuda", "--repeats", "1", "--no-progress"])
    result = cuda_section.cuda(args, progress_factory(False))
    assert result["status"] == "measured" and result["peak_bandwidth_bytes_per_s"] == 3.35e12
    float32 = [r for r in result["comparisons"] if r["dtype"] == "float32"]
    assert {r["op"] for r in float32} == {"deform_kernel2d", "deform_kernel_conv2d"}
    moved = [r for r in result["timings"] if "bandwidth_fraction" in r]
    assert moved and all(r["bytes_moved"] > 0 and r["bandwidth_fraction"] > 0 for r in moved)
    assert {r["dtype"] for r in result["full_dk"]} == {"float32", "float16", "bfloat16"}
    targets = {t["name"]: t for t in evaluate_targets({"cuda": result}, quick=True)}
    assert targets["CUDA float32 deform_kernel2d fwd / cuDNN dw conv2d"]["status"] in (
        "PASS",
        "MISS",
    )
    assert targets["CUDA float32 deform_kernel2d fwd DRAM bandwidth / peak"]["measured"] > 0


def test_the_ratio_is_the_median_of_the_per_round_ratios():
    """The committed Mask R-CNN inference samples (ms, three rounds): per-round ratios 1.023, 1.180,
    1.180, so the ratio is 1.18 (a miss of <= 1.15), not the medians' ratio 1.06."""
    dk = Measurement("dk", [0.4212338, 0.4861748, 0.4358971])
    plain = Measurement("plain", [0.4118109, 0.4119620, 0.3693531])
    found = ratio(dk, plain)
    assert found["ratio_median"] == pytest.approx(1.180, abs=1e-3)
    assert (found["ratio_min"], found["ratio_max"]) == pytest.approx((1.023, 1.180), abs=1e-3)


def test_a_model_that_does_not_build_fails_the_benchmark(monkeypatch):
    from benchmarks import model as model_section

    def broken(cfg):
        raise KeyError("no backbone named build_resnet_dk_fpn_backbone")

    monkeypatch.setattr(model_section, "build_benchmark_model", broken)
    args = parse_args(["--quick", "--model", "--no-progress"])
    with pytest.raises(RuntimeError, match="could not be built: KeyError: .*no backbone named"):
        model_section.model(args, lambda total, desc: None)


def test_the_committed_figures_follow_from_the_committed_samples():
    """benchmarks/results.json: every ratio, speedup and verdict equals what
    ``python -m benchmarks.recompute`` derives from the per-round samples stored beside them."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "results.json")
    with open(path) as f:
        committed = json.load(f)
    recomputed = recompute(committed)
    # the same arithmetic on the same samples (JSON keeps floats exactly): equal, not close
    for section in ("ops", "full_dk", "model"):
        assert committed[section]["comparisons"] == recomputed[section]["comparisons"], section
    threads = committed["scaling"]["threads"]["speedups"]
    assert threads == recomputed["scaling"]["threads"]["speedups"]
    assert [(t["name"], t["status"], t["measured_text"]) for t in committed["targets"]] == \
        [(t["name"], t["status"], t["measured_text"]) for t in recomputed["targets"]]
    inference = next(t for t in committed["targets"] if t["metric"] == "model/inference")
    assert inference["status"] == "MISS" and inference["measured_text"].startswith("1.18x")
