"""medseg.plan: fingerprints and plans of generated datasets with known spacing, shape, intensities and labels."""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.config import compose
from medseg.data.labels import LabelSpec
from medseg.planning.fingerprint import dataset_fingerprint
from medseg.planning.memory import dynunet_activation_elements, training_step_bytes
from medseg.planning.planner import PlanOptions, plan_from_fingerprint

LABELS = LabelSpec(mode="softmax", names=("organ", "lesion"), values=(0, 1, 2))


def write_task(root: Path, cases: int, shape, spacing, image_fn, label_fn, modality: str = "MRI", seed: int = 0) -> Path:
    """An MSD task of ``cases`` single-channel cases: ``image_fn(rng, shape)`` and ``label_fn(rng, shape)`` give
    the arrays (RAS order), written with a diagonal affine of ``spacing``."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        case_shape = shape(rng) if callable(shape) else shape
        case_spacing = spacing(rng) if callable(spacing) else spacing
        affine = np.diag([*case_spacing, 1.0])
        label = label_fn(rng, case_shape).astype(np.uint8)
        image = image_fn(rng, case_shape, label).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case{i:03d}.nii.gz", "label": f"./labelsTr/case{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "generated", "modality": {"0": modality}, "labels": {"0": "background", "1": "organ", "2": "lesion"}, "training": training}))
    return root


def blob_label(rng, shape, lesions: int = 0):
    """A large ellipsoid 'organ' (1) in the middle and ``lesions`` small cubes (2) of 1-3 voxels a side."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    label[(grid**2).sum(0) < 0.3] = 1
    for _ in range(lesions):
        size = rng.integers(1, 4)
        corner = [rng.integers(1, s - 4) for s in shape]
        label[tuple(slice(c, c + size) for c in corner)] = 2
    return label


def mri_image(rng, shape, label):
    return np.where(label > 0, 300.0 + 40 * label, 100.0) + rng.normal(0, 10, shape)


def ct_image(rng, shape, label):
    air = np.full(shape, -1000.0)
    body = np.where(label > 0, 60.0 + 40 * label, 0.0) + rng.normal(0, 20, shape)
    air[:, : shape[1] - 2] = body[:, : shape[1] - 2]  # a strip of air outside the body
    return air


def cases(root: Path):
    from medseg.data.layouts import find_cases

    return find_cases("msd", root)


def activation_estimate(in_channels=1, out_channels=3, base=8):
    def estimate(topology, batch):
        activations, parameters = dynunet_activation_elements(topology, in_channels, out_channels, batch, base_features=base, deep_supervision=topology.num_stages > 2)
        return training_step_bytes(activations, parameters, 4.0, 16.0)

    return estimate


def plan_for(root: Path, memory_gb: float = 0.5, declare: bool = True, **options):
    fingerprint, _ = dataset_fingerprint(cases(root), LABELS, progress=False)
    declared = json.loads((root / "dataset.json").read_text())["modality"]["0"] if declare else None
    opts = PlanOptions(memory_bytes=memory_gb * 2**30, base_features=8, **options)
    return fingerprint, plan_from_fingerprint(fingerprint, opts, 1, 3, activation_estimate(), declared_modality=declared)


def test_fingerprint_matches_numpy_and_reorients_to_ras(tmp_path):
    rng = np.random.default_rng(5)
    label = blob_label(rng, (20, 24, 16), lesions=6)
    image = mri_image(rng, label.shape, label).astype(np.float32)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    # Stored in LPS order (x and y flipped): the fingerprint must see the RAS array and its spacing.
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image[::-1, ::-1], affine), tmp_path / "imagesTr" / "a.nii.gz")
    nib.save(nib.Nifti1Image(label[::-1, ::-1].copy(), affine), tmp_path / "labelsTr" / "a.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    fingerprint, samples = dataset_fingerprint(cases(tmp_path), LABELS, progress=False, samples_per_case=10**6)
    row = fingerprint["cases"][0]
    assert row["shape"] == [20, 24, 16] and row["spacing"] == [1.5, 2.0, 3.0]
    fg = image[label > 0].astype(np.float64)
    expected = {"mean": fg.mean(), "std": fg.std(), "p0.5": np.percentile(fg, 0.5), "p99.5": np.percentile(fg, 99.5)}
    assert row["intensity"][0]["foreground"] == pytest.approx(expected, rel=1e-5)
    assert row["foreground_fraction"] == pytest.approx((label > 0).mean())
    components = cc3d.connected_components((label == 2).astype(np.uint8), connectivity=26)
    volumes = sorted((np.bincount(components.ravel())[1:] * 9.0).tolist(), reverse=True)
    assert row["regions"]["lesion"]["components_mm3"] == pytest.approx(volumes)
    assert row["regions"]["organ"]["fraction"] == pytest.approx((label == 1).mean())
    assert samples["a"].shape == (1, int((label > 0).sum()))  # every foreground voxel when the sample allows
    assert fingerprint["dataset"]["foreground_intensity"][0] == pytest.approx(expected, rel=1e-5)


def test_refingerprinting_reads_only_changed_cases(tmp_path, monkeypatch):
    import medseg.planning.fingerprint as fp

    root = write_task(tmp_path / "task", 4, (16, 16, 12), (1.0, 1.0, 1.0), mri_image, blob_label)
    first, samples = dataset_fingerprint(cases(root), LABELS, progress=False)
    read = []
    original = fp.case_fingerprint
    monkeypatch.setattr(fp, "case_fingerprint", lambda record, *a, **k: read.append(record["case"]) or original(record, *a, **k))
    again, _ = dataset_fingerprint(cases(root), LABELS, first, samples, progress=False)
    assert read == [] and again == first
    label = nib.load(root / "labelsTr" / "case002.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(label.shape, dtype=np.uint8), label.affine), root / "labelsTr" / "case002.nii.gz")
    changed, _ = dataset_fingerprint(cases(root), LABELS, first, samples, progress=False)
    assert read == ["case002"] and changed["cases"][2]["foreground_fraction"] == 0.0


def test_thick_slices_get_in_plane_only_first_stride_and_kernel(tmp_path):
    # 0.8 x 0.8 mm in plane, 4-6 mm slices, few slices: nnU-Net's anisotropic case.
    root = write_task(tmp_path / "task", 5, (96, 96, 12), lambda rng: (0.8, 0.8, float(rng.choice([4.0, 5.0, 6.0]))), mri_image, blob_label)
    fingerprint, plan = plan_for(root)
    slices = [r["spacing"][2] for r in fingerprint["cases"]]
    assert plan.value("data.spacing") == pytest.approx([0.8, 0.8, np.percentile(slices, 10)], rel=1e-3)
    strides, kernels = plan.value("model.net.strides"), plan.value("model.net.kernel_size")
    assert strides[0] == [1, 1, 1] and strides[1] == [2, 2, 1], strides  # in plane only
    assert kernels[0] == [3, 3, 1]
    assert any(s[2] == 2 for s in strides[2:]), "the slice axis is pooled once in-plane spacing has caught up"
    patch = plan.value("data.patch_size")
    assert patch[0] > patch[2]
    divisible = np.prod(np.array(strides), axis=0)
    assert all(p % d == 0 for p, d in zip(patch, divisible))
    assert plan.value("data.intensity") == "mri"


def test_ct_dataset_gets_clipping_and_global_zscore_from_its_foreground(tmp_path):
    root = write_task(tmp_path / "task", 3, (24, 24, 16), (0.7, 0.7, 2.5), ct_image, blob_label, modality="CT")
    fingerprint, plan = plan_for(root)
    fg = np.concatenate([ct_image_from(root, r) for r in fingerprint["cases"]])
    assert plan.value("data.intensity") == "ct"
    window = plan.value("data.ct_window")
    # A 10k-voxel sample per case: the pooled percentiles agree with all voxels' to a few HU.
    assert window == pytest.approx([np.percentile(fg, 0.5), np.percentile(fg, 99.5)], abs=3.0)
    assert plan.value("data.ct_zscore") == pytest.approx([fg.mean(), fg.std()], abs=1.0)
    # Without the declaration, the intensities say CT (air at -1000 HU).
    _, by_intensity = plan_for(root, declare=False)
    assert by_intensity.value("data.intensity") == "ct"


def ct_image_from(root: Path, row) -> np.ndarray:
    image = np.asanyarray(nib.load(root / "imagesTr" / f"{row['case']}.nii.gz").dataobj)
    label = np.asanyarray(nib.load(root / "labelsTr" / f"{row['case']}.nii.gz").dataobj)
    return image[label > 0].astype(np.float64)


def test_many_small_components_give_lesion_size_buckets_and_anatomy_none(tmp_path):
    lesions = write_task(tmp_path / "lesions", 4, (40, 40, 40), (1.0, 1.0, 1.0), mri_image, lambda rng, shape: blob_label(rng, shape, lesions=12))
    fingerprint, plan = plan_for(lesions)
    sizes = [s for r in fingerprint["cases"] for s in r["regions"]["lesion"]["components_mm3"]]
    edges = plan.value("model.lesion_metrics.size_buckets_mm3")
    assert len(edges) == 2 and edges[0] < edges[1]
    assert min(sizes) <= edges[0] <= np.percentile(sizes, 50) <= edges[1] <= max(sizes)
    anatomy = write_task(tmp_path / "anatomy", 4, (40, 40, 40), (1.0, 1.0, 1.0), mri_image, blob_label)
    _, plan = plan_for(anatomy)
    assert plan.value("model.lesion_metrics") is None


def test_patch_and_batch_fit_the_memory_budget_and_the_batch_cap(tmp_path):
    root = write_task(tmp_path / "task", 6, (64, 64, 64), (1.0, 1.0, 1.0), mri_image, blob_label)
    estimate = activation_estimate()
    for memory_gb in (0.05, 0.2):
        _, plan = plan_for(root, memory_gb=memory_gb, max_batch_fraction=0.0)
        patch, batch = plan.value("data.patch_size"), plan.value("data.batch_size")
        from medseg.planning.rules import network_topology

        topology = network_topology(plan.value("data.spacing"), patch)
        assert estimate(topology, batch) <= memory_gb * 2**30 < estimate(topology, batch + 1)
    small, large = plan_for(root, memory_gb=0.05, max_batch_fraction=0.0)[1], plan_for(root, memory_gb=0.2, max_batch_fraction=0.0)[1]
    assert np.prod(small.value("data.patch_size")) * small.value("data.batch_size") < np.prod(large.value("data.patch_size")) * large.value("data.batch_size")
    # nnU-Net's cap: a batch holds at most 5% of the training voxels.
    capped = plan_for(root, memory_gb=4.0)[1]
    assert capped.value("data.batch_size") == max(2, int(0.05 * 6 * 64**3 / np.prod(capped.value("data.patch_size"))))


def test_schedule_is_sized_to_the_training_time_from_the_measured_step(tmp_path):
    root = write_task(tmp_path / "task", 8, (32, 32, 32), (1.0, 1.0, 1.0), mri_image, blob_label)
    fingerprint, _ = dataset_fingerprint(cases(root), LABELS, progress=False)
    options = PlanOptions(memory_bytes=2**28, base_features=8, train_minutes=10.0, time_margin=0.1)
    plan = plan_from_fingerprint(fingerprint, options, 1, 3, activation_estimate(), step_seconds=lambda arguments, patch, batch: 0.25, train_cases=6)
    steps_per_epoch = int(np.ceil(6 / plan.value("data.batch_size")))
    assert plan.value("trainer.max_epochs") == int(10 * 60 * 0.9 / 0.25 // steps_per_epoch)
    assert plan.value("trainer.check_val_every_n_epoch") == plan.value("trainer.max_epochs") // 10


def test_plan_entry_point_writes_a_preset_that_training_composes(tmp_path, monkeypatch):
    import medseg.planning.fingerprint as fp
    from medseg.plan import plan

    root = write_task(tmp_path / "task", 6, (32, 40, 24), (1.0, 1.2, 1.5), mri_image, lambda rng, shape: blob_label(rng, shape, lesions=5))
    output = tmp_path / "plans" / "experiment" / "generated_plan.yaml"
    overrides = [f"data.root={root}", "data=msd", "data.labels.names=[organ,lesion]", "data.labels.values=[0,1,2]", "data.augment.flip_axes=[0]",
                 f"plan.output={output}", "plan.train_minutes=null", "plan.total_steps=100", "plan.cpu_memory_gb=0.6", "plan.workers=0", "paths.output_dir=" + str(tmp_path / "run")]
    result, written = plan(compose("plan", overrides), data_group="msd")
    assert written == output and (output.parent / "fingerprint.json").is_file()
    read = []
    original = fp.case_fingerprint
    monkeypatch.setattr(fp, "case_fingerprint", lambda record, *a, **k: read.append(record["case"]) or original(record, *a, **k))
    again, _ = plan(compose("plan", overrides), data_group="msd")
    assert read == [] and again.choices == result.choices  # planning again reuses the written fingerprint
    text = output.read_text()
    preset = yaml.safe_load(text)
    assert preset["data"]["patch_size"] == result.value("data.patch_size")
    assert preset["data"]["labels"]["names"] == ["organ", "lesion"]  # carried from the composed config
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every planned value is preceded by its one-line reason
        if ": " in line and not line.lstrip().startswith(("#", "-")) and not line.startswith(("task_name", "defaults")):
            assert lines[i - 1].lstrip().startswith("#"), line
    cfg = compose("train", [f"hydra.searchpath=[file://{output.parent.parent}]", "+experiment=generated_plan", f"data.root={root}", f"paths.output_dir={tmp_path / 'run'}"])
    assert cfg.model.net._target_ == "monai.networks.nets.DynUNet" and cfg.loss.loss._target_ == "medseg.losses.DiceCELoss"
    assert list(cfg.data.patch_size) == result.value("data.patch_size") and list(cfg.model.net.strides) == result.value("model.net.strides")
    assert list(cfg.model.tta_flip_axes) == [0] and cfg.optimizer._target_ == "torch.optim.SGD"
    from medseg.build import build_model

    import torch

    model = build_model(cfg)
    batch = cfg.data.batch_size
    out = model(torch.randn(batch, 1, *cfg.data.patch_size))
    assert out.shape[:3] == (batch, cfg.model.net.deep_supr_num + 1, 3)  # deep supervision outputs in training mode


@pytest.mark.parametrize("bf16, expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_precision_on_a_cpu_follows_its_bf16_support(monkeypatch, bf16, expected):
    import torch

    import medseg.plan

    if torch.cuda.is_available():
        pytest.skip("plans for the GPU here; this checks the CPU choice")
    monkeypatch.setattr(medseg.precision, "cpu_supports_bf16", lambda: bf16)
    cfg = compose("plan", ["data.root=unused", "plan.output=unused"])
    assert medseg.plan.device_profile(cfg.plan)["precision"] == expected


def test_a_budget_no_network_fits_is_refused_with_the_smallest_estimate_and_exit_1(tmp_path):
    """The planner never shrinks the network below DynUNet's three stages: a budget too small for the smallest
    planned network ends with one message naming the budget and that network's estimate (no traceback)."""
    import subprocess
    import sys

    root = write_task(tmp_path / "task", 3, (32, 40, 24), (1.0, 1.2, 1.5), mri_image, lambda rng, shape: blob_label(rng, shape, lesions=3))
    output = tmp_path / "plans" / "experiment" / "tiny.yaml"
    command = [sys.executable, "-m", "medseg.plan", f"data.root={root}", "data=msd", "data.labels.names=[organ,lesion]", "data.labels.values=[0,1,2]",
               f"plan.output={output}", "plan.train_minutes=null", "plan.precision=32-true", "plan.cpu_memory_gb=0.25", "plan.workers=0", f"paths.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stdout + done.stderr
    assert "no network fits the 0.25 GiB memory budget" in message and "3 stages" in message and "plan.memory_gb" in message
    assert "Traceback" not in message and not output.exists()


def test_fit_patch_never_plans_fewer_than_three_stages():
    from medseg.planning.rules import MIN_STAGES, fit_patch_to_budget

    def model(topology, batch):  # a fixed overhead larger than the budget: no patch can fit
        return 2.0 + batch * float(np.prod(topology.patch_size))

    with pytest.raises(ValueError, match=r"needs an estimated .* GiB") as err:
        fit_patch_to_budget([1.0, 1.0, 1.0], [64, 64, 64], model, 1.0)
    assert f"{MIN_STAGES} stages" in str(err.value)
    shapes = []
    plan = fit_patch_to_budget([1.0, 1.0, 1.0], [64, 64, 64], lambda t, b: shapes.append(t.num_stages) or b * float(np.prod(t.patch_size)), 2 * 16**3)
    assert plan.topology.num_stages >= MIN_STAGES and min(shapes) >= MIN_STAGES
