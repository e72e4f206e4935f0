"""StyleGAN network pickles: errors that name the file, the option and the code to install."""

from __future__ import annotations

import pickle

import pytest
from torch import nn

from hpd_fast.cli import main
from hpd_fast.generators import load_stylegan_pickle
from hpd_fast.generators.stylegan import OFFICIAL_CODE


def _needs_module(module: str, extra: bytes = b"") -> bytes:
    # protocol-2 pickle: GLOBAL '<module> <name>' (as persistent StyleGAN pickles begin), then
    # a string that stands for the embedded source text.
    return (
        b"\x80\x02c" + module.encode() + b"\n_reconstruct_persistent_obj\n"
        b"X" + len(extra).to_bytes(4, "little") + extra + b"\x86."
    )


def test_missing_official_code_names_the_repository(tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(_needs_module("torch_utils_missing_mod.persistence"))
    with pytest.raises(ModuleNotFoundError) as e:
        load_stylegan_pickle(path, allow_pickle=True)
    msg = str(e.value)
    assert "net.pkl" in msg and "'torch_utils_missing_mod'" in msg
    assert all(url in msg for url in OFFICIAL_CODE.values()) and "PYTHONPATH" in msg
    # A StyleGAN-XL pickle (its source mentions pg_modules): only that repository.
    path.write_bytes(_needs_module("torch_utils_missing_mod.persistence", b"import pg_modules"))
    with pytest.raises(ModuleNotFoundError) as e:
        load_stylegan_pickle(path, allow_pickle=True)
    msg = str(e.value)
    assert OFFICIAL_CODE["StyleGAN-XL"] in msg and OFFICIAL_CODE["StyleGAN3"] not in msg


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"net\.pkl'? is not a readable network pickle: the file is empty or truncated"),
        (b"hello, I am text\n", r"net\.pkl'? is not a readable network pickle"),
        (pickle.dumps({"G_ema": nn.Linear(2, 2)})[:-30], r"net\.pkl'? is not a readable"),
        (pickle.dumps({"G_ema": {"w": 1}}), r"'G_ema' in '.*net\.pkl' is a dict, not a network"),
        (pickle.dumps({"G_ema": None}), r"'G_ema' in '.*net\.pkl' is a NoneType, not a network"),
        (pickle.dumps([1, 2]), r"key 'G_ema' not found in '.*net\.pkl' \(it holds list\)"),
    ],
)
def test_bad_pickles_name_the_file(tmp_path, content, match):
    path = tmp_path / "net.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_stylegan_pickle(path, allow_pickle=True)


def test_refusal_names_the_option(tmp_path, capsys):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"G_ema": nn.Linear(2, 2)}))
    with pytest.raises(ValueError, match=r"x\.pkl.*--allow-pickle.*allow_pickle=True"):
        load_stylegan_pickle(path)
    rc = main(["distill", "--generator", str(path), "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "--allow-pickle" in err and "x.pkl" in err
