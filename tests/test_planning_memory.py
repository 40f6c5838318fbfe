"""The planner's memory model (conf/plan.yaml) against the measured memory of training steps it did not see."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medseg.config import compose
from medseg.planning.memory import dynunet_activation_elements, training_step_bytes
from medseg.planning.rules import network_topology

pytestmark = pytest.mark.slow

MEASURE = """
import json, sys, torch
from medseg.planning.memory import dynunet_arguments, measure_training_step
from medseg.planning.rules import network_topology
patch, batch, base, precision = json.loads(sys.argv[1])
topology = network_topology([1.0, 1.0, 1.0], patch)
arguments = dynunet_arguments(topology, 1, 3, base, deep_supervision=True)
torch.set_num_threads(2)
print(json.dumps(measure_training_step(arguments, topology.patch_size, batch, precision=precision, steps=1)))
"""


@pytest.mark.parametrize("patch, batch, base, precision", [([48, 48, 48], 2, 16, "32-true"), ([56, 64, 48], 3, 16, "bf16-mixed"), ([48, 48, 48], 2, 24, "32-true")])
def test_predicted_training_step_memory_is_within_25_percent_of_the_measured_peak(patch, batch, base, precision):
    plan = compose("plan", ["plan.output=unused/experiment/x.yaml"]).plan
    if precision == "bf16-mixed":
        import torch

        if not getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)():
            pytest.skip("this CPU has no bf16 support: bf16-mixed falls back to slow emulation")
    topology = network_topology([1.0, 1.0, 1.0], patch)
    activations, parameters = dynunet_activation_elements(topology, 1, 3, batch, base_features=base, deep_supervision=True)
    predicted = training_step_bytes(activations, parameters, plan.activation_bytes[precision], plan.parameter_bytes, plan.overhead_mb[precision] * 2**20)
    # A fresh process: its peak resident memory is the step's, not an earlier test's.
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([patch, batch, base, precision])], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    _, measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured > 0
    assert abs(predicted - measured) / measured < 0.25, f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
