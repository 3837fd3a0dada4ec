"""torchvision backbones with ImageNet weights only from a local file, never the network.

Weights come only from the ``weights_path`` the user names; nothing is picked up from
torchvision's or torch hub's cache folders, so a model is the same on every machine unless
asked otherwise. Without a file the network starts from random initialisation and a warning
says so.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

class BackboneWeightsError(ValueError):
    pass


def build(arch: str, **kwargs) -> nn.Module:
    """A torchvision classification network ``arch`` (e.g. ``resnet18``) at random
    initialisation. Models build with this and never open files; ``SlideModel.load_pretrained``
    (called by ``engines.registry.create``) fills in the weights the config names."""
    ctor = getattr(torchvision.models, arch, None)
    if ctor is None:
        raise BackboneWeightsError(f"torchvision has no model named {arch!r}")
    if arch == "inception_v3":
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return ctor(weights=None, **kwargs)


def load_weights(net: nn.Module, arch: str, weights_path: str | os.PathLike | None) -> nn.Module:
    """Copy ImageNet weights from the local file ``weights_path`` into ``net`` (a network
    ``build(arch)`` made, possibly with its classifier replaced); without a file the network
    keeps its random weights and a warning says so. Modules that share layers with ``net``
    (a trunk cut from it) see the new weights too: they are copied in place."""
    if not weights_path:
        log.warning("%s starts from random weights (no local ImageNet weights file given)", arch)
        return net
    path = Path(weights_path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise BackboneWeightsError(f"{path}: not a readable weights file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # The classifier may differ from ImageNet's 1000 classes: keep only matching shapes.
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise BackboneWeightsError(f"{path}: holds no weights for {arch}")
    missing = [k for k in own if k not in usable and not k.startswith(("fc.", "AuxLogits."))]
    net.load_state_dict(usable, strict=False)
    if missing:
        log.warning("%s: %d tensors not in %s stay random", arch, len(missing), path.name)
    log.info("%s weights loaded from %s", arch, path)
    return net


def resnet_trunk(arch: str = "resnet18", *, drop_pool: bool = True) -> tuple[nn.Sequential, nn.Module]:
    """A ResNet up to its last block (no average pool, no fc): (B,3,H,W) -> (B,C,H/32,W/32),
    and the whole network it shares its layers with (what ``load_weights`` takes)."""
    net = build(arch)
    layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    if not drop_pool:
        layers.append(net.avgpool)
    return nn.Sequential(*layers), net


def conv_stages(chans: list[int], stride: int = 2) -> list[nn.Module]:
    """3x3 conv -> GroupNorm -> ReLU for each step of ``chans`` (the small CNNs of the tiny
    presets). GroupNorm rather than BatchNorm: these nets see one slide per step, so a batch
    is the patches of one slide (or a single thumbnail); BatchNorm would then normalise away
    what sets a slide apart and behave differently in training and in inference."""
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                   nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU(inplace=True)]
    return layers


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a (B,3,H,W) tensor in [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
