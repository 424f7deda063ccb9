"""Model upscalers (ESRGAN, Real-ESRGAN, SRVGGNet): each file layout against the network written out by hand
from BasicSR's definitions, A1111's tiles and passes, and refusals that name the file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from difftrain.generate.upscale import (a1111_name, find_upscaler, split_grid, upscale, upscale_once,
                                        upscaler_files)
from difftrain.models.upscalers import UpscalerError, load_upscaler

FEATURES, GROWTH, BLOCKS = 8, 4, 2


def original_esrgan(doublings: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original ESRGAN's names (architecture/RRDBNet_arch.py's nn.Sequential: model.0 the
    first conv, model.1.sub the RRDBs then the trunk conv, then per x2 an upsample and a conv with its LeakyReLU,
    then the HR conv, a LeakyReLU and the last conv)."""
    generator = torch.Generator().manual_seed(seed)

    def conv(into: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(out, into, 3, 3, generator=generator) * 0.1, torch.randn(out, generator=generator) * 0.1

    convs = {"model.0": conv(3, FEATURES)}
    for block in range(BLOCKS):
        for rdb in (1, 2, 3):
            for index in range(5):
                out = FEATURES if index == 4 else GROWTH
                convs[f"model.1.sub.{block}.RDB{rdb}.conv{index + 1}.0"] = conv(FEATURES + index * GROWTH, out)
    convs[f"model.1.sub.{BLOCKS}"] = conv(FEATURES, FEATURES)
    tail = [3 * (i + 1) for i in range(doublings)]  # 4x: model.3 and model.6
    convs.update({f"model.{i}": conv(FEATURES, FEATURES) for i in tail})
    convs[f"model.{tail[-1] + 2}"] = conv(FEATURES, FEATURES)
    convs[f"model.{tail[-1] + 4}"] = conv(FEATURES, 3)
    return {f"{name}.{kind}": tensor for name, pair in convs.items() for kind, tensor in zip(("weight", "bias"), pair)}


def as_real_esrgan(state: dict, doublings: int = 2) -> dict[str, torch.Tensor]:
    """The same tensors under Real-ESRGAN's RRDBNet names, renamed one by one."""
    tail = [3 * (i + 1) for i in range(doublings)]
    names = {"model.0": "conv_first", f"model.1.sub.{BLOCKS}": "conv_body", f"model.{tail[-1] + 2}": "conv_hr",
             f"model.{tail[-1] + 4}": "conv_last", **{f"model.{i}": f"conv_up{n + 1}" for n, i in enumerate(tail)}}
    renamed = {}
    for key, tensor in state.items():
        layer, kind = key.rsplit(".", 1)
        if layer.startswith("model.1.sub.") and layer.endswith(".0"):
            _, _, _, block, rdb, conv, _ = layer.split(".")
            renamed[f"body.{block}.rdb{rdb[3:]}.{conv}.{kind}"] = tensor
        else:
            renamed[f"{names[layer]}.{kind}"] = tensor
    return renamed


def as_first_release(state: dict) -> dict[str, torch.Tensor]:
    """The same 4x tensors under the first ESRGAN release's names (RRDB_ESRGAN_x4.pth)."""
    names = {"conv_first": "conv_first", "conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2",
             "conv_hr": "HRconv", "conv_last": "conv_last"}
    renamed = {}
    for key, tensor in as_real_esrgan(state).items():
        layer, kind = key.rsplit(".", 1)
        if layer.startswith("body."):
            _, block, rdb, conv = layer.split(".")
            renamed[f"RRDB_trunk.{block}.RDB{rdb[3:]}.{conv}.{kind}"] = tensor
        else:
            renamed[f"{names[layer]}.{kind}"] = tensor
    return renamed


def esrgan_by_hand(state: dict, x: torch.Tensor, doublings: int = 2) -> torch.Tensor:
    """The original ESRGAN's forward, written from its definition over the original names."""
    def conv(name: str, value: torch.Tensor) -> torch.Tensor:
        return F.conv2d(value, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(value: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(value, 0.2)

    first = conv("model.0", x)
    trunk = first
    for block in range(BLOCKS):
        block_in = trunk
        for rdb in (1, 2, 3):
            seen = [trunk]
            for index in range(1, 5):
                seen.append(lrelu(conv(f"model.1.sub.{block}.RDB{rdb}.conv{index}.0", torch.cat(seen, 1))))
            trunk = conv(f"model.1.sub.{block}.RDB{rdb}.conv5.0", torch.cat(seen, 1)) * 0.2 + seen[0]
        trunk = trunk * 0.2 + block_in
    features = first + conv(f"model.1.sub.{BLOCKS}", trunk)
    tail = [3 * (i + 1) for i in range(doublings)]
    for index in tail:
        features = lrelu(conv(f"model.{index}", F.interpolate(features, scale_factor=2, mode="nearest")))
    return conv(f"model.{tail[-1] + 4}", lrelu(conv(f"model.{tail[-1] + 2}", features)))


def test_original_and_real_esrgan_files_load_into_the_network_they_hold(tmp_path):
    """4x and 2x original-layout files (the community's 4x-UltraSharp kind), and the same weights in Real-ESRGAN's
    layout under params_ema as its releases ship them (and for 4x in the first release's), compute the hand-written
    ESRGAN forward."""
    x = torch.rand(1, 3, 12, 10)
    for doublings in (2, 1):
        state = original_esrgan(doublings)
        expected = esrgan_by_hand(state, x, doublings)
        torch.save(state, tmp_path / "original.pth")
        torch.save({"params_ema": as_real_esrgan(state, doublings), "params": {}}, tmp_path / "real.pth")
        save_file(as_real_esrgan(state, doublings), tmp_path / "real.safetensors")
        names = ["original.pth", "real.pth", "real.safetensors"]
        if doublings == 2:
            torch.save(as_first_release(state), tmp_path / "RRDB_ESRGAN_x4.pth")
            names.append("RRDB_ESRGAN_x4.pth")
        for name in names:
            network = load_upscaler(tmp_path / name)
            assert network.scale == 2**doublings, name
            assert torch.allclose(network(x), expected, atol=1e-5), name
            assert not any(p.requires_grad for p in network.parameters())


def test_real_esrgan_x2plus_takes_the_image_pixel_unshuffled(tmp_path):
    """RealESRGAN_x2plus: 12 input channels, the image unshuffled by 2 before the 4x body: 2x in all."""
    state = original_esrgan(2, seed=1)
    state["model.0.weight"] = torch.randn(FEATURES, 12, 3, 3) * 0.1
    save_file(as_real_esrgan(state), tmp_path / "RealESRGAN_x2plus.safetensors")
    network = load_upscaler(tmp_path / "RealESRGAN_x2plus.safetensors")
    x = torch.rand(1, 3, 12, 10)
    assert network.scale == 2 and network(x).shape == (1, 3, 24, 20)
    assert torch.allclose(network(x), esrgan_by_hand(state, F.pixel_unshuffle(x, 2)), atol=1e-5)


def test_srvggnet_compact_is_convolutions_prelus_a_shuffle_and_the_nearest_upsample(tmp_path):
    """realesr-general-x4v3's layout: body.0 conv, body.1 PReLU, ..., the last conv to 3 x 16 channels."""
    generator = torch.Generator().manual_seed(2)
    layers = [(3, FEATURES), (FEATURES, FEATURES), (FEATURES, FEATURES), (FEATURES, 48)]
    state = {}
    for index, (into, out) in enumerate(layers):
        state[f"body.{2 * index}.weight"] = torch.randn(out, into, 3, 3, generator=generator) * 0.1
        state[f"body.{2 * index}.bias"] = torch.randn(out, generator=generator) * 0.1
        if index < len(layers) - 1:
            state[f"body.{2 * index + 1}.weight"] = torch.rand(FEATURES, generator=generator)
    torch.save({"params": state}, tmp_path / "realesr-general-x4v3.pth")
    network = load_upscaler(tmp_path / "realesr-general-x4v3.pth")
    x = torch.rand(1, 3, 6, 5)
    value = x
    for index in range(len(layers)):
        value = F.conv2d(value, state[f"body.{2 * index}.weight"], state[f"body.{2 * index}.bias"], padding=1)
        if index < len(layers) - 1:
            value = F.prelu(value, state[f"body.{2 * index + 1}.weight"])
    expected = F.pixel_shuffle(value, 4) + F.interpolate(x, scale_factor=4, mode="nearest")
    assert network.scale == 4 and torch.allclose(network(x), expected, atol=1e-5)


class Hostile:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_files_that_are_no_upscaler_are_refused_naming_the_file(tmp_path, capsys):
    state = original_esrgan()
    cases = {}
    with open(tmp_path / "hostile.pth", "wb") as out:
        pickle.dump({"params_ema": Hostile()}, out, protocol=2)
    cases["hostile.pth"] = "cannot be read as weights"
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    cases["lora.safetensors"] = "not an ESRGAN, Real-ESRGAN or SRVGGNet"
    state["model.3.weight"] = torch.zeros(FEATURES, FEATURES + 1, 3, 3)
    torch.save(state, tmp_path / "misfit.pth")
    cases["misfit.pth"] = "do not fit the network"
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    cases["broken.safetensors"] = "cannot be read as weights"
    torch.save([1, 2], tmp_path / "list.pth")
    cases["list.pth"] = "holds no state dict of tensors"
    cases["absent.pth"] = "does not exist"
    for name, message in cases.items():
        with pytest.raises(UpscalerError) as caught:
            load_upscaler(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value) and message in str(caught.value), (name, caught.value)
    assert "a pickle ran code" not in capsys.readouterr().out


def test_names_are_a1111s():
    assert a1111_name("models/RealESRGAN/RealESRGAN_x4plus.pth") == "R-ESRGAN 4x+"
    assert a1111_name("/x/4x-UltraSharp.safetensors") == "4x-UltraSharp" and a1111_name("Lanczos") == "Lanczos"


def test_the_upscaler_folder_finds_a1111_names_in_a1111s_layout(tmp_path):
    """The folder itself and its ESRGAN/ and RealESRGAN/, as A1111's models folder has them; its checkpoints are
    no upscalers."""
    for folder in ("ESRGAN", "RealESRGAN", "Stable-diffusion"):
        (tmp_path / folder).mkdir()
    for path in (tmp_path / "ESRGAN/4x-UltraSharp.pth", tmp_path / "RealESRGAN/RealESRGAN_x4plus.pth",
                 tmp_path / "RealESRGAN/notes.txt", tmp_path / "Stable-diffusion/v1-5.safetensors"):
        path.write_bytes(b"")
    assert upscaler_files(tmp_path) == {"4x-UltraSharp": tmp_path / "ESRGAN/4x-UltraSharp.pth",
                                        "R-ESRGAN 4x+": tmp_path / "RealESRGAN/RealESRGAN_x4plus.pth"}
    assert find_upscaler("R-ESRGAN 4x+", tmp_path) == tmp_path / "RealESRGAN/RealESRGAN_x4plus.pth"
    with pytest.raises(UpscalerError, match=r"'R-ESRGAN 2x\+': no such model file \(RealESRGAN_x2plus.pth\) .*"
                                            r"there: 4x-UltraSharp, R-ESRGAN 4x\+"):
        find_upscaler("R-ESRGAN 2x+", tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(UpscalerError, match="model.ckpt: give a .safetensors, .pth, .pt file"):
        find_upscaler(str(tmp_path / "model.ckpt"), tmp_path)
    # A server passes paths=False: a client's path is looked up as a name, never opened.
    with pytest.raises(UpscalerError, match="no such model file"):
        find_upscaler(str(tmp_path / "ESRGAN/4x-UltraSharp.pth"), tmp_path, paths=False)


class Nearest2x(torch.nn.Module):
    """An exact 2x network: each tile's output is the nearest-neighbour enlargement of the tile."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest") + self.anchor


def test_a1111s_tiles_cover_the_image_and_blend_back_to_it():
    """split_grid's spread (a 500x300 image in 192 px tiles overlapping by 8: x 0, 154, 308 and y 0, 108) and the
    blend put every pixel back: through an exact 2x network, tiled is the nearest enlargement, also for an image
    smaller than a tile (A1111 pads it with black before it, then crops that away)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    grid = split_grid(image, 192, 8)
    assert [y for y, _ in grid] == [0, 108] and [x for x, _ in grid[0][1]] == [0, 154, 308]
    network = Nearest2x()
    for picture in (image, image.crop((0, 0, 100, 60))):
        expected = picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(upscale_once(network, picture)), np.asarray(expected))
    padded = split_grid(image.crop((0, 0, 100, 60)), 192, 8)[0][1][0]
    assert padded[0] == -92 and np.asarray(padded[1])[:132, :92].max() == 0


def test_upscale_takes_a1111s_passes_then_a_lanczos_resize_to_whole_8_px():
    """A 2x network asked for 3x: two passes (4x), then down to 3x floored to 8 px; asked for 1.5x: one pass."""
    image = Image.new("RGB", (50, 30), (200, 40, 10))
    passes = []

    def one_pass(picture):
        passes.append(picture.size)
        return upscale_once(Nearest2x(), picture, tile=0)

    assert upscale(one_pass, image, 3).size == (144, 88) and passes == [(50, 30), (100, 60)]
    passes.clear()
    result = upscale(one_pass, image, 1.5)
    assert result.size == (72, 40) and passes == [(50, 30)]
    assert np.abs(np.asarray(result, dtype=int) - (200, 40, 10)).max() <= 1  # a flat colour stays flat


def test_the_upscale_command_enlarges_keeps_parameters_and_skips_a_bad_image(tmp_path, capsys):
    """`difftrain upscale`, A1111's Extras: a 4x ESRGAN by name from the folder; the PNG keeps its parameters and
    says how it was upscaled; a corrupt image is skipped and said; wrong settings name their flag."""
    from PIL.PngImagePlugin import PngInfo

    from difftrain.cli import main

    (tmp_path / "models").mkdir()
    torch.save(original_esrgan(), tmp_path / "models" / "4x-Tiny.pth")
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Seed: 5")
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "drawn.png", pnginfo=info)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    base = ["upscale", str(tmp_path / "drawn.png"), str(tmp_path / "broken.png"), "--upscaler-dir",
            str(tmp_path / "models"), "--no-progress"]
    assert main([*base, "--upscaler", "4x-Tiny", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 image(s)" in captured.out and "1 skipped" in captured.out
    assert f"skipped {tmp_path / 'broken.png'}" in captured.err
    result = Image.open(tmp_path / "out" / "drawn.png")
    assert result.size == (160, 96) and result.info["parameters"] == "a red circle\nSteps: 2, Seed: 5"
    assert result.info["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-Tiny"
    assert main([*base, "--upscaler", "Lanczos", "--scale", "1.5", "--out", str(tmp_path / "lanczos")]) == 0
    assert Image.open(tmp_path / "lanczos" / "drawn.png").size == (56, 32)  # 60x36 floored to whole 8 px, as A1111
    (tmp_path / "folder").mkdir()  # a folder stands for its images
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (16, 8), (90, 90, 200)).save(tmp_path / "folder" / name)
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    assert main(["upscale", str(tmp_path / "folder"), "--upscaler", "Nearest", "--scale", "2", "--out",
                 str(tmp_path / "from-folder"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "from-folder").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "from-folder" / "a.png").size == (32, 16)
    assert main([*base, "--upscaler", "None", "--scale", "2", "--out", str(tmp_path / "none")]) == 0
    unchanged = Image.open(tmp_path / "none" / "drawn.png")  # A1111's None does nothing, and says nothing
    assert unchanged.size == (40, 24) and "postprocessing" not in unchanged.info
    # ... and as the second upscaler, nothing is blended in (it blended an image of another size: a traceback)
    assert main([*base, "--upscaler", "4x-Tiny", "--upscaler-2", "None", "--upscaler-2-visibility", "0.5", "--out",
                 str(tmp_path / "second-none")]) == 0
    assert Image.open(tmp_path / "second-none" / "drawn.png").size == (160, 96)
    # An image too small for its scale (0 px once floored to whole 8 px) is skipped and said, the rest written
    Image.new("RGB", (5, 5)).save(tmp_path / "tiny.png")
    assert main(["upscale", str(tmp_path / "tiny.png"), str(tmp_path / "drawn.png"), "--upscaler", "Lanczos",
                 "--scale", "1", "--out", str(tmp_path / "small"), "--no-progress"]) == 0
    assert "5x5 at scale 1 is 0x0 once floored to whole 8 px" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["drawn.png"]
    for flags, message in ((["--upscaler", "Lanczos"], "--scale: Lanczos has no factor of its own; give one"),
                           (["--upscaler", "R-ESRGAN 4x+"], "--upscaler 'R-ESRGAN 4x+': no such model file"),
                           (["--upscaler", "4x-Tiny", "--scale", "40"], "--scale 40.0: from above 0 to 16"),
                           (["--upscaler", "4x-Tiny", "--tile", "12"], "--tile 12: 0 (the whole image"),
                           (["--upscaler", "4x-Tiny", "--tile", "-5"], "--tile -5: 0 (the whole image"),
                           (["--upscaler", "Lanczos", "--scale", "2", "--resize", "64x64"],
                            "--scale and --resize: give one or the other"),
                           (["--upscaler", "Lanczos", "--scale", "2", "--no-crop"], "--no-crop applies to --resize"),
                           (["--upscaler", "lanczos", "--scale", "2"], "the built-in one is 'Lanczos'"),
                           (["--upscaler", "4x-Tiny", "--upscaler-2", "Nearest", "--upscaler-2-visibility", "3"],
                            "--upscaler-2-visibility 3.0: from 0 to 1")):
        assert main([*base, *flags, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err, flags
    # --out the inputs' folder, and two inputs of one name: no input is replaced, no output written over another
    same = tmp_path / "same"
    same.mkdir()
    (same / "rgb.png").write_bytes((tmp_path / "drawn.png").read_bytes())
    Image.new("RGB", (16, 8), (200, 90, 90)).save(same / "rgb.jpg")
    before = {path.name: path.read_bytes() for path in same.iterdir()}
    assert main(["upscale", str(same), "--upscaler", "Nearest", "--scale", "2", "--out", str(same),
                 "--no-progress"]) == 0
    assert {name: (same / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in same.iterdir()) == ["rgb-1.png", "rgb-2.png", "rgb.jpg", "rgb.png"]
    assert Image.open(same / "rgb-1.png").size == (32, 16)  # rgb.jpg's, first by name
    assert Image.open(same / "rgb-2.png").info["parameters"] == "a red circle\nSteps: 2, Seed: 5"
    # nor a file already in --out (an earlier run's, or not an image at all)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "drawn.png").write_bytes(b"my precious")
    assert main([*base, "--upscaler", "Nearest", "--scale", "2", "--out", str(tmp_path / "kept")]) == 0
    assert (tmp_path / "kept" / "drawn.png").read_bytes() == b"my precious"
    assert Image.open(tmp_path / "kept" / "drawn-1.png").size == (80, 48)


def test_text_chunks_after_the_image_data_are_kept():
    """Tools may write a PNG's text after its image data (PIL's `info` alone misses it); `text_chunks` reads both."""
    import io
    import zlib

    from difftrain.generate.infotext import text_chunks

    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Seed: 5, Size: 8x8")
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    body = b"tEXt" + b"postprocessing\x00Postprocess upscaler: Lanczos"
    late = len(body[4:]).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    data = data[:-12] + late + data[-12:]  # before IEND, after IDAT
    assert text_chunks(data) == {"parameters": "a red circle\nSteps: 2, Seed: 5, Size: 8x8",
                                 "postprocessing": "Postprocess upscaler: Lanczos"}
    assert text_chunks(b"not an image") == {}
