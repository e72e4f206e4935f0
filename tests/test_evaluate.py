"""Evaluation protocol: well-formed, deterministic, seeded, validated, and it learns."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpd_fast.augment import DSA
from hpd_fast.data import load
from hpd_fast.evaluation import EVAL_MODELS, _lr_at, evaluate

FAST = dict(num_eval=2, epochs=3, num_threads=1)


@pytest.fixture(scope="module")
def full_digits():
    return load("digits")


@pytest.fixture(scope="module")
def digits(full_digits):
    # The first 90 test images only: scoring is most of the cost of these tiny runs.
    d = full_digits
    return dataclasses.replace(d, test_images=d.test_images[:90], test_labels=d.test_labels[:90])


@pytest.fixture(scope="module")
def ipc1(digits):
    return digits.random_real(1, seed=0)


def test_result_format(digits, ipc1):
    x, y = ipc1
    out = evaluate(x, y, digits, **FAST)
    assert set(out) == {"ConvNet", "random_real", "config"}  # the baseline runs by default
    stats = out["ConvNet"]
    assert len(stats["accs"]) == 2
    assert all(isinstance(a, float) and 0.0 <= a <= 100.0 for a in stats["accs"])
    assert stats["mean"] == pytest.approx(np.mean(stats["accs"]))
    assert stats["std"] == pytest.approx(np.std(stats["accs"]))
    # Accuracy is a whole number of the 90 test images.
    for a in stats["accs"]:
        assert a * 90 / 100 == pytest.approx(round(a * 90 / 100))
    cfg = out["config"]
    assert cfg["models"] == ["ConvNet"] and cfg["num_eval"] == 2 and cfg["epochs"] == 3
    assert cfg["ipc"] == 1.0 and cfg["num_images"] == 10 and cfg["soft_labels"] is False
    assert cfg["dataset"] == "digits" and cfg["device"] == "cpu" and cfg["seconds"] > 0
    assert "DSA" in cfg["augment"] and cfg["baseline"] == "random_real"


def test_deterministic_and_global_rng_untouched(digits, ipc1):
    x, y = ipc1
    state = torch.get_rng_state()
    a = evaluate(x, y, digits, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate(x, y, digits, seed=3, **FAST)
    assert a["ConvNet"]["accs"] == b["ConvNet"]["accs"]
    c = evaluate(x, y, digits, seed=4, num_eval=3, epochs=3, num_threads=1)
    d = evaluate(x, y, digits, seed=3, num_eval=3, epochs=3, num_threads=1)
    assert c["ConvNet"]["accs"] != d["ConvNet"]["accs"]
    assert d["ConvNet"]["accs"][:2] == a["ConvNet"]["accs"]  # run r's seed depends on r only


def test_random_real_baseline_shares_seeds(digits, ipc1):
    # The synthetic set IS the seed-0 random-real draw: both columns must agree exactly.
    x, y = ipc1
    out = evaluate(x, y, digits, baseline="random_real", seed=0, **FAST)
    assert out["config"]["baseline_ipc"] == 1
    assert out["random_real"]["ConvNet"]["accs"] == out["ConvNet"]["accs"]
    other = evaluate(x, y, digits, baseline="random_real", seed=1, **FAST)
    assert set(other["random_real"]) == {"ConvNet"}
    assert len(other["random_real"]["ConvNet"]["accs"]) == 2


def test_cross_architecture_models(digits, ipc1):
    x, y = ipc1
    out = evaluate(
        x, y, digits, models=EVAL_MODELS, num_eval=1, epochs=1, num_threads=1, baseline="none"
    )
    assert set(out) == {*EVAL_MODELS, "config"}
    for name in EVAL_MODELS:
        assert len(out[name]["accs"]) == 1 and 0.0 <= out[name]["mean"] <= 100.0
    alone = evaluate(x, y, digits, models="ConvNet", num_eval=1, epochs=1, num_threads=1)
    assert alone["ConvNet"]["accs"] == out["ConvNet"]["accs"]  # independent of the other models


def test_soft_labels_match_one_hot(digits, ipc1):
    x, y = ipc1
    hard = evaluate(x, y, digits, **FAST)
    soft = evaluate(x, F.one_hot(y, 10).float(), digits, **FAST)
    assert soft["config"]["soft_labels"] is True
    for a, b in zip(hard["ConvNet"]["accs"], soft["ConvNet"]["accs"]):
        assert abs(a - b) <= 100 * 2 / 90  # same loss; at most rounding-level differences


def test_augment_calls_and_minibatches(digits):
    x, y = digits.random_real(3, seed=0)  # 30 images
    calls = []

    def record(xb, seed):
        calls.append((xb.shape[0], seed))
        return xb

    kw = dict(num_eval=1, epochs=2, batch_size=8, augment=record, num_threads=1, baseline=None)
    evaluate(x, y, digits, **kw)
    assert [n for n, _ in calls] == [8, 8, 8, 6] * 2  # ceil(30 / 8) steps per epoch
    assert len({s for _, s in calls}) == len(calls)  # a fresh seed every step
    first = list(calls)
    calls.clear()
    evaluate(x, y, digits, **kw)
    assert calls == first
    for aug in (None, "none", DSA, DSA("crop"), "color_crop"):
        out = evaluate(x, y, digits, num_eval=1, epochs=1, augment=aug, num_threads=1)
        assert 0.0 <= out["ConvNet"]["mean"] <= 100.0


def test_learns_real_digits(full_digits):
    # 10 real images per class, 30 epochs, no augmentation: far above chance (10%) on all
    # 359 test images.
    x, y = full_digits.random_real(10, seed=1)
    out = evaluate(x, y, full_digits, num_eval=1, epochs=30, augment=None, num_threads=1)
    assert out["ConvNet"]["mean"] > 80.0


def test_progress_bar(digits, ipc1, capsys):
    x, y = ipc1
    evaluate(x, y, digits, num_eval=1, epochs=2, progress=True, num_threads=1)
    assert "evaluate" in capsys.readouterr().err


def test_lr_schedule():
    lrs = [_lr_at(s, 100, 0.1, 5) for s in range(100)]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert [_lr_at(s, 3, 0.1, 0) for s in range(3)][0] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x, y: (x[0], y), "images must be a 4-D"),
        (lambda x, y: (x.long(), y), "images must be floating"),
        (lambda x, y: (x[:, :, :4], y), r"images have shape \[M, 1, 4, 8\]"),
        (lambda x, y: (x, y[:5]), "labels must have 10 entries"),
        (lambda x, y: (x, y + 1), r"labels must lie in \[0, 10\)"),
        (lambda x, y: (x, y - 1), r"labels must lie in \[0, 10\)"),
        (lambda x, y: (x, y.float()), "hard labels must be an integer"),
        (lambda x, y: (x, torch.zeros(10, 7)), r"soft labels must be a float tensor \[M, 10\]"),
        (lambda x, y: (x, y.view(10, 1, 1)), "labels must be"),
        (lambda x, y: (x * float("nan"), y), "images must be finite"),
    ],
)
def test_bad_set(digits, ipc1, change, match):
    x, y = change(*ipc1)
    with pytest.raises(ValueError, match=match):
        evaluate(x, y, digits, num_eval=1, epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"models": ("ConvNet", "LeNet")}, r"models has unknown name\(s\) \['LeNet'\]"),
        ({"models": ()}, "models must be a non-empty"),
        ({"num_eval": 0}, "num_eval must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"baseline": "herding"}, "baseline must be None or one of"),
        ({"augment": 3}, "augment must be"),
        ({"augment": "color_warp"}, "unknown transform"),
        ({"model_kwargs": {"VGG11": {}}}, "model_kwargs names model"),
        ({"num_threads": 0}, "num_threads must be >= 1"),
    ],
)
def test_bad_arguments(digits, ipc1, kwargs, match):
    x, y = ipc1
    with pytest.raises(ValueError, match=match):
        evaluate(x, y, digits, **{"num_eval": 1, "epochs": 1, **kwargs})


def test_dataset_must_be_distilldata(ipc1):
    x, y = ipc1
    with pytest.raises(ValueError, match="dataset must be a DistillData"):
        evaluate(x, y, "digits")
