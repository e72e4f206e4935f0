"""The installation: what was built, how it reports itself, and that import never fails."""

import os
import subprocess
import sys

import pytest
import torch

import hpd_fast
from hpd_fast import _backend


def test_backend_info_shape():
    info = hpd_fast.backend_info()
    assert list(info) == ["reference", "cpp", "cuda", "triton"]
    for entry in info.values():
        assert isinstance(entry["available"], bool) and entry["detail"]
    assert info["reference"]["available"]


@pytest.mark.skipif(os.environ.get("HPD_FAST_REQUIRE_CPP") != "1", reason="set by CI")
def test_cpp_extension_was_built():
    assert hpd_fast.backend_info()["cpp"]["available"], hpd_fast.backend_info()["cpp"]["detail"]


def test_cuda_reason_names_the_rebuild_switch():
    info = hpd_fast.backend_info()["cuda"]
    if not info["available"] and "without CUDA kernels" in info["detail"]:
        assert "HPD_FAST_FORCE_CUDA=1" in info["detail"]


def test_import_without_cpp_falls_back():
    # With the extension disabled, import works and the op runs on the reference.
    code = (
        "import torch, hpd_fast\n"
        "info = hpd_fast.backend_info()\n"
        "assert not info['cpp']['available'] and 'HPD_FAST_DISABLE_CPP' in info['cpp']['detail']\n"
        "x = torch.randn(4, 3); y = torch.tensor([0, 1, 0, 1]); t = torch.randn(2, 3)\n"
        "print(float(hpd_fast.class_mean_distance(x, y, t)))\n"
    )
    env = dict(os.environ, HPD_FAST_DISABLE_CPP="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    float(out.stdout.strip())


def test_default_backend_selection():
    cpu = torch.device("cpu")
    expected = "cpp" if hpd_fast.backend_info()["cpp"]["available"] else "reference"
    assert _backend.select_backend("op", cpu, None) == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select_backend("op", cpu, "fastest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_is_cuda_or_warns():
    dev = torch.device("cuda")
    if hpd_fast.backend_info()["cuda"]["available"]:
        assert _backend.select_backend("op", dev, None) == "cuda"
    else:
        with pytest.warns(RuntimeWarning, match="HPD_FAST_FORCE_CUDA"):
            assert _backend.select_backend("op2", dev, None) in ("triton", "reference")


def test_cli_info():
    out = subprocess.run(
        [sys.executable, "-m", "hpd_fast", "info"], capture_output=True, text=True, check=True
    )
    assert "backends:" in out.stdout and "reference" in out.stdout
