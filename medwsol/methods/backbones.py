"""Feature extractors: MONAI's 2D ResNets without pooling/classifier, optionally dilated.

The backbones are ``monai.networks.nets.resnet18/34/50/101`` built in their 2D,
ImageNet-shaped configuration (7x7 stride-2 stem, max-pool, 1x1-conv shortcuts
without bias), so that their parameter names are exactly torchvision's
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ...) and a
torchvision ImageNet checkpoint loads without renaming (``pretrained="imagenet"``
downloads torchvision's weights once into torch.hub's cache: :func:`imagenet_weights`).

Output stride: 32 is the plain ResNet; 16 replaces the stride of ``layer4`` by
dilation 2, 8 additionally replaces the stride of ``layer3`` by dilation 2 (and
``layer4``'s becomes 4), as DeepLab / torchvision's
``replace_stride_with_dilation`` do: the first block of a dilated stage keeps the
previous dilation, the others use the new one, and the shortcut 1x1 convs lose
their stride. Spatial size of the output is ``ceil(H / output_stride)``.

Inputs are ImageNet-normalised RGB; methods receive RGB in [0, 1] and apply
:class:`ImageNetNorm` themselves.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from medwsol.errors import CheckpointError
from medwsol.methods.catalog import BACKBONES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetNorm",
    "ResNetFeatures",
    "build_backbone",
    "load_pretrained",
    "imagenet_weights",
    "IMAGENET_URLS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PREFIXES = ("module.", "backbone.", "model.", "encoder.")

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
"""torchvision's ImageNet (``IMAGENET1K_V1``) ResNet weights; the file name carries a SHA-256 prefix."""

DOWNLOAD_TIMEOUT_S = 20.0
"""Seconds allowed to connect and between two received chunks (``MEDWSOL_DOWNLOAD_TIMEOUT`` overrides)."""


class ImageNetNorm(nn.Module):
    """``(x - mean) / std`` with ImageNet statistics; non-persistent buffers (not in state dicts).

    Example:
        >>> import torch
        >>> from medwsol.methods.backbones import ImageNetNorm
        >>> y = ImageNetNorm()(torch.full((1, 3, 2, 2), 0.5))
        >>> round(float(y[0, 0, 0, 0]), 3)
        0.066
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ResNetFeatures(nn.Module):
    """The convolutional trunk of a MONAI 2D ResNet: ``[B,3,H,W] -> [B,C,ceil(H/os),ceil(W/os)]``.

    The stem and the four stages are taken from the MONAI network (same
    attribute names, hence torchvision's state-dict keys); its average pooling
    and ``fc`` are dropped.

    Args:
        net: a ``monai.networks.nets.ResNet`` built with ``spatial_dims=2``.
        out_channels: channels of ``layer4``'s output.
        output_stride: 8, 16 or 32.
        arch: name used in messages (``resnet18`` ...).

    Attributes:
        out_channels: number of output feature channels (512 for resnet18/34, 2048 for resnet50/101).
        output_stride: the total downsampling factor.
    """

    def __init__(self, net: nn.Module, out_channels: int, output_stride: int = 16, arch: str = "resnet") -> None:
        super().__init__()
        self.arch = arch
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.act = net.act
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.out_channels = out_channels
        self.output_stride = output_stride
        if output_stride == 8:
            _dilate_stage(self.layer3, previous=1, dilation=2)
            _dilate_stage(self.layer4, previous=2, dilation=4)
        elif output_stride == 16:
            _dilate_stage(self.layer4, previous=1, dilation=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate_stage(stage: nn.Sequential, previous: int, dilation: int) -> None:
    """Replace the stride-2 of a ResNet stage by dilation (in place)."""
    for i, block in enumerate(stage):
        d = previous if i == 0 else dilation
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3):
                conv.stride = (1, 1)
                conv.dilation = (d, d)
                conv.padding = (d, d)
        down = getattr(block, "downsample", None)
        if isinstance(down, nn.Sequential):
            down[0].stride = (1, 1)
        if hasattr(block, "stride"):
            block.stride = 1


def _monai_resnet(depth: int) -> tuple[nn.Module, int]:
    from monai.networks.nets import resnet18, resnet34, resnet50, resnet101

    factory = {18: resnet18, 34: resnet34, 50: resnet50, 101: resnet101}[depth]
    net = factory(
        pretrained=False,
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )
    return net, 2048 if depth >= 50 else 512


def _make_factory(depth: int) -> Callable[..., ResNetFeatures]:
    def factory(pretrained: str | Path | None = None, output_stride: int = 16) -> ResNetFeatures:
        net, channels = _monai_resnet(depth)
        model = ResNetFeatures(net, channels, output_stride, arch=f"resnet{depth}")
        if pretrained is not None:
            path = imagenet_weights(f"resnet{depth}") if str(pretrained) == "imagenet" else pretrained
            load_pretrained(model, path)
        return model

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"MONAI 2D ResNet-{depth} feature extractor (see :func:`build_backbone`)."
    return factory


for _depth in (18, 34, 50, 101):
    BACKBONES.register(f"resnet{_depth}")(_make_factory(_depth))


def _timeout() -> float:
    try:
        return float(os.environ.get("MEDWSOL_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT_S))
    except ValueError:
        return DOWNLOAD_TIMEOUT_S


def _open_with_deadline(url: str, timeout: float):
    """``urlopen`` in a daemon thread, so that not even a stuck name lookup outlives ``timeout``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["response"] = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (fixed https URL)
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name="medwsol-download", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no connection within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["response"]


def imagenet_weights(arch: str, cache_dir: str | Path | None = None) -> Path:
    """Local path of torchvision's ImageNet weights for ``arch``, downloaded once into a cache.

    The cache is torch.hub's (``$TORCH_HOME/hub/checkpoints``, the folder torchvision uses too),
    so a file downloaded elsewhere with torchvision, or copied there by hand, is found offline.
    A download is verified against the SHA-256 prefix in the file name, written to a temporary
    file and renamed, and gives up after ``MEDWSOL_DOWNLOAD_TIMEOUT`` seconds (20) without
    progress; no network means one line, never a hang.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        cache_dir: folder to look in and download to (default: torch.hub's ``checkpoints``).

    Returns:
        The path of the cached ``.pth`` file.

    Raises:
        CheckpointError: unknown ``arch``, no network, a timeout or a corrupted download.
    """
    url = IMAGENET_URLS.get(arch)
    if url is None:
        raise CheckpointError(f"model.pretrained=imagenet: no ImageNet weights known for {arch!r}; "
                              f"fix: use one of {sorted(IMAGENET_URLS)} or a local .pth")
    import torch.hub

    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    name = url.rsplit("/", 1)[-1]
    dest = folder / name
    if dest.is_file():
        return dest
    expected = name.rsplit("-", 1)[-1].split(".")[0]
    timeout = _timeout()
    fix = (f"fix: download it on a machine with network (it is cached as {dest}) and copy it there, "
           "or set model.pretrained to a local .pth")
    tmp = dest.with_name(f".{name}.{os.getpid()}.part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with _open_with_deadline(url, timeout) as response, open(tmp, "wb") as out:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        if not digest.hexdigest().startswith(expected):
            raise CheckpointError(f"model.pretrained=imagenet: {url} downloaded with a wrong checksum "
                                  f"(sha256 {digest.hexdigest()[:8]}..., expected {expected}...); {fix}")
        os.replace(tmp, dest)
    except CheckpointError:
        raise
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise CheckpointError(f"model.pretrained=imagenet: cannot download {url} ({type(err).__name__}: "
                              f"{str(reason).strip()[:120]}); {fix}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def build_backbone(name: str, pretrained: str | Path | None = None, output_stride: int = 16) -> ResNetFeatures:
    """Build a registered feature extractor.

    Args:
        name: a name in ``BACKBONES`` (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``).
        pretrained: ``"imagenet"`` (torchvision's ImageNet weights, downloaded once and cached,
            see :func:`imagenet_weights`) or a local weights file (torchvision or MONAI key
            layout; ``fc.*`` is ignored).
        output_stride: 8, 16 (dilated last stage(s)) or 32 (plain ResNet).

    Returns:
        A module mapping ImageNet-normalised ``[B,3,H,W]`` to
        ``[B, out_channels, ceil(H/os), ceil(W/os)]``, with ``.out_channels``.

    Raises:
        CheckpointError: the weights file is missing, unreadable or does not match, or the
            ImageNet download fails.

    Example:
        >>> import torch
        >>> from medwsol.methods.backbones import build_backbone
        >>> net = build_backbone("resnet18", output_stride=16)
        >>> tuple(net(torch.zeros(1, 3, 70, 90)).shape), net.out_channels
        ((1, 512, 5, 6), 512)
    """
    return BACKBONES.get(name)(pretrained=pretrained, output_stride=output_stride)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: not a state dict of tensors; fix: save the ResNet's state_dict() (torchvision or MONAI layout)"
        )
    return obj


def _rename(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local ResNet weights file into a :class:`ResNetFeatures` (in place).

    Accepted layouts: torchvision's ``resnetNN`` state dict, MONAI's 2D ResNet
    (``shortcut_type="B"``) and either wrapped in ``{"state_dict": ...}`` or with
    ``module.``/``backbone.``/``model.``/``encoder.`` prefixes. ``fc.*`` entries are
    ignored; a missing ``num_batches_tracked`` is tolerated. Anything else that
    does not match (missing/unexpected keys, shapes) is a CheckpointError naming
    the file and the first offending keys.

    Args:
        model: the feature extractor to fill.
        path: local file written by ``torch.save``; read with ``weights_only=True``.

    Returns:
        ``model``.

    Example:
        >>> import torch, tempfile, os
        >>> from medwsol.methods.backbones import build_backbone, load_pretrained
        >>> a, b = build_backbone("resnet18"), build_backbone("resnet18")
        >>> f = os.path.join(tempfile.mkdtemp(), "r18.pt"); torch.save(a.state_dict(), f)
        >>> _ = load_pretrained(b, f)
        >>> bool(torch.equal(a.conv1.weight, b.conv1.weight))
        True
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p}: pretrained weights not found; fix: give the path of a local ResNet state dict")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's legacy unpickler raises anything (KeyError, IndexError...) on junk
        text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        first = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise CheckpointError(
            f"{p}: not a readable weights file ({first}); fix: save it with torch.save(state_dict)"
        ) from None
    raw = _extract_state_dict(obj, p)
    state = {}
    for key, value in raw.items():
        new = _rename(key)
        if new.startswith("fc."):
            continue
        state[new] = value
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = [
        f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if problems:
        arch = getattr(model, "arch", type(model).__name__)
        raise CheckpointError(
            f"{p}: weights do not match the {arch} backbone ({'; '.join(problems)}); "
            "fix: use the torchvision/MONAI ImageNet weights of the same ResNet depth"
        )
    model.load_state_dict(state, strict=False)
    return model
