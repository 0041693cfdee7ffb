"""ResNet-18/34/50/101 backbones for dense prediction.

Module names follow torchvision's ResNet exactly (``conv1``, ``bn1``, ``relu``,
``maxpool``, ``layer1`` .. ``layer4``; inside blocks ``conv1``/``bn1``/``conv2``/
``bn2``/(``conv3``/``bn3``)/``downsample.0``/``downsample.1``), so an ImageNet
state dict saved by torchvision loads key for key.  The classifier (``avgpool``
and ``fc``) is left out: segmentation heads consume the feature maps instead,
and :func:`load_torchvision_weights` drops the ``fc.*`` keys of such a file.

For segmentation the last stage(s) trade stride for dilation (as in DeepLab):
output stride 16 dilates ``layer4``; output stride 8 dilates ``layer3`` and
``layer4``.  The receptive field stays that of the ImageNet network while the
feature map keeps 1/16 or 1/8 of the input resolution.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from rmi_triton.files import load_refusal

NormLayer = Callable[[int], nn.Module]

OUTPUT_STRIDES: Tuple[int, ...] = (8, 16)

# Which of layer2/layer3/layer4 swap their stride-2 for dilation.
_DILATE_BY_OUTPUT_STRIDE: Dict[int, Tuple[bool, bool, bool]] = {
    16: (False, False, True),
    8: (False, True, True),
}


def check_choice(kind: str, value: str, choices: Tuple[str, ...]) -> None:
    """Raise unless ``value`` is one of the names in ``choices`` (``kind`` names what it picks).

    Raises:
        TypeError: not a str.
        ValueError: a str that is not one of ``choices``.
    """
    if not isinstance(value, str):
        raise TypeError(f"the {kind} must be named by a str, one of {choices}; "
                        f"got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {choices}")


def check_output_stride(output_stride: int) -> None:
    """Raise unless ``output_stride`` is the int 8 or 16.

    A float (``16.0``) or a bool compares equal to an allowed value but would
    turn dilations and atrous rates into floats that fail only at forward time.

    Raises:
        TypeError: not an int (or a bool).
        ValueError: an int other than 8 or 16.
    """
    if isinstance(output_stride, bool) or not isinstance(output_stride, int):
        raise TypeError(f"output_stride must be an int, one of {OUTPUT_STRIDES}; "
                        f"got {type(output_stride).__name__} {output_stride!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")


def init_norm_as_identity(m: nn.Module) -> None:
    """A norm layer's affine part as the identity (weight 1, bias 0); one built without it
    (``affine=False``) has nothing to set."""
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution whose padding keeps the size (up to stride) for any dilation."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride,
        padding=dilation, dilation=dilation, bias=False,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a norm layer always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Input ``[N, inplanes, H, W]`` -> output ``[N, planes, H/stride, W/stride]``.
    Unlike torchvision's block this one accepts ``dilation > 1``: both 3x3
    convolutions use it, which is what dilating a stage of ResNet-18/34 needs.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided / dilated) -> 1x1 expand, plus residual (ResNet-50/101).

    Input ``[N, inplanes, H, W]`` -> output ``[N, 4 * planes, H/stride, W/stride]``.
    The stride sits on the 3x3 convolution ("ResNet v1.5"), as in torchvision,
    so torchvision's ImageNet weights fit.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of all four stages.

    ``forward(x)`` with ``x`` of shape ``[N, 3, H, W]`` returns a dict with
    ``"layer1"`` ``[N, C1, ceil(H/4), ceil(W/4)]`` (stride 4, used as
    DeepLabv3+'s low-level features), ``"layer2"`` (stride 8), ``"layer3"``
    (stride 8 or 16) and ``"layer4"`` (stride ``output_stride``).  The channel
    counts are in ``self.channels``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        output_stride: int = 16,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        check_output_stride(output_stride)
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.output_stride = output_stride
        dilate = _DILATE_BY_OUTPUT_STRIDE[output_stride]

        # The stem downsamples by 4: stride-2 conv then stride-2 max pool.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # _make_layer threads the running (inplanes, dilation) state through the stages.
        self._inplanes = 64
        self._dilation = 1
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0], norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1], norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2], norm_layer)
        del self._inplanes, self._dilation

        self.channels: Dict[str, int] = {
            f"layer{i + 1}": width * block.expansion
            for i, width in enumerate((64, 128, 256, 512))
        }
        self._init_weights()

    def _make_layer(
        self,
        block: Block,
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
        norm_layer: NormLayer,
    ) -> nn.Sequential:
        """One stage of ``blocks`` residual blocks; a dilated stage keeps stride 1.

        As in torchvision, the first block of a dilated stage still uses the
        previous stage's dilation and only the following blocks use the new
        one, so the grid the first block sees matches the strided network.
        """
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            # Projection shortcut when the residual's shape changes.
            downsample = nn.Sequential(
                conv1x1(self._inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers: List[nn.Module] = [
            block(self._inplanes, planes, stride, previous_dilation, downsample, norm_layer)
        ]
        self._inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self._inplanes, planes, 1, self._dilation, None, norm_layer))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init for ReLU networks; norm layers start as identity.  Pretrained
        # weights, when given, overwrite all of it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                init_norm_as_identity(m)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return {"layer1": c1, "layer2": c2, "layer3": c3, "layer4": c4}


# name -> (block, blocks per stage); the layouts of the ResNet paper.
_RESNET_SPECS: Dict[str, Tuple[Block, Tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}

BACKBONES: Tuple[str, ...] = tuple(_RESNET_SPECS)


def build_resnet(
    name: str,
    output_stride: int = 16,
    norm_layer: Optional[NormLayer] = None,
    pretrained: Optional[Union[str, os.PathLike]] = None,
) -> ResNet:
    """Build the ResNet called ``name`` (one of :data:`BACKBONES`).

    ``pretrained`` is an optional path to a local torchvision-format state
    dict (see :func:`load_torchvision_weights`); nothing is downloaded.

    Raises:
        TypeError: ``name`` not a str, ``output_stride`` not an int.
        ValueError: unknown ``name``, ``output_stride`` not 8 or 16.
    """
    check_choice("backbone", name, BACKBONES)
    block, layers = _RESNET_SPECS[name]
    model = ResNet(block, layers, output_stride=output_stride, norm_layer=norm_layer)
    if pretrained is not None:
        load_torchvision_weights(model, pretrained, backbone_name=name)
    return model


def _preview(items: Sequence[str], limit: int = 8) -> str:
    """Comma-joined first ``limit`` items, noting how many were left out."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _describe_non_state_dict(obj: object) -> str:
    """What a file holds instead of a state dict, naming where a nested one sits.

    Training scripts often save ``{"state_dict": {...}, "epoch": ...}``; the
    nested state dict is not taken silently, since its keys may carry prefixes
    (``module.``, ``backbone.``) that only the user knows how to strip.
    """
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    nested = [repr(k) for k, v in obj.items() if _is_state_dict(v) and v]
    others = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
              if not isinstance(v, Tensor) and not (_is_state_dict(v) and v)]
    text = f"a {type(obj).__name__}"
    if others:
        text += f" with non-tensor entries {_preview(others)}"
    if nested:
        text += (
            f"; a state dict is nested under {_preview(nested)}: save that mapping on its own "
            f"(e.g. torch.save(torch.load(path)[{nested[0]}], new_path)) and pass new_path"
        )
    return text


def load_torchvision_weights(
    model: ResNet,
    path: Union[str, os.PathLike],
    backbone_name: str = "the backbone",
) -> None:
    """Copy a torchvision-format ResNet state dict from ``path`` into ``model``.

    The file is read with ``torch.load(path, map_location="cpu",
    weights_only=True)``, so it must be a plain state dict (no pickled code).
    ``fc.*`` keys (the ImageNet classifier) are ignored.  ``num_batches_tracked``
    buffers may be absent, because the older torchvision model-zoo files predate
    them; every other key must be present with the right shape.

    Raises:
        FileNotFoundError: ``path`` is not an existing file.
        ValueError: the file cannot be read, is not a mapping of names to
            tensors, or its keys/shapes do not fit ``model``; the message names
            the path and the missing, unexpected and mis-shaped keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights for {backbone_name} not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"could not read pretrained weights from {path!r}: {load_refusal(exc)}") from None
    if not _is_state_dict(state):
        raise ValueError(
            f"{path!r} does not hold a state dict (a mapping of parameter names to "
            f"tensors) but {_describe_non_state_dict(state)}"
        )

    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in state and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_preview(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped keys: {_preview(misshaped)}")
        raise ValueError(
            f"pretrained weights in {path!r} do not fit {backbone_name} "
            f"(expected a torchvision-format ResNet state dict); " + "; ".join(problems)
        )
    # strict=False only to tolerate absent num_batches_tracked; all else was checked above.
    model.load_state_dict(state, strict=False)
