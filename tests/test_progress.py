"""Progress reporting of train_experts and evaluate: a tqdm bar on a terminal, one log line per
finished network elsewhere, nothing with progress=False."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

import hpd_fast
from hpd_fast._common import progress_bar
from hpd_fast.evaluation import evaluate
from hpd_fast.experts import train_experts

SMALL = {"width": 8}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> hpd_fast.DistillData:
    return hpd_fast.data.load("digits", max_per_class=4)


def _stderr(monkeypatch, stream: io.StringIO | None = None) -> io.StringIO:
    """Replace stderr (where tqdm writes) by a non-terminal stream the test reads; called in
    the test itself, as pytest restores its own capture between setup and call."""
    stream = io.StringIO() if stream is None else stream
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _experts(data, progress):
    return train_experts(
        data, "ConvNet", num_experts=2, epochs=1, batch_size=16, model_kwargs=SMALL,
        progress=progress,
    )  # fmt: skip


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hpd_fast"]


def test_progress_bar_modes(monkeypatch):
    _stderr(monkeypatch)
    bar, lines = progress_bar(None, total=1)
    assert bar.disable and lines  # not a terminal: log lines, no bar
    bar, lines = progress_bar(False, total=1)
    assert bar.disable and not lines
    bar, lines = progress_bar(True, total=1)
    assert not bar.disable and not lines
    bar.close()
    bar, lines = progress_bar(None, total=1, disable=True)
    assert bar.disable and not lines
    _stderr(monkeypatch, _Terminal())
    bar, lines = progress_bar(None, total=1)
    assert not bar.disable and not lines
    bar.close()


def test_experts_log_lines_off_terminal(tiny, monkeypatch, caplog):
    stderr = _stderr(monkeypatch)
    caplog.set_level(logging.INFO, logger="hpd_fast")
    ex = _experts(tiny, None)
    lines = _lines(caplog)
    assert len(lines) == 2
    for k, (line, acc) in enumerate(zip(lines, ex.test_accuracy)):
        assert line.startswith(f"expert {k + 1}/2: test accuracy {acc:.1f}%, ")
        assert line.endswith(" s")
    assert stderr.getvalue() == ""  # no bar

    caplog.clear()
    _experts(tiny, False)
    assert _lines(caplog) == [] and stderr.getvalue() == ""


def test_experts_bar(tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="hpd_fast")
    for progress, stream in ((True, io.StringIO()), (None, _Terminal())):
        _stderr(monkeypatch, stream)
        _experts(tiny, progress)
        assert "experts" in stream.getvalue()  # the bar
        assert _lines(caplog) == []


def test_evaluate_log_lines_off_terminal(tiny, monkeypatch, caplog):
    stderr = _stderr(monkeypatch)
    caplog.set_level(logging.INFO, logger="hpd_fast")
    x, y = tiny.random_real(1, 0)
    kw = dict(num_eval=2, epochs=1, augment=None, baseline="random_real")
    res = evaluate(x, y, tiny, progress=None, **kw)
    lines = _lines(caplog)
    assert len(lines) == 4
    want = [
        f"evaluate ConvNet {key} run {r + 1}/2: test accuracy {acc:.1f}%, "
        for key, accs in (
            ("synthetic", res["ConvNet"]["accs"]),
            ("random_real", res["random_real"]["ConvNet"]["accs"]),
        )
        for r, acc in enumerate(accs)
    ]
    for line, start in zip(lines, want):
        assert line.startswith(start) and line.endswith(" s")
    assert stderr.getvalue() == ""

    caplog.clear()
    evaluate(x, y, tiny, **kw)  # default: progress=False
    evaluate(x, y, tiny, progress=True, **kw)
    assert _lines(caplog) == [] and "evaluate" in stderr.getvalue()
