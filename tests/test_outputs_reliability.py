"""Outputs whole or absent, one writer per folder, checks before the long work, errors that
name the file, and non-finite values named truthfully (the library calls; the killed CLI runs
are in test_fault_injection.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hpd_fast
from hpd_fast._files import FolderLock, FolderLockedError
from hpd_fast.config import preset
from hpd_fast.distill.result import DistillResult, IncompleteResultError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _result(m: int = 2, stages: int = 2) -> DistillResult:
    g = torch.Generator().manual_seed(m)
    img = lambda: torch.randn(m, 1, 4, 4, generator=g)  # noqa: E731
    return DistillResult(
        images=img(),
        labels=torch.arange(m),
        w=torch.randn(m, 3, generator=g),
        f=torch.randn(m, 2, generator=g),
        stage=1,
        iteration=0,
        stage_images={k: img() for k in range(1, stages + 1)},
        stage_w={k: torch.randn(m, 3, generator=g) for k in range(1, stages + 1)},
        stage_f={k: torch.randn(m, 2, generator=g) for k in range(1, stages + 1)},
        stage_best={k: {"iteration": 0, "score": 1.0} for k in range(1, stages + 1)},
        config={"ipc": m},
    )


# ------------------------------------------------------------------------- whole or absent


def test_tensors_of_another_save_are_refused(tmp_path):
    """A save killed between replacing the tensors and the summary (IPC-2 tensors beside an
    IPC-1 summary) must not load."""
    _result(2).save(tmp_path / "a", figures=False)
    _result(4).save(tmp_path / "b", figures=False)
    os.replace(tmp_path / "b" / "tensors.safetensors", tmp_path / "a" / "tensors.safetensors")
    with pytest.raises(IncompleteResultError, match="does not belong to"):
        DistillResult.load(tmp_path / "a")


def test_save_removes_the_old_manifest_first_and_stale_files(tmp_path, monkeypatch):
    out = tmp_path / "r"
    _result(2, stages=4).save(out)
    assert (out / "grid_stage4.png").is_file()
    import hpd_fast.distill.result as R

    def killed(*a, **k):
        raise KeyboardInterrupt  # a kill while the figures are drawn

    monkeypatch.setattr(R, "save_figures", killed)
    with pytest.raises(KeyboardInterrupt):
        _result(3, stages=2).save(out)
    with pytest.raises(FileNotFoundError, match="summary.json"):  # absent, not mixed
        DistillResult.load(out)
    monkeypatch.undo()
    new = _result(3, stages=2)
    new.save(out)
    assert not (out / "grid_stage3.png").exists() and not (out / "grid_stage4.png").exists()
    back = DistillResult.load(out)
    assert back.run_id == new.run_id and torch.equal(back.images, new.images)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tensors"]["images"] == [3, 1, 4, 4]


def test_load_names_the_damaged_file(tmp_path):
    out = _result().save(tmp_path / "r", figures=False)
    data = (out / "tensors.safetensors").read_bytes()
    (out / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompleteResultError, match=r"tensors\.safetensors.*--overwrite"):
        DistillResult.load(out)
    out = _result().save(tmp_path / "s", figures=False)
    (out / "summary.json").write_text('{"format": ')
    with pytest.raises(IncompleteResultError, match=r"summary\.json.*not valid JSON"):
        DistillResult.load(out)


def test_truncated_checkpoint_names_the_file(tmp_path):
    from hpd_fast.distill.state import CheckpointCorruptError, read_checkpoint, write_checkpoint

    write_checkpoint(tmp_path, {"w": torch.ones(100)}, {"config": {"a": 1}})
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint\.safetensors.*--overwrite"):
        read_checkpoint(tmp_path, {"a": 1})


def test_permission_error_is_reported_as_one(tmp_path):
    from hpd_fast._files import describe_os_error

    msg = describe_os_error(PermissionError(13, "x"), tmp_path / "f", "cannot read")
    assert "permission denied" in msg and str(tmp_path / "f") in msg


# ------------------------------------------------------------------------------ expert files


def _expert_config():
    return {
        "training": {"epochs": 2, "lr": 0.01},
        "num_params": 3,
        "model": {},
        "dataset": {"name": "digits"},
        "layout": [],
    }


def test_non_finite_experts_are_named(tmp_path):
    from hpd_fast.experts import format as F

    traj = torch.ones(3, 3)
    traj[2, 1] = float("nan")
    with pytest.raises(F.NonFiniteExpertError, match="expert 4 diverged.*epoch 2"):
        F._save_expert(tmp_path / "e.safetensors", traj, torch.ones(2), _expert_config(), 4, 1.0)
    assert not (tmp_path / "e.safetensors").exists()
    meta = {"format": F.FORMAT, "version": "1", "config": json.dumps(_expert_config())}
    path = tmp_path / "expert_00000.safetensors"
    save_file({"trajectory": traj, "train_loss": torch.ones(2)}, str(path), metadata=meta)
    with pytest.raises(F.NonFiniteExpertError, match=r"expert_00000\.safetensors.*epoch 2"):
        F.load(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"expert_00000\.safetensors.*(damaged|not a readable)"):
        F.load(tmp_path)


# ------------------------------------------------------------------------------------ locks


def test_folder_lock_names_the_holder_and_dies_with_it(tmp_path):
    pid = f"PID {os.getpid()}"
    with FolderLock(tmp_path, "test holder"), pytest.raises(FolderLockedError, match=pid):
        FolderLock(tmp_path, "second").acquire()
    code = (
        "import sys, time; from hpd_fast._files import FolderLock; "
        f"FolderLock({str(tmp_path)!r}, 'child').acquire(); print('held', flush=True); "
        "time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(FolderLockedError, match=f"PID {child.pid}"):
        FolderLock(tmp_path, "x").acquire()
    child.send_signal(signal.SIGKILL)
    child.wait()
    with FolderLock(tmp_path, "after the kill"):  # a dead holder's lock is free
        pass


def test_expert_entry_lock_waits_for_same_settings_refuses_others(tmp_path):
    from hpd_fast.experts.cache import _lock_entry

    holder = FolderLock(tmp_path, "hpd-fast expert training", {"settings": "aaa"}).acquire()
    with pytest.raises(FolderLockedError, match=f"PID {os.getpid()}"):
        _lock_entry(tmp_path, "bbb", None)
    threading.Timer(0.5, holder.release).start()
    t0 = time.perf_counter()
    lock = _lock_entry(tmp_path, "aaa", None)  # the same settings: waits, then proceeds
    assert time.perf_counter() - t0 >= 0.4 and lock.held
    lock.release()


# ----------------------------------------------------------------------- before the long work


def _tiny_run(tmp_path, **kw):
    cfg = preset("digits")
    cfg.out = str(tmp_path / "out")
    cfg.data.max_per_class = 5
    cfg.experts.cache_dir = str(tmp_path / "cache")
    cfg.experts.num_experts, cfg.experts.epochs = 1, 2
    cfg.experts.model_kwargs = {"width": 4}
    for k, v in kw.items():
        obj = cfg
        *path, last = k.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg


def test_bad_model_kwargs_refused_before_experts(tmp_path):
    from hpd_fast.run import distill_run

    cfg = _tiny_run(tmp_path, **{"experts.model_kwargs": {"widht": 4}})
    with pytest.raises(ValueError, match=r"experts\.model.*widht"):
        distill_run(cfg, device="cpu", progress=False)
    assert not (tmp_path / "cache").exists()
    cfg = _tiny_run(tmp_path, **{"hpd.select.crfd_model_kwargs": {"nope": 1}})
    with pytest.raises(ValueError, match=r"crfd_model.*nope"):
        distill_run(cfg, device="cpu", progress=False)
    assert not (tmp_path / "cache").exists()


def test_generator_resolution_refused_before_experts(tmp_path):
    from hpd_fast.generators import ConvGenerator, save_generator
    from hpd_fast.run import distill_run

    d = hpd_fast.data.load("digits")
    g = ConvGenerator(10, (1, 16, 16), latent_dim=4, width=4, mean=d.mean, std=d.std)
    save_generator(g, tmp_path / "g16")
    cfg = _tiny_run(tmp_path, **{"generator.source": str(tmp_path / "g16")})
    with pytest.raises(ValueError, match=r"generator: it renders images of shape \[1, 16, 16\]"):
        distill_run(cfg, device="cpu", progress=False)
    assert not (tmp_path / "cache").exists()


def test_out_under_a_file_refused_up_front(tmp_path):
    from hpd_fast.run import distill_run

    (tmp_path / "file").write_text("x")
    cfg = _tiny_run(tmp_path, out=str(tmp_path / "file" / "run"))
    with pytest.raises(ValueError, match="is a file"):
        distill_run(cfg, device="cpu", progress=False)
    assert not (tmp_path / "cache").exists()


def test_out_folder_locked_finished_and_overwritten(tmp_path):
    from hpd_fast.run import OutputFolderError, _prepare_out

    cfg = _tiny_run(tmp_path)
    out = Path(cfg.out)
    pid = f"the other distill \\(PID {os.getpid()}\\)"
    with FolderLock(out, "the other distill"), pytest.raises(OutputFolderError, match=pid):
        _prepare_out(cfg, None)
    _result().save(out)
    for name in ("grid_stage3.png", "grid_stage4.png", "evaluation.json", "metrics.json"):
        (out / name).write_text("old")
    (out / "mine.txt").write_text("not a run file")
    with pytest.raises(OutputFolderError, match="finished run.*--overwrite"):
        _prepare_out(cfg, None)
    cfg.overwrite = True
    _prepare_out(cfg, None).release()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "mine.txt"]


def test_evaluate_out_checked_before_training(tmp_path):
    from hpd_fast.run import evaluate_run

    run = _result().save(tmp_path / "r", figures=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(run, out=tmp_path / "missing" / "e.json")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        evaluate_run(run, out=str(tmp_path / "newdir") + "/")


# ------------------------------------------------------------------------------- non-finite


@pytest.fixture(scope="module")
def small():
    from hpd_fast.experts import train_experts
    from hpd_fast.generators import ConvGenerator

    d = hpd_fast.data.load("digits", max_per_class=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = ConvGenerator(10, (1, 8, 8), latent_dim=4, width=4, mean=d.mean, std=d.std)
    ex = train_experts(d, "ConvNet", num_experts=2, epochs=3, model_kwargs={"width": 4})
    return d, g, ex


HPD_KW = dict(
    iterations_per_stage=2, last_stage=2, syn_steps=2, expert_epochs=1, max_start_epoch=2,
    crfd_models=1,
)  # fmt: skip


def test_nan_experts_are_named_as_expert_data(small, tmp_path):
    from hpd_fast.distill import HPD, NonFiniteLossError
    from hpd_fast.experts import Experts

    d, g, ex = small
    trajs = [t.clone() for t in ex.trajectories]
    for t in trajs:
        t[1:] = float("nan")
    bad = Experts(trajs, ex.config)
    hpd = HPD(g, d, experts=bad, algorithm="mtt", checkpoint_dir=tmp_path / "c", **HPD_KW)
    with pytest.raises(NonFiniteLossError, match="expert data is not finite.*epoch") as e:
        hpd.fit(progress=False)
    assert "no checkpoint was written yet" in str(e.value)


def test_huge_lr_lr_names_the_learning_rate(small):
    from hpd_fast.distill import HPD, NonFiniteLossError

    d, g, ex = small
    with pytest.raises(NonFiniteLossError, match=r"stage \d, iteration \d.*lr_lr") as e:
        HPD(g, d, experts=ex, algorithm="mtt", lr_lr=1e30, **HPD_KW).fit(progress=False)
    assert "checkpoint" not in str(e.value)  # there is none to keep
