"""``lightfusion batch`` / :func:`LightFusionLib.batch.fuse_batch`: CSV and BIDS cohorts, failures
recorded while the others go on, resume after a kill, a Dask LocalCluster run equal to the local one,
the review report.

Small synthetic volumes (32^3) and the shipped ONNX model; planes run at 64x64 to keep the module fast.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.batch import SUMMARY_COLUMNS, fuse_batch, plan_batch
from LightFusionLib.bids import find_pairs
from LightFusionLib.cli import main

pytest.importorskip("onnxruntime")
FAST = {"backend": "onnx", "device": "cpu", "plane_size": 64}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------
def _volumes(seed: int = 0, n: int = 32, ct: bool = False, pet_slices: int | None = None):
    """(MRI int16, PET float32 or CT int16 in HU) on a 2 mm grid; ``pet_slices``: a PET covering
    only that many of the MRI's slices (a coverage warning)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:n, :n, :n]
    r2 = (zz - n / 2) ** 2 + (yy - n / 2) ** 2 + (xx - n / 2) ** 2
    head = r2 < (n / 2.4) ** 2
    mri = sitk.GetImageFromArray((head * (400 + 200 * np.sin(xx / 3.0) * np.cos(yy / 2.5))
                                  + rng.normal(0, 10, head.shape)).astype(np.int16))
    if ct:
        arr = np.where(head, 40 + 800 * (r2 > (n / 3) ** 2), -1000).astype(np.int16)
    else:
        hot = np.exp(-((zz - n / 2 - seed % 5) ** 2 + (yy - n / 3) ** 2 + (xx - n / 2) ** 2) / 20)
        arr = (head * (1 + 5 * hot) + rng.random(head.shape) * 0.1).astype(np.float32)
    if pet_slices:
        arr = np.ascontiguousarray(arr[:pet_slices])
    other = sitk.GetImageFromArray(arr)
    for image in (mri, other):
        image.SetSpacing((2.0, 2.0, 2.0))
    return mri, other


def _write_pair(folder: Path, name: str, ext: str = ".nrrd", **kw) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mri, other = _volumes(**kw)
    paths = folder / f"{name}_mri{ext}", folder / f"{name}_other{ext}"
    sitk.WriteImage(mri, str(paths[0]))
    sitk.WriteImage(other, str(paths[1]))
    return paths


def _manifest(root: Path, rows: list[dict], name: str = "cohort.csv") -> Path:
    columns = ["id", "mri", "other"] + [c for c in ("task", "axis", "colormap", "model", "register")
                                        if any(c in r for r in rows)]
    path = root / name
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cohort(root: Path, n_pet: int = 2) -> Path:
    """``n_pet`` PET cases (the last one covering a third of its MRI: a warning), a CT case, a
    damaged file and a missing one; paths relative to the manifest."""
    data = root / "data"
    rows = []
    for i in range(n_pet):
        _write_pair(data, f"p{i}", seed=i, pet_slices=10 if i == n_pet - 1 and n_pet > 1 else None)
        rows.append({"id": f"p{i}", "mri": f"data/p{i}_mri.nrrd", "other": f"data/p{i}_other.nrrd", "task": ""})
    _write_pair(data, "ct", ct=True)
    rows.append({"id": "ct1", "mri": "data/ct_mri.nrrd", "other": "data/ct_other.nrrd", "task": "ct-mri"})
    (data / "damaged.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    rows.append({"id": "damaged", "mri": "data/p0_mri.nrrd", "other": "data/damaged.nrrd", "task": ""})
    rows.append({"id": "missing", "mri": "data/p0_mri.nrrd", "other": "data/nowhere.nii.gz", "task": ""})
    return _manifest(root, rows)


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ----------------------------------------------------------------------------------------------
# CSV: outputs, failures recorded, summary, report, resume
# ----------------------------------------------------------------------------------------------
def test_csv_cohort_records_failures_writes_summary_and_report_and_resumes(tmp_path):
    manifest = _cohort(tmp_path)
    out = tmp_path / "out"
    result = fuse_batch(manifest, out, **FAST)

    status = {r["id"]: r["status"] for r in result.rows}
    assert status == {"p0": "fused", "p1": "fused", "ct1": "fused", "damaged": "failed", "missing": "failed"}
    rows = {r["id"]: r for r in result.rows}
    assert "damaged.nrrd" in rows["damaged"]["message"] and "\n" not in rows["damaged"]["message"]
    assert rows["missing"]["message"].endswith("nowhere.nii.gz does not exist")
    assert any("covers only" in w for w in rows["p1"]["warnings"])  # the pipeline's input warnings
    for case in ("p0", "p1", "ct1"):
        fused = sitk.ReadImage(str(out / case / "fused.nrrd"))
        assert fused.GetSize() == (32, 32, 32)
        assert fused.GetNumberOfComponentsPerPixel() == (1 if case == "ct1" else 3)
        assert (out / case / "montage.png").is_file()
        record = json.loads((out / case / "fused.json").read_text())["LightFusion"]
        assert record["task"] == ("ct-mri" if case == "ct1" else "pet-mri")
        assert record["model"].endswith(".onnx") and len(record["model_sha256"]) == 64
        assert record["plane_size"] == 64 and record["planes"] == 32
    assert not (out / "damaged").exists()  # nothing written for a failed case

    with (out / "summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["id"] for r in table] == ["p0", "p1", "ct1", "damaged", "missing"]
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert "covers only" in table[1]["warnings"] and float(table[0]["seconds"]) > 0 and table[0]["planes"] == "32"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["fused"] == 3 and summary["totals"]["failed"] == 2 and summary["complete"]
    assert summary["totals"]["with_warnings"] == 1

    page = (out / "report.html").read_text()
    assert page.count('<div class="case ') == 5
    for case in ("p0", "p1", "ct1", "damaged", "missing"):
        assert f'id="case-{case}"' in page
    assert page.count("data:image/jpeg;base64,") == 3  # a montage embedded per fused case
    assert page.count('href="p0/montage.png"') == 2 and 'href="ct1/fused.nrrd"' in page
    first_ok = min(page.index(f'id="case-{c}"') for c in ("p0", "p1", "ct1"))
    assert page.index('id="case-damaged"') < first_ok and page.index('id="case-missing"') < first_ok
    assert page.index('id="case-p1"') < page.index('id="case-p0"')  # warnings before clean cases
    assert "http" not in page.split("</style>")[1]  # nothing fetched from elsewhere

    # rerun: verified outputs are kept (files untouched), the failed cases are retried
    stamps = {c: (out / c / "fused.nrrd").stat().st_mtime_ns for c in ("p0", "p1", "ct1")}
    again = fuse_batch(manifest, out, **FAST)
    assert {r["id"]: r["status"] for r in again.rows} == status | {"p0": "kept", "p1": "kept", "ct1": "kept"}
    assert {c: (out / c / "fused.nrrd").stat().st_mtime_ns for c in stamps} == stamps
    assert next(r for r in again.rows if r["id"] == "p1")["warnings"] == rows["p1"]["warnings"]
    assert (out / "report.html").read_text().count("data:image/jpeg;base64,") == 3  # kept cases keep their montage

    # an output that no longer matches its sidecar is redone; a changed setting redoes the cases it affects
    with (out / "p0" / "fused.nrrd").open("ab") as fh:
        fh.write(b"\0")
    changed = fuse_batch(manifest, out, colormap="hot", **FAST)
    assert {r["id"]: r["status"] for r in changed.rows if r["status"] != "failed"} == {
        "p0": "fused", "p1": "fused", "ct1": "kept"}  # a colour map does not apply to the CT case

    forced = fuse_batch(manifest, out, colormap="hot", force=True, report=False, **FAST)
    assert [r["status"] for r in forced.rows].count("fused") == 3


def test_cli_batch_dry_run_exit_code_and_one_line_manifest_errors(tmp_path, capsys):
    manifest = _cohort(tmp_path, n_pet=1)
    assert main(["batch", str(manifest), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cases from the CSV manifest" in out
    assert "p0: pet-mri: data/p0_mri.nrrd + data/p0_other.nrrd -> p0/fused.nrrd" in out
    assert not (tmp_path / "o").exists()

    rows = [{"id": "p0", "mri": "data/p0_mri.nrrd", "other": "data/p0_other.nrrd"},
            {"id": "gone", "mri": "data/p0_mri.nrrd", "other": "data/gone.nrrd"}]
    small = _manifest(tmp_path, rows, "small.csv")
    code = main(["batch", str(small), "--out", str(tmp_path / "o"), "--quiet", "--backend", "onnx",
                 "--plane-size", "64", "--no-montage"])
    out = capsys.readouterr().out
    assert code == 3  # some cases failed
    assert "1 fused, 0 kept" in out and "failed gone: other" not in out and "failed gone: PET" in out
    assert not (tmp_path / "o" / "p0" / "montage.png").exists()

    def error(text: str, *extra: str) -> str:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        assert main(["batch", str(bad), "--out", str(tmp_path / "o2"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lightfusion batch: error: ") and "\n" not in err
        return err

    assert "unknown column(s) 'subject'" in error("id,mri,other,subject\na,x,y,1\n")
    assert "no other column" in error("id,mri\na,x\n")
    assert "repeats the case" in error("id,mri,other\na,x,y\nA,x,y\n")
    assert "must be letters" in error("id,mri,other\n../a,x,y\n")
    assert "line 2: unknown task 'pet'" in error("id,mri,other,task\na,x,y,pet\n")
    assert "colour maps apply to PET/SPECT" in error("id,mri,other,task,colormap\na,x,y,ct-mri,hot\n")
    assert "either --workers" in error("id,mri,other\na,x,y\n", "--workers", "2", "--scheduler", "tcp://x:1")


def test_scheduler_without_dask_installed_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the [cluster] extra were not installed
    manifest = _manifest(tmp_path, [{"id": "a", "mri": "x.nrrd", "other": "y.nrrd"}])
    assert main(["batch", str(manifest), "--out", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert "needs Dask distributed: pip install 'lightfusion[cluster]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# BIDS: matching, skipped with reasons, BIDS-Derivatives output
# ----------------------------------------------------------------------------------------------
def _nii(path: Path, image: sitk.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _bids(root: Path) -> Path:
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t61\nsub-02\t70\n")
    mri, pet = _volumes(seed=1)
    ses = root / "sub-01" / "ses-baseline"
    _nii(ses / "anat" / "sub-01_ses-baseline_T1w.nii.gz", mri)
    _nii(ses / "anat" / "sub-01_ses-baseline_T2w.nii.gz", mri)
    _nii(ses / "pet" / "sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet.nii.gz", pet)
    (ses / "pet" / "sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet.json").write_text(
        json.dumps({"TracerName": "FDG", "Modality": "PT"}))
    (ses / "pet" / "sub-01_ses-baseline_recording-manual_blood.tsv").write_text("time\tplasma_radioactivity\n")
    (root / "sub-01" / "ses-followup" / "anat").mkdir(parents=True)  # an MRI-only session
    _nii(root / "sub-01" / "ses-followup" / "anat" / "sub-01_ses-followup_T1w.nii.gz", mri)
    mri2, ct = _volumes(seed=2, ct=True)
    _nii(root / "sub-02" / "anat" / "sub-02_T2w.nii.gz", mri2)  # no T1w: the T2w
    _nii(root / "sub-02" / "ct" / "sub-02_ct.nii.gz", ct)
    _nii(root / "sub-03" / "pet" / "sub-03_trc-11CPIB_pet.nii.gz", pet)  # no MRI
    (root / "derivatives" / "old").mkdir(parents=True)  # never read
    return root


def test_bids_matching_says_what_is_fused_and_what_is_not(tmp_path, capsys):
    root = _bids(tmp_path / "bids")
    pairs, skipped = find_pairs(root, root / "derivatives" / "lightfusion")
    found = {p.id: p for p in pairs}
    assert set(found) == {"sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet", "sub-02_ct"}
    pet = found["sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet"]
    assert pet.task == "pet-mri" and pet.mri.name == "sub-01_ses-baseline_T1w.nii.gz" and pet.space == "T1w"
    assert pet.output.relative_to(root / "derivatives" / "lightfusion").as_posix() == \
        "sub-01/ses-baseline/pet/sub-01_ses-baseline_trc-18FFDG_rec-acstat_space-T1w_desc-fused_pet.nii.gz"
    assert pet.montage.relative_to(root / "derivatives" / "lightfusion").as_posix() == \
        "sub-01/figures/sub-01_ses-baseline_trc-18FFDG_rec-acstat_space-T1w_desc-fusedmontage_pet.png"
    assert pet.sources == ("bids:raw:sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz",
                           "bids:raw:sub-01/ses-baseline/pet/sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet.nii.gz")
    ct = found["sub-02_ct"]
    assert ct.task == "ct-mri" and ct.mri.name == "sub-02_T2w.nii.gz" and ct.output.name == "sub-02_space-T2w_desc-fused_ct.nii.gz"
    reasons = {s.path: s.reason for s in skipped}
    assert "T1w is preferred" in reasons["sub-01/ses-baseline/anat/sub-01_ses-baseline_T2w.nii.gz"]
    assert "no pet" in reasons["sub-01/ses-followup"]
    assert "no anat T1w or T2w image in sub-03" in reasons["sub-03/pet/sub-03_trc-11CPIB_pet.nii.gz"]
    assert len(skipped) == 3

    only_ct, skipped_ct = find_pairs(root, tmp_path / "d", task="ct-mri")
    assert [p.id for p in only_ct] == ["sub-02_ct"]
    assert "--task is ct-mri" in {s.path: s.reason for s in skipped_ct}[
        "sub-01/ses-baseline/pet/sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet.nii.gz"]

    # a session without anat takes the subject-level anat; never another session's
    (root / "sub-04" / "anat").mkdir(parents=True)
    mri, pet_image = _volumes(seed=4)
    _nii(root / "sub-04" / "anat" / "sub-04_T1w.nii.gz", mri)
    _nii(root / "sub-04" / "ses-1" / "pet" / "sub-04_ses-1_trc-18FFDG_pet.nii.gz", pet_image)
    pairs, _ = find_pairs(root, tmp_path / "d")
    sub4 = next(p for p in pairs if p.id.startswith("sub-04"))
    assert sub4.mri == (root / "sub-04" / "anat" / "sub-04_T1w.nii.gz").resolve() and "subject-level" in sub4.match

    with pytest.raises(Exception, match="BIDS dataset itself"):
        plan_batch(root, root)
    assert main(["batch", str(root), "--out", str(tmp_path / "x"), "--ext", ".nrrd"]) == 2
    assert "a BIDS derivative holds NIfTI images" in capsys.readouterr().err


def test_bids_batch_writes_a_bids_derivative(tmp_path, capsys):
    root = _bids(tmp_path / "bids")
    deriv = root / "derivatives" / "lightfusion"
    code = main(["batch", str(root), "--out", str(deriv), "--quiet", "--backend", "onnx", "--plane-size", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 cases from the BIDS dataset" in out and "not fused: sub-03/pet/sub-03_trc-11CPIB_pet.nii.gz" in out
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "LightFusion"
    assert description["DatasetLinks"]["raw"] == root.resolve().as_uri()
    stem = deriv / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_trc-18FFDG_rec-acstat_space-T1w_desc-fused_pet"
    fused = sitk.ReadImage(f"{stem}.nii.gz")
    assert fused.GetNumberOfComponentsPerPixel() == 3 and fused.GetSize() == (32, 32, 32)
    sidecar = json.loads(Path(f"{stem}.json").read_text())
    assert sidecar["Sources"][1] == "bids:raw:sub-01/ses-baseline/pet/sub-01_ses-baseline_trc-18FFDG_rec-acstat_pet.nii.gz"
    assert sidecar["SpatialReference"] == "bids:raw:sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz"
    settings = sidecar["LightFusion"]
    assert settings["task"] == "pet-mri" and settings["model"].endswith("pet-mri.onnx") and settings["colormap"] == "harvard-pet"
    assert (deriv / "sub-02" / "ct" / "sub-02_space-T2w_desc-fused_ct.nii.gz").is_file()
    assert (deriv / "sub-01" / "figures" / f"{stem.name.replace('desc-fused', 'desc-fusedmontage')}.png").is_file()
    summary = json.loads((deriv / "summary.json").read_text())
    assert summary["kind"] == "bids" and len(summary["skipped"]) == 3
    assert "sub-03_trc-11CPIB_pet.nii.gz" in (deriv / "report.html").read_text()

    again = fuse_batch(root, deriv, **FAST)  # a rerun keeps the verified RGB24 NIfTI outputs
    assert [r["status"] for r in again.rows] == ["kept", "kept"]


# ----------------------------------------------------------------------------------------------
# a real batch process killed mid-way resumes where it stopped
# ----------------------------------------------------------------------------------------------
def test_killed_batch_resumes_where_it_stopped(tmp_path):
    data = tmp_path / "data"
    _write_pair(data, "a", seed=0)
    rows = [{"id": f"k{i:02d}", "mri": "data/a_mri.nrrd", "other": "data/a_other.nrrd"} for i in range(12)]
    manifest = _manifest(tmp_path, rows)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "LightFusionLib", "batch", str(manifest), "--out", str(out),
                             "--workers", "2", "--quiet", "--backend", "onnx", "--device", "cpu", "--plane-size", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.glob("k*/fused.json"))) < 2 and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the batch and its worker processes, mid-batch
        proc.wait()
        gone = time.monotonic() + 20
        while time.monotonic() < gone:  # until the orphaned workers are reaped (as when a batch is resumed later)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    done_before = {p.parent.name for p in out.glob("k*/fused.json")}
    assert 2 <= len(done_before) < 12, "the batch was not killed mid-way"

    result = fuse_batch(manifest, out, **FAST)
    status = {r["id"]: r["status"] for r in result.rows}
    assert {i for i, s in status.items() if s == "kept"} == done_before
    assert {i for i, s in status.items() if s == "fused"} == {r["id"] for r in rows} - done_before
    assert result.totals["failed"] == 0 and result.totals["pending"] == 0
    assert not list(out.rglob(".lightfusion-*"))  # no temporaries and no lock left behind
    reference = _array(out / "k00" / "fused.nrrd")
    for r in rows:
        np.testing.assert_array_equal(_array(out / r["id"] / "fused.nrrd"), reference)


def test_a_worker_process_that_dies_fails_its_cases_and_the_others_go_on(tmp_path):
    import multiprocessing
    import threading

    data = tmp_path / "data"
    _write_pair(data, "a", seed=0)
    manifest = _manifest(tmp_path, [{"id": f"w{i}", "mri": "data/a_mri.nrrd", "other": "data/a_other.nrrd"}
                                    for i in range(8)])
    out, results = tmp_path / "out", []
    runner = threading.Thread(target=lambda: results.append(fuse_batch(manifest, out, workers=2, **FAST)))
    runner.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("w*/fused.json")):
        time.sleep(0.02)
    victims = [p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")]  # the pool's workers
    assert victims
    os.kill(victims[0].pid, signal.SIGKILL)
    runner.join(120)
    rows = results[0].rows
    died = [r for r in rows if r["status"] == "failed"]
    assert died and all("a worker process died" in r["message"] for r in died)
    assert len(died) + sum(r["status"] == "fused" for r in rows) == 8 and results[0].totals["pending"] == 0
    again = fuse_batch(manifest, out, **FAST)  # the rerun retries them
    assert sorted(r["id"] for r in again.rows if r["status"] == "fused") == sorted(r["id"] for r in died)


# ----------------------------------------------------------------------------------------------
# Dask: a real LocalCluster (processes) gives the outputs of the local run
# ----------------------------------------------------------------------------------------------
def test_dask_local_cluster_gives_the_same_outputs_as_the_local_run(tmp_path):
    distributed = pytest.importorskip("distributed")
    manifest = _cohort(tmp_path, n_pet=2)
    local = fuse_batch(manifest, tmp_path / "local", report=False, **FAST)
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster:
        remote = fuse_batch(manifest, tmp_path / "dask", scheduler=cluster.scheduler_address, **FAST)
        workers = {r["worker"] for r in remote.rows}
    assert [(r["id"], r["status"], r["message"]) for r in remote.rows] == \
        [(r["id"], r["status"], r["message"].replace(str(tmp_path / "local"), str(tmp_path / "dask")))
         for r in local.rows]
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)  # ran on both workers
    for row in local.rows:
        if row["status"] == "fused":
            twin = tmp_path / "dask" / row["id"]
            np.testing.assert_array_equal(_array(twin / "fused.nrrd"), _array(row["output"]))
            np.testing.assert_array_equal(_array(twin / "montage.png"), _array(row["montage"]))
            assert next(r for r in remote.rows if r["id"] == row["id"])["warnings"] == row["warnings"]
    summary = json.loads((tmp_path / "dask" / "summary.json").read_text())
    assert summary["settings"]["scheduler"] == cluster.scheduler_address and summary["totals"]["failed"] == 2


def test_memory_trend_of_the_batch_benchmark_reads_each_workers_rows():
    from LightFusionLib.benchmark import _memory_trend

    rows = [{"worker": f"h:{1 + i % 2}", "rss_mb": 300.0 + (i % 2) * 10 + (0.01 * i if i >= 20 else i)} for i in range(60)]
    trend = _memory_trend(rows)
    assert set(trend) == {"h:1", "h:2"} and trend["h:1"]["cases"] == 30
    assert trend["h:1"]["rss_after_10_cases_mb"] == rows[18]["rss_mb"]  # the worker's 10th case
    assert 0 < trend["h:1"]["fitted_mb_per_100_cases"] < 5  # fitted after the first 10 cases: the start-up ramp is left out


def test_colour_and_compression_options_reach_the_outputs_and_colour_counts_for_resume(tmp_path):
    data = tmp_path / "data"
    _write_pair(data, "p0")
    manifest = _manifest(tmp_path, [{"id": "p0", "mri": "data/p0_mri.nrrd", "other": "data/p0_other.nrrd"}])
    out = tmp_path / "out"
    plain = fuse_batch(manifest, out, **FAST)
    assert plain.rows[0]["status"] == "fused"
    assert b"encoding: raw" in (out / "p0" / "fused.nrrd").read_bytes()[:1000]
    yuv = _array(out / "p0" / "fused.nrrd")
    again = fuse_batch(manifest, out, **FAST, compress=True)  # same voxels: nothing to redo
    assert again.rows[0]["status"] != "fused"
    vivid = fuse_batch(manifest, out, **FAST, colour_mode="saturated", compress=True)  # other colours: redone
    assert vivid.rows[0]["status"] == "fused"
    assert b"encoding: gzip" in (out / "p0" / "fused.nrrd").read_bytes()[:1000]
    assert not np.array_equal(_array(out / "p0" / "fused.nrrd"), yuv)


def test_register_column_registers_that_case_and_records_it(tmp_path):
    """A CSV ``register`` cell: that case's PET (the sample's, moved 12 mm) is registered to its MRI
    first, the others are fused as they lie; the sidecar says what the registration found."""
    from stand_ins import SAMPLE

    from LightFusionLib.demo import SAMPLE_MRI, SAMPLE_PET

    data = tmp_path / "data"
    data.mkdir()
    pet = sitk.ReadImage(str(SAMPLE / SAMPLE_PET))
    pet.SetOrigin(tuple(np.add(pet.GetOrigin(), (12.0, 0.0, 0.0))))
    sitk.WriteImage(pet, str(data / "moved_pet.nrrd"))
    mri = str(SAMPLE / SAMPLE_MRI)
    manifest = _manifest(tmp_path, [
        {"id": "aligned", "mri": mri, "other": str(SAMPLE / SAMPLE_PET), "register": ""},
        {"id": "moved", "mri": mri, "other": "data/moved_pet.nrrd", "register": "rigid"},
        {"id": "moved-as-is", "mri": mri, "other": "data/moved_pet.nrrd", "register": "none"}])
    result = fuse_batch(manifest, tmp_path / "out", **FAST)
    assert {r["id"]: r["status"] for r in result.rows} == {"aligned": "fused", "moved": "fused", "moved-as-is": "fused"}
    records = {case: json.loads((tmp_path / "out" / case / "fused.json").read_text())["LightFusion"]
               for case in ("aligned", "moved", "moved-as-is")}
    assert records["moved"]["register"] == "rigid" and "measure" in records["moved"]["registration"]
    assert records["aligned"]["register"] == "none" and records["aligned"]["registration"] is None
    assert records["aligned"]["colour"] == "yuv"
    volumes = {case: _array(tmp_path / "out" / case / "fused.nrrd").astype(float) for case in records}
    # registered, the moved PET fuses (nearly) like the aligned one; as it lies, it does not
    gap_registered = np.abs(volumes["moved"] - volumes["aligned"]).mean()
    gap_as_is = np.abs(volumes["moved-as-is"] - volumes["aligned"]).mean()
    assert gap_registered < 0.3 * gap_as_is
