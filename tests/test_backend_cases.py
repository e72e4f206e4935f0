"""The suite's (device, backend) parametrisations are valid on machines with and without a GPU.

A GPU machine is simulated on this CPU: ``torch.cuda.is_available`` returns True in a pytest
subprocess that only collects the suite; every collected (device, backend) pair must then be one
the dispatcher accepts (on such a machine ``backend="triton"`` refuses CPU tensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from hpd_fast import _backend

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent(
    '''
    """pytest plugin: a visible GPU, simulated; records every (device, backend) pair collected."""
    import json
    import os

    import torch

    torch.cuda.is_available = lambda: True  # before conftest.py and hpd_fast look
    torch.cuda.device_count = lambda: 1


    def pytest_collection_modifyitems(session, config, items):
        from hpd_fast import _backend

        pairs, bad = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "device" in params and "backend" in params:
                pairs.append([item.nodeid, params["device"], params["backend"]])
                try:
                    _backend.check_device("test", params["backend"], params["device"])
                except ValueError as exc:
                    bad.append([item.nodeid, str(exc)])
        with open(os.environ["SIM_GPU_REPORT"], "w") as f:
            json.dump({"pairs": pairs, "bad": bad}, f)
    '''
)


def _collect_as_gpu_machine(tmp_path: Path) -> dict:
    (tmp_path / "sim_gpu_plugin.py").write_text(PLUGIN)
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a GPU machine compiles Triton
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["SIM_GPU_REPORT"] = str(report)
    cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "sim_gpu_plugin"]
    cmd += ["-p", "no:cacheprovider", str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(report.read_text())


def test_suite_collects_only_valid_pairs_on_a_gpu_machine(tmp_path):
    report = _collect_as_gpu_machine(tmp_path)
    assert report["pairs"], "no (device, backend) parametrisation was collected"
    assert not report["bad"], "impossible (device, backend) cases on a GPU machine:\n" + "\n".join(
        f"{node}: {why}" for node, why in report["bad"]
    )
    # The simulated machine has CUDA tensors, and they get parametrised.
    assert any(device == "cuda" for _, device, _ in report["pairs"])


def test_runnable_pairs_are_accepted_here():
    pairs = _backend.runnable_pairs()
    assert ("cpu", "reference") in pairs
    for device, backend in pairs:
        _backend.check_device("test", backend, device)  # raises if the dispatcher would refuse
    on_gpu = torch.cuda.is_available()
    assert (("cpu", "triton") in pairs) == (
        not on_gpu and _backend.backend_info()["triton"]["available"]
    )
