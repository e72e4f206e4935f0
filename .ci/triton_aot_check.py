"""Compile every Triton kernel ahead of time for sm_90, without a GPU, and check the machine code.

For each dtype and constexpr combination the launchers in hpd_fast/ops/_*_triton.py use on the
GPU, ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` (and the launchers' compile options,
kernels/_math.py: LAUNCH_OPTIONS) lowers the kernel to PTX and, through the ptxas that ships in
the Triton wheel, to a cubin. The check fails on

* a compile error (what the CPU interpreter accepts but the compiler does not),
* a register spill (``ptxas -v``: "N bytes spill stores/loads" other than 0),
* an approximate or contracted floating-point instruction in the PTX (``div.full``,
  ``sqrt.approx``, ``rcp.approx``, ``fma`` ...) unless docs/gpu.md allows it (ALLOWED below).

Usage: python .ci/triton_aot_check.py [--jobs N] [-v]      (TRITON_INTERPRET must not be 1)
Works with triton >= 3.6; nothing here needs or touches a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90

# Approximate math (and multiply-add contraction, which breaks the per-element parity with the
# CPU build) that docs/gpu.md does not allow. ex2/lg2/sin/cos/tanh approx: no kernel needs them.
FORBIDDEN = re.compile(
    r"\b(div\.(?:full|approx)\.\S+|(?:sqrt|rsqrt|rcp|ex2|lg2|sin|cos|tanh)\.approx\.\S+|fma\.\S+)"
)
# Instructions docs/gpu.md allows despite FORBIDDEN (none at present).
ALLOWED: set[str] = set()

FP = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def _acc(dt: str) -> str:
    return "fp64" if dt == "fp64" else "fp32"


def _configs() -> list[tuple[str, str, dict, dict, int, str]]:
    """(module, kernel, signature, constexprs, num_warps, label) for every GPU launch variant."""
    out = []
    # class_mean_distance: GPU tiles from forward_blocks(True) / backward_blocks(True).
    from hpd_fast.kernels.class_mean_distance import backward_blocks, forward_blocks

    br, bd = forward_blocks(True, 1000, 1000)
    bn, bd2 = backward_blocks(True, 1000, 1000)
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        a = "*" + _acc(dt)
        sig = dict(x_ptr=FP[dt], t_ptr=a, order_ptr="*i64", offsets_ptr="*i64", diff_ptr=a,
                   partial_ptr=a, D="i32", ld_diff="i32", NBLK="i32", BLOCK_R="constexpr",
                   BLOCK_D="constexpr", ACC_FP64="constexpr")  # fmt: skip
        ce = dict(BLOCK_R=br, BLOCK_D=bd, ACC_FP64=dt == "fp64")
        out.append(("class_mean_distance", "_class_mean_distance_fwd_kernel", sig, ce, 4, dt))
        sig = dict(scale_ptr=a, diff_ptr=a, labels_ptr="*i64", out_ptr=FP[dt], N="i32", D="i32",
                   S="i32", ld_diff="i32", NBLK_D="i32", BLOCK_N="constexpr",
                   BLOCK_D="constexpr")  # fmt: skip
        ce = dict(BLOCK_N=bn, BLOCK_D=bd2)
        out.append(("class_mean_distance", "_class_mean_distance_bwd_kernel", sig, ce, 4, dt))

    # instance_norm_relu_pool: BLOCK/num_warps from plane_block(True, H * W) for the planes of
    # 8x8, 32x32 and 64x64 planes (and larger: BLOCK is capped at 2048).
    from hpd_fast.kernels.instance_norm_relu_pool import plane_block

    ints = dict(C="i32", H="i32", W="i32", H2="i32", W2="i32")
    cex = dict(POOL="constexpr", BLOCK="constexpr", ACC_FP64="constexpr")
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        # fp16 differs from bf16 only in its loads and stores: one plane size is enough.
        sizes = (1024,) if dt == "fp16" else (64, 4096)
        x, a = FP[dt], "*" + _acc(dt)
        fwd = dict(x_ptr=x, w_ptr=a, b_ptr=a, eps_ptr=a, y_ptr=x, mean_ptr=a, rstd_ptr=a)
        bwd = dict(gy_ptr=x, x_ptr=x, w_ptr=a, b_ptr=a, mean_ptr=a, rstd_ptr=a, gx_ptr=x,
                   gw_part_ptr=a, gb_part_ptr=a)  # fmt: skip
        dbwd = dict(u_ptr=x, ggw_ptr=a, ggb_ptr=a, gy_ptr=x, x_ptr=x, w_ptr=a, b_ptr=a,
                    mean_ptr=a, rstd_ptr=a, g_gy_ptr=x, g_x_ptr=x, gw_part_ptr=a)  # fmt: skip
        for n in sizes:
            block, warps = plane_block(True, n)
            for pool in (True, False):
                ce = dict(POOL=pool, BLOCK=block, ACC_FP64=dt == "fp64")
                label = f"{dt} BLOCK={block} POOL={pool}"
                for name, ptrs in (("fwd", fwd), ("bwd", bwd), ("dbwd", dbwd)):
                    out.append(("instance_norm_relu_pool",
                                f"_instance_norm_relu_pool_{name}_kernel",
                                {**ptrs, **ints, **cex}, ce, warps, label))  # fmt: skip

    # trajectory_ops: flat parameters in any float dtype; BLOCK from block_size(True, n).
    from hpd_fast.kernels.trajectory_ops import block_size

    blk = dict(BLOCK=block_size(True, 1 << 20))
    for dt in ("bf16", "fp32", "fp64"):
        t, a = FP[dt], "*" + _acc(dt)
        sigs = {
            "_sgd_step_fwd_kernel": dict(theta_ptr=t, grad_ptr=t, lr_ptr=a, out_ptr=t),
            "_param_match_sums_kernel": dict(theta_n_ptr=t, target_ptr=t, start_ptr=t,
                                             num_ptr="*fp64", den_ptr="*fp64"),
            "_param_match_seed_kernel": dict(theta_n_ptr=t, target_ptr=t, den_ptr="*fp64",
                                             seed_ptr=t),
            "_adjoint_update_fwd_kernel": dict(lam_ptr=t, h_ptr=t, g_ptr=t, out_ptr=t,
                                               dot_ptr="*fp64"),
        }  # fmt: skip
        for name, ptrs in sigs.items():
            sig = {**ptrs, "P": "i32", "BLOCK": "constexpr"}
            out.append(("trajectory_ops", name, sig, blk, 4, dt))
    return out


def _ptxas() -> str:
    """The ptxas Triton itself uses (shipped in the wheel), else one on PATH."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older layouts: fall through to the file search
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("ptxas")
    if not found:
        raise RuntimeError("no ptxas: neither in the Triton wheel nor on PATH")
    return found


def _compile(job: tuple) -> dict:
    module, kernel, sig, constexprs, warps, label = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    from hpd_fast.kernels._math import LAUNCH_OPTIONS

    fn = getattr(importlib.import_module(f"hpd_fast.kernels.{module}"), kernel)
    res = {"kernel": kernel, "label": label, "warps": warps, "errors": []}
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        options = {"num_warps": warps, **LAUNCH_OPTIONS}
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a finding
        res["errors"].append(f"compile error: {type(exc).__name__}: {str(exc)[:2000]}")
        res["seconds"] = time.perf_counter() - t0
        return res
    ptx = compiled.asm["ptx"]
    bad = sorted(set(FORBIDDEN.findall(ptx)) - ALLOWED)
    if bad:
        res["errors"].append(f"approximate/contracted instructions in the PTX: {bad}")
    # Registers and spills: ptxas -v on the same PTX with the flags Triton uses.
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        fmad = [] if LAUNCH_OPTIONS.get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [_ptxas(), "-v", *fmad, f"--gpu-name=sm_{ARCH}a", str(p), "-o", str(p) + ".o"]
        run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        res["errors"].append(f"ptxas failed ({run.returncode}): {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    res["registers"] = int(regs.group(1)) if regs else None
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    res["spill_bytes"] = sum(spills)
    if res["spill_bytes"]:
        res["errors"].append(f"register spill: {res['spill_bytes']} bytes ({log.strip()[-500:]})")
    if regs is None and run.returncode == 0:
        res["errors"].append(f"could not read ptxas -v output: {log[-500:]}")
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per kernel variant")
    ap.add_argument("-k", dest="only", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        os.environ["TRITON_INTERPRET"] = "0"  # the interpreter compiles nothing
    sys.path.insert(0, str(ROOT))
    import triton

    t0 = time.perf_counter()
    jobs = [j for j in _configs() if args.only in j[1]]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    failed = [r for r in results if r["errors"]]
    for r in results:
        if args.verbose or r["errors"]:
            status = "FAIL" if r["errors"] else "ok"
            print(f"{status:4} {r['kernel']:40} {r['label']:28} warps={r['warps']} "
                  f"regs={r.get('registers')} spill={r.get('spill_bytes')} "
                  f"{r['seconds']:.1f}s")  # fmt: skip
            for e in r["errors"]:
                print("     " + e)
    kernels = sorted({r["kernel"] for r in results})
    print(
        f"Triton AOT check (triton {triton.__version__}, sm_{ARCH}): {len(results)} variants of "
        f"{len(kernels)} kernels, {len(failed)} failed, {time.perf_counter() - t0:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
