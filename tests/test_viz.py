"""Pictures and tables for inspection: what they show is checked, not only that they draw."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.viz import bucket_labels, lesions_html, missed_lesions, plot_case_dice, plot_overlays, plot_recall_by_size, recall_by_size, save_figure, worst_cases


def blobs():
    reference = np.zeros((20, 20, 20), bool)
    reference[2:5, 2:5, 2:5] = True      # found
    reference[10:12, 10:12, 10:12] = True  # missed
    reference[15, 15, 15] = True           # missed single voxel
    prediction = np.zeros_like(reference)
    prediction[3, 3, 3] = True
    prediction[17:19, 1:3, 1:3] = True     # false positive
    return reference, prediction


def test_missed_lesions_are_the_untouched_reference_components():
    reference, prediction = blobs()
    missed = missed_lesions(prediction, reference)
    expected = np.zeros_like(reference)
    expected[10:12, 10:12, 10:12] = True
    expected[15, 15, 15] = True
    assert np.array_equal(missed, expected)


def test_overlay_grid_and_shape_check(tmp_path):
    reference, prediction = blobs()
    images = {"t1": np.random.default_rng(0).random((20, 20, 20)), "flair": np.ones((20, 20, 20))}
    fig = plot_overlays(images, reference, prediction, (11, 11, 11), missed_lesions(prediction, reference), spacing=(1, 1, 3))
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["axial 11", "coronal 11", "sagittal 11"]
    # The coronal slice (x horizontal, z vertical) of a (1, 1, 3) mm volume is drawn 3x taller per voxel.
    assert fig.axes[1].get_aspect() == 3.0 and fig.axes[0].get_aspect() == 1.0
    path = save_figure(fig, tmp_path / "overlay.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="one shape"):
        plot_overlays({"t1": np.ones((5, 5, 5))}, reference, prediction, (1, 1, 1))


def test_lesion_table_html_highlights_missed_rows():
    rows = [{"id": 1, "volume_mm3": 27.0, "bucket": "small", "detected": True, "lesion_dice": 0.8, "centroid": (3.0, 3.0, 3.0)},
            {"id": 2, "volume_mm3": 8.0, "bucket": "small", "detected": False, "lesion_dice": 0.0, "centroid": (10.5, 10.5, 10.5)}]
    html = lesions_html(rows)
    assert html.count("<tr") == 3 and html.count("#f8d0d0") == 1
    assert html.index("#f8d0d0") > html.index("<td>1</td>")  # the highlighted row is lesion 2's


def test_recall_by_size_pools_cases_and_buckets():
    rows = [{"case": "a", "region": "et", "dice": 0.5, "detected_small": 1, "n_ref_lesions_small": 3, "detected_large": 1, "n_ref_lesions_large": 1},
            {"case": "b", "region": "et", "dice": 0.9, "detected_small": 2, "n_ref_lesions_small": 2, "detected_large": 0, "n_ref_lesions_large": 0}]
    assert recall_by_size(rows, ("small", "large")) == {"et": {"small": (3, 5), "large": (1, 1)}}
    fig = plot_recall_by_size(rows, ("small", "large"), (50.0,))
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([0.6, 1.0])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["small\n< 50 mm³", "large\n>= 50 mm³"]
    assert worst_cases(rows, "et", n=1)[0]["case"] == "a"
    assert len(plot_case_dice(rows).axes[0].collections) == 1


def test_bucket_labels_without_edges():
    assert bucket_labels(["s", "m", "l"], None) == ["s", "m", "l"]
    assert bucket_labels(["s", "m", "l"], [10, 100]) == ["s\n< 10 mm³", "m\n10-100 mm³", "l\n>= 100 mm³"]
