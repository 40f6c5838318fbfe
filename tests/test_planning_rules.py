"""The planning rules (medseg.planning.rules) against the figures they are derived from."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.planning.rules import Topology, fit_patch_to_budget, initial_patch_size, network_topology, target_spacing


def test_target_spacing_is_the_median_for_isotropic_data():
    rng = np.random.default_rng(0)
    spacings = rng.uniform(0.8, 1.2, size=(11, 3))
    shapes = rng.integers(100, 200, size=(11, 3))
    np.testing.assert_allclose(target_spacing(spacings, shapes), np.median(spacings, axis=0))


def test_target_spacing_takes_a_finer_percentile_along_thick_slices():
    # 0.8 x 0.8 mm in plane, 3-6 mm slices, few slices: the 10th percentile of the slice spacing.
    rng = np.random.default_rng(1)
    slices = rng.uniform(3.0, 6.0, size=20)
    spacings = np.stack([np.full(20, 0.8), np.full(20, 0.8), slices], axis=1)
    shapes = np.stack([np.full(20, 512), np.full(20, 512), rng.integers(20, 60, size=20)], axis=1)
    target = target_spacing(spacings, shapes)
    assert target[:2].tolist() == [0.8, 0.8]
    assert target[2] == pytest.approx(np.percentile(slices, 10))
    assert target[2] < np.median(slices)


def test_target_spacing_keeps_the_median_when_the_coarse_axis_has_many_voxels():
    # Anisotropic spacing but as many voxels along the coarse axis: no reason to resample it finer.
    spacings = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 6.0]])
    shapes = np.array([[200, 200, 200]] * 3)
    np.testing.assert_allclose(target_spacing(spacings, shapes), [0.8, 0.8, 5.0])


def test_target_spacing_rejects_bad_input():
    with pytest.raises(ValueError, match="spacings"):
        target_spacing(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="positive"):
        target_spacing([[1.0, -1.0, 1.0]], [[10, 10, 10]])
    with pytest.raises(ValueError, match="one shape per spacing"):
        target_spacing([[1.0, 1.0, 1.0]] * 2, [[10, 10, 10]])


def test_isotropic_topology_pools_every_axis_down_to_the_minimum_feature_map():
    topology = network_topology([1.0, 1.0, 1.0], [128, 128, 128], min_feature_map_size=4, max_pools=5)
    assert topology.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert topology.kernel_sizes == ((3, 3, 3),) * 6
    assert topology.feature_map_shapes()[-1] == (4, 4, 4)
    assert topology.patch_size == (128, 128, 128) and topology.divisible_by == (32, 32, 32)


def test_thick_slices_get_in_plane_only_first_strides_and_kernels():
    # 0.8 x 0.8 x 5 mm: the slice axis is pooled only once in-plane pooling brought it within a factor 2.
    topology = network_topology([0.8, 0.8, 5.0], [256, 256, 24], min_feature_map_size=4, max_pools=6)
    assert topology.strides[1] == (2, 2, 1)
    assert topology.kernel_sizes[0] == (3, 3, 1)
    # 0.8 -> 1.6 -> 3.2 in plane: from then on within a factor 2 of 5 mm, so pooled and convolved in 3D.
    assert topology.strides[2] == (2, 2, 1) and topology.strides[3] == (2, 2, 2)
    assert topology.kernel_sizes[2] == (3, 3, 3)
    for shape in topology.feature_map_shapes():
        assert min(shape) >= 4
    assert all(p % d == 0 for p, d in zip(topology.patch_size, topology.divisible_by))


def test_topology_stops_at_max_pools_and_pads_the_patch():
    topology = network_topology([1.0, 1.0, 1.0], [100, 60, 36], min_feature_map_size=4, max_pools=3)
    assert topology.pools_per_axis == (3, 3, 3)
    assert topology.patch_size == (104, 64, 40)  # rounded up to multiples of 8
    small = network_topology([1.0, 1.0, 1.0], [40, 56, 40], min_feature_map_size=4)
    # 40 -> 20 -> 10 -> 5: three pools; 56 -> 28 -> 14 -> 7: three; one more would leave < 4 voxels.
    assert small.pools_per_axis == (3, 3, 3)
    assert min(small.feature_map_shapes()[-1]) >= 4


def test_initial_patch_follows_the_spacing_and_the_median_shape():
    patch = initial_patch_size([1.0, 1.0, 2.0], [1000, 1000, 1000])
    assert patch[0] == patch[1] and patch[0] == pytest.approx(2 * patch[2], abs=1)
    assert np.prod(patch) == pytest.approx(256**3, rel=0.01)
    np.testing.assert_array_equal(initial_patch_size([1.0, 1.0, 1.0], [36, 50, 35]), [36, 50, 35])


def voxel_model(bytes_per_voxel: float = 1000.0):
    """A memory model proportional to patch voxels x batch: the budget arithmetic can be checked exactly."""
    return lambda topology, batch: bytes_per_voxel * batch * float(np.prod(topology.patch_size))


def test_patch_shrinks_along_the_axis_largest_relative_to_the_case_until_it_fits():
    model = voxel_model()
    budget = model(Topology((), (), (96, 96, 96), (1, 1, 1)), 2)
    plan = fit_patch_to_budget([1.0, 1.0, 1.0], [200, 160, 120], model, budget, min_batch_size=2)
    assert plan.estimated_bytes <= budget
    assert plan.batch_size == 2
    patch = np.array(plan.topology.patch_size)
    assert np.prod(patch) <= 96**3
    # Shrinking kept the patch's shape close to the case's: no axis far larger than the others relative to it.
    ratios = patch / np.array([200, 160, 120])
    assert ratios.max() / ratios.min() < 1.6
    assert all(p % d == 0 for p, d in zip(plan.topology.patch_size, plan.topology.divisible_by))


def test_spare_budget_goes_to_the_batch_size_up_to_its_cap():
    model = voxel_model()
    budget = 5.5 * model(Topology((), (), (36, 50, 35), (1, 1, 1)), 1)
    plan = fit_patch_to_budget([1.0, 1.0, 1.0], [36, 50, 35], model, 1e18, min_batch_size=2, max_batch_size=12)
    assert plan.batch_size == 12  # unbounded budget: the cap
    plan = fit_patch_to_budget([1.0, 1.0, 1.0], [36, 50, 35], model, budget, min_batch_size=2)
    assert model(plan.topology, plan.batch_size) <= budget < model(plan.topology, plan.batch_size + 1)


def test_a_budget_too_small_for_any_patch_is_an_error():
    with pytest.raises(ValueError, match="plan.memory_gb"):
        fit_patch_to_budget([1.0, 1.0, 1.0], [128, 128, 128], voxel_model(), 1.0)


def test_planned_dynunet_builds_and_its_activations_are_counted_as_a_real_pass_counts_them():
    import torch
    from torch import nn

    from medseg.planning.memory import activation_elements, build_dynunet, dynunet_activation_elements, dynunet_arguments, features_per_stage

    assert features_per_stage(7) == [32, 64, 128, 256, 320, 320, 320]
    topology = network_topology([0.8, 0.8, 2.0], [32, 32, 16], min_feature_map_size=4)
    arguments = dynunet_arguments(topology, in_channels=2, out_channels=3, base_features=4, max_features=16)
    net = build_dynunet(arguments)
    out = net(torch.zeros(1, 2, *topology.patch_size))
    assert out.shape == (1, 3, *topology.patch_size)
    # The meta-device count equals a count of the real outputs on the CPU.
    seen = []
    for module in net.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda _m, _i, output: seen.append(output.numel()))
    with torch.no_grad():
        net(torch.zeros(2, 2, *topology.patch_size))
    real = sum(seen)
    counted, parameters = dynunet_activation_elements(topology, 2, 3, batch_size=2, base_features=4, max_features=16)
    assert counted == real and parameters == sum(p.numel() for p in net.parameters())
    # Linear in the batch; the input layer's output alone is batch x features x voxels.
    assert dynunet_activation_elements(topology, 2, 3, batch_size=4, base_features=4, max_features=16)[0] == 2 * counted
    assert counted > 2 * 4 * int(np.prod(topology.patch_size))
    assert isinstance(net, nn.Module) and activation_elements(nn.Sequential(nn.Conv3d(1, 5, 1)), (1, 1, 2, 3, 4)) == 5 * 24
