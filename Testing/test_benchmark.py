"""`lightfusion benchmark --json`: the report names the machine and carries the promised keys."""
import json

import numpy as np
import pytest

from LightFusionLib.cli import main


def test_benchmark_json_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["benchmark", "--backend", "torch", "--device", "cpu", "--batch-sizes", "1,2",
                 "--seconds", "0.05", "--no-volume", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert 3500 <= report["params"] <= 4500
    assert 0.24 <= report["gflops"] <= 0.32 and report["gflops_arithmetic"] == 2 * report["gmacs"]
    assert report["device"] == "torch-cpu" and report["slices_per_second"] > 0
    entry = report["backends"]["torch-cpu"]
    assert set(entry["slices_per_second_by_batch"]) == {"1", "2"}
    assert report["machine"]["cpus"] >= 1 and report["machine"]["cpu"]
    assert entry["network_ms_per_256_slices"] == round(256_000 / max(entry["slices_per_second_by_batch"].values()), 1)
    assert "slices/s" in capsys.readouterr().out


def test_volume_benchmark_times_the_process_and_each_stage_in_process(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    ballast = np.ones(64_000_000)  # 512 MB here: the child's peak must not include this process's memory
    code = main(["benchmark", "--backend", "onnx", "--device", "cpu", "--batch-sizes", "2", "--seconds", "0.05",
                 "--volume-size", "40,36,24", "--volume-size", "32,32,20", "--json", str(out)])
    del ballast
    assert code == 0
    entry = json.loads(out.read_text())["backends"]["onnx-cpu"]
    volume = entry["volume"]
    assert volume["shape"] == [40, 36, 24]
    assert [v["shape"] for v in entry["volumes"]] == [[40, 36, 24], [32, 32, 20]]  # each size, stage by stage
    assert all(set(v["stages"]) >= {"host", "network", "planes", "write", "verify"} for v in entry["volumes"])
    assert 50 < volume["peak_rss_mb"] < 480  # Python, SimpleITK and ONNX Runtime alone take about 280 MB
    warm = volume["warm"]
    assert set(warm) == {"read", "prepare", "fuse", "write", "total"}
    assert all(v >= 0 for v in warm.values())
    assert warm["total"] == pytest.approx(sum(v for k, v in warm.items() if k != "total"), abs=0.01)
    assert warm["total"] < volume["seconds"]  # no process start, no model load
