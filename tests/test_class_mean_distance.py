"""hpd_fast.class_mean_distance: every backend against an independent float64 oracle."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import hpd_fast
from hpd_fast import (
    ClassMeanAccumulator,
    _backend,
    class_mean_distance,
    class_mean_distance_ref,
    class_means,
)

INFO = hpd_fast.backend_info()


# Only pairs the dispatcher accepts here: no (cpu, triton) on a machine with a GPU
# (tests/test_backend_cases.py collects the suite as a GPU machine would).
CASES = _backend.runnable_pairs()
KERNEL_CASES = [c for c in CASES if c[1] != "reference"]


def oracle(features, labels, targets):
    """Loop over segments with boolean masks, in float64: independent of every backend."""
    s = targets[0].shape[0]
    out = torch.zeros(s, dtype=torch.float64)
    for f, t in zip(features, targets):
        f = f.detach().double().cpu().flatten(1)
        t = t.detach().double().cpu().reshape(s, t[0].numel())
        for seg in range(s):
            rows = f[labels.cpu() == seg]
            if rows.shape[0]:
                out[seg] += ((rows.mean(0) - t[seg]) ** 2).sum()
    return out


def make(n, dims, s, dtype=torch.float32, device="cpu", labels=None, grad=False):
    feats = [torch.randn(n, *d, dtype=dtype, device=device) for d in dims]
    if labels is None:
        labels = torch.randint(0, s, (n,), device=device)
    tgts = [torch.randn(s, *d, dtype=torch.float32, device=device) for d in dims]
    for t in feats + tgts:
        t.requires_grad_(grad)
    return feats, labels.to(device), tgts


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "n,dims,s",
    [
        (1, [(5,)], 3),  # one sample: two empty segments
        (7, [(3,)], 1),  # one segment
        (13, [(2, 3, 3), (7,), (1,)], 4),  # many layers, odd sizes, D = 1
        (31, [(4099,)], 5),  # several column blocks, ragged tail
        (0, [(6,)], 3),  # no rows at all: every segment empty
        (40, [(3, 5, 5), (11,), (2, 2), (9,), (5,), (1, 1, 3)], 7),  # six layers
    ],
)
def test_matches_oracle(device, backend, n, dims, s):
    feats, labels, tgts = make(n, dims, s, device=device)
    got = class_mean_distance(feats, labels, tgts, reduction="none", backend=backend)
    want = oracle(feats, labels, tgts)
    assert got.shape == (s,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-5)
    total = class_mean_distance(feats, labels, tgts, backend=backend)
    torch.testing.assert_close(total.double().cpu(), want.sum(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_segments_contribute_nothing(device, backend):
    feats, labels, tgts = make(10, [(6,)], 5, device=device, labels=torch.tensor([0, 2] * 5))
    d = class_mean_distance(feats, labels, tgts, reduction="none", backend=backend)
    assert d[1].item() == 0 and d[3].item() == 0 and d[4].item() == 0
    assert d[0].item() > 0 and d[2].item() > 0


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs(device, backend):
    base = torch.randn(6, 23, 4, device=device)
    f = base.transpose(1, 2)[:, :, 1:]  # [6, 4, 22], strided
    labels = torch.tensor([0, 2, 2, 1, 0, 2], device=device)[::1]
    t = torch.randn(4 * 22, 3, device=device).t()  # [3, 88], strided
    assert not f.is_contiguous() and not t.is_contiguous()
    got = class_mean_distance(f, labels, t, reduction="none", backend=backend)
    torch.testing.assert_close(got.double().cpu(), oracle([f], labels, [t]), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_float64_exact(device, backend):
    feats, labels, tgts = make(17, [(3, 3), (5,)], 4, dtype=torch.float64, device=device)
    tgts = [t.double() for t in tgts]
    got = class_mean_distance(feats, labels, tgts, reduction="none", backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), oracle(feats, labels, tgts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bound(device, backend, dtype):
    """fp32 accumulation: the error against fp64 on the same rounded inputs is at most about
    twice what PyTorch's own same-dtype computation makes (in practice far less)."""
    n, d, s = 120, 300, 6
    x = (torch.randn(n, d, device=device) + 3.0).to(dtype)  # offset: sums grow, rounding shows
    labels = torch.randint(0, s, (n,), device=device)
    t = torch.randn(s, d, device=device).to(dtype)
    truth = oracle([x], labels, [t])
    got = class_mean_distance(x, labels, t.float(), reduction="none", backend=backend)
    # PyTorch in the same dtype: index_add_ sums, mean, distance, all in `dtype`.
    sums = torch.zeros(s, d, dtype=dtype, device=device).index_add_(0, labels, x)
    cnt = torch.bincount(labels, minlength=s).to(dtype).clamp(min=1)
    torch_same = ((sums / cnt[:, None] - t) ** 2).sum(1, dtype=dtype).double().cpu()
    err_kernel = (got.double().cpu() - truth).abs().max().item()
    err_torch = (torch_same - truth).abs().max().item()
    assert err_torch > 0
    assert err_kernel <= 2 * err_torch
    # And, since accumulation is fp32, close to the fp64 result outright.
    torch.testing.assert_close(got.double().cpu(), truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_deterministic(device, backend):
    feats, labels, tgts = make(64, [(8, 8), (33,)], 5, device=device)
    a = class_mean_distance(feats, labels, tgts, reduction="none", backend=backend)
    b = class_mean_distance(feats, labels, tgts, reduction="none", backend=backend)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- gradients


def grads(fn, feats, tgts, weights):
    out = fn(feats, tgts)
    return torch.autograd.grad((out * weights).sum(), feats + tgts)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_float64_reference(device, backend, dtype):
    labels = torch.tensor([3, 0, 0, 2, 3, 3, 0, 2, 2, 2, 0], device=device)  # segment 1 empty
    feats = [
        torch.randn(11, *d, dtype=dtype, device=device, requires_grad=True) for d in [(2, 5), (7,)]
    ]
    tgts = [torch.randn(4, d, dtype=dtype, device=device, requires_grad=True) for d in (10, 7)]
    w = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    got = grads(
        lambda f, t: class_mean_distance(f, labels, t, reduction="none", backend=backend).double(),
        feats, tgts, w,
    )  # fmt: skip
    f64 = [f.detach().double().requires_grad_() for f in feats]
    t64 = [t.detach().double().requires_grad_() for t in tgts]
    want = grads(lambda f, t: class_mean_distance_ref(f, labels, t, reduction="none"), f64, t64, w)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for g, h, x in zip(got, want, feats + tgts):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g.double(), h, **tol)
    assert got[2][1].abs().max() == 0  # empty segment: no gradient to its target


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(device, backend, dtype):
    labels = torch.randint(0, 3, (20,), device=device)
    x = torch.randn(20, 37, device=device).to(dtype).requires_grad_()
    t = torch.randn(3, 37, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(class_mean_distance(x, labels, t, backend=backend), [x])
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(class_mean_distance_ref(x64, labels, t.detach().double()), [x64])
    assert gx.dtype == dtype
    # The kernel computes in fp32 and rounds once: within twice the rounding of the exact value.
    rounding = (want.to(dtype).double() - want).abs()
    assert ((gx.double() - want).abs() <= 2 * rounding + 1e-6).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck_float64(device, backend):
    labels = torch.tensor([1, 0, 1, 1, 3], device=device)
    f1 = torch.randn(5, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    f2 = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    t1 = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    t2 = torch.randn(4, 4, dtype=torch.float64, device=device, requires_grad=True)

    def fn(a, b, c, d):
        return class_mean_distance([a, b], labels, [c, d], reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (f1, f2, t1, t2))


@pytest.mark.parametrize("device,backend", CASES)
def test_gradgradcheck_float64(device, backend):
    # The backward is itself differentiable (e.g. for a gradient penalty on the features).
    labels = torch.tensor([1, 0, 1, 1, 3, 0], device=device)
    f = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)

    def fn(a, b):
        return class_mean_distance(a, labels, b, reduction="none", backend=backend)

    assert torch.autograd.gradgradcheck(fn, (f, t))


# ----------------------------------------------------------------------------- torch.library


def _opcheck_args(device):
    labels = torch.tensor([0, 2, 2, 1, 0], device=device)
    feats = [torch.randn(5, 6, device=device, requires_grad=True), torch.randn(5, 3, device=device)]
    tgts = [torch.randn(3, 6, device=device), torch.randn(3, 3, device=device, requires_grad=True)]
    return feats, labels, tgts


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    mod = importlib.import_module("hpd_fast.ops.class_mean_distance")

    if backend == "triton":
        fwd = mod._triton_ops()
        bwd = torch.ops.hpd_fast.class_mean_distance_backward_triton
    else:
        mod._register_cpp()
        fwd = torch.ops.hpd_fast.class_mean_distance
        bwd = torch.ops.hpd_fast.class_mean_distance_backward
    # Tracing a triton_op with fake tensors needs compiled (GPU) Triton; the CPU interpreter
    # would run the kernel on fake data. There the schema and autograd checks still run.
    utils = (
        ("test_schema", "test_autograd_registration")
        if backend == "triton" and device == "cpu"
        else torch.library._OPCHECK_DEFAULT_UTILS
    )
    feats, labels, tgts = _opcheck_args(device)
    torch.library.opcheck(fwd, (feats, labels, tgts), test_utils=utils)
    _, diff, counts = fwd(feats, labels, tgts)
    scale = torch.rand(3, device=device)
    for dt in (torch.float32, torch.bfloat16):
        torch.library.opcheck(bwd, (scale, diff[:, :6], labels, dt), test_utils=utils)


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_torch_compile_fullgraph_parity():
    feats, labels, tgts = make(12, [(3, 4), (5,)], 3, grad=True)

    def loss(f, t):
        return class_mean_distance(f, labels, t) * 2.0 + 1.0

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a = loss(feats, tgts)
    b = compiled(feats, tgts)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, feats + tgts)
    gb = torch.autograd.grad(b, feats + tgts)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_inductor_cuda(backend):
    if not INFO[backend]["available"]:
        pytest.skip(INFO[backend]["detail"])
    feats, labels, tgts = make(40, [(8, 8), (16,)], 5, device="cuda", grad=True)
    fn = lambda f, t: class_mean_distance(f, labels, t, backend=backend)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(fn(feats, tgts), compiled(feats, tgts))


# ----------------------------------------------------------------------------- means


def test_class_means_and_accumulator_agree():
    x = torch.randn(50, 3, 4)
    y = torch.randint(0, 6, (50,))
    y[y == 5] = 4  # segment 5 never appears
    means, counts = class_means(x, y, 6)
    assert means.shape == (6, 3, 4)
    for s in range(6):
        m = x[y == s].mean(0) if (y == s).any() else torch.zeros(3, 4)
        torch.testing.assert_close(means[s], m)
        assert counts[s].item() == (y == s).sum().item()
    acc = ClassMeanAccumulator(6)
    for i in range(0, 50, 7):  # uneven batches
        acc.update(x[i : i + 7], y[i : i + 7])
    torch.testing.assert_close(acc.means(), means)
    torch.testing.assert_close(acc.counts.float(), counts)


def test_accumulator_layers_feed_the_distance():
    blocks = [torch.randn(30, 2, 3), torch.randn(30, 5)]
    y = torch.randint(0, 3, (30,))
    acc = ClassMeanAccumulator(3)
    acc.update([b[:16] for b in blocks], y[:16])
    acc.update([b[16:] for b in blocks], y[16:])
    targets = acc.means()
    assert isinstance(targets, list) and targets[0].shape == (3, 2, 3)
    # The batch's own class means are at distance 0 from the accumulated means.
    d = class_mean_distance(blocks, y, targets)
    assert d.item() < 1e-10


def test_accumulator_errors():
    acc = ClassMeanAccumulator(3)
    with pytest.raises(RuntimeError, match="before any update"):
        acc.means()
    acc.update([torch.randn(4, 2), torch.randn(4, 3)], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="layers"):
        acc.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels"):
        acc.update([torch.randn(4, 2), torch.randn(4, 3)], torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"features\[1\]"):
        acc.update([torch.randn(4, 2), torch.randn(4, 4)], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="num_segments"):
        ClassMeanAccumulator(0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", [b for _, b in CASES if _ == "cpu"])
def test_bad_inputs_name_the_argument(backend):
    f = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.randn(3, 4)

    def call(*a, **k):
        return class_mean_distance(*a, backend=backend, **k)

    with pytest.raises(ValueError, match="labels has 5 entries"):
        call(f, y[:5], t)
    with pytest.raises(ValueError, match="labels contains 3"):
        call(f, torch.tensor([0, 1, 3, 0, 1, 2]), t)
    with pytest.raises(ValueError, match="labels contains -1"):
        call(f, torch.tensor([0, 1, -1, 0, 1, 2]), t)
    with pytest.raises(TypeError, match="labels must be an integer"):
        call(f, y.float(), t)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        call(f, y.view(2, 3), t)
    with pytest.raises(ValueError, match=r"targets\[0\] has shape"):
        call(f, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="num_segments"):
        call(f, y, t, num_segments=4)
    with pytest.raises(ValueError, match="features has 2 layers but targets has 1"):
        call([f, f], y, [t])
    with pytest.raises(ValueError, match=r"features\[1\] has shape"):
        call([f, torch.randn(5, 4)], y, [t, t])
    with pytest.raises(TypeError, match=r"features\[0\] has dtype torch.int64"):
        call(f.long(), y, t)
    with pytest.raises(TypeError, match=r"targets\[0\] has dtype torch.int32"):
        call(f, y, t.int())
    with pytest.raises(TypeError, match=r"features must be a tensor or a list"):
        call("f", y, t)
    with pytest.raises(ValueError, match="features is an empty list"):
        call([], y, [])
    with pytest.raises(ValueError, match="reduction"):
        call(f, y, t, reduction="mean")
    with pytest.raises(ValueError, match="labels is on meta"):
        call(f, y.to("meta"), t)
    with pytest.raises(ValueError, match=r"targets\[0\] is on meta"):
        call(f, y, t.to("meta"))
    with pytest.raises(ValueError, match=r"features\[1\] is on meta"):
        call([f, f.to("meta")], y, [t, t])


def test_forced_backend_errors():
    f, y, t = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3)
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        class_mean_distance(f, y, t, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        class_mean_distance(f, y, t, backend="fast")


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_cpp_kernel_checks_labels_itself():
    # Called directly (no Python front end), the kernel still refuses out-of-range labels.
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.hpd_fast.class_mean_distance(
            [torch.randn(3, 2)], torch.tensor([0, 5, 1]), [torch.randn(2, 2)]
        )


# ----------------------------------------------------------------------------- GPU launch limits

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


class _GridRecorder:
    """Stands in for ``wrap_triton``: records each launch grid, launches nothing."""

    def __init__(self):
        self.grids = []

    def __call__(self, kernel):
        recorder = self

        class _Launch:
            def __getitem__(self, grid):
                recorder.grids.append((kernel.__name__, tuple(grid)))
                return lambda *args, **kwargs: None

        return _Launch()


@pytest.mark.skipif(not INFO["triton"]["available"], reason="triton not available")
def test_triton_launch_grids_fit_cuda_limits_beyond_65535(monkeypatch):
    """CRFD scores select_batch x classes segments at once (ImageNet-1K: > 65,535); the GPU grid
    arithmetic (GPU tile sizes) must stay within CUDA's limits per axis. The interpreter does not
    enforce them, so the launch grids themselves are checked."""
    mod = importlib.import_module("hpd_fast.ops._class_mean_distance_triton")
    import hpd_fast.kernels.class_mean_distance as kern

    recorder = _GridRecorder()
    monkeypatch.setattr(mod, "wrap_triton", recorder)
    monkeypatch.setattr(mod, "forward_blocks", lambda on_gpu, d, n: kern.forward_blocks(True, d, n))
    monkeypatch.setattr(
        mod, "backward_blocks", lambda on_gpu, n, d: kern.backward_blocks(True, n, d)
    )
    s, n, d = 70_001, 300_007, 3
    labels = torch.arange(n) % s
    mod.class_mean_distance_triton([torch.zeros(n, d)], labels, [torch.zeros(s, d)])
    mod.class_mean_distance_backward_triton(
        torch.zeros(s), torch.zeros(s, d), labels, torch.float32
    )
    assert [name for name, _ in recorder.grids] == [
        "_class_mean_distance_fwd_kernel",
        "_class_mean_distance_bwd_kernel",
    ]
    for name, grid in recorder.grids:
        assert len(grid) <= 3
        for axis, (size, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
            assert 1 <= size <= limit, f"{name}: grid axis {axis} = {size} exceeds {limit}"
    # Every (segment, column block) and (row block, column block) gets its program.
    fwd_blocks = kern.forward_blocks(True, d, n)
    bwd_blocks = kern.backward_blocks(True, n, d)
    assert recorder.grids[0][1] == (s * -(-d // fwd_blocks[1]),)
    assert recorder.grids[1][1] == (-(-n // bwd_blocks[0]) * -(-d // bwd_blocks[1]),)


@pytest.mark.skipif(not INFO["triton"]["available"], reason="triton not available")
def test_triton_many_segments_and_rows_match_the_oracle():
    """More segments than column blocks and rows than one row block: the 1-D grids' (segment,
    block) decomposition is right (run through the interpreter / the GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, labels, tgts = make(301, [(5,), (2, 3)], 97, device=device, grad=True)
    got = class_mean_distance(feats, labels, tgts, reduction="none", backend="triton")
    want = class_mean_distance_ref(feats, labels, tgts, reduction="none")
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), feats + tgts)
    g_want = torch.autograd.grad(want.sum(), feats + tgts)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- labels on the GPU


@pytest.mark.parametrize("device,backend", [c for c in KERNEL_CASES if c[1] != "cuda"])
def test_kernel_ops_refuse_or_ignore_out_of_range_labels(device, backend):
    """The launchers' contract when the Python range check is skipped (torch.compile): the
    forward fails on a bad label, and the backward never reads outside scale / diff (such a row
    gets 0). Memory right after scale and diff holds NaN, so an out-of-bounds read shows."""
    if backend == "triton":
        fwd = importlib.import_module("hpd_fast.ops.class_mean_distance")._triton_ops()
        bwd = torch.ops.hpd_fast.class_mean_distance_backward_triton
    else:
        fwd = torch.ops.hpd_fast.class_mean_distance
        bwd = torch.ops.hpd_fast.class_mean_distance_backward
    s, d = 3, 5
    for bad in (s, -1):
        labels = torch.tensor([0, 2, bad, 1], device=device)
        with pytest.raises((RuntimeError, IndexError)):
            fwd([torch.randn(4, d, device=device)], labels, [torch.randn(s, d, device=device)])
    if backend != "triton":
        return  # the C++ CPU backward raises instead (test_cpp_kernel_checks_labels_itself)
    scale_buf = torch.full((2 * s,), float("nan"), device=device)
    diff_buf = torch.full((2 * s, d), float("nan"), device=device)
    scale_buf[:s] = torch.rand(s)
    diff_buf[:s] = torch.randn(s, d)
    scale, diff = scale_buf[:s], diff_buf[:s]
    labels = torch.tensor([0, s, 2, s + 1, 1], device=device)
    out = bwd(scale, diff, labels, torch.float32)
    ok = labels < s
    torch.testing.assert_close(out[ok], scale[labels[ok]].unsqueeze(1) * diff[labels[ok]])
    assert torch.equal(out[~ok], torch.zeros_like(out[~ok]))


# ----------------------------------------------------------------------------- determinism


def _no_index_add(monkeypatch):
    """index_add_ adds with float atomics on CUDA (a different sum each run): forbid it."""

    def refuse(*args, **kwargs):
        raise AssertionError("index_add_ used: not a fixed-order reduction on the GPU")

    monkeypatch.setattr(torch.Tensor, "index_add_", refuse)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_class_means_and_accumulator_use_the_fixed_order_kernels(monkeypatch, device, backend):
    """ClassMeanAccumulator (CRFD's real-data targets) and class_means reduce through the
    library's bucketed kernels, run to run identical, on every kernel backend."""
    feats, labels, _ = make(53, [(4, 3), (7,)], 6, device=device)
    want_means = [torch.stack([f[labels == c].double().mean(0) for c in range(6)]) for f in feats]
    _no_index_add(monkeypatch)
    runs = []
    for _ in range(2):
        acc = ClassMeanAccumulator(6, backend=backend)
        for part in torch.arange(53, device=device).split(20):
            acc.update([f[part] for f in feats], labels[part])
        runs.append(acc.means(torch.float64))
        assert acc.counts.tolist() == torch.bincount(labels.cpu(), minlength=6).double().tolist()
    for a, b, want in zip(*runs, want_means):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want)
    means, counts = class_means(feats[0], labels, 6, backend=backend)
    again, _ = class_means(feats[0], labels, 6, backend=backend)
    assert torch.equal(means, again)
    torch.testing.assert_close(means.double(), want_means[0])
    x = feats[0].detach().clone().requires_grad_()
    means, _ = class_means(x, labels, 6, backend=backend)
    w = torch.arange(12.0, device=device).view(4, 3)
    (grad,) = torch.autograd.grad((means * w).sum(), x)
    torch.testing.assert_close(grad, w / counts[labels].view(-1, 1, 1))


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_default_backend_of_class_means_is_not_index_add(monkeypatch):
    """backend=None chooses a kernel (cpp here, cuda or triton for CUDA tensors), as
    class_mean_distance does: never the atomics of index_add_."""
    _no_index_add(monkeypatch)
    x, y = torch.randn(10, 3), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
    acc = ClassMeanAccumulator(3)
    acc.update(x, y)
    means, _ = class_means(x, y, 3)
    torch.testing.assert_close(means, acc.means())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_label_under_torch_compile_fails_on_the_gpu(backend):
    """Under torch.compile the Python range check is skipped: the GPU kernels must fail (a
    device-side assert poisons the CUDA context, hence a subprocess), never read garbage."""
    if not INFO[backend]["available"]:
        pytest.skip(INFO[backend]["detail"])
    code = f"""
import torch
from hpd_fast import class_mean_distance
f = torch.randn(6, 4, device="cuda", requires_grad=True)
y = torch.tensor([0, 1, 2, 7, 1, 0], device="cuda")
t = torch.randn(3, 4, device="cuda")
fn = torch.compile(lambda f, y, t: class_mean_distance(f, y, t, backend="{backend}"))
fn(f, y, t).backward()
torch.cuda.synchronize()
print("NO ERROR")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "assert" in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
