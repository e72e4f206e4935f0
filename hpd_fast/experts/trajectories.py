"""The :class:`Experts` object: a set of expert trajectories, their settings and the checks a
student must pass; trajectories held in memory or read lazily from their files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hpd_fast._checks import check_int
from hpd_fast.models import get_model
from hpd_fast.params import Layout, load_flat_params_, param_layout

__all__ = ["Experts"]


class _LazyTrajectories(Sequence[Tensor]):
    """Trajectories read from their files on access (nothing kept in memory)."""

    def __init__(self, files: list[Path]) -> None:
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        from safetensors import safe_open

        with safe_open(str(self._files[i]), framework="pt") as f:
            return f.get_tensor("trajectory")

    def rows(self, i: int, rows: Sequence[int]) -> list[Tensor]:
        """Only the given epochs of trajectory ``i`` (each [P]), without reading the rest."""
        from safetensors import safe_open

        with safe_open(str(self._files[i]), framework="pt") as f:
            sl = f.get_slice("trajectory")
            return [sl[r] for r in rows]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))


class Experts:
    """A set of expert trajectories and everything needed to use them.

    Attributes:
        trajectories: one float32 tensor [epochs + 1, P] per expert (row e: parameters after
            e epochs; row 0: the initialisation). A list, or a lazily reading sequence for
            ``load(..., lazy=True)``.
        indices: the expert index of each trajectory (its seed is derived from it).
        test_accuracy: final test accuracy (percent) of each expert, or None when unknown.
        config: the full JSON-compatible configuration (see :attr:`model_config`,
            :attr:`training`, :attr:`dataset`).
        path: the folder they were read from / written to, or None.
    """

    def __init__(
        self,
        trajectories: Sequence[Tensor],
        config: Mapping[str, Any],
        *,
        indices: Sequence[int] | None = None,
        test_accuracy: Sequence[float | None] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.trajectories = trajectories
        self.config: dict[str, Any] = json.loads(json.dumps(config))  # a private deep copy
        self.indices = list(range(len(trajectories)) if indices is None else indices)
        self.test_accuracy = (
            [None] * len(trajectories) if test_accuracy is None else list(test_accuracy)
        )
        self.path = None if path is None else Path(path)
        if len(self.indices) != len(trajectories) or len(self.test_accuracy) != len(trajectories):
            raise ValueError("indices and test_accuracy must have one entry per trajectory")

    # --------------------------------------------------------------------------- descriptions

    @property
    def model_config(self) -> dict[str, Any]:
        """``{"name", "channel", "num_classes", "im_size", "kwargs"}`` of the expert network."""
        return dict(self.config["model"])

    @property
    def training(self) -> dict[str, Any]:
        """Training settings: epochs, lr, batch_size, momentum, weight_decay, augment, seed."""
        return dict(self.config["training"])

    @property
    def dataset(self) -> dict[str, Any]:
        """The dataset they were trained on: name, num_train, channels, num_classes, im_size..."""
        return dict(self.config["dataset"])

    @property
    def dataset_name(self) -> str:
        return str(self.config["dataset"]["name"])

    @property
    def lr(self) -> float:
        """The experts' SGD learning rate (the usual initial value of the student's rate)."""
        return float(self.config["training"]["lr"])

    @property
    def epochs(self) -> int:
        """Training epochs per expert; each trajectory has ``epochs + 1`` rows."""
        return int(self.config["training"]["epochs"])

    @property
    def layout(self) -> Layout:
        """(name, shape) of every parameter, in flat-vector order."""
        return [(str(n), tuple(int(s) for s in shape)) for n, shape in self.config["layout"]]

    @property
    def num_params(self) -> int:
        """P, the length of one flat parameter vector."""
        return int(self.config["num_params"])

    def __len__(self) -> int:
        return len(self.trajectories)

    def __repr__(self) -> str:
        m = self.config["model"]
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"Experts({len(self)} x [{self.epochs + 1}, {self.num_params}], model={m['name']}, "
            f"dataset={self.dataset_name!r}{where})"
        )

    # ---------------------------------------------------------------------------- the student

    def make_student(self, device: torch.device | str | None = None) -> nn.Module:
        """A fresh network with the experts' architecture (weights: expert 0's initialisation
        when available; overwrite them with :func:`hpd_fast.params.load_flat_params_`)."""
        m = self.config["model"]
        net = get_model(
            m["name"], m["channel"], m["num_classes"], tuple(m["im_size"]), **m["kwargs"]
        )
        self.check_student(net)
        if len(self):
            load_flat_params_(net, self.params(0, 0))
        return net if device is None else net.to(device)

    def check_student(self, student: nn.Module | Layout) -> None:
        """Refuse a student whose parameter layout differs from the experts'.

        Args:
            student: a network, or a layout from :func:`hpd_fast.params.param_layout`.

        Raises:
            ValueError: saying what differs (parameter count, first differing name or shape,
                missing or extra parameters) and which model the experts were trained with.
        """
        theirs = self.layout
        mine = (
            param_layout(student)
            if isinstance(student, nn.Module)
            else [(str(n), tuple(int(s) for s in shape)) for n, shape in student]
        )
        if mine == theirs:
            return
        m = self.config["model"]
        p_mine = sum(math.prod(s) for _, s in mine)
        what = [
            f"student has {len(mine)} parameter tensors / P={p_mine}, "
            f"experts have {len(theirs)} / P={self.num_params}"
        ]
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                what.append(
                    f"first difference at tensor {i}: student {a[0]!r} {list(a[1])} vs experts "
                    f"{b[0]!r} {list(b[1])}"
                )
                break
        else:
            longer, who = (mine, "student") if len(mine) > len(theirs) else (theirs, "experts")
            extra = [n for n, _ in longer[min(len(mine), len(theirs)) :]]
            what.append(f"only the {who} have {extra}")
        raise ValueError(
            "student parameter layout does not match the expert trajectories: "
            + "; ".join(what)
            + f". The experts were trained with {m['name']} (channel={m['channel']}, "
            f"num_classes={m['num_classes']}, im_size={tuple(m['im_size'])}, "
            f"kwargs={m['kwargs']}); build the student with Experts.make_student() or train "
            "experts for this student."
        )

    # ---------------------------------------------------------------------------------- access

    def params(self, expert: int, epoch: int) -> Tensor:
        """Flat parameters [P] of expert number ``expert`` (position, not index) after ``epoch``."""
        return self.pair(expert, epoch, 0)[0]

    def pair(self, expert: int, start_epoch: int, expert_epochs: int) -> tuple[Tensor, Tensor]:
        """(θ_start, θ_target) = rows ``start_epoch`` and ``start_epoch + expert_epochs`` [P].

        ``expert`` is a position in ``trajectories`` (0 <= expert < len(self)).
        """
        expert = check_int("expert", expert, 0)
        if expert >= len(self):
            raise ValueError(f"expert must be < {len(self)} (the number of experts), got {expert}")
        start_epoch = check_int("start_epoch", start_epoch, 0)
        expert_epochs = check_int("expert_epochs", expert_epochs, 0)
        end = start_epoch + expert_epochs
        if end > self.epochs:
            raise ValueError(
                f"start_epoch + expert_epochs = {end} exceeds the experts' {self.epochs} epochs"
            )
        if isinstance(self.trajectories, _LazyTrajectories):
            a, b = self.trajectories.rows(expert, [start_epoch, end])
            return a, b
        t = self.trajectories[expert]
        return t[start_epoch], t[end]
