"""The memory model of one H-PD iteration at ImageNet-1K scale, as tables (docs/scaling.md).

Run::

    .venv/bin/python benchmarks/scaling_model.py            # ImageNet-1K, IPC 50, 128 px
    .venv/bin/python benchmarks/scaling_model.py --ipc 10 --ranks 1,8,64

Nothing here needs a GPU or the StyleGAN-XL weights: the per-image shapes come from
``make_stylegan_shaped(K, 128)`` (benchmarks/stylegan_shaped.py, StyleGAN-XL's geometry at full
width) through the library's own adapter (``gen.w_shape``, ``gen.feature_shape(k)``), and the
expected number of touched images is checked against ``hpd_fast.distill.trajectory.
batch_schedule``. Every quantity is a formula of docs/scaling.md; the names below follow it.
GB = 10**9 bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before hpd_fast's Triton kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stylegan_shaped import (  # noqa: E402
    STYLEGAN_XL,
    hpd_stage_shapes,
    make_stylegan_shaped,
    official_parameter_count,
    stylegan_xl_layers,
)

from hpd_fast.distill.trajectory import batch_schedule  # noqa: E402
from hpd_fast.models import get_model  # noqa: E402

GB = 1e9
F32 = 4


def prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def gb(x: float) -> str:
    if x >= 100 * GB:
        return f"{x / GB:,.0f}"
    if x >= 10 * GB:
        return f"{x / GB:.1f}"
    return f"{x / GB:.2f}"


def table(head: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def union_expected(m: int, s: int, b: int, t: int) -> float:
    """E[U]: one trajectory touches exactly min(M, S b) distinct images (the first S chunks
    of one permutation, or all of them); T independent trajectories touch
    M (1 - (1 - u1 / M)^T) in expectation."""
    u1 = min(m, s * b)
    return m * (1 - (1 - u1 / m) ** t)


def union_measured(m: int, s: int, b: int, t: int, seeds: int) -> tuple[float, int, int]:
    sizes = []
    for r in range(seeds):
        parts = [i for k in range(t) for i in batch_schedule(m, s, b, seed=1000 * r + k).indices]
        sizes.append(int(torch.cat(parts).unique().numel()))
    return sum(sizes) / len(sizes), min(sizes), max(sizes)


def render_activation_estimate(layers: list[dict], stage: int) -> int:
    """Bytes per image that the official network's graph keeps when rendering from ``stage``
    (layers at positions stage-1 .. end): per layer its input, its convolution output
    (``(S_in + k - 1)^2`` pixels, before the filtered leaky ReLU) and the per-sample modulated
    weight ``Cout x Cin x k x k``, float32. An estimate from the shapes, not a measurement."""
    total = 0
    for lay in layers[stage - 1 :]:
        k = 1 if lay["torgb"] else STYLEGAN_XL["conv_kernel"]
        cin, cout, sin = lay["in_channels"], lay["channels"], lay["in_size"]
        total += F32 * (cin * sin * sin + cout * (sin + k - 1) ** 2 + cout * cin * k * k)
    return total


def render_flop_estimate(layers: list[dict], stage: int) -> int:
    """FLOP per image of the official network's modulated convolutions from ``stage`` to the
    image: ``2 Cin Cout k^2 (S_in + k - 1)^2`` per layer (padding ``k - 1``). The filtered
    leaky ReLU, affines and the mapping are left out. An estimate from the shapes."""
    total = 0
    for lay in layers[stage - 1 :]:
        k = 1 if lay["torgb"] else STYLEGAN_XL["conv_kernel"]
        sin = lay["in_size"]
        total += 2 * lay["in_channels"] * lay["channels"] * k * k * (sin + k - 1) ** 2
    return total


#: Full passes (one read or one write of every byte) over a rank's latents w and f per
#: iteration, counted from hpd.py and torch.optim.SGD: each finiteness check of the latents,
#: before and after the step, is one torch.aminmax read (2 for both); the full-size zero
#: gradient of index_select's backward (1 write); the gradient's finiteness check (1 read);
#: SGD with momentum: buf.mul_ (2), buf.add_(grad) (3), param.add_(buf) (3).
STATE_PASSES = 12.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000, help="K (default 1000)")
    ap.add_argument("--ipc", type=int, default=50, help="images per class (default 50)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--first-stage", type=int, default=2, help="H-PD's layer 1 (default 2)")
    ap.add_argument("--last-stage", type=int, default=10, help="H-PD's layer 9 (default 10)")
    ap.add_argument("--ranks", default="1,2,4,8", help="W values of the tables")
    ap.add_argument("--syn-steps", type=int, default=20, help="S (default 20)")
    ap.add_argument("--batch-syn", type=int, default=256, help="b for the peak table")
    ap.add_argument("--batches", default="100,256,500,1000,2500", help="b values, union table")
    ap.add_argument("--select-batch", type=int, default=4, help="P (default 4)")
    ap.add_argument("--syn-augments", type=int, default=4, help="CRFD's R (default 4)")
    ap.add_argument("--chunk-size", type=int, default=10, help="render chunk c (default 10)")
    ap.add_argument("--max-snapshots", type=int, default=32)
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="device memory per rank, GB")
    ap.add_argument("--seeds", type=int, default=20, help="schedules per union check")
    ap.add_argument("--select-every", type=int, default=10, help="E (default 10)")
    a = ap.parse_args(argv)

    k_cls, ipc, res = a.classes, a.ipc, a.resolution
    m = k_cls * ipc
    ranks = [int(x) for x in a.ranks.split(",")]
    cap = a.gpu_gb * GB
    p_sel, r_aug, chunk = a.select_batch, a.syn_augments, a.chunk_size

    # ---- generator geometry, through the library's adapter
    gen = make_stylegan_shaped(k_cls, res)  # full width (channel_base 65536, channel_max 1024)
    layers = stylegan_xl_layers(res)
    w_shape, feats = hpd_stage_shapes(layers)
    assert gen.w_shape == w_shape, (gen.w_shape, w_shape)
    for k in range(1, gen.num_stages + 1):
        assert gen.feature_shape(k) == feats[k - 1], (k, gen.feature_shape(k), feats[k - 1])
    img_b = F32 * prod(gen.image_shape)
    w_b = F32 * prod(gen.w_shape)
    params = official_parameter_count(layers)
    student = get_model("ConvNet", 3, k_cls, (res, res))
    p_student = sum(p.numel() for p in student.parameters())

    print(f"# H-PD memory model: K = {k_cls}, IPC = {ipc}, M = {m:,}, {res} px StyleGAN-XL\n")
    print(
        f"w: {gen.w_shape} -> {w_b:,} B per image; image {gen.image_shape} -> {img_b:,} B; "
        f"num_stages {gen.num_stages}; official synthesis parameters "
        f"{params['synthesis']:,} + mapping {params['mapping']:,} (without the class "
        f"embedding table) = {F32 * params['total'] / GB:.2f} GB in float32; student ConvNet "
        f"{p_student:,} parameters ({F32 * p_student / 1e6:.1f} MB per vector)\n"
    )

    # ---- 1. per-stage shapes
    rows = []
    for k in range(1, gen.num_stages + 1):
        name = "input" if k == 1 else layers[k - 2]["name"]
        f_b = F32 * prod(feats[k - 1])
        hpd = f"{k - 1}" if a.first_stage <= k <= a.last_stage else ""
        rows.append(
            [k, hpd, name, "x".join(map(str, feats[k - 1])), f"{f_b:,}", f"{w_b + f_b:,}",
             gb(m * (w_b + f_b))]
        )  # fmt: skip
    print("## 1. Latent bytes per stage\n")
    print(
        table(
            ["stage k", "H-PD layer", "f_k is the output of", "f_k shape", "f B/image",
             "w+f B/image", f"one copy of M={m:,}, GB"],
            rows,
        )
    )  # fmt: skip

    # ---- 2. latent state per rank
    def local_images(w: int) -> int:
        return ipc * math.ceil(k_cls / w)

    def copies(k: int) -> int:
        # latents + momentum + gradient + P pending + one best per finished stage + the
        # current stage's best
        return 3 + p_sel + (k - a.first_stage) + 1

    print("\n## 2. Latent state on the rank owning the most classes (GB)\n")
    print(
        "copies(k) = 3 + P + (k - first_stage) + 1 full-size (w, f) sets at the in-stage peak; "
        f"P = {p_sel}\n"
    )
    rows = []
    for k in range(a.first_stage, a.last_stage + 1):
        a_b = w_b + F32 * prod(feats[k - 1])
        row = [k, copies(k), gb(m * a_b)]
        row += [gb(copies(k) * local_images(w) * a_b) for w in ranks]
        rows.append(row)
    print(
        table(
            ["stage k", "copies(k)", "one copy, all M"]
            + [f"W={w} ({local_images(w):,} img)" for w in ranks],
            rows,
        )
    )

    # ---- 3. per-rank peak with the other terms, and the fewest ranks that fit
    s, b = a.syn_steps, a.batch_syn
    u = min(m, s * b)
    g_w = F32 * params["total"]
    snaps = a.max_snapshots * F32 * p_student

    def need(w: int, k: int, n_copies: int) -> float:
        n = local_images(w)
        a_b = w_b + F32 * prod(feats[k - 1])
        u_r = u * n / m
        return (
            n_copies * n * a_b  # latent state
            + 2 * u_r * a_b  # touched rows and their gradient
            + 2 * u * img_b  # all-gathered union images and their gradient
            + chunk * render_activation_estimate(layers, k)  # one render chunk's graph
            + g_w
            + snaps
        )

    def fewest(k: int, n_copies: int) -> str:
        for w in range(1, k_cls + 1):
            if need(w, k, n_copies) <= cap:
                return f"{w} ({local_images(w):,} img)"
        return "none"

    print(
        f"\n## 3. Peak per rank, MTT (S = {s}, b = {b}, U = {u:,}, chunk {chunk}), "
        f"GB, and the fewest ranks with <= {a.gpu_gb:g} GB\n"
    )
    rows = []
    for k in range(a.first_stage, a.last_stage + 1):
        act = chunk * render_activation_estimate(layers, k)
        row = [k, gb(act)]
        row += [gb(need(w, k, copies(k))) for w in ranks]
        row += [fewest(k, copies(k)), fewest(k, 4)]
        rows.append(row)
    print(
        table(
            ["stage k", "render chunk graph (est.)"]
            + [f"W={w}" for w in ranks]
            + ["fewest W", "fewest W, 4 copies"],
            rows,
        )
    )
    print(
        f"\nother terms in every cell: generator weights {gb(g_w)}, {a.max_snapshots} student "
        f"snapshots {gb(snaps)}, union images x2 {gb(2 * u * img_b)}; '4 copies': latents, "
        "momentum, gradient and the current stage's best on the device, pending candidates "
        "and finished stages' bests elsewhere"
    )

    # ---- 4. union of touched images
    print(f"\n## 4. Touched images U per iteration (S = {s}), checked with batch_schedule\n")
    rows = []
    for bb in [int(x) for x in a.batches.split(",")]:
        row = [bb, f"{min(m, s * bb):,}"]
        for t in (1, 2, 4):
            mean, lo, hi = union_measured(m, s, bb, t, a.seeds)
            row.append(f"{union_expected(m, s, bb, t):,.0f} / {mean:,.0f} [{lo:,}-{hi:,}]")
        row.append(gb(min(m, s * bb) * img_b))
        rows.append(row)
    print(
        table(
            ["b", "min(M, S b)", "T=1: formula / measured [range]", "T=2", "T=4",
             "U x image, GB (T=1)"],
            rows,
        )
    )  # fmt: skip
    naive = m * (1 - (1 - b / m) ** s)
    print(
        f"\n(independent draws of b images per step would give M(1-(1-b/M)^S) = {naive:,.0f} "
        f"for b = {b}; the schedule walks permutations, so the S batches are disjoint)"
    )

    # ---- 5. selection and checkpoints
    print("\n## 5. Selection (CRFD) and checkpoints\n")
    crfd_full = (2 + 2 * r_aug) * p_sel * m * img_b
    rows = [
        ["CRFD batched score, all M images in one process", gb(crfd_full)],
        *[
            [f"CRFD score of one rank's classes, W={w}",
             gb((2 + 2 * r_aug) * p_sel * local_images(w) * img_b)]
            for w in ranks
        ],
    ]  # fmt: skip
    # A checkpoint holds the latents, the optimiser's momentum (none right after a stage
    # boundary: the optimiser is new), the pending candidates and one best per finished stage.
    n_stages = a.last_stage - a.first_stage + 1
    a_b = w_b + F32 * prod(feats[a.last_stage - 1])
    for label, n_copies in (
        (f"checkpoint at the boundary into stage {a.first_stage + 1} (latents, 1 candidate, "
         "1 best)", 3),
        (f"checkpoint at the boundary into stage {a.last_stage} (latents, 1 candidate, "
         f"{n_stages - 1} bests)", 2 + n_stages - 1),
        (f"checkpoint at the end (latents, momentum, {n_stages} bests)", 2 + n_stages),
    ):  # fmt: skip
        rows.append([f"{label}: rank 0's host memory and the file", gb(n_copies * m * a_b)])
    rows.append(["M rendered images (one candidate, or the result)", gb(m * img_b)])
    print(table(["what", "GB"], rows))

    # ---- 6. work per iteration
    e = a.select_every
    w8 = ranks[-1]
    n8 = local_images(w8)
    u8 = u * n8 / m
    print(
        f"\n## 6. Work per iteration on one rank (W = {w8}, n = {n8:,}, U_r = {u8:,.0f}, E = {e})\n"
    )
    rows = []
    for k in range(a.first_stage, a.last_stage + 1):
        fk = render_flop_estimate(layers, k)
        a_b = w_b + F32 * prod(feats[k - 1])
        rows.append(
            [k, f"{fk / 1e12:.2f}", f"{4 * fk * u8 / 1e15:.2f}", f"{fk * n8 / e / 1e15:.2f}",
             gb(STATE_PASSES * n8 * a_b)]
        )  # fmt: skip
    print(
        table(
            ["stage k", "F_k, TFLOP/image (est.)", "MTT render 4 F_k U_r, PFLOP",
             "selection render F_k n / E, PFLOP", f"latent traffic {STATE_PASSES:g} n a_k, GB"],
            rows,
        )
    )  # fmt: skip
    comm = 2 * u * img_b + 3 * s * F32 * p_student
    print(
        f"\ncommunication per iteration and rank (any W > 1), GB: union images all-gathered "
        f"{gb(u * img_b)} + their gradient all-reduced {gb(u * img_b)} + {3 * s} all-reduces "
        f"of the student gradient ({F32 * p_student / 1e9:.4f} each) = {gb(comm)}"
    )


if __name__ == "__main__":
    main()
