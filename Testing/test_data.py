"""Data folders: discovery, validation errors that name the files, case splits, crops."""
import numpy as np
import pytest

from LightFusionLib.data import (DataError, case_of, check_task, find_pairs, load_pairs, random_crops,
                                 split_by_case, to_unit)
from tiny_pairs import HARVARD, make_pairs, write_png


def test_pairs_found_and_loaded(tmp_path):
    make_pairs(tmp_path)
    pairs = find_pairs(tmp_path, "pet-mri")
    assert [p.name for p in pairs] == ["1001", "1002", "2001", "2002", "3001"]
    arrays = load_pairs(pairs)
    assert arrays.mri.shape == (5, 32, 32) and arrays.other.shape == (5, 32, 32, 3)
    mri, other = to_unit(arrays)
    assert mri.dtype == np.float32 and 0 <= mri.min() and mri.max() <= 1 and other.max() <= 1


def test_parent_folder_with_task_subfolder(tmp_path):
    make_pairs(tmp_path / "CT-MRI", modality="CT")
    assert len(find_pairs(tmp_path, "CT-MRI")) == 5


def test_unpaired_names_are_listed(tmp_path):
    make_pairs(tmp_path)
    (tmp_path / "PET" / "1002.png").unlink()
    write_png(tmp_path / "PET" / "9001.png", np.zeros((32, 32, 3)))
    with pytest.raises(DataError, match=r"2 unpaired.*1002\.png.*9001\.png"):
        find_pairs(tmp_path, "pet-mri")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "nope", "pet-mri")
    (tmp_path / "MRI").mkdir()
    with pytest.raises(DataError, match="PET"):
        find_pairs(tmp_path, "pet-mri")
    (tmp_path / "PET").mkdir()
    with pytest.raises(DataError, match="no images"):
        find_pairs(tmp_path, "pet-mri")


def test_unreadable_files_are_listed(tmp_path):
    make_pairs(tmp_path)
    (tmp_path / "MRI" / "1001.png").write_bytes(b"not a png")
    (tmp_path / "PET" / "2002.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 unreadable.*MRI/1001\.png.*PET/2002\.png"):
        load_pairs(find_pairs(tmp_path, "pet-mri"))


def test_mixed_sizes_are_listed(tmp_path):
    make_pairs(tmp_path)
    write_png(tmp_path / "MRI" / "2001.png", np.zeros((40, 32)))
    with pytest.raises(DataError, match=r"mixed image sizes.*MRI/2001\.png \(40x32\)"):
        load_pairs(find_pairs(tmp_path, "pet-mri"))


def test_case_split_never_splits_a_case(tmp_path):
    make_pairs(tmp_path)
    pairs = find_pairs(tmp_path, "pet-mri")
    train, val = split_by_case(pairs, ["2"])
    assert {p.case for p in val} == {"2"} and "2" not in {p.case for p in train}
    assert len(train) + len(val) == len(pairs)
    with pytest.raises(DataError, match="not in data"):
        split_by_case(pairs, ["7"])
    with pytest.raises(DataError, match="nothing left"):
        split_by_case(pairs, ["1", "2", "3"])


def test_case_of_and_task_names():
    assert case_of("25015") == "25" and case_of("2004.png") == "2"
    with pytest.raises(DataError):
        case_of("12")
    assert check_task("PET-MRI") == "pet-mri"
    with pytest.raises(ValueError, match="unknown task"):
        check_task("xray-mri")


def test_crops_are_aligned_between_modalities():
    rng = np.random.default_rng(0)
    base = rng.random((3, 20, 20)).astype(np.float32)
    m, o = random_crops(base, base * 0.5, 8, np.random.default_rng(1), count=10)
    assert m.shape == (10, 1, 8, 8)
    assert np.allclose(o, m * 0.5)  # same window and flips in both
    with pytest.raises(DataError, match="exceeds"):
        random_crops(base, base, 32, rng)


@pytest.mark.skipif(not HARVARD.is_dir(), reason="../shared data not present")
def test_shared_harvard_layout():
    counts = {t: len(find_pairs(HARVARD / t.upper(), t)) for t in ("pet-mri", "spect-mri", "ct-mri")}
    assert counts == {"pet-mri": 269, "spect-mri": 290, "ct-mri": 163}


def test_rotations_and_jitter_augment_both_modalities_alike():
    rng = np.random.default_rng(0)
    base = rng.random((1, 8, 8), dtype=np.float32)
    dihedral_without_transpose = [base[0], base[0, ::-1], base[0, :, ::-1], base[0, ::-1, ::-1]]
    plain, _ = random_crops(base, base, 8, np.random.default_rng(1), count=32)
    assert all(any(np.array_equal(c[0], d) for d in dihedral_without_transpose) for c in plain)
    turned_m, turned_o = random_crops(base, base * 0.5, 8, np.random.default_rng(1), count=32, rotate=True)
    transposed = [np.rot90(d) for d in dihedral_without_transpose]
    assert any(any(np.array_equal(c[0], d) for d in transposed) for c in turned_m)  # flips alone never make these
    np.testing.assert_allclose(turned_o, turned_m * 0.5)  # the same geometry for both modalities
    # the same seed without rotate/jitter gives the same crops as before these options existed
    again, _ = random_crops(base, base, 8, np.random.default_rng(1), count=32, rotate=False, jitter=0.0)
    np.testing.assert_array_equal(again, plain)
    jm, jo = random_crops(base, base, 8, np.random.default_rng(1), count=32, jitter=0.3)
    assert jm.min() >= 0 and jm.max() <= 1
    assert not np.allclose(jm, jo)  # each modality gets its own contrast factor
    np.testing.assert_allclose(jm.mean(axis=(2, 3)), plain.mean(axis=(2, 3)), atol=0.05)  # about the mean
