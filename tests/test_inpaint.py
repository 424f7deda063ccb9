"""Inpainting as A1111's img2img inpaint tab: the mask's preparation by A1111's rules, the sampler-side blend that
keeps every denoised estimate on the init latents outside the mask (checked against each scheduler's own x0),
and `difftrain generate --mask` end to end on the tiny SD."""

from __future__ import annotations

from inspect import signature
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_text2image import tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.generate.inpaint import (binary_mask, crop_region, expand_crop_region, fill, load_mask, prepare,
                                        resize_and_fill)
from difftrain.sampling.masked import LatentMask, keeping_unmasked


def _pictures(tmp_path, size=(64, 48), box=(30, 10, 50, 30)):
    init = Image.new("RGB", size, (200, 30, 30))
    ImageDraw.Draw(init).rectangle((0, 0, 20, size[1] - 1), fill=(20, 20, 220))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    return init, mask


# ----------------------------------------------------------------------------- the mask, by A1111's rules
def test_a_transparent_masks_alpha_marks_the_area_and_an_opaque_one_its_brightness():
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putdata([(0, 0, 0, 0), (255, 255, 255, 100), (0, 0, 0, 129), (9, 9, 9, 255)])
    assert list(binary_mask(rgba).getdata()) == [0, 0, 255, 255]  # alpha cut at 128, colour ignored
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    opaque.putpixel((1, 0), (0, 0, 0, 255))
    assert list(binary_mask(opaque).getdata()) == [255, 0]  # all opaque: its brightness, as it is
    assert list(binary_mask(Image.new("L", (1, 1), 77)).getdata()) == [77]
    grey_alpha = Image.new("LA", (2, 1), (0, 0))
    grey_alpha.putpixel((1, 0), (0, 200))
    assert list(binary_mask(grey_alpha).getdata()) == [0, 255]  # a grey mask's alpha counts too
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert list(binary_mask(sixteen).getdata()) == [0, 128, 255]  # 16 bits scaled, not clipped


def test_the_crop_box_grows_to_the_drawing_aspect_inside_the_image():
    # A1111's own example: a 128x32 box drawn at 512x512 becomes 128x128.
    assert expand_crop_region((100, 200, 228, 232), 512, 512, 1024, 1024) == (100, 152, 228, 280)
    # Against the top edge it slides down instead of leaving the image.
    assert expand_crop_region((100, 0, 228, 32), 512, 512, 1024, 1024) == (100, 0, 228, 128)
    # A tall box for a wide drawing grows in x, against the right edge.
    assert expand_crop_region((90, 10, 100, 30), 64, 32, 100, 100) == (60, 10, 100, 30)
    mask = Image.new("L", (50, 40))
    mask.paste(255, (10, 12, 20, 18))
    assert crop_region(mask, 0) == (10, 12, 20, 18) and crop_region(mask, 15) == (0, 0, 35, 33)
    assert crop_region(Image.new("L", (8, 8)), 4) is None


def test_resize_and_fill_stretches_the_edges_into_the_bands():
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 40, 1))  # a red top row
    filled = np.asarray(resize_and_fill(wide, 32, 32))
    assert filled.shape == (32, 32, 3)
    assert (filled[:8, :, 0] > 200).all() and (filled[-8:, :, 2] > 200).all()  # top band red, bottom band blue


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    image = Image.new("RGB", (64, 64), (250, 10, 10))
    image.paste((10, 10, 250), (24, 24, 40, 40))  # blue where the mask is
    mask = Image.new("L", (64, 64))
    mask.paste(255, (24, 24, 40, 40))
    filled = np.asarray(fill(image, mask)).astype(int)
    inside, outside = filled[24:40, 24:40], filled[:16]
    assert inside[..., 0].min() > 200 and inside[..., 2].max() < 60  # red now, from around it
    assert np.abs(outside - [250, 10, 10]).max() <= 1


def test_prepare_blurs_with_a1111s_kernel_and_lays_the_original_over_what_is_outside(tmp_path):
    init, mask = _pictures(tmp_path)
    ready = prepare(init, load_mask(tmp_path / "mask.png", "mask"), 64, 48, blur=(4, 4))
    blurred = np.asarray(ready.mask).astype(int)
    # cv2's kernel for radius 4 is 21 taps (A1111's 2 * int(2.5 * 4 + 0.5) + 1): it reaches 10 px past the edge.
    assert blurred[20, 40] == 255 and blurred[20, 50 + 10] > 0 and blurred[20, 50 + 11] == 0
    # The overlay: the original wherever twice the blurred mask is still 0, see-through where it reaches 255.
    alpha = np.asarray(ready.overlay)[..., 3].astype(int)
    assert np.array_equal(alpha, 255 - np.clip(blurred * 2, 0, 255))
    green = ready.finish(Image.new("RGB", (64, 48), (0, 255, 0)))
    kept = alpha == 255
    assert np.array_equal(np.asarray(green)[kept], np.asarray(init)[kept]) and kept.sum() > 1400
    assert (np.asarray(green)[alpha == 0] == [0, 255, 0]).all()
    # The latents' mask: the 8x reduction of the blurred mask, rounded (A1111's nmask).
    redraw = ready.latent_mask(6, 8)
    assert redraw.shape == (1, 1, 6, 8) and set(redraw.unique().tolist()) == {0.0, 1.0}
    assert redraw[0, 0, 2, 4] == 1 and redraw[0, 0, 0, 0] == 0


def test_only_masked_draws_the_box_at_the_output_size_and_pastes_it_back(tmp_path):
    init, mask = _pictures(tmp_path, size=(96, 96), box=(40, 40, 55, 50))
    ready = prepare(init, mask, 32, 32, blur=(0, 0), only_masked=True, padding=2)
    # The box 40..56 x 40..51 padded by 2 (38..58 x 38..53), grown to a square: 20 x 20 at (38, 36), 2 rows
    # above and 3 below.
    assert ready.paste_to == (38, 36, 20, 20)
    assert ready.image.size == (32, 32) and ready.mask.size == (32, 32)
    back = np.asarray(ready.finish(Image.new("RGB", (32, 32), (0, 255, 0))))
    assert back.shape == (96, 96, 3)
    assert (back[42:48, 42:52] == [0, 255, 0]).all()  # the mask's area: the drawn box, put back
    assert np.array_equal(back[:30], np.asarray(init)[:30])  # outside it: the original
    assert prepare(init, Image.new("L", (96, 96)), 32, 32, only_masked=True) is None  # blank: plain img2img
    # A ControlNet's image is made at the init image's size and cut to the same box.
    gradient = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (96, 1, 3)))
    sizes = []
    fitted = ready.fit(lambda w, h: sizes.append((w, h)) or gradient)
    assert sizes == [(96, 96)]
    assert np.array_equal(np.asarray(fitted), np.asarray(resize_and_fill(gradient.crop((38, 36, 58, 56)), 32, 32)))
    assert prepare(init, mask, 32, 32).fit(lambda w, h: sizes.append((w, h)) or gradient) is gradient
    assert sizes[-1] == (32, 32)  # the whole picture: made at the drawing size


# ----------------------------------------------------------------------------- the sampler-side blend
class _RandomUNet(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        out = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(float(timestep) * 7)))
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def _all_samplers() -> list[str]:
    from difftrain.sampling.schedulers import SCHEDULERS

    return sorted(SCHEDULERS)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_every_denoised_estimate_is_the_init_latents_outside_the_mask(tiny_sd, prediction):  # noqa: F811
    """The blend is A1111's (denoised x nmask + init x mask) whatever the sampler: each scheduler's own x0 from the
    replaced prediction is the init latents where they are kept, and untouched where redrawn. Every sampler
    difftrain builds, from an img2img start (its begin index), with both halves of classifier-free guidance."""
    from diffusers import DDPMScheduler

    from difftrain.sampling.schedulers import make_scheduler

    config = dict(DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler").config, prediction_type=prediction)
    init = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    redraw = torch.zeros(1, 1, 6, 6)
    redraw[..., 2:5, 1:4] = 1
    keep = redraw.expand(2, 4, 6, 6) == 0
    checked = []
    for name in _all_samplers():
        if prediction == "v_prediction" and name.startswith("lcm"):
            continue  # (LCM's consistency parameterisation: epsilon only here)
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(8)
        begin = 2 * scheduler.order  # as img2img begins, a few steps in
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        pipe = SimpleNamespace(unet=_RandomUNet(), scheduler=scheduler)
        x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
        with keeping_unmasked(pipe, init, redraw):
            for index, t in enumerate(scheduler.timesteps[begin:begin + 5]):
                model_input = scheduler.scale_model_input(x, t)
                halves = pipe.unet(torch.cat([model_input] * 2), t).sample  # [uncond, cond]
                raw = _RandomUNet()(torch.cat([model_input] * 2), t).sample
                assert torch.equal(halves[~keep], raw[~keep]), name  # the redrawn area: the UNet's own prediction
                predicted = halves[:1] + 7.5 * (halves[1:] - halves[:1])
                x0 = None
                if hasattr(scheduler, "convert_model_output"):  # multistep (DPM++ 2M, UniPC, DEIS): x0 first
                    if scheduler.step_index is None:
                        scheduler._init_step_index(t)
                    x0 = scheduler.convert_model_output(predicted, sample=x)
                    if scheduler.config.get("algorithm_type") == "deis":  # (it answers in its own form: back to x0)
                        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index])
                        x0 = (x - sigma * x0) / alpha
                drawn = {"generator": torch.Generator().manual_seed(index)} if "generator" in signature(
                    scheduler.step).parameters else {}  # (an ancestral sampler's noise)
                step = scheduler.step(predicted, t, x, **drawn)
                if x0 is None:  # (LCM's "denoised" is its boundary-conditioned x0: c_skip is ~1e-5 this far in)
                    x0 = step.denoised if hasattr(step, "denoised") else getattr(step, "pred_original_sample", None)
                if x0 is None:  # PLMS: no x0 of its own; the call's, at the timestep's alpha (DDIM's definition)
                    alpha = scheduler.alphas_cumprod[int(t)]
                    a, s = alpha.sqrt(), (1 - alpha).sqrt()
                    x0 = (x - s * predicted) / a if prediction == "epsilon" else a * x - s * predicted
                torch.testing.assert_close(x0[keep[:1]], init[keep[:1]], rtol=1e-4, atol=2e-4, msg=name)
                x = step.prev_sample
        assert "forward" not in pipe.unet.__dict__  # the UNet's own forward, put back
        checked.append(name)
    assert len(checked) >= 36, checked


def test_the_final_blend_and_the_latent_fills():
    init = torch.ones(2, 4, 3, 3)
    mask = LatentMask(torch.tensor([[[[0, 1, 0], [0, 1, 0], [0, 0, 0]]]], dtype=torch.float32), "latent nothing")
    start = mask.start(init, [5, 6])
    assert start[:, :, :2, 1].abs().sum() == 0 and (start[:, :, 2] == 1).all()
    noisy = LatentMask(mask.redraw, "latent noise").start(init, [5, 6])
    seed_noise = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(noisy[1, :, 0, 1], seed_noise[:, 0, 1]) and (noisy[:, :, 0, 0] == 1).all()
    assert torch.equal(LatentMask(mask.redraw, "original").start(init, [5, 6]), init)
    sampled = torch.full_like(init, 7.0)
    blended = mask.blend(sampled, init)
    assert (blended[:, :, 0, 1] == 7).all() and (blended[:, :, 0, 0] == 1).all()


# ----------------------------------------------------------------------------- the command
def test_while_a_draw_samples_every_estimate_keeps_the_init_latents_outside_the_mask(tiny_sd, tmp_path):  # noqa: F811
    """The blend wired into `generate`'s sampling, not only the final blend and the overlay: Euler's own x0 of every
    step, recorded in the pipeline's scheduler, is the init latents where the mask keeps them."""
    from difftrain.generate.text2image import Drawer, GenerateOptions

    _pictures(tmp_path)
    options = GenerateOptions(prompt="a red circle", steps=6, width=64, height=48, scheduler="Euler", seed=1,
                              init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"), mask_blur=0)
    drawer = Drawer(str(tiny_sd), options, progress=False)
    estimates, step = [], drawer.runner.scheduler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        estimates.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    drawer.runner.scheduler.step = recording
    drawer.draw("a red circle", "", [1])
    init, redraw = drawer.extra["image"], drawer.extra["mask"].redraw
    keep = redraw.expand_as(init) == 0
    assert len(estimates) == 5 and 0 < keep.float().mean() < 1  # int(6 x 0.75) + 1 steps
    for estimate in estimates:
        torch.testing.assert_close(estimate[keep], init[keep], rtol=1e-4, atol=1e-4)
    assert all((estimate[~keep] - init[~keep]).abs().max() > 0.01 for estimate in estimates)


def _outputs(folder):
    return sorted(folder.glob("*.png"))


def test_generate_inpaints_only_the_mask_and_from_png_repeats_it(tiny_sd, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    init, mask = _pictures(tmp_path)
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
            "--steps", "4", "--width", "64", "--height", "48", "--seed", "3", "--no-progress"]
    monkeypatch.chdir(tmp_path)  # given relative to here; --from-png below runs from another folder
    relative = [item if item != str(tmp_path / "init.png") else "init.png" for item in base]
    assert main([*relative, "--mask", "mask.png", "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    [drawn] = _outputs(tmp_path / "a")
    out = np.asarray(Image.open(drawn).convert("RGB")).astype(int)
    alpha = np.asarray(prepare(init, mask, 64, 48).overlay)[..., 3]
    assert np.array_equal(out[alpha == 255], np.asarray(init)[alpha == 255])  # outside: pixel for pixel
    assert np.abs(out - np.asarray(init))[np.asarray(mask) > 0].mean() > 10  # inside: redrawn
    _, _, params = parse_infotext(read_png_infotext(drawn))
    assert params["Mask blur"] == "4" and params["Masked content"] == "original" and "Inpaint area" not in params
    # --from-png draws it again, pixel for pixel; a setting given with it replaces the PNG's.
    assert main(["generate", str(tiny_sd), "--from-png", str(drawn), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    [again] = _outputs(tmp_path / "b")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(drawn)))
    # Every masked content and "only masked" draw; each differs from plain img2img inside the mask only.
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    plain = np.asarray(Image.open(_outputs(tmp_path / "plain")[0]).convert("RGB")).astype(int)
    assert np.abs(plain - np.asarray(init)).max() > 10  # (plain img2img redraws everywhere)
    for extra in (["--masked-content", "fill"], ["--masked-content", "latent noise", "--scheduler", "DDIM"],
                  ["--masked-content", "latent nothing", "--mask-blur", "0"],
                  ["--only-masked", "--only-masked-padding", "4"]):
        folder = tmp_path / extra[1].replace(" ", "-")
        assert main([*base, "--mask", str(tmp_path / "mask.png"), *extra, "--out", str(folder)]) == 0
        image = Image.open(_outputs(folder)[0])
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert np.array_equal(pixels[:, :8], np.asarray(init)[:, :8]), extra  # far from the mask: the init's
        assert np.abs(pixels - np.asarray(init))[np.asarray(mask) > 0].mean() > 10, extra
    assert "Inpaint area: Only masked, Masked area padding: 4" in image.info["parameters"]
    # Inverted (unblurred): what the mask leaves black is redrawn, and the mask's area stays.
    assert main([*base, "--mask", str(tmp_path / "mask.png"), "--invert-mask", "--mask-blur", "0", "--out",
                 str(tmp_path / "inv")]) == 0
    inverted = Image.open(_outputs(tmp_path / "inv")[0])
    assert "Mask mode: Inpaint not masked" in inverted.info["parameters"]
    pixels = np.asarray(inverted.convert("RGB")).astype(int)
    assert np.array_equal(pixels[10:31, 30:51], np.asarray(init)[10:31, 30:51])
    assert np.abs(pixels - np.asarray(init))[:, :25].mean() > 10


def test_the_resize_modes_bring_the_init_image_to_the_size_drawn_as_a1111s_do(tiny_sd, tmp_path):  # noqa: F811
    """Crop and resize, resize and fill: every pixel the mask leaves is the init image brought to the drawing size
    that way; plain img2img encodes the image so; the mode is written and --from-png repeats it."""
    from difftrain.data.transforms import center_crop
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.text2image import encode_pixels

    init, mask = _pictures(tmp_path, size=(96, 48), box=(60, 8, 80, 28))  # twice as wide as it is drawn
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
            "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--steps", "3", "--width", "48", "--height",
            "48", "--seed", "3", "--no-progress"]
    cropped = center_crop(init, (48, 48), Image.Resampling.LANCZOS)
    for mode, expected in (("crop and resize", cropped), ("resize and fill", resize_and_fill(init, 48, 48))):
        folder = tmp_path / mode.replace(" ", "-")
        assert main([*base, "--resize-mode", mode, "--out", str(folder)]) == 0
        [drawn] = _outputs(folder)
        image = Image.open(drawn)
        assert f"Resize mode: {mode.capitalize()}" in image.info["parameters"]
        kept = np.asarray(prepare(init, mask, 48, 48, blur=(0, 0), resize_mode=mode).overlay)[..., 3] == 255
        assert 0.5 < kept.mean() < 1
        assert np.array_equal(np.asarray(image.convert("RGB"))[kept], np.asarray(expected)[kept]), mode
    assert main(["generate", str(tiny_sd), "--from-png", str(drawn), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(_outputs(tmp_path / "again")[0])), np.asarray(image))
    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="x", steps=3, width=48, height=48, resize_mode="crop and "
                                                  "resize", init_image=str(tmp_path / "init.png")), progress=False)
    wanted = encode_pixels(drawer.pipe, drawer.pipe.image_processor.preprocess(cropped))
    assert torch.equal(drawer.extra["image"], wanted)


def test_the_latent_upscale_resize_mode_resizes_the_images_own_size_latents(tiny_sd, tmp_path):  # noqa: F811
    """A1111's resize mode 3, "Just resize (latent upscale)": the image is encoded as it is and its latents are
    brought to the drawing size (bilinear), not the image; written and repeated by --from-png; refused with a mask."""
    from difftrain.generate.inpaint import LATENT_UPSCALE
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.text2image import encode_pixels

    init, _ = _pictures(tmp_path, size=(96, 48), box=(60, 8, 80, 28))
    options = dict(prompt="x", steps=3, width=48, height=64, init_image=str(tmp_path / "init.png"))
    drawer = Drawer(str(tiny_sd), GenerateOptions(**options, resize_mode=LATENT_UPSCALE), progress=False)
    own = encode_pixels(drawer.pipe, drawer.pipe.image_processor.preprocess(init))
    assert own.shape[-2:] == (24, 48)  # (the tiny VAE halves each side)
    wanted = torch.nn.functional.interpolate(own, size=(32, 24), mode="bilinear")
    assert torch.equal(drawer.extra["image"], wanted)
    stretched = Drawer(str(tiny_sd), GenerateOptions(**options), progress=False).extra["image"]
    assert stretched.shape == wanted.shape and not torch.allclose(stretched, wanted, atol=1e-3)
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
            "--steps", "3", "--width", "48", "--height", "64", "--seed", "3", "--no-progress"]
    assert main([*base, "--resize-mode", LATENT_UPSCALE, "--out", str(tmp_path / "latent")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    [drawn], [plain] = _outputs(tmp_path / "latent"), _outputs(tmp_path / "plain")
    image = Image.open(drawn)
    assert image.size == (48, 64) and "Resize mode: Just resize (latent upscale)" in image.info["parameters"]
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(plain)))
    assert main(["generate", str(tiny_sd), "--from-png", str(drawn), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(_outputs(tmp_path / "again")[0])), np.asarray(image))


def test_a_folder_of_init_images_draws_each_with_its_mask_and_skips_what_it_cannot(
        tiny_sd, tmp_path, caplog, capsys):  # noqa: F811
    """A1111's img2img batch: each image with the mask of its name, drawn as one --init-image of it draws, written
    under its name; an unreadable image or one without a mask is skipped and said; names already there refused."""
    init, mask = _pictures(tmp_path)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    init.save(images / "a.png")
    init.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "b.jpg", quality=95)
    init.save(images / "c.png")  # (no mask of its name)
    (images / "d.png").write_bytes(b"\x89PNG not really")
    mask.save(masks / "a.png")
    mask.save(masks / "b.webp", lossless=True)
    mask.save(masks / "d.png")
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--steps", "3", "--width", "64", "--height", "48",
            "--seed", "3", "--no-progress"]
    assert main([*base, "--init-image", str(images), "--mask", str(masks), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    said = caplog.text
    assert "skipped c.png: no mask named c.* in" in said and "skipped d.png:" in said and "2 of the 4" in said
    assert "Init image: " + str(images / "b.jpg") in Image.open(tmp_path / "out" / "b.png").info["parameters"]
    assert main([*base, "--init-image", str(images / "a.png"), "--mask", str(masks / "a.png"), "--out",
                 str(tmp_path / "one")]) == 0
    assert np.array_equal(np.asarray(Image.open(_outputs(tmp_path / "one")[0])),
                          np.asarray(Image.open(tmp_path / "out" / "a.png")))  # as drawn alone
    # Again into the same folder: refused before drawing; two images each are named by their seeds.
    assert main([*base, "--init-image", str(images), "--mask", str(masks), "--out", str(tmp_path / "out")]) == 2
    assert "holds a.png already (2 of the names this batch writes)" in capsys.readouterr().err
    # Two variations of one seed each (one mask for all): named by their variation seeds too.
    assert main([*base, "--init-image", str(images), "--mask", str(masks / "a.png"), "--batch-size", "2",
                 "--variation-seed", "7", "--variation-strength", "0.3", "--out", str(tmp_path / "two")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        f"{name}-3-{variation}.png" for name in "abc" for variation in (7, 8)]


def test_inpainting_flags_that_cannot_work_are_refused_naming_them(tiny_sd, tmp_path, capsys):  # noqa: F811
    _pictures(tmp_path)
    base = ["generate", str(tiny_sd), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o")]
    init = ["--init-image", str(tmp_path / "init.png")]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for flags, words in [
        (["--mask", str(tmp_path / "mask.png")], "--mask marks what img2img redraws: give --init-image too"),
        ([*init, "--mask-blur", "8"], "--mask-blur applies to inpainting: give --mask"),
        ([*init, "--mask", str(tmp_path / "mask.png"), "--masked-content", "noise"], "--masked-content 'noise'"),
        ([*init, "--mask", str(tmp_path / "mask.png"), "--mask-blur", "99"], "--mask-blur 99: from 0 to 64"),
        ([*init, "--mask", str(tmp_path / "broken.png")], f"--mask {tmp_path / 'broken.png'}: not a mask"),
        ([*init, "--mask", str(tmp_path / "none.png")], "no such file"),
        ([*init, "--resize-mode", "latent upscale"], "--resize-mode 'latent upscale': choose one of just resize"),
        ([*init, "--mask", str(tmp_path / "mask.png"), "--resize-mode", "just resize (latent upscale)"],
         "resizes the image's latents, which an inpainting's mask and original do not follow"),
        (["--resize-mode", "crop and resize"], "--resize-mode brings img2img's image to the size drawn"),
    ]:
        assert main([*base, *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags


# ----------------------------------------------------------------------------- inpainting models (9 channels)
@pytest.fixture(scope="module")
def inpainting_sd(tiny_sd, tmp_path_factory):  # noqa: F811
    """The tiny SD with an inpainting UNet (latents, mask, masked image's latents: 9 input channels), as
    sd-v1-5-inpainting's diffusers folder is laid out."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("inpainting") / "sd"
    shutil.copytree(tiny_sd, folder)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(folder / "unet"), "in_channels": 9}
                                     ).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    return folder


def _unet_inputs(drawer) -> list[torch.Tensor]:
    seen = []
    drawer.pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_an_inpainting_model_is_given_the_mask_and_the_masked_image_as_a1111_gives_them(inpainting_sd, tmp_path):
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.text2image import encode_pixels

    init, mask = _pictures(tmp_path)
    # Text to image: the whole image masked (ones) and a grey image's latents, on every call (both CFG halves).
    drawer = Drawer(str(inpainting_sd), GenerateOptions(prompt="a red circle", steps=3, width=64, height=48),
                    progress=False)
    seen = _unet_inputs(drawer)
    [image] = drawer.draw("a red circle", "", [1])
    grey = encode_pixels(drawer.pipe, torch.zeros(1, 3, 48, 64))
    size = (48 // drawer.pipe.vae_scale_factor, 64 // drawer.pipe.vae_scale_factor)
    assert len(seen) == 3 and all(x.shape == (2, 9, *size) for x in seen)
    assert all((x[:, 4] == 1).all() and torch.allclose(x[:, 5:], grey.expand(2, -1, -1, -1)) for x in seen)
    encodes = []
    drawer.pipe.vae.encoder.register_forward_pre_hook(lambda module, args: encodes.append(1))
    assert np.array_equal(np.asarray(drawer.draw("a red circle", "", [1])[0]), np.asarray(image))
    assert encodes == []  # the grey image's latents are encoded once for this VAE and size, not every draw
    # Inpainting: the rounded mask (nearest to the latents' size) and the latents of the image with it zeroed.
    options = GenerateOptions(prompt="a red circle", steps=4, width=64, height=48,
                              init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "mask.png"),
                              masked_content="fill")
    drawer = Drawer(str(inpainting_sd), options, progress=False)
    seen = _unet_inputs(drawer)
    [image] = drawer.draw("a red circle", "", [1])
    ready = prepare(init, mask, 64, 48, fill_mode="fill")
    rounded = torch.from_numpy(np.around(np.asarray(ready.mask, dtype=np.float32) / 255))[None, None]
    pixels = torch.from_numpy(np.asarray(ready.image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    masked = encode_pixels(drawer.pipe, pixels * (1 - rounded))
    small = torch.nn.functional.interpolate(rounded, size=size)
    assert len(seen) == 4  # int(4 x 0.75) + 1 steps of the schedule's tail (A1111's img2img steps)
    for x in seen:
        assert torch.equal(x[:, 4:5], small.expand(2, -1, -1, -1))
        torch.testing.assert_close(x[:, 5:], masked.expand(2, -1, -1, -1), rtol=1e-4, atol=1e-4)
    assert not torch.equal(masked, encode_pixels(drawer.pipe, pixels))  # (the mask's zeros took part)
    alpha = np.asarray(ready.overlay)[..., 3]
    assert np.array_equal(np.asarray(image)[alpha == 255], np.asarray(init)[alpha == 255])
    # Soft inpainting: its conditioning mask keeps the blurred greys too (A1111 rounds no mask then).
    from dataclasses import replace

    from difftrain.sampling.soft_inpaint import SoftInpainting

    soft = SoftInpainting()
    drawer = Drawer(str(inpainting_sd), replace(options, mask_blur=8, soft_inpainting=soft), progress=False)
    seen = _unet_inputs(drawer)
    drawer.draw("a red circle", "", [1])
    unrounded = np.asarray(prepare(init, mask, 64, 48, (8, 8), fill_mode="fill", soft=soft).mask, dtype=np.float32)
    small = torch.nn.functional.interpolate(torch.from_numpy(unrounded / 255)[None, None], size=size)
    assert ((small > 0.05) & (small < 0.95)).any() and torch.equal(seen[0][:, 4:5], small.expand(2, -1, -1, -1))


def test_an_inpainting_models_single_file_draws_with_its_base_models_configs(inpainting_sd, tiny_sd,  # noqa: F811
                                                                          tmp_path):
    """sd-v1-5-inpainting.safetensors with --config of the v1-5 folder: the UNet takes the file's 9 channels, and
    draws what the diffusers folder draws. Training still refuses it, by name."""
    from diffusers import StableDiffusionPipeline

    from difftrain.models.sd import ModelLoadError, load_sd
    from difftrain.models.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(inpainting_sd, safety_checker=None, requires_safety_checker=False)
    save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "inpainting.safetensors")
    _pictures(tmp_path)
    drawn = []
    for model, extra in ((inpainting_sd, []), (tmp_path / "inpainting.safetensors", ["--config", str(tiny_sd)])):
        out = tmp_path / f"out-{len(drawn)}"
        assert main(["generate", str(model), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
                     "--mask", str(tmp_path / "mask.png"), "--steps", "3", "--width", "64", "--height", "48",
                     "--seed", "2", "--out", str(out), "--no-progress", *extra]) == 0
        drawn.append(np.asarray(Image.open(_outputs(out)[0]).convert("RGB")).astype(int))
    assert np.abs(drawn[0] - drawn[1]).max() <= 1
    with pytest.raises(ModelLoadError, match="StableDiffusionInpaintPipeline, an inpainting model .* trains"):
        load_sd(str(inpainting_sd))


def test_a_served_inpainting_model_draws_what_generate_draws(inpainting_sd, tmp_path):
    import webuiapi

    from difftrain.serve.app import BackgroundServer, ServeSettings
    from difftrain.serve.requests import Limits

    init, mask = _pictures(tmp_path, size=(64, 64))
    running = BackgroundServer(ServeSettings(models=[str(inpainting_sd)], limits=Limits(max_width=128, max_height=128)))
    try:
        host, port = running.url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="Euler a", steps=3)
        served = api.img2img(images=[init], mask_image=mask, prompt="a red circle", seed=5, width=64, height=64,
                             denoising_strength=0.9, inpaint_full_res=False, inpainting_fill=1).image
        drawn_from_text = api.txt2img(prompt="a red circle", seed=5, width=64, height=64).image
    finally:
        running.stop()
    base = ["generate", str(inpainting_sd), "--prompt", "a red circle", "--scheduler", "Euler a", "--steps", "3",
            "--seed", "5", "--width", "64", "--height", "64", "--no-progress"]
    assert main([*base, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.9", "--out", str(tmp_path / "inpainted")]) == 0
    assert main([*base, "--out", str(tmp_path / "text")]) == 0
    for image, folder in ((served, "inpainted"), (drawn_from_text, "text")):
        mine = Image.open(_outputs(tmp_path / folder)[0]).convert("RGB")
        assert np.array_equal(np.asarray(mine), np.asarray(image.convert("RGB"))), folder
