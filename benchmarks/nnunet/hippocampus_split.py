"""The hippocampus side by side's data: the labelled cases of an MSD Task04 folder (200 in ../shared/data) -> a seeded held-out test set of 40 and the
other cases for cross-validation, each as an MSD task folder (symbolic links, nothing copied), and the training
cases plus the test images as an nnU-Net v2 raw dataset.

    python benchmarks/nnunet/hippocampus_split.py ../shared/data/Task04_Hippocampus OUT
writes OUT/hippocampus_cv (medseg.crossval's data.root), OUT/hippocampus_test (medseg.predict's input, with
labelsTs/ for medseg.evaluate) and OUT/nnunet_raw/Dataset004_Hippocampus (nnUNet_raw).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from medseg.data.layouts import find_cases
from medseg.data.layouts.nnunet import export_nnunet

TEST_CASES, SEED = 40, 0


def main(task: Path, out: Path) -> None:
    cases = sorted(find_cases("msd", task), key=lambda c: str(c["case"]))
    test_ids = set(random.Random(SEED).sample(range(len(cases)), TEST_CASES))
    test = [c for i, c in enumerate(cases) if i in test_ids]
    train = [c for i, c in enumerate(cases) if i not in test_ids]
    meta = json.loads((task / "dataset.json").read_text())

    cv = out / "hippocampus_cv"
    cv.mkdir(parents=True, exist_ok=True)
    entries = [{"image": str(Path(c["image"][0]).resolve()), "label": str(Path(c["label"]).resolve())} for c in train]
    (cv / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(entries), "numTest": 0, "training": entries, "test": []}, indent=1))

    held_out = out / "hippocampus_test"
    for sub in ("imagesTs", "labelsTs"):
        (held_out / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for c in test:
        name = f"{c['case']}.nii.gz"
        for sub, source in (("imagesTs", c["image"][0]), ("labelsTs", c["label"])):
            link = held_out / sub / name
            if not link.exists():
                link.symlink_to(Path(source).resolve())
        entries.append({"image": f"./imagesTs/{name}", "label": f"./labelsTs/{name}"})
    (held_out / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(entries), "numTest": 0, "training": entries, "test": []}, indent=1))
    (held_out / "test_cases.json").write_text(json.dumps({"seed": SEED, "rule": f"random.Random({SEED}).sample(range({len(cases)}), {TEST_CASES}) of the id-sorted cases", "cases": [str(c["case"]) for c in test]}, indent=1))

    labels = {"background": 0, "Anterior": 1, "Posterior": 2}
    raw = out / "nnunet_raw" / "Dataset004_Hippocampus"
    export_nnunet(train, raw, ["MRI"], labels)
    export_nnunet(test, raw, ["MRI"], labels, section="imagesTs")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
