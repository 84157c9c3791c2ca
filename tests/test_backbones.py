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


@pytest.mark.parametrize("payload", [b"junk\n", b"\x80\x02}q\x00", bytes(range(256)) * 4, b"PK\x03\x04broken"],
                         ids=["text", "truncated-pickle", "binary", "broken-zip"])
def test_any_undecodable_weights_file_is_one_checkpoint_error(tmp_path, payload):
    """torch's weights-only unpickler raises KeyError, IndexError, ... on junk: all are one CheckpointError."""
    from medwsol.checkpoint import read_checkpoint

    bad = tmp_path / "w.pth"
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"w.pth: not a readable weights file .*fix:"):
        load_pretrained(build_backbone("resnet18"), bad)
    with pytest.raises(CheckpointError, match=r"w.pth: not a readable checkpoint .*fix:"):
        read_checkpoint(bad)


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


# ------------------------------------------------------------------------------------------ model.pretrained: imagenet
class _Server:
    """A local HTTP server (no network): serves ``files`` by name, or accepts and never answers (``hang``)."""

    def __init__(self, files: dict[str, bytes] | None = None, hang: bool = False) -> None:
        import http.server
        import socket
        import threading

        self.hang = hang
        if hang:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(5)  # the kernel accepts the connection; nobody ever reads or writes
            self.port = self.sock.getsockname()[1]
            return
        served = dict(files or {})

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = served.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        if self.hang:
            self.sock.close()
        else:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty torch.hub cache, and no way out: any URL we did not set fails as on an offline machine."""
    import urllib.error

    from medwsol.methods import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    real_urlopen = backbones.urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        if not str(url).startswith("http://127.0.0.1:"):
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(backbones.urllib.request, "urlopen", local_only)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _weights_file(path):
    torch.manual_seed(3)
    net = build_backbone("resnet18")
    torch.save(net.state_dict(), path)
    return net


def test_imagenet_offline_is_one_line_naming_the_cache(hub):
    with pytest.raises(CheckpointError) as err:
        build_backbone("resnet18", pretrained="imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "cannot download" in msg and "resnet18-f37072fd.pth" in msg and "fix:" in msg
    assert str(hub / "resnet18-f37072fd.pth") in msg
    assert not hub.exists() or not list(hub.iterdir())  # nothing half-written


def test_imagenet_cached_file_is_used_offline(hub):
    hub.mkdir(parents=True)
    ref = _weights_file(hub / "resnet18-f37072fd.pth")
    ours = build_backbone("resnet18", pretrained="imagenet")
    assert torch.equal(ours.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)


def test_imagenet_download_is_verified_and_cached(hub, tmp_path, monkeypatch):
    import hashlib

    from medwsol.methods import backbones

    ref = _weights_file(tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    good = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server = _Server({good: data, "resnet18-00000000.pth": data})
    try:
        monkeypatch.setitem(backbones.IMAGENET_URLS, "resnet18", server.url("resnet18-00000000.pth"))
        with pytest.raises(CheckpointError, match="wrong checksum") as err:
            build_backbone("resnet18", pretrained="imagenet")
        assert "\n" not in str(err.value) and not list(hub.iterdir())  # the bad download is not kept
        monkeypatch.setitem(backbones.IMAGENET_URLS, "resnet18", server.url(good))
        ours = build_backbone("resnet18", pretrained="imagenet", output_stride=8)
        assert torch.equal(ours.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
        assert [p.name for p in hub.iterdir()] == [good]
    finally:
        server.close()


def test_imagenet_download_never_hangs(hub, monkeypatch):
    import time

    from medwsol.methods import backbones

    server = _Server(hang=True)
    try:
        monkeypatch.setitem(backbones.IMAGENET_URLS, "resnet18", server.url("resnet18-f37072fd.pth"))
        monkeypatch.setenv("MEDWSOL_DOWNLOAD_TIMEOUT", "1")
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="cannot download") as err:
            build_backbone("resnet18", pretrained="imagenet")
        assert time.perf_counter() - t0 < 10 and "\n" not in str(err.value)
    finally:
        server.close()


def test_imagenet_urls_cover_every_backbone():
    from medwsol.methods.backbones import IMAGENET_URLS

    assert set(BACKBONES.names()) == set(IMAGENET_URLS)
    with pytest.raises(CheckpointError, match="no ImageNet weights known"):
        from medwsol.methods.backbones import imagenet_weights

        imagenet_weights("resnet152")


def test_local_weights_anywhere_and_in_the_config(tmp_path, monkeypatch):
    from medwsol.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    ref = _weights_file(tmp_path / "mine.pth")
    ours = build_backbone("resnet18", pretrained="~/mine.pth")  # any path, ~ expanded
    assert torch.equal(ours.conv1.weight, ref.conv1.weight)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "pipelines/demo.yaml", overrides=["model.pretrained=imagenet"])  # no file check
    assert cfg.model.pretrained == "imagenet"
    cfg = load_config(root / "pipelines/demo.yaml", overrides=["model.pretrained=~/mine.pth"])
    assert str(cfg.model.pretrained) == "~/mine.pth"


def test_resnet101_builds_with_torchvision_keys():
    net = build_backbone("resnet101", output_stride=32)
    assert net.out_channels == 2048 and len(net.layer3) == 23
    assert "layer3.22.conv3.weight" in net.state_dict() and "layer2.0.downsample.1.running_var" in net.state_dict()
