"""`difftrain generate --controlnet`: one or several ControlNets on the tiny Stable Diffusion, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_generate import FAST, pixels, run
from test_text2image import tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.data.conditioning import canny
from difftrain.data.transforms import center_crop
from difftrain.generate.infotext import parse_infotext, read_png_infotext
from difftrain.models.tiny_sd import write_tiny_controlnet


@pytest.fixture(scope="module")
def controlnets(tiny_sd, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    folder = tmp_path_factory.mktemp("controlnets")
    return (write_tiny_controlnet(tiny_sd, folder / "cn-a", seed=1),
            write_tiny_controlnet(tiny_sd, folder / "cn-b", seed=2))


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    image = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(image).rectangle([2, 2, 14, 14], fill="white")  # a square in the top-left
    path = tmp_path_factory.mktemp("control") / "mask.png"
    image.save(path)
    return path


def test_scale_zero_gives_the_plain_image_and_a_scale_steers_it(tiny_sd, controlnets, mask, tmp_path):  # noqa: F811
    prompt = ["--prompt", "a red circle"]
    [plain] = run(tiny_sd, tmp_path / "plain", *prompt)
    [off] = run(tiny_sd, tmp_path / "off", *prompt, "--controlnet", f"{controlnets[0]}:0", "--control-image", str(mask))
    [on] = run(tiny_sd, tmp_path / "on", *prompt, "--controlnet", f"{controlnets[0]}:1.5", "--control-image", str(mask))
    # Weight 0 adds zero residuals: the ControlNet pipeline then draws exactly the plain image.
    assert np.array_equal(pixels(plain), pixels(off))
    assert np.abs(pixels(plain) - pixels(on)).mean() > 1.0
    # A window that ends before the first step leaves it no step to act on.
    [late] = run(tiny_sd, tmp_path / "late", *prompt, "--controlnet", f"{controlnets[0]}:1.5",
                 "--control-image", str(mask), "--control-start", "0.9", "--control-end", "1.0")
    assert not np.array_equal(pixels(late), pixels(on))


def test_two_controlnets_write_a1111_infotext_and_from_png_repeats_them(
        tiny_sd, controlnets, mask, tmp_path, capsys):  # noqa: F811
    args = ["--prompt", "a blue square", "--controlnet", f"{controlnets[0]}:0.7", "--control-image", str(mask),
            "--controlnet", f"{controlnets[1]}:1.2", "--control-image", str(mask),
            "--preprocess", "canny", "--preprocess", "none", "--control-end", "0.5", "--control-end", "1",
            "--processor-res", "128", "--processor-res", "64"]
    [first] = run(tiny_sd, tmp_path / "two", *args)
    _, _, params = parse_infotext(read_png_infotext(first))
    unit = params["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: cn-a [")
    for part in ("Weight: 0.7", "Resize Mode: Crop and Resize", "Threshold A: 100", "Threshold B: 200",
                 "Guidance Start: 0", "Guidance End: 0.5", "Control Mode: Balanced", "Processor Res: 128",
                 "Pixel Perfect: False"):
        assert part in unit, (part, unit)
    assert params["ControlNet 1"].startswith("Module: none, Model: cn-b [") and "Weight: 1.2" in params["ControlNet 1"]
    assert "Threshold A" not in params["ControlNet 1"]
    assert main(["generate", str(tiny_sd), "--from-png", str(first), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    [again] = sorted((tmp_path / "again").glob("*.png"))
    assert np.array_equal(pixels(first), pixels(again))
    # Another tool's PNG names its units' models but no files we can find: refused, not drawn without them.
    import re

    from PIL.PngImagePlugin import PngInfo

    text = re.sub(r', ControlNet 0 files: "[^"]*"|, ControlNet 0 files: [^,]*', "", read_png_infotext(first))
    assert "ControlNet 0 files" not in text and "ControlNet 0:" in text
    info = PngInfo()
    info.add_text("parameters", text)
    foreign = tmp_path / "foreign.png"
    Image.open(first).save(foreign, pnginfo=info)
    assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 2
    assert "ControlNet 0 (cn-a [" in capsys.readouterr().err
    # Units given on the command line replace the PNG's.
    assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--out", str(tmp_path / "g"), "--no-progress",
                 "--controlnet", str(controlnets[1]), "--control-image", str(mask)]) == 0
    [replaced] = (tmp_path / "g").glob("*.png")
    _, _, params = parse_infotext(read_png_infotext(replaced))
    assert "Model: cn-b [" in params["ControlNet 0"] and "ControlNet 1" not in params


def test_controlnet_with_img2img_and_guess_mode(tiny_sd, controlnets, mask, tmp_path):  # noqa: F811
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(init)
    [image] = run(tiny_sd, tmp_path / "i2i", "--prompt", "a red circle", "--init-image", str(init),
                  "--controlnet", str(controlnets[0]), "--control-image", str(mask), "--guess-mode")
    _, _, params = parse_infotext(read_png_infotext(image))
    assert "Control Mode: ControlNet is more important" in params["ControlNet 0"]
    assert "Denoising strength" in params
    [balanced] = run(tiny_sd, tmp_path / "balanced", "--prompt", "a red circle", "--init-image", str(init),
                     "--controlnet", str(controlnets[0]), "--control-image", str(mask))
    assert np.abs(pixels(image) - pixels(balanced)).mean() > 0.5  # guess mode reached the pipeline


def test_misfits_and_bad_inputs_are_refused_with_what_to_do(tiny_sd, controlnets, mask, tmp_path, capsys):  # noqa: F811
    def refused(*args) -> str:
        assert main(["generate", str(tiny_sd), "--prompt", "a red circle", "--out", str(tmp_path / "x"), *FAST,
                     *args]) == 2
        return capsys.readouterr().err

    other = write_tiny_controlnet(tiny_sd, tmp_path / "wide", cross_attention_dim=48)
    err = refused("--controlnet", str(other), "--control-image", str(mask))
    assert "text conditioning width (cross_attention_dim) is 48, the model's UNet has 32" in err
    assert "1 --controlnet and 0 --control-image" in refused("--controlnet", str(controlnets[0]))
    assert "no such file" in refused("--controlnet", str(controlnets[0]), "--control-image", str(tmp_path / "nope.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert "--control-image" in refused("--controlnet", str(controlnets[0]), "--control-image", str(broken))
    assert "need 0 <= start < end <= 1" in refused("--controlnet", str(controlnets[0]), "--control-image", str(mask),
                                                   "--control-start", "0.6", "--control-end", "0.4")
    assert "cannot load a ControlNet" in refused("--controlnet", str(tmp_path), "--control-image", str(mask))
    assert "--guess-mode applies to ControlNets" in refused("--guess-mode")
    assert "--guess-mode is --control-mode control for every ControlNet" in refused(
        "--controlnet", str(controlnets[0]), "--control-image", str(mask), "--guess-mode", "--control-mode", "prompt")
    assert "apply to ControlNets" in refused("--preprocess", "canny")
    assert "a ControlNet or T2I-Adapter adds its residuals to two halves only" in refused(
        "--controlnet", str(controlnets[0]), "--control-image", str(mask), "--prompt", "a red circle AND a square")


def test_control_modes_and_resize_modes_as_a1111_has_them(tiny_sd, controlnets, mask, tmp_path):  # noqa: F811
    import torch
    from diffusers import ControlNetModel

    from difftrain.data.conditioning import Preprocess, condition_image
    from difftrain.generate.controlnet import _soft_injection

    # "My prompt is more important": each residual weighed 0.825^(12 - i) on SD's 12 (here n - i), the middle 1.
    net = ControlNetModel.from_pretrained(controlnets[0])
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(1, 77, 32), controlnet_cond=torch.rand(1, 3, 16, 16),
                  return_dict=False)
    plain_down, plain_mid = net(**inputs)
    _soft_injection(net, True)
    soft_down, soft_mid = net(**inputs)
    count = len(plain_down)
    for i, (soft, plain) in enumerate(zip(soft_down, plain_down)):
        torch.testing.assert_close(soft, plain * 0.825 ** (count - i))
    assert torch.equal(soft_mid, plain_mid)
    _soft_injection(net, False)  # switched off, not piled up
    assert all(torch.equal(a, b) for a, b in zip(net(**inputs)[0], plain_down))

    args = ["--prompt", "a red circle", "--controlnet", f"{controlnets[0]}:1.5", "--control-image", str(mask)]
    [balanced] = run(tiny_sd, tmp_path / "balanced", *args)
    [prompt] = run(tiny_sd, tmp_path / "prompt", *args, "--control-mode", "prompt", "--control-resize", "fill")
    assert np.abs(pixels(balanced) - pixels(prompt)).mean() > 0.5
    _, _, params = parse_infotext(read_png_infotext(prompt))
    assert "Resize Mode: Resize and Fill" in params["ControlNet 0"]
    assert "Control Mode: My prompt is more important" in params["ControlNet 0"]
    assert main(["generate", str(tiny_sd), "--from-png", str(prompt), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(pixels(prompt), pixels(next((tmp_path / "again").glob("*.png"))))

    # The three resize modes on a wide image with a white middle half, drawn at a square.
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    ImageDraw.Draw(wide).rectangle([16, 0, 47, 31], fill="white")
    crop, resize, fill = (np.asarray(condition_image(wide, (32, 32), Preprocess("none"), mode))
                          for mode in ("crop", "resize", "fill"))
    assert crop.min() > 200  # the white middle, cover and cut
    assert resize[:, 1].tolist() == [[0, 0, 255]] * 32 and resize[:, 16].min() > 200  # stretched whole
    # fitted inside (32 x 16 in the middle rows), the rest the median of its border: the blue ends' colour
    assert fill[8:24, 16].min() > 200 and fill[0, 16].tolist() == fill[31, 16].tolist() == [0, 0, 255]


def test_canny_and_the_crop_and_resize_rule():
    image = Image.new("RGB", (64, 32), "black")
    ImageDraw.Draw(image).rectangle([16, 0, 47, 31], fill="white")  # the centre half is white
    square = center_crop(image, (32, 32))
    assert square.size == (32, 32)
    assert np.asarray(square.convert("L")).min() > 200  # the centre was kept, the black sides cropped
    square = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(square).rectangle([8, 8, 23, 23], fill="white")
    edges = np.asarray(canny(square, 100, 200).convert("L"))
    assert set(np.unique(edges)) == {0, 255}
    assert edges[8, 4:28].max() == 255 and edges[16, 16] == 0  # the square's top edge, not its inside


def test_an_img2img_batch_gives_every_image_the_units_control_image(tiny_sd, controlnets, mask, tmp_path):  # noqa: F811
    """A folder of init images with a ControlNet, as A1111's batch: each image drawn as that one --init-image draws
    with the unit, and under "only masked" the control image cut to each mask's own box."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name, colour, box in (("a", "red", (4, 4, 16, 16)), ("b", "blue", (14, 12, 30, 28))):
        Image.new("RGB", (32, 32), colour).save(images / f"{name}.png")
        drawn = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(drawn).rectangle(box, fill=255)
        drawn.save(masks / f"{name}.png")
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--steps", "3", "--width", "32", "--height", "32",
            "--seed", "3", "--strength", "0.9", "--controlnet", f"{controlnets[0]}:1.5", "--control-image", str(mask),
            "--no-progress"]
    for flags in ([], ["--mask", str(masks), "--only-masked", "--only-masked-padding", "2"]):
        out = tmp_path / ("masked" if flags else "plain")
        assert main([*base, "--init-image", str(images), *flags, "--out", str(out)]) == 0
        for name in "ab":
            one = [*flags[:1], str(masks / f"{name}.png"), *flags[2:]] if flags else []
            assert main([*base, "--init-image", str(images / f"{name}.png"), *one, "--out",
                         str(tmp_path / f"{out.name}-{name}")]) == 0
            [alone] = sorted((tmp_path / f"{out.name}-{name}").glob("*.png"))
            assert np.array_equal(pixels(alone), pixels(out / f"{name}.png")), (out.name, name)


def test_canny_thresholds_given_win_over_those_a_controlnet_was_trained_with(
        tiny_sd, controlnets, mask, tmp_path, capsys):  # noqa: F811
    """(--canny-low/--canny-high had a default of 100/200, which looked given: a canny-trained run's own
    thresholds then always won, and the ones on the command line were silently ignored.)"""
    import shutil

    from difftrain.generate.controlnet import ControlUnit, canny_thresholds, with_own_controlnet
    from difftrain.models.manifest import Manifest

    trained = tmp_path / "canny-run"
    shutil.copytree(controlnets[0], trained)
    Manifest("controlnet", controls=[{"preprocess": "canny", "low_threshold": 50, "high_threshold": 150}]).write(trained)

    def resolved(**given) -> tuple:
        [unit] = with_own_controlnet([ControlUnit(model=str(trained), image=str(mask), **given)], None, None, "m")
        return unit.preprocess, canny_thresholds(unit)

    assert resolved(preprocess=None) == ("canny", (50, 150))  # the run's preprocessor and thresholds
    assert resolved(preprocess="canny") == ("canny", (50, 150))
    assert resolved(preprocess=None, low_threshold=10) == ("canny", (10, 150))
    assert resolved(preprocess="mask") == ("mask", (100, 200))  # not trained on it: canny's defaults, unused
    for given, said in (([], "Threshold A: 50, Threshold B: 150"),
                        (["--canny-low", "10", "--canny-high", "20"], "Threshold A: 10, Threshold B: 20")):
        [image] = run(tiny_sd, tmp_path / f"given{len(given)}", "--prompt", "x", "--controlnet", str(trained),
                      "--control-image", str(mask), *given)
        unit = parse_infotext(read_png_infotext(image))[2]["ControlNet 0"]
        assert "Module: canny" in unit and said in unit, unit
    # Per ControlNet, as the other unit values (the last one given used to apply to every unit)
    two = ["--controlnet", str(trained), "--control-image", str(mask)] * 2
    [image] = run(tiny_sd, tmp_path / "per-unit", "--prompt", "x", *two, "--canny-low", "10", "--canny-low", "60",
                  "--canny-high", "200")
    units = parse_infotext(read_png_infotext(image))[2]
    assert "Threshold A: 10, Threshold B: 200" in units["ControlNet 0"]
    assert "Threshold A: 60, Threshold B: 200" in units["ControlNet 1"]
    assert main(["generate", str(tiny_sd), "--prompt", "x", *two, "--canny-low", "1", "--canny-low", "2",
                 "--canny-low", "3", "--out", str(tmp_path / "three")]) == 2
    assert "--canny-low: give one value for all 2 ControlNets or one for each" in capsys.readouterr().err


def test_canny_runs_at_the_preprocessor_resolution_as_a1111_runs_it(mask, tmp_path):
    """A1111's Preprocessor Resolution: canny on the whole image at that short side, the map then fitted to the
    drawing and kept binary; Pixel Perfect (and generate's default) runs it at the drawn size. The infotext
    says which, and PNGs that recorded the drawn size under Pixel Perfect: False read back as pixel perfect."""
    from difftrain.generate.controlnet import ControlUnit, conditioning_image, units_from_infotext

    drawing = Image.new("RGB", (256, 256), "white")
    for x in range(8, 256, 12):  # fine lines: what the resolution decides
        ImageDraw.Draw(drawing).line([(x, 0), (x + 40, 255)], fill="black", width=2)
    drawing.save(tmp_path / "lines.png")
    maps = {res: np.asarray(conditioning_image(ControlUnit(model=None, image=str(tmp_path / "lines.png"),
                                                           preprocess="canny", processor_res=res), 64, 64))
            for res in (None, 64, 512)}
    assert all(set(np.unique(m)) <= {0, 255} for m in maps.values())  # edges stay a binary map
    assert not np.array_equal(maps[None], maps[512]) and not np.array_equal(maps[64], maps[512])
    files = {"ControlNet 0 files": f"cn | {mask}"}
    for recorded, size, read in (("Processor Res: 512, Pixel Perfect: False", "64x64", 512),
                                 ("Processor Res: 64, Pixel Perfect: False", "64x64", None),  # (before 2026-12-08)
                                 ("Processor Res: 64, Pixel Perfect: True", "64x64", None)):
        [unit] = units_from_infotext({"Size": size, "ControlNet 0": f"Module: canny, {recorded}", **files})
        assert unit.processor_res == read, recorded
    # A resolution given that is the drawn short side reads back as given (it read back as pixel perfect, and
    # --from-png drew another edge map), and the image path reads back whole.
    from difftrain.generate.controlnet import infotext_units

    for given in (64, None, 512):
        written = infotext_units([ControlUnit(model=str(mask), image=str(mask), preprocess="canny",
                                              processor_res=given)], 64, 128)
        [unit] = units_from_infotext({"Size": "64x128", **written})
        assert (unit.processor_res, unit.image) == (given, str(mask)), written


def test_an_a1111_png_draws_again_with_its_unit_settings_once_its_files_are_named(  # noqa: F811
        tiny_sd, controlnets, mask, tmp_path, capsys):  # noqa: F811
    """Another tool's PNG names no files difftrain can find; the message asked for --controlnet and
    --control-image, which then replaced the units whole: module, weight, window, thresholds and mode were lost."""
    from PIL.PngImagePlugin import PngInfo

    unit = ('"Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.6, Resize Mode: Crop and Resize, '
            'Low Vram: False, Processor Res: 128, Threshold A: 50.0, Threshold B: 120.0, Guidance Start: 0.2, '
            'Guidance End: 0.5, Pixel Perfect: False, Control Mode: My prompt is more important"')
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 32x32, "
                                f"ControlNet 0: {unit}, Version: v1.10.1")
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    assert main(["generate", str(tiny_sd), "--from-png", str(tmp_path / "a1111.png"), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "its other settings are taken from the PNG" in capsys.readouterr().err
    files = ["--controlnet", str(controlnets[0]), "--control-image", str(mask)]
    for extra, said in (([], "Guidance End: 0.5"), (["--control-end", "0.8"], "Guidance End: 0.8")):
        [image] = run(tiny_sd, tmp_path / f"again{len(extra)}", "--from-png", str(tmp_path / "a1111.png"), *files,
                      *extra)
        drawn = parse_infotext(read_png_infotext(image))[2]["ControlNet 0"]
        for kept in ("Module: canny", "Weight: 0.6", "Processor Res: 128", "Threshold A: 50", "Threshold B: 120",
                     "Guidance Start: 0.2", said, "Pixel Perfect: False", "Control Mode: My prompt is more important"):
            assert kept in drawn, (kept, drawn)
    # A module generate does not run is named as the PNG's, with what to do (it named a --preprocess not typed)
    info = PngInfo()
    info.add_text("parameters", "x\nSteps: 3, Seed: 5, Size: 32x32, ControlNet 0: \"Module: depth_midas, Model: d, "
                                "Weight: 1, Threshold A: -1, Threshold B: -1\"")
    Image.new("RGB", (32, 32)).save(tmp_path / "depth.png", pnginfo=info)
    assert main(["generate", str(tiny_sd), "--from-png", str(tmp_path / "depth.png"), *files, "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 2
    assert "preprocessor 'depth_midas': generate runs none, canny, mask, segmentation; for another one, give its map " \
           "as --control-image with --preprocess none" in capsys.readouterr().err
    [image] = run(tiny_sd, tmp_path / "depth", "--from-png", str(tmp_path / "depth.png"), *files, "--preprocess",
                  "none")
    assert "Module: none" in read_png_infotext(image)
