"""The benchmark suite (medseg.bench): its helpers on known answers, and a quick run of every benchmark
that must write valid JSON with the documented fields. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medseg.bench import BENCHMARKS
from medseg.bench.__main__ import main, parse_args
from medseg.bench.report import Contender, Figure, Goal, finite_json
from medseg.bench.scaling import fit_exponent, window_count
from medseg.bench.timing import peak_memory, time_alternating

FIGURE_KEYS = {"benchmark", "name", "kind", "value", "ratio_min", "ratio_peak_memory", "a", "b", "goal", "meets_goal", "note"}
CONTENDER_KEYS = {"name", "value", "unit", "min", "samples", "peak_bytes"}
ENVIRONMENT_KEYS = {"device", "device_name", "cpu_model", "cpu_count", "threads", "python", "platform", "torch", "cuda", "cudnn", "gpu_count", "lightning", "monai", "numpy"}


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"expected strict JSON, got {constant}")

    return json.loads(text, parse_constant=refuse)


def test_time_alternating_takes_turns_in_abba_order():
    calls = []
    timings = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert [len(t.times_s) for t in timings.values()] == [3, 3]
    assert all(t.min_s <= t.median_s for t in timings.values())


def test_time_alternating_refuses_no_repeats():
    with pytest.raises(ValueError, match="expected repeats >= 1"):
        time_alternating({"a": lambda: None}, torch.device("cpu"), repeats=0)


def test_peak_memory_counts_tensors_made_inside_only():
    before = torch.ones(2000, 2000)  # made before the window: not counted
    peak = peak_memory(lambda: before * 2, torch.device("cpu"))  # one new (2000, 2000) float32 tensor
    assert peak is not None and 2000 * 2000 * 4 <= peak < 2 * 2000 * 2000 * 4


def test_peak_memory_leaves_out_frees_of_blocks_from_an_earlier_window():
    cpu = torch.device("cpu")
    kept: list[torch.Tensor] = []
    peak_memory(lambda: kept.append(torch.ones(1000, 1000)), cpu)  # 4 MB allocated in an earlier window
    # freed here, then two (500, 500) float32 tensors alive at once: the peak is theirs, 2 MB
    peak = peak_memory(lambda: (kept.clear(), torch.ones(500, 500) * 2), cpu)
    assert peak is not None and 2 * 500 * 500 * 4 <= peak < 3 * 500 * 500 * 4


def test_fit_exponent_known_answers():
    voxels = [8.0, 27.0, 64.0]
    assert fit_exponent(voxels, [v**1.5 for v in voxels]) == pytest.approx(1.5)
    assert fit_exponent(voxels, [3.0 * v for v in voxels]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected at least two distinct sizes"):
        fit_exponent([8.0, 8.0], [1.0, 2.0])


@pytest.mark.parametrize(("shape", "roi", "overlap"), [((96, 96, 64), (64, 64, 64), 0.5), ((48, 40, 32), (32, 32, 32), 0.25), ((20, 20, 20), (32, 32, 32), 0.5)])
def test_window_count_is_what_monai_evaluates(shape, roi, overlap):
    from monai.inferers import sliding_window_inference

    seen = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap=overlap)
    assert window_count(shape, roi, overlap) == sum(seen)


def test_figure_ratios_and_goal():
    a = Contender("a", 2.0, "s", min=1.0, samples=(1.0, 2.0, 3.0), peak_bytes=300)
    b = Contender("b", 4.0, "s", min=4.0, samples=(4.0,), peak_bytes=100)
    figure = Figure.compare("x", "a vs b", a, b, Goal("<=", 1.05))
    assert (figure.value, figure.ratio_min, figure.ratio_peak_memory, figure.meets_goal) == (0.5, 0.25, 3.0, True)
    assert Figure.compare("x", "b vs a", b, a, Goal(">=", 2.5)).meets_goal is False
    assert Figure.compare("x", "no goal", a, b).meets_goal is None
    assert set(figure.to_dict()) == FIGURE_KEYS


def test_finite_json_replaces_nan_and_infinity():
    assert finite_json({"a": [1.0, math.nan], "b": (math.inf, 2)}) == {"a": [1.0, None], "b": [None, 2]}


def test_only_must_name_known_benchmarks(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--only", "train_step,nonsense"])
    assert "expected --only to name some of" in capsys.readouterr().err
    assert parse_args(["--only", "loss, lesion", "--device", "cpu"]).only == ["loss", "lesion"]


@pytest.mark.slow
def test_fit_slope_recovers_a_line():
    from medseg.bench.cache import fit_slope

    slope, intercept = fit_slope([6, 12, 24], [1e9 + 3e5 * n for n in (6, 12, 24)])
    assert slope == pytest.approx(3e5) and intercept == pytest.approx(1e9)


def test_quick_suite_writes_every_benchmark_as_valid_json(tmp_path):
    import importlib.util

    out = tmp_path / "bench.json"
    names = [n for n in BENCHMARKS if n != "onnx" or importlib.util.find_spec("onnxruntime") is not None]  # onnx: the onnx extra's
    status = main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--only", ",".join(names)])
    assert status == 0
    results = _strict_json(out.read_text())
    assert results["schema"] == 1 and results["errors"] == {}
    assert set(results["environment"]) == ENVIRONMENT_KEYS
    assert results["environment"]["threads"] == 1 and results["settings"]["quick"] is True
    assert list(results["benchmarks"]) == names
    for name, bench in results["benchmarks"].items():
        assert bench["seconds"] > 0 and isinstance(bench["settings"], dict) and isinstance(bench["details"], dict)
        assert bench["figures"], f"{name}: no figures"
        for figure in bench["figures"]:
            assert set(figure) == FIGURE_KEYS and figure["benchmark"] == name
            assert figure["kind"] in ("ratio", "exponent", "value")
            assert math.isfinite(figure["value"]), figure
            if figure["kind"] == "value":  # a measured quantity (a slope may be negative: noise around 0)
                assert figure["b"] is None and figure["value"] == figure["a"]["value"]
            else:
                assert figure["value"] > 0, figure
            if figure["kind"] == "ratio":
                for side in ("a", "b"):
                    assert set(figure[side]) == CONTENDER_KEYS and figure[side]["value"] > 0
                assert figure["value"] == pytest.approx(figure["a"]["value"] / figure["b"]["value"])
            if figure["goal"] is None:
                assert figure["meets_goal"] is None
            else:
                assert figure["goal"]["op"] in ("<=", ">=") and isinstance(figure["meets_goal"], bool)
    train = results["benchmarks"]["train_step"]["figures"][0]
    assert train["a"]["peak_bytes"] > 0 and train["b"]["peak_bytes"] > 0  # peak memory measured on the CPU
    assert results["benchmarks"]["inference"]["details"]["max_abs_difference"] < 1e-4  # same computation
