"""Image upscaler networks as their files hold them: ESRGAN, Real-ESRGAN and Real-ESRGAN's compact SRVGGNet.

These are the model upscalers AUTOMATIC1111 offers beside Lanczos (its "R-ESRGAN 4x+", "4x-UltraSharp"
and the like). The reference code (BasicSR, spandrel) needs torchvision, which does not install
beside our torch, and each network is a few convolutions: so they are written here, with the
reference's parameter names, and a file's layout decides which one it is and its sizes.

Four layouts are read:
- Real-ESRGAN's RRDBNet (`conv_first`, `body.N.rdb1.conv1`, ..., `conv_last`), the plain state dict
  or under `params_ema` / `params` as its releases ship it. Its 2x and 1x models take the image
  pixel-unshuffled (12 or 48 input channels) and still upsample twice.
- The original ESRGAN's (`model.0`, `model.1.sub.N.RDB1.conv1.0`, ...; 4x-UltraSharp and most
  community models): the same network, one nearest-neighbour x2 and convolution per factor of 2.
- ESRGAN's first release (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`, `HRconv`:
  RRDB_ESRGAN_x4.pth, A1111's "ESRGAN_4x").
- SRVGGNetCompact (`body.0` ... with PReLUs; realesr-general-x4v3, realesr-animevideov3).

`.safetensors` are read as tensors; anything else (`.pth`, `.pt`) with torch.load(weights_only=True),
which restores tensors and plain containers only, so a hostile pickle cannot run code.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from difftrain.errors import UpscalerError


class _DenseBlock(nn.Module):
    """ESRGAN's ResidualDenseBlock: five convolutions, each seeing all earlier outputs; scaled residual."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        for index in range(5):
            out = features if index == 4 else growth
            setattr(self, f"conv{index + 1}", nn.Conv2d(features + index * growth, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for index in range(1, 5):
            outputs.append(F.leaky_relu(getattr(self, f"conv{index}")(torch.cat(outputs, 1)), 0.2))
        return self.conv5(torch.cat(outputs, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. `unshuffle`: the input's pixel-unshuffle factor (Real-ESRGAN x2: 2, x1: 4);
    `doublings`: nearest x2 + conv steps; scale = 2**doublings / unshuffle."""

    def __init__(self, features: int = 64, blocks: int = 23, growth: int = 32, doublings: int = 2,
                 unshuffle: int = 1, channels: int = 3):
        super().__init__()
        self.unshuffle, self.doublings = unshuffle, doublings
        self.scale = 2**doublings // unshuffle
        self.conv_first = nn.Conv2d(channels * unshuffle**2, features, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for index in range(doublings):
            setattr(self, f"conv_up{index + 1}", nn.Conv2d(features, features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for index in range(self.doublings):
            upsampled = F.interpolate(features, scale_factor=2, mode="nearest")
            features = F.leaky_relu(getattr(self, f"conv_up{index + 1}")(upsampled), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(features), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: convolutions and PReLUs at the input's size, a pixel shuffle, plus the
    input upsampled by nearest neighbour."""

    def __init__(self, features: int = 64, convs: int = 16, scale: int = 4, channels: int = 3):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, channels * scale**2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shuffled = F.pixel_shuffle(self.body(x), self.scale)
        return shuffled + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file (unwrapped from Real-ESRGAN's `params_ema`/`params`)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UpscalerError(f"upscaler {path} does not exist") from None
    except Exception as reason:  # a damaged file, or a pickle of more than tensors (refused by weights_only)
        raise UpscalerError(f"upscaler {path} cannot be read as weights: {str(reason).splitlines()[0]}") from None
    if isinstance(state, dict):
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) or not state:
        raise UpscalerError(f"upscaler {path} holds no state dict of tensors")
    return state


def _count(state: dict, pattern: str) -> int:
    return len({match[1] for key in state if (match := re.fullmatch(pattern, key))})


def _from_original_esrgan(state: dict) -> dict:
    """The original ESRGAN's names as Real-ESRGAN's: model.0 conv_first, model.1.sub.N the RRDBs and (last)
    conv_body, then the upsampling convolutions, conv_hr and conv_last in the order of their indices."""
    blocks = _count(state, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
    renamed, tail = {}, set()
    for key, value in state.items():
        if match := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            block, rdb, conv, kind = match.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif match := re.fullmatch(rf"model\.1\.sub\.{blocks}\.(weight|bias)", key):
            renamed[f"conv_body.{match[1]}"] = value
        elif match := re.fullmatch(r"model\.0\.(weight|bias)", key):
            renamed[f"conv_first.{match[1]}"] = value
        elif match := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key):
            tail.add(int(match[1]))
        else:
            raise UpscalerError(f"an ESRGAN layout with a key this reader does not know: {key}")
    tail_names = [f"conv_up{i + 1}" for i in range(len(tail) - 2)] + ["conv_hr", "conv_last"]
    for index, name in zip(sorted(tail), tail_names):
        for kind in ("weight", "bias"):
            renamed[f"{name}.{kind}"] = state[f"model.{index}.{kind}"]
    return renamed


# The first ESRGAN release's own names (RRDB_ESRGAN_x4.pth, A1111's "ESRGAN_4x") as Real-ESRGAN's.
_FIRST_RELEASE = [(r"RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2."), (r"trunk_conv\.", "conv_body."),
                  (r"upconv(\d)\.", r"conv_up\1."), (r"HRconv\.", "conv_hr.")]


def _from_first_release(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        for pattern, name in _FIRST_RELEASE:
            key = re.sub(rf"^{pattern}", name, key)
        renamed[key] = value
    return renamed


def network_for(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """(the state under the names of the network it is the weights of; that network, built at the sizes the
    state holds, its weights not yet loaded)."""
    if "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state:
        state = _from_original_esrgan(state)
    elif "RRDB_trunk.0.RDB1.conv1.weight" in state:
        state = _from_first_release(state)
    if "conv_first.weight" in state:
        first = state["conv_first.weight"]
        unshuffle = math.isqrt(first.shape[1] // state["conv_last.weight"].shape[0])
        return state, RRDBNet(features=first.shape[0], blocks=_count(state, r"body\.(\d+)\.rdb1\.conv1\.weight"),
                              growth=state["body.0.rdb1.conv1.weight"].shape[0],
                              doublings=_count(state, r"conv_up(\d+)\.weight"), unshuffle=unshuffle,
                              channels=state["conv_last.weight"].shape[0])
    convs = sorted(int(m[1]) for key in state if (m := re.fullmatch(r"body\.(\d+)\.weight", key))
                   and state[key].ndim == 4)
    if convs and convs[0] == 0 and "body.1.weight" in state and state["body.1.weight"].ndim == 1:
        channels = state["body.0.weight"].shape[1]
        return state, SRVGGNetCompact(features=state["body.0.weight"].shape[0], convs=len(convs) - 2,
                                      scale=math.isqrt(state[f"body.{convs[-1]}.weight"].shape[0] // channels),
                                      channels=channels)
    raise UpscalerError("not an ESRGAN, Real-ESRGAN or SRVGGNet (realesr-*) upscaler; its first keys: "
                        + ", ".join(list(state)[:4]))


def load_upscaler(path: str | Path) -> nn.Module:
    """The upscaler network in `path`, its weights loaded, in eval mode; `.scale` is its factor."""
    path = Path(path)
    state = read_state(path)
    try:
        state, network = network_for(state)
        network.load_state_dict(state)
    except UpscalerError as reason:
        raise UpscalerError(f"upscaler {path}: {reason}") from None
    except (RuntimeError, KeyError, IndexError) as reason:  # sizes or names that do not fit the layout it looked like
        raise UpscalerError(f"upscaler {path}: its tensors do not fit the network they look like: "
                            f"{str(reason).splitlines()[0]}") from None
    return network.eval().requires_grad_(False)
