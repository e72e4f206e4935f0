"""Training a :class:`ConvGenerator` as a class-conditional GAN.

The discriminator is a small spectrally-normalised ConvNet with a projection head (Miyato &
Koyama, 2018), a minibatch-standard-deviation feature and an auxiliary classifier head. Losses:
the hinge loss; an auxiliary cross-entropy that both networks minimise (the discriminator on real
images, the generator on its own samples), which sharpens the conditioning on small data sets;
and a mode-seeking term for the generator (Mao et al., 2019) that keeps samples of one class
diverse. The returned generator holds an exponential moving average of the generator weights.

Everything random (initialisation, shuffling, z) is drawn under ``torch.random.fork_rng`` from
``seed``; the caller's global RNG state is left untouched. Runs are reproducible on the same
machine, thread count and torch version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from hpd_fast._common import logger, progress_bar
from hpd_fast.generators.base import check_labels
from hpd_fast.generators.convgen import ConvGenerator

__all__ = ["train_generator"]


class _ProjectionDiscriminator(nn.Module):
    """Spectrally-normalised ConvNet with a projection head and a classifier head.

    conv3x3(C -> d) -> lrelu, then [conv3x3 -> lrelu -> avgpool2] blocks (channels doubling,
    capped at 4d) until the map is <= 2 px, then global sum pooling; the score also sees the
    minibatch standard deviation of the pooled features. Input [B, C, H, W] in
    [-1, 1] and labels [B]; returns (score [B], class logits [B, num_classes]).
    """

    def __init__(self, num_classes: int, image_shape: Sequence[int], width: int) -> None:
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = [
            spectral_norm(nn.Conv2d(c, width, 3, padding=1)),
            nn.LeakyReLU(0.2),
        ]
        ch = width
        while min(h, w) > 2 and h % 2 == 0 and w % 2 == 0:
            nxt = min(2 * ch, 4 * width)
            layers += [
                spectral_norm(nn.Conv2d(ch, nxt, 3, padding=1)),
                nn.LeakyReLU(0.2),
                nn.AvgPool2d(2),
            ]
            ch, h, w = nxt, h // 2, w // 2
        self.body = nn.Sequential(*layers)
        self.score = spectral_norm(nn.Linear(ch + 1, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, ch))
        self.classify = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).sum(dim=(2, 3))  # global sum pooling, [B, ch]
        proj = (self.embed(labels) * h).sum(dim=1)
        score = self.score(torch.cat([h, _minibatch_std(h)], dim=1)).squeeze(1)
        return score + proj, self.classify(h)


def _minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Mean feature std within groups of ``group`` samples, one value per sample [B, 1].

    Lets the discriminator see sample diversity, which counters mode collapse.
    """
    b = h.shape[0]
    g = group if b % group == 0 else b
    if g < 2:
        return h.new_zeros(b, 1)
    s = h.view(g, b // g, -1).std(dim=0).mean(dim=1)  # [b // g]
    return s.repeat(g).unsqueeze(1)


def _check_images(images: torch.Tensor, labels: torch.Tensor, image_shape: Sequence[int] | None):
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or not images.dtype.is_floating_point
    ):
        raise ValueError("dataset_images must be a floating tensor [N, C, H, W]")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(int(s) for s in image_shape):
        raise ValueError(
            f"dataset_images has per-image shape {tuple(images.shape[1:])},"
            f" image_shape says {tuple(image_shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"dataset_labels has {labels.shape[0]} entries for {images.shape[0]} dataset_images"
        )


def train_generator(
    dataset_images: torch.Tensor,
    dataset_labels: torch.Tensor,
    num_classes: int,
    *,
    image_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    epochs: int = 80,
    batch_size: int = 64,
    lr: float = 5e-4,
    latent_dim: int = 32,
    width: int = 32,
    d_width: int = 32,
    num_stages: int | None = None,
    cond_weight: float = 0.1,
    diversity_weight: float = 0.2,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool | None = True,
    out: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 200,
    device: torch.device | str | None = None,
) -> ConvGenerator:
    """Train a :class:`ConvGenerator` on labelled images.

    Args:
        dataset_images: [N, C, H, W] float. If ``mean``/``std`` are None the images are pixel
            values in [0, 1] and the generator's normalisation is their per-channel mean/std;
            otherwise they are already normalised as ``(x - mean) / std`` with x in [0, 1].
        dataset_labels: [N] integer labels in [0, num_classes).
        num_classes: number of classes.
        image_shape: (C, H, W); checked against the data (default: taken from it).
        mean, std: see ``dataset_images``.
        epochs: passes over the data; one step per minibatch (the last partial batch is
            dropped).
        batch_size: minibatch size (capped at N).
        lr: Adam learning rate of both networks (betas (0.0, 0.99)).
        latent_dim, width, num_stages: :class:`ConvGenerator` arguments.
        d_width: discriminator channels.
        cond_weight: weight of the auxiliary classification loss (0 = pure projection GAN).
        diversity_weight: weight of the mode-seeking term (Mao et al., 2019): the two halves of
            each generator batch share labels, and the generator minimises
            ``1 / (mean|G(z1, y) - G(z2, y)| / mean|z1 - z2| + 1e-5)`` (0 = off).
        ema_decay: decay of the generator weight average that is returned.
        seed: seed of all randomness.
        progress: True: a tqdm bar; None: the bar on a terminal, else a log line (logger
            ``hpd_fast``) every ``checkpoint_every`` steps; False: nothing.
        out: if given, the trained generator is saved there with :func:`save_generator`.
        checkpoint: a ``.safetensors`` file holding the whole training state (both networks,
            the weight average, both optimisers, the random stream, the step), rewritten
            atomically every ``checkpoint_every`` steps. If it exists and was written with the
            same settings and data, training resumes from it and ends with the weights an
            uninterrupted run gives; one of other settings raises ValueError.
        checkpoint_every: steps between checkpoints (and progress lines).
        device: where to train (default the CPU); z and the shuffling are drawn on the CPU, so
            the random stream does not depend on it.

    The defaults are the settings of the shipped digits checkpoint (1,760 steps on the 1,438
    digits training images, about 4.5 CPU-minutes on one thread).

    Returns:
        The EMA generator (eval mode, float32, CPU) with ``training_config`` set to the
        training settings (stored by :func:`save_generator`).
    """
    labels = check_labels(torch.as_tensor(dataset_labels), num_classes, "dataset_labels")
    _check_images(dataset_images, labels, image_shape)
    images = dataset_images.detach().to("cpu", torch.float32)
    c = images.shape[1]
    if mean is None and std is None:
        x01 = images
        mean_t = images.mean(dim=(0, 2, 3))
        std_t = images.std(dim=(0, 2, 3))
    elif mean is None or std is None:
        raise ValueError("give both mean and std, or neither")
    else:
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten().expand(c).clone()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten().expand(c).clone()
        x01 = images * std_t.view(1, -1, 1, 1) + mean_t.view(1, -1, 1, 1)
    real = x01 * 2 - 1  # the GAN works in the generator's raw [-1, 1] space
    n = real.shape[0]
    batch_size = min(int(batch_size), n)
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size}, {epochs}")
    if not 0 <= float(ema_decay) < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    steps_per_epoch = n // batch_size
    total = steps_per_epoch * int(epochs)
    settings: dict[str, Any] = {
        "epochs": int(epochs),
        "batch_size": batch_size,
        "lr": float(lr),
        "d_width": int(d_width),
        "cond_weight": float(cond_weight),
        "diversity_weight": float(diversity_weight),
        "ema_decay": float(ema_decay),
        "seed": int(seed),
        "num_images": n,
        "steps": total,
        "loss": "hinge + auxiliary cross-entropy + mode seeking, projection discriminator",
    }

    identity = _identity(settings, num_classes, latent_dim, width, num_stages, real, labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        G = ConvGenerator(
            num_classes,
            tuple(real.shape[1:]),
            latent_dim=latent_dim,
            width=width,
            num_stages=num_stages,
            mean=mean_t,
            std=std_t,
        )
        D = _ProjectionDiscriminator(num_classes, tuple(real.shape[1:]), d_width)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        G, D, G_ema = G.to(dev), D.to(dev), G_ema.to(dev)
        opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.99))
        opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.99))
        nets = {"G": G, "D": D, "G_ema": G_ema}
        opts = {"opt_g": opt_g, "opt_d": opt_d}

        step, order = 0, None
        if checkpoint is not None and Path(checkpoint).is_file():
            step, order = _load_checkpoint(Path(checkpoint), identity, nets, opts, gen, dev)
            logger.info(
                "train generator: resuming at step %d of %d from %s", step, total, checkpoint
            )
        real, labels = real.to(dev), labels.to(dev)

        bar, log_lines = progress_bar(
            progress, total=total, initial=step, desc="train generator", unit="step"
        )
        loss_d = loss_g = torch.zeros(())
        t0 = time.perf_counter()
        with bar:
            while step < total:
                i = step % steps_per_epoch
                if i == 0:
                    order = torch.randperm(n, generator=gen)
                idx = order[i * batch_size : (i + 1) * batch_size].to(dev)
                x, y = real[idx], labels[idx]
                z = torch.randn(batch_size, latent_dim, generator=gen).to(dev)
                # Two halves with the same labels, for the mode-seeking term.
                half = torch.randint(0, num_classes, ((batch_size + 1) // 2,), generator=gen)
                y_fake = torch.cat([half, half])[:batch_size].to(dev)

                # Discriminator: hinge on real/fake + classification of real images.
                with torch.no_grad():
                    fake = G.generate_raw(z, y_fake)
                s_real, logit_real = D(x, y)
                s_fake, _ = D(fake, y_fake)
                loss_d = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
                loss_d = loss_d + cond_weight * F.cross_entropy(logit_real, y)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

                # Generator: fool the projection head and be classified as its label.
                fake = G.generate_raw(z, y_fake)
                s_fake, logit_fake = D(fake, y_fake)
                loss_g = -s_fake.mean() + cond_weight * F.cross_entropy(logit_fake, y_fake)
                if diversity_weight > 0 and batch_size >= 2:
                    h = batch_size // 2
                    ratio = (fake[:h] - fake[h : 2 * h]).abs().mean() / (
                        (z[:h] - z[h : 2 * h]).abs().mean()
                    )
                    loss_g = loss_g + diversity_weight / (ratio + 1e-5)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()

                # EMA with a warm-up so early averages are not dominated by the init.
                decay = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                        p_ema.lerp_(p, 1 - decay)
                step += 1
                bar.update(1)
                if step % 50 == 0 or step == total:
                    bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
                if step % int(checkpoint_every) == 0 or step == total:
                    if checkpoint is not None and step < total:
                        _save_checkpoint(Path(checkpoint), identity, step, order, nets, opts, gen)
                    if log_lines:
                        logger.info(
                            "train generator: step %d/%d, loss D %.3f, G %.3f, %.1f s",
                            step,
                            total,
                            loss_d.item(),
                            loss_g.item(),
                            time.perf_counter() - t0,
                        )

    G_ema = G_ema.to("cpu")
    G_ema.training_config = settings
    if out is not None:
        from hpd_fast.generators.io import save_generator

        save_generator(G_ema, out)
    return G_ema


# ------------------------------------------------------------------------------------------
# the resumable training state
# ------------------------------------------------------------------------------------------

_CKPT_FORMAT = "hpd_fast.GeneratorTrainingCheckpoint"


def _identity(
    settings: Mapping[str, Any],
    num_classes: int,
    latent_dim: int,
    width: int,
    num_stages: int | None,
    real: torch.Tensor,
    labels: torch.Tensor,
) -> str:
    """What decides the training: settings, architecture and a fingerprint of the data."""
    h = hashlib.sha256()
    spec = {
        **settings,
        "num_classes": int(num_classes),
        "latent_dim": int(latent_dim),
        "width": int(width),
        "num_stages": num_stages,
        "shape": list(real.shape),
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(labels.numpy().tobytes())
    h.update(real.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _save_checkpoint(
    path: Path,
    identity: str,
    step: int,
    order: torch.Tensor,
    nets: Mapping[str, nn.Module],
    opts: Mapping[str, torch.optim.Optimizer],
    gen: torch.Generator,
) -> None:
    """One safetensors file, replaced atomically: a kill leaves the previous one or this."""
    from hpd_fast._files import atomic_save_tensors

    tensors: dict[str, torch.Tensor] = {"order": order, "rng": gen.get_state()}
    for name, net in nets.items():
        for k, v in net.state_dict().items():
            tensors[f"{name}/{k}"] = v
    for name, opt in opts.items():
        for idx, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"{name}/{idx}/{k}"] = torch.as_tensor(v)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": _CKPT_FORMAT, "identity": identity, "step": str(step)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, tensors, meta)


def _load_checkpoint(
    path: Path,
    identity: str,
    nets: Mapping[str, nn.Module],
    opts: Mapping[str, torch.optim.Optimizer],
    gen: torch.Generator,
    device: torch.device,
) -> tuple[int, torch.Tensor]:
    """Restore the state of :func:`_save_checkpoint` in place; ``(step, epoch order)``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"generator training checkpoint {str(path)!r} is not readable ({exc}); delete it "
            "to start afresh"
        ) from None
    if meta.get("format") != _CKPT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a generator training checkpoint")
    if meta.get("identity") != identity:
        raise ValueError(
            f"generator training checkpoint {str(path)!r} was written with other settings or "
            "data; delete it (or the folder) to start afresh"
        )
    for name, net in nets.items():
        prefix = f"{name}/"
        net.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    for name, opt in opts.items():
        sd = opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            parts = k.split("/")
            if parts[0] == name:
                state.setdefault(int(parts[1]), {})[parts[2]] = v
        sd["state"] = state
        opt.load_state_dict(sd)
        for st in opt.state.values():  # Adam keeps "step" on the CPU
            for k, v in st.items():
                if k != "step":
                    st[k] = v.to(device)
    gen.set_state(tensors["rng"])
    return int(meta["step"]), tensors["order"]
