"""``ebpo-train`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads its OpenMP runtime (which
reads the variable once), and leaves a value from the environment alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# records the variable at the moment the first ``import torch`` starts
SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY", "unset"))
sys.meta_path.insert(0, Spy())
import ebpo_megatron.train
print(seen[0])
"""


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_set_before_torch_is_imported(given, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", SPY], env={**env, "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split()[-1] == want
