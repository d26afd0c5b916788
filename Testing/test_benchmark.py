"""`lightfusion benchmark --json`: the report names the machine and carries the promised keys."""
import json

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
    assert "slices/s" in capsys.readouterr().out
