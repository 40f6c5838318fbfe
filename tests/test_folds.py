"""Case-level k-fold cross-validation splits: data.fold and data.num_folds."""

from __future__ import annotations

import json

import pytest

from medseg.data.datamodule import SegmentationDataModule, split_cases

from conftest import BRATS_LABELS


def cases(n: int) -> list[dict[str, str]]:
    return [{"case": f"c{i:02d}"} for i in range(n)]


def ids(records) -> list[str]:
    return [c["case"] for c in records]


def test_as_many_folds_as_cases_is_leave_one_out_in_id_order():
    listed = [{"case": "patient26"}, {"case": "patient07"}, {"case": "patient19"}]  # file-system order
    for fold, held_out in enumerate(["patient07", "patient19", "patient26"]):
        train, val = split_cases(listed, 0.2, seed=0, fold=fold, num_folds=3)
        assert ids(val) == [held_out]
        assert ids(train) == sorted({"patient07", "patient19", "patient26"} - {held_out})


def test_folds_are_contiguous_blocks_that_partition_the_cases():
    folds = [split_cases(list(reversed(cases(10))), 0.2, seed=0, fold=k, num_folds=3) for k in range(3)]
    # 10 cases in 3 folds: 4, 3, 3 (larger blocks first, as scikit-learn's unshuffled KFold).
    assert [ids(val) for _, val in folds] == [["c00", "c01", "c02", "c03"], ["c04", "c05", "c06"], ["c07", "c08", "c09"]]
    for train, val in folds:
        assert sorted(ids(train) + ids(val)) == ids(cases(10)) and not set(ids(train)) & set(ids(val))


def test_folds_ignore_seed_and_val_fraction():
    a = split_cases(cases(7), 0.2, seed=1, fold=2, num_folds=4)
    b = split_cases(cases(7), 0.5, seed=99, fold=2, num_folds=4)
    assert ids(a[1]) == ids(b[1]) == ["c04", "c05"] and ids(a[0]) == ids(b[0])  # blocks of 2, 2, 2, 1


def test_no_fold_keeps_the_seeded_split():
    assert split_cases(cases(10), 0.2, seed=5, fold=None, num_folds=3) == split_cases(cases(10), 0.2, seed=5)


@pytest.mark.parametrize(
    ("fold", "num_folds", "message"),
    [
        (3, 3, r"expected data.fold in \[0, 3\) \(data.num_folds=3\), got 3"),
        (-1, 3, r"expected data.fold in \[0, 3\).*got -1"),
        (1.0, 3, r"expected data.fold in \[0, 3\).*got 1.0"),
        (True, 3, r"expected data.fold in \[0, 3\).*got True"),
        (0, 1, r"expected data.num_folds to be an integer >= 2 with data.fold=0, got 1"),
        (0, None, r"expected data.num_folds to be an integer >= 2 with data.fold=0, got None"),
        (0, 4, r"expected data.num_folds <= the number of cases \(3\), got 4"),
    ],
)
def test_bad_fold_arguments(fold, num_folds, message):
    with pytest.raises(ValueError, match=message):
        split_cases(cases(3), 0.2, seed=0, fold=fold, num_folds=num_folds)


def make_datamodule(root, tmp_path, **overrides) -> SegmentationDataModule:
    options = dict(
        layout="brats", root=str(root), labels=BRATS_LABELS, patch_size=(32, 32, 32), num_workers=0,
        split_path=str(tmp_path / "split.json"),
    )
    return SegmentationDataModule(**{**options, **overrides})


def test_datamodule_rejects_a_bad_fold_before_reading_data(tmp_path):
    with pytest.raises(ValueError, match=r"expected data.fold in \[0, 3\) \(data.num_folds=3\), got 5"):
        make_datamodule(tmp_path / "absent", tmp_path, fold=5, num_folds=3)


def test_fold_is_recorded_in_split_json_and_checked_on_resume(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path, fold=1, num_folds=3)
    dm.trainer = type("T", (), {"is_global_zero": True})()
    dm.setup("fit")
    saved = json.loads((tmp_path / "split.json").read_text())
    # 6 cases SYN-0000..SYN-0005 in 3 folds: fold 1 holds out the second pair.
    assert (saved["fold"], saved["num_folds"]) == (1, 3) and saved["val"] == ["SYN-0002", "SYN-0003"]
    assert saved["train"] == ["SYN-0000", "SYN-0001", "SYN-0004", "SYN-0005"] == ids(dm.train_cases)
    resumed = make_datamodule(brats_tree, tmp_path, fold=1, num_folds=3)
    resumed.setup("fit")
    assert ids(resumed.val_cases) == saved["val"]
    other = make_datamodule(brats_tree, tmp_path, fold=2, num_folds=3)
    with pytest.raises(ValueError, match=r"split.json: the saved split is fold 1, got data.fold=2"):
        other.setup("fit")


def test_seeded_split_records_no_fold(brats_tree, tmp_path):
    dm = make_datamodule(brats_tree, tmp_path, val_fraction=0.34, seed=1, num_folds=3)
    dm.trainer = type("T", (), {"is_global_zero": True})()
    dm.setup("fit")
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["fold"] is None and saved["num_folds"] is None and len(saved["val"]) == 2
