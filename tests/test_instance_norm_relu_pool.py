"""hpd_fast.instance_norm_relu_pool: every backend, first and second derivatives, against an
independent float64 oracle; and the fused ConvNet against the unfused one."""

from __future__ import annotations

import importlib

import pytest
import torch

import hpd_fast
from hpd_fast import _backend
from hpd_fast.ops.instance_norm_relu_pool import (
    instance_norm_relu_pool,
    instance_norm_relu_pool_ref,
)

INFO = hpd_fast.backend_info()
MOD = importlib.import_module("hpd_fast.ops.instance_norm_relu_pool")


# Only pairs the dispatcher accepts here: no (cpu, triton) on a machine with a GPU
# (tests/test_backend_cases.py collects the suite as a GPU machine would).
CASES = _backend.runnable_pairs()
KERNEL_CASES = [c for c in CASES if c[1] != "reference"]


def interpreted(device: str, backend: str) -> bool:
    """Triton on CPU runs through the (slow) interpreter: such cases get the small shapes."""
    return backend == "triton" and device == "cpu"


# Shapes [B, C, H, W] with pool: batch 1, odd channel counts, odd and tiny sizes, and the
# "no pool" variant (including 1x1 planes, where the variance is 0).
SHAPES = [
    ((1, 3, 5, 7), True),
    ((2, 5, 4, 6), True),
    ((3, 1, 3, 3), True),
    ((2, 3, 2, 2), True),
    ((1, 3, 3, 4), False),
    ((2, 2, 1, 1), False),
    ((2, 7, 9, 5), True),
    ((4, 6, 16, 16), True),
    ((3, 5, 11, 13), False),
]
SMALL_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[4]]  # for the Triton interpreter (slow)


def shapes_for(device, backend):
    return SMALL_SHAPES if interpreted(device, backend) else SHAPES


# ----------------------------------------------------------------------------- the oracle


def oracle(x, w, b, eps=1e-5, pool=True):
    """Float64, written out from the definitions (no group_norm / relu / avg_pool2d);
    differentiable to any order by autograd."""
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean((2, 3), keepdim=True)
    var = (x - mean).square().mean((2, 3), keepdim=True)
    z = (x - mean) / torch.sqrt(var + eps) * w[None, :, None, None] + b[None, :, None, None]
    a = torch.where(z > 0, z, torch.zeros_like(z))
    if not pool:
        return a
    bsz, c, h, wd = a.shape
    h2, w2 = h // 2, wd // 2
    return a[:, :, : 2 * h2, : 2 * w2].reshape(bsz, c, h2, 2, w2, 2).mean((3, 5))


def make(shape, dtype=torch.float64, device="cpu"):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype).to(device)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5) * torch.where(torch.rand(c) < 0.2, -1.0, 1.0)
    b = torch.randn(c, dtype=torch.float64) * 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return [t.requires_grad_() for t in (x, w.to(acc).to(device), b.to(acc).to(device))]


def all_derivatives(fn, x, w, b, seed=1):
    """y, (gx, gw, gb) for a random gy, and the VJP of (gx, gw, gb) w.r.t. (x, w, gy) for
    random cotangents: what the exact trajectory sweep computes."""
    gen = torch.Generator().manual_seed(seed)
    y = fn(x, w, b)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y).requires_grad_()
    g = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in g]
    h = torch.autograd.grad(g, (x, w, gy), cot)
    return [y, *g, *h]


def assert_close_scaled(got, want, rel):
    """|got - want| <= rel * (|want| + max(1, max|want|)): relative to the tensor's scale (the
    inputs are O(1), so 1 is the floor: exact zeros come out as rounding noise)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale.item())


# ----------------------------------------------------------------------------- values and derivatives


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derivatives_match_float64_oracle(device, backend, dtype):
    """Forward, first and second derivatives, on every shape, against the float64 oracle."""
    rel = 1e-10 if dtype == torch.float64 else 2e-5
    for shape, pool in shapes_for(device, backend):
        if dtype == torch.float32 and shape[2] * shape[3] == 1:
            # 1x1 planes (var = 0) are checked in float64 only: in float32 every backend,
            # PyTorch's GroupNorm included, returns rounding noise amplified by 1/sqrt(eps).
            continue
        x, w, b = make(shape, dtype, device)
        got = all_derivatives(
            lambda x, w, b, pool=pool: instance_norm_relu_pool(x, w, b, pool=pool, backend=backend),
            x, w, b,
        )  # fmt: skip
        x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
        want = all_derivatives(lambda x, w, b, pool=pool: oracle(x, w, b, pool=pool), x64, w64, b64)
        names = ["y", "gx", "gw", "gb", "ggy", "ggx", "ggw"]
        for name, g, h, like in zip(names, got, want, [None, x, w, b, None, x, w]):
            if like is not None:
                assert g.dtype == like.dtype, name
            try:
                assert_close_scaled(g, h, rel)
            except AssertionError as e:
                raise AssertionError(f"{name} for shape {shape}, pool={pool}: {e}") from None


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck_and_gradgradcheck_float64(device, backend):
    slow = interpreted(device, backend)  # the interpreter: fast mode, one small case
    if slow or backend == "reference":  # the reference is PyTorch's own ops: one case
        cases = [((1, 1, 3, 4), True)]
    else:
        cases = [((1, 3, 5, 4), True), ((2, 2, 3, 3), False)]
    for shape, pool in cases:
        x, w, b = make(shape, torch.float64, device)

        def fn(x, w, b, pool=pool):
            return instance_norm_relu_pool(x, w, b, pool=pool, backend=backend)

        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=slow)
        assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=slow)


@pytest.mark.parametrize("device,backend", [c for c in CASES if not interpreted(*c)])
def test_third_order_matches_oracle(device, backend):
    """Third derivatives fall back to PyTorch ops; they must still be exact."""
    x, w, b = make((2, 3, 4, 5), torch.float64, device)

    def third(fn, x, w, b):
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(gx.sin().sum(), x, create_graph=True)
        return torch.autograd.grad(h.cos().sum(), (x, w))

    got = third(lambda x, w, b: instance_norm_relu_pool(x, w, b, backend=backend), x, w, b)
    want = third(oracle, x, w, b)
    for g, h in zip(got, want):
        assert_close_scaled(g, h, 1e-9)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_inputs_and_gradients(device, backend):
    base = torch.randn(3, 7, 6, 4, dtype=torch.float64, device=device)
    x = base.permute(0, 3, 1, 2)[:, 1:].requires_grad_()  # [3, 3, 7, 6], strided
    w = torch.randn(6, dtype=torch.float64, device=device)[::2].requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert not x.is_contiguous() and not w.is_contiguous()
    y = instance_norm_relu_pool(x, w, b, backend=backend)
    # y.sum() sends an expanded (stride-0) gradient into the backward.
    got = torch.autograd.grad(y.sum(), (x, w, b))
    x64 = x.detach().cpu().requires_grad_()
    w64, b64 = w.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    want_y = oracle(x64, w64, b64)
    want = torch.autograd.grad(want_y.sum(), (x64, w64, b64))
    assert_close_scaled(y, want_y, 1e-10)
    for g, h in zip(got, want):
        assert_close_scaled(g, h, 1e-10)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bound(device, backend, dtype):
    """fp32 arithmetic: the error against fp64 on the same rounded inputs is at most about
    twice what PyTorch's own same-dtype computation makes; likewise for the input gradient."""
    shape = (2, 3, 6, 8) if interpreted(device, backend) else (4, 8, 16, 16)
    x = (torch.randn(shape) * 2 + 1).to(dtype).to(device).requires_grad_()
    # weight/bias representable in `dtype`, so every computation sees the same values
    w = (torch.rand(shape[1]) + 0.5).to(dtype).float().to(device)
    b = (torch.randn(shape[1]) * 0.3).to(dtype).float().to(device)
    gy_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    gy = torch.randn(gy_shape).to(dtype).to(device)

    y = instance_norm_relu_pool(x, w, b, backend=backend)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert y.dtype == dtype and gx.dtype == dtype
    x64 = x.detach().double().cpu().requires_grad_()
    truth = oracle(x64, w.double().cpu(), b.double().cpu())
    (truth_gx,) = torch.autograd.grad(truth, x64, gy.double().cpu())
    # PyTorch's composition in `dtype`
    xt = x.detach().requires_grad_()
    yt = torch.nn.functional.avg_pool2d(
        torch.relu(torch.nn.functional.group_norm(xt, shape[1], w.to(dtype), b.to(dtype))), 2
    )
    (torch_gx,) = torch.autograd.grad(yt, xt, gy)
    for got, same, want in ((y, yt, truth), (gx, torch_gx, truth_gx)):
        err_kernel = (got.double().cpu() - want).abs().max().item()
        err_torch = (same.double().cpu() - want).abs().max().item()
        assert err_torch > 0
        assert err_kernel <= 2 * err_torch, (err_kernel, err_torch)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_deterministic(device, backend):
    shape = (1, 2, 4, 4) if interpreted(device, backend) else (8, 16, 12, 12)
    x, w, b = make(shape, torch.float32, device)
    a = all_derivatives(lambda x, w, b: instance_norm_relu_pool(x, w, b, backend=backend), x, w, b)
    c = all_derivatives(lambda x, w, b: instance_norm_relu_pool(x, w, b, backend=backend), x, w, b)
    for s, t in zip(a, c):
        assert torch.equal(s, t)


@pytest.mark.parametrize("device,backend", CASES)
def test_matches_torch_modules(device, backend):
    """The op is exactly the unfused ConvNet tail (GroupNorm(C, C) -> ReLU -> AvgPool2d)."""
    shape = (2, 3, 6, 6) if interpreted(device, backend) else (5, 16, 10, 10)
    mods = torch.nn.Sequential(
        torch.nn.GroupNorm(shape[1], shape[1]), torch.nn.ReLU(), torch.nn.AvgPool2d(2, 2)
    ).to(device)
    with torch.no_grad():
        mods[0].weight.normal_()
        mods[0].bias.normal_()
    x = torch.randn(shape, device=device)
    want = mods(x)
    got = instance_norm_relu_pool(x, mods[0].weight, mods[0].bias, eps=mods[0].eps, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_is_the_composition():
    x, w, b = make((2, 3, 5, 5), torch.float64)
    torch.testing.assert_close(instance_norm_relu_pool_ref(x, w, b), oracle(x, w, b))
    torch.testing.assert_close(
        instance_norm_relu_pool_ref(x, w, b, pool=False, eps=0.1), oracle(x, w, b, 0.1, False)
    )


@pytest.mark.parametrize("device,backend", CASES)
def test_weight_and_bias_none(device, backend):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device)
    got = instance_norm_relu_pool(x, None, None, backend=backend)
    want = oracle(x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert_close_scaled(got, want, 1e-10)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_empty_batch(device, backend):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    y = instance_norm_relu_pool(x, w, b, backend=backend)
    assert y.shape == (0, 3, 2, 2)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0


# ----------------------------------------------------------------------------- torch.library


def _ops(backend):
    if backend == "triton":
        MOD._triton_ops()
        names = MOD._TRITON_NAMES
    else:
        assert MOD._register_cpp()
        names = MOD._CPP_NAMES
    return [getattr(torch.ops.hpd_fast, n) for n in names]


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    fwd, bwd, dbwd = _ops(backend)
    # Tracing a triton_op with fake tensors needs compiled (GPU) Triton; the CPU interpreter
    # would run the kernel on fake data. There the schema and autograd checks still run.
    full = torch.library._OPCHECK_DEFAULT_UTILS
    cheap = ("test_schema", "test_autograd_registration")
    if not interpreted(device, backend):
        cheap += ("test_faketensor",)
    for pool in (True, False):
        utils = cheap if interpreted(device, backend) or not pool else full
        x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
        w = torch.randn(3, device=device, requires_grad=True)
        b = torch.randn(3, device=device, requires_grad=True)
        torch.library.opcheck(fwd, (x, w, b, 1e-5, pool), test_utils=utils)
        y, mean, rstd = fwd(x, w, b, 1e-5, pool)
        gy = torch.randn(y.shape, device=device, requires_grad=True)
        stats = (mean.detach(), rstd.detach())
        torch.library.opcheck(bwd, (gy, x, w, b, *stats, 1e-5, pool), test_utils=utils)
        u = torch.randn(x.shape, device=device, requires_grad=True)
        ggw, ggb = torch.randn(3, device=device), torch.randn(3, device=device)
        args = (u, ggw, ggb, gy, x, w, b, *stats, 1e-5, pool)
        torch.library.opcheck(dbwd, args, test_utils=cheap)
        if utils == full:
            # Traced without inputs that need grad: the double backward's own derivative is the
            # PyTorch fallback (checked by test_third_order_matches_oracle), slow to trace.
            plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(dbwd, plain, test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_torch_compile_fullgraph_parity():
    x, w, b = make((3, 4, 6, 6), torch.float32)

    def block(x, w, b):
        return instance_norm_relu_pool(x * 1.5, w, b) * 2.0 + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    a, c = block(x, w, b), compiled(x, w, b)
    torch.testing.assert_close(a, c)
    for g, h in zip(
        torch.autograd.grad(a.sum(), (x, w, b)), torch.autograd.grad(c.sum(), (x, w, b))
    ):
        torch.testing.assert_close(g, h)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_inductor_cuda(backend):
    if not INFO[backend]["available"]:
        pytest.skip(INFO[backend]["detail"])
    x, w, b = make((8, 16, 32, 32), torch.float32, "cuda")
    fn = lambda x, w, b: instance_norm_relu_pool(x, w, b, backend=backend)  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), torch.compile(fn, fullgraph=True)(x, w, b))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", [b for d, b in CASES if d == "cpu"])
def test_bad_inputs_name_the_argument(backend):
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3)

    def call(*a, **k):
        return instance_norm_relu_pool(*a, backend=backend, **k)

    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call("x", w, b)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        call(x[0], w, b)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        call(x.long(), w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \[C\] = \[3\]"):
        call(x, torch.randn(4), b)
    with pytest.raises(ValueError, match=r"bias must have shape \[C\] = \[3\]"):
        call(x, w, torch.randn(3, 1))
    with pytest.raises(TypeError, match="weight has dtype torch.int32"):
        call(x, w.int(), b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        call(x, w, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="weight is on meta"):
        call(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="pool=True needs H, W >= 2"):
        call(torch.randn(2, 3, 1, 4), w, b)
    with pytest.raises(TypeError, match="pool must be a bool"):
        call(x, w, b, pool=1)
    with pytest.raises(ValueError, match="eps must be"):
        call(x, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        call(x, w, b, eps=float("nan"))


def test_forced_backend_errors():
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3)
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        instance_norm_relu_pool(x, w, b, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        instance_norm_relu_pool(x, w, b, backend="fast")


@pytest.mark.skipif(not INFO["cpp"]["available"], reason="hpd_fast._C not built")
def test_cpp_kernels_check_their_arguments():
    # Called directly (no Python front end), the kernels still refuse inconsistent inputs.
    fwd, bwd, dbwd = _ops("cpp")
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3)
    with pytest.raises(RuntimeError, match="weight must be"):
        fwd(x, w.double(), b, 1e-5, True)
    with pytest.raises(RuntimeError, match="pooling needs H, W >= 2"):
        fwd(torch.randn(2, 3, 1, 4), w, b, 1e-5, True)
    y, mean, rstd = fwd(x, w, b, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        bwd(torch.randn(2, 3, 4, 4), x, w, b, mean, rstd, 1e-5, True)
    with pytest.raises(RuntimeError, match="mean must be"):
        bwd(y, x, w, b, mean[:1], rstd, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_grad_input must have shape"):
        dbwd(y, w, b, y, x, w, b, mean, rstd, 1e-5, True)


# ----------------------------------------------------------------------------- the fused ConvNet


def _convnet_pair(pooling: str, **kw):
    from hpd_fast.models import ConvNet

    kw = dict(channel=2, num_classes=3, width=5, depth=2, pooling=pooling, im_size=(8, 6)) | kw
    fused = ConvNet(**kw).double()
    plain = ConvNet(fused=False, **kw).double()
    with torch.no_grad():
        for p in fused.parameters():  # non-trivial norm parameters (a fresh GroupNorm is 1, 0)
            p.normal_(0.0, 0.5)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("pooling", ["avgpooling", "none"])
def test_fused_convnet_matches_unfused(pooling):
    """Same parameters -> equal outputs, first derivatives and second derivatives (float64)."""
    from hpd_fast.models._layers import FusedConvBlock
    from hpd_fast.params import flatten_params, functional_forward, param_layout

    fused, plain = _convnet_pair(pooling)
    assert fused.fused and not plain.fused
    assert all(isinstance(b, FusedConvBlock) for b in fused.features)
    assert not any(isinstance(b, FusedConvBlock) for b in plain.features)
    assert param_layout(fused) == param_layout(plain)  # flat-parameter layout unchanged
    theta = flatten_params(fused)
    x = torch.randn(4, 2, 8, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])

    def derivatives(net):
        # The student step's gradient, then the VJP of that gradient (as the exact sweep).
        th = theta.clone().requires_grad_()
        xx = x.clone().requires_grad_()
        out = functional_forward(net, th, xx)
        loss = torch.nn.functional.cross_entropy(out, y)
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
        v = torch.linspace(-1, 1, g.numel(), dtype=torch.float64)
        h_theta, h_x = torch.autograd.grad(g @ v, (th, xx))
        return out, g, h_theta, h_x

    for got, want in zip(derivatives(fused), derivatives(plain)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Module call and functional call agree.
    torch.testing.assert_close(fused(x), functional_forward(fused, theta, x))


def test_fused_switch_only_touches_instancenorm_relu_blocks():
    from hpd_fast.models import ConvNet
    from hpd_fast.models._layers import FusedConvBlock

    for kw in (
        dict(pooling="maxpooling"),
        dict(act="leakyrelu"),
        dict(norm="batchnorm"),
        dict(norm="layernorm"),
    ):
        net = ConvNet(width=4, depth=2, im_size=8, **kw)
        assert not net.fused, kw
        assert not any(isinstance(b, FusedConvBlock) for b in net.features)
    with pytest.raises(TypeError, match="fused must be a bool"):
        ConvNet(width=4, fused="yes")


def test_fused_block_falls_back_when_modified():
    fused, plain = _convnet_pair("avgpooling")
    x = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    for net in (fused, plain):
        net.features[0][2] = torch.nn.LeakyReLU(0.1)  # no longer instance norm -> ReLU
    assert not fused.features[0].fusable() and fused.features[1].fusable()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-12)


def test_func_transforms_run_the_reference():
    """vmap / grad (as the experts' vmap trainer uses them) see through the fused ConvNet."""
    from torch.func import functional_call, grad_and_value, vmap

    fused, plain = _convnet_pair("avgpooling", channel=1, im_size=8)
    names = [n for n, _ in fused.named_parameters()]
    stacked = [torch.stack([p.detach(), p.detach() * 0.9]) for _, p in fused.named_parameters()]
    xb = torch.randn(2, 3, 1, 8, 8, dtype=torch.float64)
    yb = torch.randint(0, 3, (2, 3))

    def step(net):
        def loss_fn(flat, x, y):
            out = functional_call(net, dict(zip(names, flat)), (x,))
            return torch.nn.functional.cross_entropy(out, y)

        return vmap(grad_and_value(loss_fn))(stacked, xb, yb)

    (g1, l1), (g2, l2) = step(fused), step(plain)
    torch.testing.assert_close(l1, l2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)
    with pytest.raises(RuntimeError, match="cannot run under torch.func"):
        vmap(lambda x: instance_norm_relu_pool(x, None, None, backend="cpp"))(
            torch.randn(2, 1, 3, 4, 4)
        )


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("pool", [True, False])
def test_nan_and_inf_propagate_like_the_reference(device, backend, pool):
    """ReLU passes NaN through on every backend (Triton's tl.maximum would turn it into 0 and
    hide a diverging run); an inf input makes its plane NaN as in the reference."""
    x = torch.randn(2, 4, 4, 6, device=device)
    x[0, 1, 2, 3] = float("nan")  # one plane: mean and rstd NaN
    x[1, 2, 0, 0] = float("inf")
    w = torch.randn(4, device=device)
    b = torch.randn(4, device=device)
    b[3] = float("nan")  # one channel: z NaN with finite statistics
    want = instance_norm_relu_pool_ref(x, w, b, pool=pool)
    got = instance_norm_relu_pool(x, w, b, pool=pool, backend=backend)
    assert want.isnan().any() and not want.isnan().all()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
