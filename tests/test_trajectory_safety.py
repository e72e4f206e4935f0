"""Trajectory matching refuses inputs that would give a silently wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpd_fast.distill.trajectory import trajectory_matching_loss
from hpd_fast.params import flatten_params

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(layer: nn.Module | None = None, seed: int = 0):
    torch.manual_seed(seed)
    mid = [layer] if layer is not None else []
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), *mid, nn.Linear(16, 3))
    net = net.to(F64)
    start = flatten_params(net)
    target = start + 0.1 * torch.randn_like(start)
    images = torch.randn(6, 3, 2, 2, dtype=F64)
    labels = torch.arange(6) % 3
    return net, images, labels, start, target


def _grads(problem, mode, **kw):
    net, images, labels, start, target = problem
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.2, dtype=images.dtype, requires_grad=True)
    kw = {"syn_steps": 4, "batch_syn": 3, "seed": 5, **kw}
    loss = trajectory_matching_loss(net, x, labels, lr, start, target, mode=mode, **kw)
    loss.backward()
    return x.grad, lr.grad


# ------------------------------------------------------------------- B: stochastic students


@pytest.mark.parametrize(
    "layer",
    [nn.Dropout(0.5), nn.AlphaDropout(0.3), nn.FeatureAlphaDropout(0.3), nn.RReLU()],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("mode", ["exact", "first_order"])
def test_stochastic_layer_in_training_mode_refused(layer, mode):
    problem = _problem(layer)
    problem[0].train()
    with pytest.raises(ValueError, match=rf"cannot be replayed: 3 \({type(layer).__name__}\)"):
        _grads(problem, mode)


def test_dropout_in_eval_mode_matches_the_unroll():
    problem = _problem(nn.Dropout(0.5))
    problem[0].eval()
    gx, glr = _grads(problem, "exact")
    ux, ulr = _grads(problem, "unrolled")
    torch.testing.assert_close(gx, ux, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(glr, ulr, rtol=1e-9, atol=1e-12)
    # Dropout(p=0) in training mode draws nothing that matters: accepted too
    problem = _problem(nn.Dropout(0.0))
    torch.testing.assert_close(_grads(problem, "exact")[0], _grads(problem, "unrolled")[0])


class _HiddenDropout(nn.Module):
    """Randomness the type check cannot see: F.dropout inside forward."""

    def forward(self, x):
        return F.dropout(x, 0.5, training=self.training)


def test_random_forward_refused_by_the_runtime_check():
    problem = _problem(_HiddenDropout())
    with pytest.raises(ValueError, match="two identical forward calls gave different outputs"):
        _grads(problem, "exact")
    problem[0].eval()
    _grads(problem, "exact")  # deterministic again


# ------------------------------------------------------------------------------ E: dtypes


def test_syn_lr_dtype_must_match_images():
    net, images, labels, start, target = _problem()
    lr = torch.tensor(0.2, dtype=torch.float32, requires_grad=True)
    with pytest.raises(TypeError, match=r"syn_lr has dtype torch.float32 but images.*float64"):
        trajectory_matching_loss(net, images, labels, lr, start, target, syn_steps=2)


@pytest.mark.parametrize("name", ["start_params", "target_params"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_expert_trajectories_refused(name, dtype):
    net, images, labels, start, target = _problem()
    args = {"start_params": start, "target_params": target}
    args[name] = (args[name] * 100).to(dtype)
    lr = torch.tensor(0.2, dtype=F64)
    with pytest.raises(TypeError, match=rf"{name} must be floating point.*{dtype}"):
        trajectory_matching_loss(net, images, labels, lr, syn_steps=2, **args)


# -------------------------------------------------------------------------- F: meta tensors


@pytest.mark.parametrize("name", ["images", "labels", "syn_lr", "start_params", "target_params"])
def test_meta_tensors_refused_up_front(name):
    net, images, labels, start, target = _problem()
    args = dict(images=images, labels=labels, syn_lr=torch.tensor(0.2, dtype=F64),
                start_params=start, target_params=target)  # fmt: skip
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is a meta tensor"):
        trajectory_matching_loss(net, syn_steps=2, **args)
    # all of them on meta (devices agree): still refused, naming the first
    meta = {k: v.to("meta") for k, v in args.items()}
    with pytest.raises(ValueError, match="images is a meta tensor"):
        trajectory_matching_loss(net.to("meta"), syn_steps=2, **meta)


# ----------------------------------------------------------------------- D: numpy integers


def test_numpy_integers_accepted():
    problem = _problem()
    ref = _grads(problem, "exact", syn_steps=4, batch_syn=3, seed=5, max_snapshots=2)
    got = _grads(
        problem,
        "exact",
        syn_steps=np.int64(4),
        batch_syn=np.int32(3),
        seed=np.int64(5),
        max_snapshots=np.int64(2),
    )
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="syn_steps must be an int"):
        _grads(problem, "exact", syn_steps=np.float64(4))
