"""Expert trajectories: training, determinism, save / resume / load, layout checks, vmap."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hpd_fast
from hpd_fast import experts as E
from hpd_fast.models import get_model
from hpd_fast.params import flatten_params, num_params

SMALL = {"width": 8}
# For the vmap path: layer norm (GroupNorm(1, C)) has no buffers and no fused custom op.
VMAPPABLE = {"width": 8, "norm": "layernorm"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread avoids waiting on a second, busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> hpd_fast.DistillData:
    """Digits, 6 training images per class (60 in all)."""
    return hpd_fast.data.load("digits", max_per_class=6)


def _train(data, **kw):
    args = dict(
        num_experts=3, epochs=2, batch_size=16, progress=False, model_kwargs=SMALL, vmap=False
    )
    args.update(kw)
    return E.train_experts(data, "ConvNet", **args)


def test_shapes_and_metadata(tiny, tmp_path):
    ex = _train(tiny, out=tmp_path / "ex")
    p = num_params(get_model("ConvNet", 1, 10, (8, 8), **SMALL))
    assert len(ex) == 3 and ex.indices == [0, 1, 2]
    for t in ex.trajectories:
        assert t.shape == (3, p) and t.dtype == torch.float32
        assert not torch.equal(t[0], t[1])  # it trained
    # different experts start from different weights
    assert not torch.equal(ex.trajectories[0][0], ex.trajectories[1][0])
    assert ex.epochs == 2 and ex.lr == 0.01 and ex.dataset_name == "digits"
    assert ex.model_config == {
        "name": "ConvNet",
        "channel": 1,
        "num_classes": 10,
        "im_size": [8, 8],
        "kwargs": SMALL,
    }
    assert ex.training["momentum"] == 0.0 and ex.training["weight_decay"] == 0.0
    assert ex.training["augment"]["type"] == "DSA"
    assert all(0.0 <= a <= 100.0 for a in ex.test_accuracy)
    files = sorted(x.name for x in (tmp_path / "ex").iterdir())
    assert files == [f"expert_0000{i}.safetensors" for i in range(3)]

    loaded = E.load(tmp_path / "ex")
    assert loaded.layout == ex.layout and loaded.config == ex.config
    assert loaded.test_accuracy == pytest.approx(ex.test_accuracy)
    for a, b in zip(loaded.trajectories, ex.trajectories):
        assert torch.equal(a, b)
    one = E.load(E.expert_path(tmp_path / "ex", 2))  # a single file
    assert one.indices == [2] and torch.equal(one.trajectories[0], ex.trajectories[2])
    lazy = E.load(tmp_path / "ex", lazy=True)
    assert torch.equal(lazy.trajectories[1], ex.trajectories[1])
    start, target = lazy.pair(1, 0, 2)
    assert torch.equal(start, ex.trajectories[1][0]) and torch.equal(target, ex.trajectories[1][2])
    with pytest.raises(ValueError, match="exceeds"):
        ex.pair(0, 1, 2)


def test_deterministic_and_global_rng_untouched(tiny):
    state = torch.get_rng_state()
    a = _train(tiny, num_experts=2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)  # a different global state must not matter
    b = _train(tiny, num_experts=2)
    for x, y in zip(a.trajectories, b.trajectories):
        assert torch.equal(x, y)
    # expert k depends on (seed, k) only, not on how many experts are trained
    c = _train(tiny, num_experts=1)
    assert torch.equal(c.trajectories[0], a.trajectories[0])
    d = _train(tiny, num_experts=1, seed=1)
    assert not torch.equal(d.trajectories[0][0], a.trajectories[0][0])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("vmap", [False, True], ids=["sequential", "vmap"])
def test_resume_after_interruption(tiny, tmp_path, vmap):
    kw = dict(num_experts=4, vmap=vmap, group_size=2, model_kwargs=VMAPPABLE)
    full = _train(tiny, out=tmp_path / "full", **kw)

    def stop_after_1(index, path):
        assert path is not None and path.is_file()
        if index == 1:
            raise _Stop

    with pytest.raises(_Stop):
        _train(tiny, out=tmp_path / "run", on_expert=stop_after_1, **kw)
    names = sorted(x.name for x in (tmp_path / "run").iterdir())
    assert names == ["expert_00000.safetensors", "expert_00001.safetensors"]  # no temp files

    trained = []
    resumed = _train(tiny, out=tmp_path / "run", on_expert=lambda i, p: trained.append(i), **kw)
    assert trained == [2, 3]  # finished experts were kept, not retrained
    for a, b in zip(resumed.trajectories, full.trajectories):
        assert torch.equal(a, b)  # bit for bit
    for a, b in zip(E.load(tmp_path / "run").trajectories, full.trajectories):
        assert torch.equal(a, b)


def test_vmap_matches_sequential(tiny):
    kw = dict(num_experts=3, model_kwargs=VMAPPABLE)
    seq = _train(tiny, vmap=False, **kw)
    vm = _train(tiny, vmap=True, group_size=2, **kw)  # blocks [0, 1] and [2]
    for a, b in zip(seq.trajectories, vm.trajectories):
        # Batched kernels sum in another order: float32 rounding, amplified a little by the
        # training steps; far below the distance the parameters travel.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)
        moved = float((a[-1] - a[0]).abs().max())
        assert float((a - b).abs().max()) < 1e-2 * moved
    assert vm.test_accuracy == pytest.approx(seq.test_accuracy, abs=2.0)


def test_momentum_and_weight_decay_match_torch_sgd(tiny):
    """The hand-written update is torch.optim.SGD's rule (vmap path included)."""
    kw = dict(num_experts=1, epochs=1, momentum=0.9, weight_decay=5e-4, augment=None)
    ex = _train(tiny, model_kwargs=VMAPPABLE, **kw)
    vm = _train(tiny, vmap=True, model_kwargs=VMAPPABLE, **kw)
    net = E._init_net("ConvNet", tiny, VMAPPABLE, 0, 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for idx, _ in E._Stream(0, 0).epoch(len(tiny), 16):
        loss = torch.nn.functional.cross_entropy(
            net(tiny.train_images[idx]), tiny.train_labels[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(ex.trajectories[0][-1], flatten_params(net), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vm.trajectories[0][-1], flatten_params(net), rtol=1e-5, atol=1e-6)


def test_batchnorm_model_trains_sequentially_only(tiny):
    kw = dict(num_experts=1, epochs=1, model_kwargs={"width": 8, "norm": "batchnorm"})
    ex = _train(tiny, **kw)
    assert ex.trajectories[0].shape[0] == 2
    with pytest.raises(ValueError, match="vmap=True needs a model without buffers"):
        _train(tiny, vmap=True, **kw)


class _NoVmapSquare(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _NoVmapNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(_NoVmapSquare.apply(x.flatten(1)))


def test_vmap_probe_refuses_unsupported_ops(tiny):
    with pytest.raises(ValueError, match="does not support torch.func.vmap.*use vmap=False"):
        E._vmap_probe(_NoVmapNet(), tiny)
    E._vmap_probe(get_model("ConvNet", 1, 10, (8, 8), **VMAPPABLE), tiny)  # supported: no error


def test_layout_check(tiny):
    ex = _train(tiny, num_experts=1, epochs=1)
    student = ex.make_student()
    ex.check_student(student)
    ex.check_student(hpd_fast.params.param_layout(student))
    assert torch.equal(flatten_params(student), ex.trajectories[0][0])
    wider = get_model("ConvNet", 1, 10, (8, 8), width=16)
    with pytest.raises(
        ValueError, match=r"features\.0\.0\.weight.*\[16, 1, 3, 3\].*\[8, 1, 3, 3\]"
    ):
        ex.check_student(wider)
    deeper = get_model("ConvNetD3", 1, 10, (8, 8), width=8)
    with pytest.raises(ValueError, match="do not match|does not match") as info:
        ex.check_student(deeper)
    assert "ConvNet" in str(info.value) and "width" in str(info.value)
    with pytest.raises(ValueError, match="P="):
        ex.check_student(get_model("ConvNet", 1, 7, (8, 8), width=8))


def test_settings_mismatch_on_resume(tiny, tmp_path):
    _train(tiny, num_experts=1, epochs=1, out=tmp_path)
    with pytest.raises(ValueError, match=r"training\.lr: stored 0\.01, requested 0\.02"):
        _train(tiny, num_experts=2, epochs=1, out=tmp_path, lr=0.02)
    with pytest.raises(ValueError, match="layout"):
        _train(tiny, num_experts=2, epochs=1, out=tmp_path, model_kwargs={"width": 4})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"batch_size": 1.5}, "batch_size must be an int"),
        ({"augment": 3}, "augment must be"),
        ({"model_kwargs": {"width": object()}}, "JSON"),
    ],
)
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        _train(tiny, **kw)


def test_bad_model_and_dataset(tiny):
    with pytest.raises(ValueError, match="unknown model name 'ConvNot'"):
        E.train_experts(tiny, "ConvNot", num_experts=1, epochs=1)
    with pytest.raises(ValueError, match="dataset must be a DistillData"):
        E.train_experts(torch.zeros(3), num_experts=1, epochs=1)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        E.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no expert trajectories in"):
        E.load(tmp_path / "empty")
    junk = tmp_path / "expert_00000.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        E.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"trajectory": torch.zeros(2, 3)}, str(other), metadata={"format": "x"})
    with pytest.raises(ValueError, match="not an expert trajectory file"):
        E.load(other)


def test_load_rejects_inconsistent_shape(tiny, tmp_path):
    ex = _train(tiny, num_experts=1, epochs=1, out=tmp_path)
    path = E.expert_path(tmp_path, 0)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({"trajectory": ex.trajectories[0][:1].clone()}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="config says"):
        E.load(tmp_path)
    cfg = json.loads(meta["config"])
    assert cfg["num_params"] == ex.num_params
