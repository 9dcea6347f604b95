"""DenseNet121 backbone and the checkpoint formats it loads, with small checkpoints made here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from models.backbone import FEATURE_DIM, DenseNetBackbone, load_backbone_checkpoint
from models.errors import ModelError
from models.imaging import Preprocessing


@pytest.fixture(scope="module")
def torchvision_model() -> nn.Module:
    torch.manual_seed(1)
    return torchvision.models.densenet121(weights=None).eval()


@pytest.fixture(scope="module")
def xrv_like_model() -> nn.Module:
    """torchxrayvision's DenseNet layout: torchvision names, 1-channel conv0, 18-output classifier."""
    torch.manual_seed(2)
    model = torchvision.models.densenet121(weights=None, num_classes=18)
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model.eval()


def reference_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What torchvision's forward feeds its classifier."""
    with torch.no_grad():
        return F.adaptive_avg_pool2d(F.relu(model.features(x)), 1).flatten(1)


def backbone_features(backbone: DenseNetBackbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as pre-0.4 torchvision DenseNet checkpoints had them: norm.1 for norm1, no BatchNorm counters."""
    return {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }


def test_backbone_shapes() -> None:
    backbone = DenseNetBackbone().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone.feature_maps(x)
        pooled = backbone(x)
    assert maps.shape == (2, FEATURE_DIM, 2, 2) and bool((maps >= 0).all())
    assert pooled.shape == (2, FEATURE_DIM)
    torch.testing.assert_close(pooled, maps.mean(dim=(2, 3)))
    assert DenseNetBackbone(in_channels=1).features.conv0.in_channels == 1


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": legacy_names(s), "epoch": torch.tensor(3)},
    ],
    ids=["plain", "state_dict+module", "model+legacy-names"],
)
def test_torchvision_checkpoints(torchvision_model: nn.Module, wrap: object, tmp_path: Path) -> None:
    path = tmp_path / "densenet121.pth"
    torch.save(wrap(torchvision_model.state_dict()), path)  # type: ignore[operator]
    loaded = load_backbone_checkpoint(path)
    assert loaded.source_format == "torchvision"
    assert loaded.preprocessing == Preprocessing()
    assert set(loaded.head_keys) == {"classifier.weight", "classifier.bias"}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone_features(loaded.backbone, x), reference_features(torchvision_model, x))


def test_legacy_names_really_differ(torchvision_model: nn.Module) -> None:
    renamed = legacy_names(torchvision_model.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in renamed
    assert "features.denseblock1.denselayer1.norm1.weight" not in renamed


def test_torchxrayvision_checkpoint(xrv_like_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "xrv-densenet121.pt"
    torch.save(xrv_like_model.state_dict(), path)
    loaded = load_backbone_checkpoint(path)
    assert loaded.source_format == "torchxrayvision"
    assert loaded.backbone.in_channels == 1
    assert loaded.preprocessing == Preprocessing.torchxrayvision()
    assert loaded.preprocessing.channels == 1 and loaded.preprocessing.size == 224
    x = torch.randn(2, 1, 64, 64) * 1024
    torch.testing.assert_close(backbone_features(loaded.backbone, x), reference_features(xrv_like_model, x))


def test_our_own_state_dict_round_trips(tmp_path: Path) -> None:
    backbone = DenseNetBackbone(in_channels=1)
    torch.save(backbone.state_dict(), tmp_path / "ours.pt")
    loaded = load_backbone_checkpoint(tmp_path / "ours.pt")
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(backbone_features(loaded.backbone, x), backbone_features(backbone, x))
    assert loaded.head_keys == ()


def test_mismatched_checkpoint_names_the_keys(torchvision_model: nn.Module) -> None:
    state = dict(torchvision_model.state_dict())
    del state["features.norm5.weight"]
    state["features.extra.weight"] = torch.zeros(3)
    state["features.conv0.weight"] = torch.zeros(32, 3, 7, 7)
    with pytest.raises(ModelError) as caught:
        load_backbone_checkpoint(state)
    message = str(caught.value)
    assert "1 missing keys (e.g. features.norm5.weight)" in message
    assert "1 unexpected keys (e.g. features.extra.weight)" in message
    assert "features.conv0.weight (32, 3, 7, 7) != (64, 3, 7, 7)" in message


def test_other_architecture_is_refused() -> None:
    with pytest.raises(ModelError, match="not a DenseNet121 backbone: .*unexpected keys"):
        load_backbone_checkpoint(torchvision.models.densenet169(weights=None).state_dict())


def test_pickled_model_and_junk_files_are_refused(torchvision_model: nn.Module, tmp_path: Path) -> None:
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "whole-model.pt")
    with pytest.raises(ModelError, match="state_dict"):
        load_backbone_checkpoint(tmp_path / "whole-model.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match="notes.pt"):
        load_backbone_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(ModelError, match="not found"):
        load_backbone_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ModelError, match="not a state dict of tensors"):
        load_backbone_checkpoint({"state_dict": {"features.conv0.weight": [1, 2, 3]}})
