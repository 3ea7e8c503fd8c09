"""The benchmark modules run end to end in --quick mode and write the JSON fields the
figures and the README rely on. No timing is asserted: speed is measured, not tested."""
import json

import pytest

from benchmarks import common, kernels, roofline, schemes


@pytest.fixture
def out_dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "FIGURES", tmp_path / "figures")
    return tmp_path


def load(tmp, name):
    return json.loads((tmp / "results" / f"{name}.json").read_text())


def test_roofline_quick(out_dirs):
    roofline.main(["--quick"])
    data = load(out_dirs, "roofline")
    assert data["read_bandwidth"]["best_gbs"] > 0 and data["sgemm"]["gflops"] > 0 and data["int8_dot"]["gops"] > 0
    kernels_seen = {d["kernel"] for d in data["dots"]}
    assert {"numpy-fp32", "int8", "w8a8", "int4-g128", "int4-g64", "int4-g32", "q8_0", "q4_0", "q4_k"} <= kernels_seen
    for d in data["dots"]:
        assert d["intensity"] == pytest.approx(d["flops"] / d["weight_bytes"])
        assert {"ms", "gbs", "gflops", "pct_of_bandwidth", "x_fp32"} <= set(d)
    fp32 = next(d for d in data["dots"] if d["kernel"] == "numpy-fp32")
    assert fp32["intensity"] == pytest.approx(0.5)          # 2 FLOP per 4-byte weight
    assert (out_dirs / "figures" / "roofline.png").stat().st_size > 10_000


def test_kernels_quick(out_dirs):
    kernels.main(["--quick"])
    data = load(out_dirs, "kernels")
    assert data["quick"] is True and data["results"]
    for r in data["results"]:
        assert {"layer", "shape", "kernel", "ms", "gbs", "pct_of_bandwidth", "x_fp32", "weight_bytes"} <= set(r)


def test_schemes_quick(out_dirs):
    schemes.main(["--quick"])
    data = load(out_dirs, "schemes")
    from refquant import schemes as registry
    assert [r["scheme"] for r in data["results"]] == registry.names()
    assert (out_dirs / "figures" / "schemes_sqnr.png").exists()
