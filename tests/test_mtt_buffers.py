"""Expert buffers of the published MTT code (replay_buffer_<k>.pt): reading, checks, import."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from hpd_fast.cli import build_parser, main
from hpd_fast.experts import import_mtt, load, load_mtt
from hpd_fast.experts.mtt_buffers import describe_buffer_folder
from hpd_fast.params import load_flat_params_

WIDTH = 8  # small experts: the published ConvNet with net_width 8


def published_convnet(channel=3, num_classes=10, width=WIDTH, depth=3, im=32) -> nn.Module:
    """The published ConvNet's module structure (utils.py / networks.py ConvNet, instancenorm,
    avgpooling): features = Sequential(conv, GroupNorm(C, C), ReLU, AvgPool2d) x depth, then
    classifier = Linear."""

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c, h = [], channel, im
            for d in range(depth):
                pad = 3 if channel == 1 and d == 0 else 1
                layers += [
                    nn.Conv2d(c, width, kernel_size=3, padding=pad),
                    nn.GroupNorm(width, width, affine=True),
                    nn.ReLU(inplace=True),
                    nn.AvgPool2d(kernel_size=2, stride=2),
                ]
                c, h = width, h // 2
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(width * h * h, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).reshape(x.shape[0], -1))

    return ConvNet()


def write_buffers(folder: Path, files=2, experts=2, epochs=4, seed=0, **net_kw) -> list:
    """What the published buffer.py writes: per file a list of trajectories, each a list over
    epochs of [p.detach().cpu() for p in teacher_net.parameters()] (there on CUDA, where .cpu()
    copies; here .clone() does, or every epoch would share the final values)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    everything = []
    for n in range(files):
        trajectories = []
        for _ in range(experts):
            net = published_convnet(**net_kw)
            opt = torch.optim.SGD(net.parameters(), lr=0.01)
            timestamps = [[p.detach().cpu().clone() for p in net.parameters()]]
            for _ in range(epochs):
                x = torch.randn(
                    4, net_kw.get("channel", 3), net_kw.get("im", 32), net_kw.get("im", 32)
                )
                y = torch.randint(0, net_kw.get("num_classes", 10), (4,))
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                timestamps.append([p.detach().cpu().clone() for p in net.parameters()])
            trajectories.append(timestamps)
        torch.save(trajectories, folder / f"replay_buffer_{n}.pt")
        everything += trajectories
    return everything


@pytest.fixture
def buffers(tmp_path):
    folder = tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    return folder, write_buffers(folder)


KW = {"model_kwargs": {"width": WIDTH}}


def test_load_matches_published_flattening_and_network(buffers):
    folder, trajs = buffers
    ex = load(folder, format="mtt", **KW)
    assert len(ex) == 4 and ex.epochs == 4
    assert ex.dataset_name == "cifar10" and ex.model_config["name"] == "ConvNetD3"
    assert ex.config["source"]["files"] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    assert ex.config["dataset"]["zca"] is False
    for k, traj in enumerate(trajs):
        for e, params in enumerate(traj):
            # the published distill.py: torch.cat([p.reshape(-1) for p in params], 0)
            assert torch.equal(ex.params(k, e), torch.cat([p.reshape(-1) for p in params]))
    # The student computes what the published network computes with the same parameters.
    ref = published_convnet()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), trajs[3][2]):
            p.copy_(q)
    student = load_flat_params_(ex.make_student(), ex.params(3, 2))
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(student(x), ref(x), rtol=1e-5, atol=1e-5)
    assert ex.test_accuracy == [None] * 4
    assert not torch.equal(ex.params(0, 0), ex.params(0, 4))  # the epochs differ


def test_published_names_and_folders(tmp_path):
    assert describe_buffer_folder(tmp_path / "CIFAR100" / "ConvNet").zca is True
    tiny = describe_buffer_folder(tmp_path / "Tiny" / "ConvNetD4")
    assert (tiny.dataset, tiny.model) == ("tinyimagenet", "ConvNetD4")
    inet = describe_buffer_folder(tmp_path / "ImageNet" / "imagewoof" / "64" / "ConvNetD4")
    assert (inet.dataset, inet.resolution, inet.model) == ("imagewoof", 64, "ConvNetD4")
    folder = tmp_path / "ImageNet" / "imagewoof" / "64" / "ConvNetD4"
    write_buffers(folder, files=1, experts=1, epochs=2, im=64, depth=4)
    ex = load_mtt(folder, **KW)
    assert ex.dataset_name == "imagewoof" and ex.model_config["im_size"] == [64, 64]
    assert ex.model_config["name"] == "ConvNetD4"
    with pytest.raises(ValueError, match="dataset: cannot tell"):
        write_buffers(tmp_path / "x", files=1, experts=1, epochs=1)
        load_mtt(tmp_path / "x", **KW)
    with pytest.raises(ValueError, match="model: unknown network 'Nope'"):
        load_mtt(folder, model="Nope")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing(tmp_path):
    folder = tmp_path / "CIFAR10_NO_ZCA" / "ConvNet"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    bad = folder / "replay_buffer_0.pt"
    torch.save([[_Payload(marker)]], bad)
    # The payload is real: an unrestricted unpickler runs it.
    torch.load(bad, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"replay_buffer_0\.pt.*not a plain tensor file") as e:
        load(folder, format="mtt", **KW)
    assert "system" in str(e.value)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not a plain tensor file"):
        import_mtt(folder, out, **KW)
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(".out.importing-*"))
    # Raw pickle.dumps (no torch zip container) is refused too.
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"replay_buffer_0\.pt"):
        load_mtt(folder, **KW)
    assert not marker.exists()


def _edit(folder: Path, fn) -> None:
    f = folder / "replay_buffer_1.pt"
    data = torch.load(f, weights_only=True)
    fn(data)
    torch.save(data, f)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda d: d[1][2].pop(),
            r"trajectory 1, epoch 2: 13 parameter tensors, but the student .* has 14; missing at "
            r"the end: \['classifier\.bias \[10\]'\]",
        ),
        (
            lambda d: d[0][0].__setitem__(2, torch.zeros(7)),
            r"trajectory 0, epoch 0, parameter 2: shape \[7\], but the student .* "
            r"features\.0\.1\.weight \[8\]",
        ),
        (
            lambda d: d[0][3].__setitem__(13, d[0][3][13].double()),
            r"trajectory 0, epoch 3, parameter 13 \(classifier\.bias\): dtype torch\.float64",
        ),
        (
            lambda d: d[1][4][0].view(-1).__setitem__(5, float("nan")),
            r"trajectory 1, epoch 4, parameter 0 \(features\.0\.0\.weight\): 1 non-finite",
        ),
        (lambda d: d[1].pop(), r"trajectory 1: 3 epochs, but the trajectories before it have 4"),
        (lambda d: d[0].__setitem__(1, "text"), r"trajectory 0, epoch 1: expected a list"),
        (lambda d: d.clear(), r"holds no expert trajectories"),
    ],
)
def test_first_mismatch_named(buffers, edit, match):
    folder, _ = buffers
    _edit(folder, edit)
    with pytest.raises(ValueError, match=match) as e:
        load_mtt(folder, **KW)
    assert "replay_buffer_1.pt" in str(e.value)


def test_epochs_and_file_errors(buffers, tmp_path):
    folder, _ = buffers
    with pytest.raises(ValueError, match=r"5 parameter sets .* expert_epochs \+ 1 = 6"):
        load_mtt(folder, expert_epochs=5, **KW)
    assert load_mtt(folder, expert_epochs=4, **KW).epochs == 4
    f = folder / "replay_buffer_1.pt"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"replay_buffer_1\.pt.*not a readable torch\.save"):
        load_mtt(folder, **KW)
    f.write_text("hello\n")
    with pytest.raises(ValueError, match=r"replay_buffer_1\.pt"):
        load_mtt(folder, **KW)
    torch.save({"a": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match=r"replay_buffer_1\.pt.*expected a list of expert"):
        load_mtt(folder, **KW)
    with pytest.raises(FileNotFoundError, match="no expert buffers in"):
        load_mtt(tmp_path, dataset="cifar10")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_mtt(tmp_path / "missing", dataset="cifar10")


def test_load_dispatch_errors(buffers):
    folder, _ = buffers
    with pytest.raises(ValueError, match="format must be one of"):
        load(folder, format="pt")
    with pytest.raises(ValueError, match="lazy=True reads hpd_fast's format only"):
        load(folder, format="mtt", lazy=True)
    with pytest.raises(ValueError, match="takes no options"):
        load(folder, dataset="cifar10")


def test_import_cli_roundtrip(buffers, tmp_path, capsys):
    folder, trajs = buffers
    out = tmp_path / "converted"
    argv = ["experts", "import", str(folder), "--format", "mtt", "--out", str(out)]
    rc = main([*argv, "--model-kwargs", '{"width": 8}', "-q"])
    assert rc == 0, capsys.readouterr().err
    assert "imported 4 experts x 4 epochs" in capsys.readouterr().out
    ex = load(out)
    assert len(ex) == 4 and ex.dataset_name == "cifar10"
    assert torch.equal(ex.params(2, 3), torch.cat([p.reshape(-1) for p in trajs[2][3]]))
    # out must be new.
    assert main([*argv, "--model-kwargs", '{"width": 8}']) == 1
    assert "already exists" in capsys.readouterr().err
    # A mismatch: nothing is left behind, the message names the file.
    out2 = tmp_path / "converted2"
    assert main(["experts", "import", str(folder), "--format", "mtt", "--out", str(out2)]) == 1
    err = capsys.readouterr().err
    assert "replay_buffer_0.pt" in err and "features.0.0.weight [128, 3, 3, 3]" in err
    assert not out2.exists() and not list(tmp_path.glob(".converted2*"))


def test_cli_actions_parse(capsys):
    parser = build_parser()
    ns = parser.parse_args(["experts", "--epochs", "2"])
    assert ns.action == "train" and ns.source is None
    ns = parser.parse_args(["experts", "import", "d", "--format", "mtt", "--out", "o"])
    assert (ns.action, ns.source, ns.format, ns.out) == ("import", "d", "mtt", "o")
    for argv, what in (
        (["experts", "import", "d", "--out", "o"], "--format"),
        (["experts", "import", "d", "--format", "mtt"], "--out"),
        (["experts", "train", "d"], "is for `hpd-fast experts import`"),
    ):
        assert main(argv) == 2
        assert what in capsys.readouterr().err
