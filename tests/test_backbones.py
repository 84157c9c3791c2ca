"""Backbones: output strides, local pretrained weights in torchvision/MONAI layouts, clear errors."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

from medwsol.errors import CheckpointError, RegistryError
from medwsol.methods.backbones import ImageNetNorm, build_backbone, load_pretrained
from medwsol.methods.catalog import BACKBONES

torch.set_num_threads(1)


def torchvision_keys(depth: int) -> list[str]:
    """torchvision's ResNet state-dict keys, written from its naming scheme (not from our model)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    convs = ["conv1", "conv2", "conv3"] if depth == 50 else ["conv1", "conv2"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for stage, n in enumerate(blocks, start=1):
        for i in range(n):
            for j, conv in enumerate(convs, start=1):
                keys.append(f"layer{stage}.{i}.{conv}.weight")
                keys += [f"layer{stage}.{i}.bn{j}.{b}" for b in bn]
            if i == 0 and (stage > 1 or depth == 50):
                keys.append(f"layer{stage}.{i}.downsample.0.weight")
                keys += [f"layer{stage}.{i}.downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_output_stride_shapes(output_stride, size):
    net = build_backbone("resnet18", output_stride=output_stride).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 3, *size))
    h, w = (math.ceil(s / output_stride) for s in size)
    assert tuple(y.shape) == (1, 512, h, w)
    assert net.out_channels == 512 and net.output_stride == output_stride


def test_all_registered_backbones_build():
    assert {"resnet18", "resnet34", "resnet50"} <= set(BACKBONES.names())
    net = build_backbone("resnet50", output_stride=32).eval()
    with torch.no_grad():
        y = net(torch.rand(1, 3, 64, 64))
    assert tuple(y.shape) == (1, 2048, 2, 2) and net.out_channels == 2048


def test_dilation_replaces_stride():
    net = build_backbone("resnet18", output_stride=8)
    assert net.layer3[0].conv1.stride == (1, 1) and net.layer3[0].downsample[0].stride == (1, 1)
    assert net.layer3[1].conv1.dilation == (2, 2) and net.layer4[1].conv2.dilation == (4, 4)
    assert net.layer4[0].conv1.dilation == (2, 2)  # first block keeps the previous dilation
    plain = build_backbone("resnet18", output_stride=32)
    assert plain.layer4[0].conv1.stride == (2, 2) and plain.layer4[0].conv1.dilation == (1, 1)


@pytest.mark.parametrize("depth", [18, 50])
def test_keys_are_torchvision_layout(depth):
    own = set(build_backbone(f"resnet{depth}").state_dict())
    assert own == set(torchvision_keys(depth)) - {"fc.weight", "fc.bias"}


def test_torchvision_state_dict_loads_and_changes_weights(tmp_path):
    ref = build_backbone("resnet18", output_stride=32)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key in torchvision_keys(18):
        if key == "fc.weight":
            sd[key] = torch.randn(1000, 512, generator=gen)
        elif key == "fc.bias":
            sd[key] = torch.randn(1000, generator=gen)
        elif key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        else:
            sd[key] = torch.rand(shapes[key], generator=gen) + 0.5  # positive, so running_var is valid
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(sd, path)
    net = build_backbone("resnet18", pretrained=path, output_stride=16)
    assert torch.equal(net.conv1.weight, sd["conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    assert torch.equal(net.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])
    assert not torch.equal(ref.conv1.weight, net.conv1.weight)
    # DataParallel prefix and a {"state_dict": ...} wrapper, without num_batches_tracked (old checkpoints)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    again = build_backbone("resnet18", pretrained=tmp_path / "wrapped.pth", output_stride=8)
    assert torch.equal(again.layer3[0].conv2.weight, sd["layer3.0.conv2.weight"])


def test_monai_layout_loads(tmp_path):
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
                   shortcut_type="B", bias_downsample=False, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "monai.pt")
    ours = build_backbone("resnet18", pretrained=tmp_path / "monai.pt")
    assert torch.equal(ours.layer1[0].conv1.weight, net.layer1[0].conv1.weight)


def test_pretrained_emits_no_warning(tmp_path):
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_backbone("resnet18", pretrained=tmp_path / "w.pt")
        build_backbone("resnet18")
    assert caught == []


def test_mismatched_file_names_file_and_keys(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(build_backbone("resnet34").state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_backbone("resnet18", pretrained=path)
    msg = str(err.value)
    assert str(path) in msg and "unexpected" in msg and "layer1.2." in msg and "fix:" in msg
    assert "\n" not in msg

    bad_shape = tmp_path / "r50.pt"
    torch.save(build_backbone("resnet50").state_dict(), bad_shape)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_backbone("resnet18", pretrained=bad_shape)


def test_unreadable_or_missing_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        build_backbone("resnet18", pretrained=junk)
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("resnet18", pretrained=tmp_path / "absent.pt")
    torch.save({"epoch": 3}, tmp_path / "nodict.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "nodict.pt")


def test_unknown_backbone():
    with pytest.raises(RegistryError, match="resnet18"):
        build_backbone("resnet81")


def test_imagenet_norm():
    norm = ImageNetNorm()
    assert dict(norm.state_dict()) == {}
    x = torch.rand(2, 3, 4, 5)
    y = norm(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(y, (x - mean) / std)


def test_methods_package_is_torch_free():
    code = "import sys, medwsol.methods as m; assert 'torch' not in sys.modules, 'torch imported'; print(m.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
