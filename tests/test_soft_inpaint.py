"""A1111's soft inpainting: its filters and blend against A1111's own per-pixel algorithm written out as its code
reads, the blend wired into every kind of sampler (the scheduler's own estimate is A1111's blended one), and
`difftrain generate --soft-inpainting` and the server's `alwayson_scripts` end to end on the tiny SD."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_inpaint import _RandomUNet
from test_text2image import tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.sampling.masked import keeping_unmasked
from difftrain.sampling.soft_inpaint import (SoftInpainting, composite_masks, gaussian_kernel, latent_blend, step_mask,
                                             weighted_histogram_filter)


def _a1111_filter(img, kernel, centre, percentile_min, percentile_max, min_width=1.0):
    """A1111's weighted_histogram_filter, pixel by pixel as its code does it (the oracle)."""
    out = img.copy()
    for y, x in np.ndindex(img.shape):
        items = []
        for wy in range(max(0, y - centre), min(img.shape[0], y - centre + kernel.shape[0])):
            for wx in range(max(0, x - centre), min(img.shape[1], x - centre + kernel.shape[1])):
                items.append([float(img[wy, wx]), float(kernel[wy - y + centre, wx - x + centre])])
        items.sort(key=lambda item: item[0])
        stack, bounds = 0.0, []
        for value, weight in items:
            bounds.append((stack, stack + weight))
            stack += weight
        low, high = stack * percentile_min, stack * percentile_max
        if high - low < min_width:
            middle = (low + high) / 2
            low, high = middle - min_width / 2, middle + min_width / 2
            if high > stack:
                low, high = stack - min_width, stack
            if low < 0:
                low, high = 0, min_width
        total = weight_sum = 0.0
        for (value, _), (bottom, top) in zip(items, bounds):
            if low >= top:
                continue
            if high <= bottom:
                break
            width = min(high, top) - max(low, bottom)
            total, weight_sum = total + value * width, weight_sum + width
        out[y, x] = total / weight_sum if weight_sum != 0 else 0
    return out


@pytest.mark.parametrize("window", [(0.9, 1.0), (0.25, 0.75), (0.5, 0.5)])
def test_the_weighted_histogram_filter_is_a1111s(window):
    image = np.random.default_rng(0).random((7, 9), dtype=np.float32) * 3
    image[2, 3] = image[2, 4] = image[5, 5]  # (ties)
    kernel = gaussian_kernel(stddev_radius=1.5, max_radius=2)
    for weights, width in ((kernel, 1.0), (kernel * 0.05, 1.0), (kernel, 0.3)):  # (0.05: every window narrow)
        ours = weighted_histogram_filter(image, weights, *window, min_width=width)
        assert ours.dtype == np.float32 and ours.shape == image.shape
        np.testing.assert_allclose(ours, _a1111_filter(image, weights, 2, *window, width), rtol=1e-6, atol=1e-6)


def test_the_kernel_is_a1111s_thresholded_gaussian():
    kernel = gaussian_kernel(stddev_radius=1.5, max_radius=2)
    floor = math.exp(-9 / 2.25)
    assert kernel.shape == (5, 5) and kernel[2, 2] == 1 and np.array_equal(kernel, kernel.T)
    assert kernel[0, 1] == pytest.approx((math.exp(-5 / 2.25) - floor) / (1 - floor))
    assert gaussian_kernel(1.0, 1)[0, 0] == pytest.approx((math.exp(-2) - math.exp(-4)) / (1 - math.exp(-4)))


def test_the_blend_keeps_the_lengths_and_the_step_mask_grows_with_the_noise():
    settings = SoftInpainting()
    generator = torch.Generator().manual_seed(0)
    init, current = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    zeros, ones = torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3)
    torch.testing.assert_close(latent_blend(settings, init, current, zeros), init, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent_blend(settings, init, current, ones), current, rtol=1e-4, atol=1e-4)
    half = latent_blend(settings, init, current, ones / 2)
    length = lambda x: torch.linalg.vector_norm(x.double(), dim=1)  # noqa: E731
    wanted = ((length(init) ** 4 + length(current) ** 4) / 2) ** 0.25  # the power mean of the two lengths
    torch.testing.assert_close(length(half), wanted, rtol=1e-4, atol=1e-4)
    direction = (init + current) / length(init + current)[:, None]  # a plain mix's direction
    torch.testing.assert_close((half / length(half)[:, None]).float(), direction.float(), rtol=1e-4, atol=1e-4)
    grey = torch.tensor([0.0, 0.5, 1.0])
    assert step_mask(settings, grey, 2.0).tolist() == [0.0, 0.5, 1.0]  # 0.5 ** (2 ** 1 x 0.5)
    assert step_mask(settings, grey, 0.5)[1] == pytest.approx(0.5 ** 0.25)  # later, less noise: more redrawn
    assert step_mask(SoftInpainting(schedule_bias=2), grey, 2.0)[1] == pytest.approx(0.5 ** 2)


def test_the_commands_flags_are_the_settings_with_their_defaults():
    """(cli.py names them without importing torch: the two lists must not drift apart)"""
    from dataclasses import fields

    from difftrain.cli import SOFT_INPAINTING_FLAGS

    settings = fields(SoftInpainting)
    assert [name for name, _ in SOFT_INPAINTING_FLAGS] == [setting.name for setting in settings]
    for (_, what), setting in zip(SOFT_INPAINTING_FLAGS, settings):
        assert f"(default {setting.default:g})" in what, setting.name


def test_composite_masks_show_what_moved_and_keep_what_did_not():
    init = torch.zeros(1, 4, 12, 16)
    latents = init.clone()
    latents[..., 4:8, 10:14] = 3.0  # moved far; the rest not at all
    redraw = torch.zeros(1, 1, 12, 16)
    [mask] = composite_masks(SoftInpainting(), redraw, init, latents)
    assert mask.dtype == np.uint8 and mask.shape == (12, 16)
    assert (mask[4:8, 10:14] >= 254).all() and (mask[:, :6] == 0).all() and (mask[11] == 0).all()  # (truncated)
    # A larger difference threshold keeps the original where it moved less than that.
    assert (composite_masks(SoftInpainting(difference_threshold=8), redraw, init, latents * 0.5)[0] < 60).all()


# ----------------------------------------------------------------------------- the blend while sampling
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_every_guided_estimate_is_a1111s_soft_blend(tiny_sd, prediction):  # noqa: F811
    """Each scheduler's own x0 of the step, from the prediction that both replaced halves guide to, is A1111's
    latent_blend of the init latents and the UNet's guided x0 through the step mask of the step's sigma."""
    from diffusers import DDPMScheduler

    from difftrain.sampling.masked import _sigma_now
    from difftrain.sampling.schedulers import make_scheduler

    config = dict(DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler").config, prediction_type=prediction)
    settings = SoftInpainting(schedule_bias=1.5, preservation_strength=0.8)
    init = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    redraw = torch.zeros(1, 1, 6, 6)
    redraw[..., 1:5, 1:5] = 0.4
    redraw[..., 2:4, 2:4] = 1
    for name in ("euler", "euler_a", "dpm++_2m", "ddim", "heun"):
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(8)
        begin = 2 * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        pipe = SimpleNamespace(unet=_RandomUNet(), scheduler=scheduler, do_classifier_free_guidance=True,
                               guidance_scale=7.5)
        x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
        with keeping_unmasked(pipe, init, redraw, settings):
            for index, t in enumerate(scheduler.timesteps[begin:begin + 4]):
                model_input = scheduler.scale_model_input(x, t)
                halves = pipe.unet(torch.cat([model_input] * 2), t).sample
                assert torch.equal(halves[:1], halves[1:]), name  # guidance leaves the blended prediction be
                raw = _RandomUNet()(torch.cat([model_input] * 2), t).sample
                guided = raw[:1] + 7.5 * (raw[1:] - raw[:1])
                sigma = _sigma_now(scheduler, t)
                a = float(1 / (sigma ** 2 + 1).sqrt())
                s = float(sigma) * a
                x0_raw = (model_input - s * guided) / a if prediction == "epsilon" else a * model_input - s * guided
                wanted = latent_blend(settings, init, x0_raw, step_mask(settings, redraw, sigma))
                x0 = (model_input - s * halves[:1]) / a if prediction == "epsilon" else a * model_input - s * halves[:1]
                torch.testing.assert_close(x0, wanted, rtol=1e-4, atol=2e-4, msg=name)
                drawn = {"generator": torch.Generator().manual_seed(index)} if name == "euler_a" else {}
                x = scheduler.step(halves[:1], t, x, **drawn).prev_sample
        assert "forward" not in pipe.unet.__dict__


# ----------------------------------------------------------------------------- the command and the server
def _pictures(tmp_path):
    init = Image.new("RGB", (128, 96), (200, 30, 30))
    ImageDraw.Draw(init).rectangle((0, 0, 30, 95), fill=(20, 20, 220))
    mask = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(mask).rectangle((84, 12, 108, 36), fill=255)
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    return init, mask


def _drawn(folder) -> np.ndarray:
    [path] = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_soft_inpaints_records_it_and_from_png_repeats_it(tiny_sd, tmp_path, capsys):  # noqa: F811
    init, _ = _pictures(tmp_path)
    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
            "--mask", str(tmp_path / "mask.png"), "--scheduler", "Euler", "--steps", "6", "--seed", "3",
            "--width", "128", "--height", "96", "--no-progress"]
    assert main([*base, "--soft-inpainting", "--soft-schedule-bias", "1.5", "--out", str(tmp_path / "soft")]) == 0
    assert main([*base, "--out", str(tmp_path / "hard")]) == 0
    [path] = sorted((tmp_path / "soft").glob("*.png"))
    text = Image.open(path).info["parameters"]
    assert ("Soft inpainting enabled: True, Soft inpainting schedule bias: 1.5, Soft inpainting preservation "
            "strength: 0.5, Soft inpainting transition contrast boost: 4, Soft inpainting mask influence: 0, Soft "
            "inpainting difference threshold: 0.5, Soft inpainting difference contrast: 2") in text
    soft, hard, original = _drawn(tmp_path / "soft"), _drawn(tmp_path / "hard"), np.asarray(init).astype(int)
    assert np.array_equal(soft[64:], original[64:]) and np.array_equal(soft[:, :56], original[:, :56])
    assert np.abs(soft[12:37, 84:109] - original[12:37, 84:109]).mean() > 20  # the mask itself redrawn
    # Laid over through what moved, not the painted mask: changes beyond the hard inpainting's blurred edge (x 74).
    assert np.array_equal(hard[:, :72], original[:, :72]) and np.abs(soft[12:37, 64:72] - original[12:37, 64:72]
                                                                      ).mean() > 1
    assert np.abs(soft - hard).max() > 20  # (not the hard inpainting's image)
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(_drawn(tmp_path / "again"), soft)
    # A flag given with --from-png changes that setting alone.
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--soft-difference-threshold", "3",
                 "--out", str(tmp_path / "changed"), "--no-progress"]) == 0
    [changed] = sorted((tmp_path / "changed").glob("*.png"))
    changed_text = Image.open(changed).info["parameters"]
    assert "schedule bias: 1.5" in changed_text and "difference threshold: 3," in changed_text
    capsys.readouterr()
    for argv, said in [
        ([*base, "--soft-mask-influence", "0.5"], "--soft-mask-influence sets soft inpainting: give --soft-inpainting"),
        ([*base, "--soft-inpainting", "--soft-transition-contrast-boost", "0.5"],
         "--soft-transition-contrast-boost 0.5: from 1 to 32"),
        ([*base[:6], *base[8:], "--soft-inpainting"], "--soft-inpainting applies to inpainting: give --mask"),
        (["generate", str(tiny_sd), "--from-png", str(tmp_path / "hard" / next((tmp_path / "hard").iterdir()).name),
          "--soft-mask-influence", "0.5"], "was not soft-inpainted: give --soft-inpainting"),
    ]:
        assert main([*argv, "--out", str(tmp_path / "refused")]) == 2, argv
        assert said in capsys.readouterr().err, argv
    assert not (tmp_path / "refused").exists()


def test_served_soft_inpainting_draws_what_generate_draws(tiny_sd, tmp_path):  # noqa: F811
    import requests
    import webuiapi

    from difftrain.serve.app import BackgroundServer, ServeSettings
    from difftrain.serve.requests import Limits

    init, mask = _pictures(tmp_path)
    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)], limits=Limits(max_width=128, max_height=128)))
    try:
        host, port = running.url.rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="Euler a", steps=4)
        soft = {"soft inpainting": {"args": [True, 1, 0.5, 4, 0.2, 0.5, 2]}}
        served = api.img2img(images=[init], mask_image=mask, prompt="a red circle", seed=5, width=128, height=96,
                             denoising_strength=0.8, inpainting_fill=1, inpaint_full_res=False, alwayson_scripts=soft)
        body = {"init_images": [webuiapi.raw_b64_img(init)], "mask": webuiapi.raw_b64_img(mask), "steps": 2,
                "width": 64, "height": 64}
        answers = [requests.post(f"{running.url}/sdapi/v1/img2img", json={**body, "alwayson_scripts": scripts})
                   for scripts in ({"Soft Inpainting": {"args": [True, 1, 0.5, 40]}},
                                   {"soft inpainting": {"args": "on"}})]
        answers.append(requests.post(f"{running.url}/sdapi/v1/txt2img", json={"alwayson_scripts": soft, "width": 64,
                                                                              "height": 64}))
        unrounded = requests.post(f"{running.url}/sdapi/v1/img2img", json={**body, "mask_round": False})
        unrounded_soft = requests.post(f"{running.url}/sdapi/v1/img2img",
                                       json={**body, "mask_round": False, "alwayson_scripts": soft})
    finally:
        running.stop()
    text = served.image.info["parameters"]
    assert "Soft inpainting enabled: True" in text and "Soft inpainting mask influence: 0.2" in text
    assert main(["generate", str(tiny_sd), "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--soft-inpainting", "--soft-mask-influence", "0.2",
                 "--scheduler", "Euler a", "--steps", "4", "--strength", "0.8", "--seed", "5", "--width", "128",
                 "--height", "96", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert np.array_equal(_drawn(tmp_path / "out"), np.asarray(served.image.convert("RGB")).astype(int))
    errors = [(answer.status_code, json.loads(answer.text).get("field"), json.loads(answer.text)["detail"])
              for answer in answers]
    assert errors[0][:2] == (422, "alwayson_scripts.soft inpainting.args[3]") and "from 1 to 32" in errors[0][2]
    assert errors[1][:2] == (422, "alwayson_scripts.soft inpainting.args") and "enabled, schedule bias" in errors[1][2]
    assert errors[2][:2] == (422, "alwayson_scripts") and "soft inpainting is img2img's" in errors[2][2]
    # A1111's soft inpainting rounds no mask itself; without it, an unrounded mask is not served.
    assert unrounded.status_code == 422 and unrounded.json()["field"] == "mask_round"
    assert unrounded_soft.status_code == 200, unrounded_soft.text
