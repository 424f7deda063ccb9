"""The web page at `/`, in a real headless browser (Debian's chromium through Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_text2image import tiny_sd  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTEFACTS = Path(__file__).parent / "artefacts"  # the page's screenshot is kept here (git-ignored)


def _image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt install chromium)")
def test_the_page_generates_shows_and_reuses_an_image_offline(tiny_sd, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    import webuiapi

    from difftrain.models.tiny_sd import write_tiny_controlnet
    from difftrain.serve.app import BackgroundServer, ServeSettings

    from test_upscalers import original_esrgan

    (tmp_path / "upscalers").mkdir()
    torch.save(original_esrgan(), tmp_path / "upscalers" / "4x-Tiny.pth")
    write_tiny_controlnet(tiny_sd, tmp_path / "controlnets" / "cn", seed=1)
    control = Image.new("RGB", (64, 64))
    ImageDraw.Draw(control).rectangle((16, 16, 48, 48), fill=(255, 255, 255))
    control.save(tmp_path / "control.png")
    second = Image.new("RGB", (64, 64))
    ImageDraw.Draw(second).ellipse((4, 30, 30, 60), fill=(255, 255, 255))
    second.save(tmp_path / "second.png")
    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)], upscaler_dir=str(tmp_path / "upscalers"),
                                             controlnet_dir=str(tmp_path / "controlnets")))
    outside: list[str] = []
    jobs: list[dict] = []  # the bodies the page posts to /v1/jobs
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("request", lambda request: None if request.url.startswith((running.url, "data:"))
                    else outside.append(request.url))
            page.on("request", lambda request: jobs.append(request.post_data_json)
                    if request.method == "POST" and request.url.endswith("/v1/jobs") else None)
            page.goto(running.url + "/")
            page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 10")
            page.click("#tab_img2img")
            page.click("#generate")
            no_image = page.inner_text("#status")
            page.click("#tab_txt2img")
            page.fill("#prompt", "a red circle")
            for field, value in (("steps", "3"), ("width", "64"), ("height", "64"), ("seed", "11")):
                page.fill(f"#{field}", value)
            page.select_option("#sampler_name", "DPM++ 2M")
            page.click("#generate")
            page.wait_for_selector("figure img", timeout=60_000)
            source = page.get_attribute("figure img", "src")
            caption = page.inner_text("figure figcaption")
            ARTEFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTEFACTS / "serve-page.png"), full_page=True)
            assert page.input_value("#seed") == "11"
            page.fill("#seed", "99")
            page.fill("#prompt", "something else")
            page.click("figure button")  # "Reuse settings"
            reused = {field: page.input_value(f"#{field}") for field in ("prompt", "seed", "steps", "sampler_name")}
            assert page.get_attribute("figure a", "download") == "difftrain-11.png"
            assert page.inner_text("#status") == "done"
            # img2img: the image sent from the gallery, a stroke painted across its middle (shown at 6x its size).
            page.click("figure button.send")
            page.wait_for_function("document.querySelector('#mask').width == 64")
            mode = page.get_attribute("body", "data-mode")
            box = page.locator("#mask").bounding_box()
            at = lambda x, y: (box["x"] + x * box["width"] / 64, box["y"] + y * box["height"] / 64)  # noqa: E731
            page.mouse.move(*at(16, 32))
            page.mouse.down()
            page.mouse.move(*at(32, 32), steps=4)
            page.mouse.move(*at(48, 32), steps=4)
            page.mouse.up()
            page.fill("#denoising_strength", "0.9")
            page.select_option("#inpainting_fill", "latent noise")  # new content where painted, plainly
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('figure img').length == 2", timeout=60_000)
            inpainted, inpaint_caption = page.get_attribute("figure img", "src"), page.inner_text("figure figcaption")
            page.screenshot(path=str(ARTEFACTS / "serve-page-inpaint.png"), full_page=True)
            page.select_option("#inpainting_fill", "original")
            page.fill("#mask_blur", "9")
            page.click("#tab_txt2img")
            page.locator("figure button.reuse").first.click()
            inpaint_reused = [page.get_attribute("body", "data-mode"), *map(page.input_value, (
                "#inpainting_fill", "#mask_blur", "#denoising_strength", "#inpaint_full_res"))]
            page.check("#soft_inpainting")
            page.select_option("#resize_mode", "Crop and resize")
            soft_sent = page.evaluate("[request().alwayson_scripts, request().resize_mode]")
            page.locator("figure button.reuse").first.click()  # (that image was not soft-inpainted)
            soft_reused = page.is_checked("#soft_inpainting")
            page.click("#tab_txt2img")
            # The hires fix, through the server's ESRGAN: the newest figure comes first.
            upscalers = page.eval_on_selector_all("#hr_upscaler option", "options => options.map(o => o.value)")
            page.check("#enable_hr")
            page.fill("#hr_scale", "1.5")
            page.select_option("#hr_upscaler", "4x-Tiny")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('figure img').length == 3", timeout=60_000)
            hires = page.get_attribute("figure img", "src")
            page.uncheck("#enable_hr")
            page.locator("figure button").first.click()  # its settings, the checkbox included
            hires_reused = [page.is_checked("#enable_hr"), *map(page.input_value, ("#hr_scale", "#hr_upscaler"))]
            # An uploaded image is drawn at its own size, to a multiple of 8; the mask canvas takes its size.
            Image.new("RGB", (50, 41), "red").save(tmp_path / "upload.png")
            page.click("#tab_img2img")
            page.set_input_files("#init_image", str(tmp_path / "upload.png"))
            page.wait_for_function("document.querySelector('#mask').width == 50")
            uploaded = [page.input_value("#width"), page.input_value("#height"), page.evaluate(
                "document.querySelector('#mask').height")]
            # The eraser: a stroke across the upload, its right half erased, then the rest (nothing left: no mask).
            box = page.locator("#mask").bounding_box()
            on_upload = lambda x, y: (box["x"] + x * box["width"] / 50, box["y"] + y * box["height"] / 41)  # noqa: E731

            def stroke(start: int, end: int) -> None:
                page.mouse.move(*on_upload(start, 20))
                page.mouse.down()
                page.mouse.move(*on_upload(end, 20), steps=6)
                page.mouse.up()

            stroke(4, 46)
            page.check("#eraser")
            stroke(26, 49)
            half_erased = page.evaluate("maskImage()")
            stroke(1, 26)
            all_erased = page.evaluate("maskImage()")
            page.uncheck("#eraser")
            # A ControlNet unit, drawn as an A1111 client's unit is drawn (below).
            page.click("#tab_txt2img")
            page.uncheck("#enable_hr")
            for field, value in (("width", "64"), ("height", "64"), ("seed", "11"), ("cn_weight_0", "0.8")):
                page.fill(f"#{field}", value)
            page.select_option("#cn_model_0", "cn")
            page.click("#generate")
            no_control = page.inner_text("#status")
            page.set_input_files("#cn_image_0", str(tmp_path / "control.png"))
            page.wait_for_function("controlImages[0] !== null")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('figure img').length == 4", timeout=60_000)
            controlled = page.get_attribute("figure img", "src")
            # A second unit beside it (the third left empty), and both reused from the gallery.
            page.select_option("#cn_model_1", "cn")
            page.fill("#cn_weight_1", "0.5")
            page.set_input_files("#cn_image_1", str(tmp_path / "second.png"))
            page.wait_for_function("controlImages[1] !== null")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('figure img').length == 5", timeout=60_000)
            two_units = page.get_attribute("figure img", "src")
            for unit in (0, 1):
                page.select_option(f"#cn_model_{unit}", "")
            page.locator("figure .reuse").first.click()
            units_reused = [page.input_value(f"#cn_{part}_{unit}") for unit in (0, 1, 2)
                            for part in ("model", "weight")]
            # A unit 1 alone, with an image left on unit 0, comes back as unit 1 (it came back as unit 0, beside
            # unit 0's image); a cleared file input lets its image go.
            slots = page.evaluate("""() => {
              $("cn_model_0").value = ""; $("cn_model_1").value = "cn";
              const body = request(); $("cn_model_1").value = ""; reuse(body, "txt2img");
              return [$("cn_model_0").value, $("cn_model_1").value, body.alwayson_scripts.ControlNet.args.length];
            }""")
            page.set_input_files("#cn_image_0", [])
            cleared = page.evaluate("controlImages[0]")
            # Cancelled while it waits or draws (40 steps at 128 px): no image comes. Typed values between the
            # fields' arrow steps (A1111 takes them) are sent, a hidden field's too: the browser blocked the form.
            for field, value in (("steps", "40"), ("width", "128"), ("height", "128"), ("denoising_strength", "0.33"),
                                 ("hr_scale", "1.3")):
                page.fill(f"#{field}", value)
            for unit in (0, 1):
                page.select_option(f"#cn_model_{unit}", "")
            page.click("#generate")
            page.wait_for_function("!document.querySelector('#cancel').disabled")
            page.click("#cancel")
            page.wait_for_function("!document.querySelector('#generate').disabled", timeout=60_000)
            cancelled = [page.inner_text("#status"), page.locator("figure img").count(), page.evaluate(
                "document.querySelector('#progress').value")]
            browser.close()
        host, port = running.url.rsplit(":", 1)
        unit = webuiapi.ControlNetUnit(image=control, module="none", model="cn", weight=0.8)
        client = webuiapi.WebUIApi(host=host.split("//")[1], port=int(port))
        asked = dict(prompt="a red circle", seed=11, steps=3, sampler_name="DPM++ 2M", cfg_scale=7, width=64, height=64,
                     alwayson_scripts={})
        direct = client.txt2img(**asked, controlnet_units=[unit]).image
        direct_two = client.txt2img(**asked, controlnet_units=[
            unit, webuiapi.ControlNetUnit(image=second, module="none", model="cn", weight=0.5)]).image
    finally:
        running.stop()
    image = _image(source)
    assert image.size == (64, 64)
    assert "Steps: 3, Sampler: DPM++ 2M" in image.info["parameters"] and "Seed: 11," in image.info["parameters"]
    assert caption == image.info["parameters"]
    assert reused == {"prompt": "a red circle", "seed": "11", "steps": "3", "sampler_name": "DPM++ 2M"}
    hires = _image(hires)
    # (one Denoise field serves both tabs: the inpainting's 0.9, reused, is the hires fix's too)
    assert hires.size == (96, 96) and "Denoising strength: 0.9, Hires upscale: 1.5" in hires.info["parameters"]
    assert "Hires upscaler: 4x-Tiny" in hires.info["parameters"]
    assert upscalers[:2] == ["Latent", "Latent (antialiased)"] and upscalers[-4:] == ["None", "Lanczos", "Nearest",
                                                                                      "4x-Tiny"]
    assert hires_reused == [True, "1.5", "4x-Tiny"]
    assert outside == []  # nothing from a CDN or anywhere else: the page works offline
    assert no_image.startswith("error: img2img needs an image")
    # The inpainting: the gallery's image itself and the stroke, on the image's own pixels, sent as a mask.
    assert mode == "img2img" and [job["type"] for job in jobs] == ["txt2img", "img2img", *["txt2img"] * 4]
    sent = jobs[1]["request"]
    assert "enable_hr" not in sent and (sent["mask_blur"], sent["inpainting_fill"], sent["inpaint_full_res"],
                                        sent["denoising_strength"]) == (4, 2, False, 0.9)
    init = np.asarray(_image(sent["init_images"][0]).convert("RGB"))
    assert np.array_equal(init, np.asarray(image.convert("RGB")))
    mask = np.asarray(_image(sent["mask"]).convert("L"))
    rows, columns = np.nonzero(mask > 128)
    assert mask.shape == (64, 64) and set(np.unique(mask)) >= {0, 255}
    assert (rows.min(), rows.max(), columns.min(), columns.max()) in [
        (y0, y1, x0, x1) for y0 in (25, 26, 27) for y1 in (37, 38) for x0 in (9, 10, 11) for x1 in (53, 54)]
    drawn = np.asarray(_image(inpainted).convert("RGB"))
    far = np.r_[0:12, 53:64]  # rows the blurred mask (a 21-px kernel about rows 26-38) leaves whole
    assert np.array_equal(drawn[far], init[far])
    assert np.abs(drawn[28:37, 12:52].astype(int) - init[28:37, 12:52]).mean() > 10
    for text in ("Denoising strength: 0.9", "Mask blur: 4", "Masked content: latent noise"):
        assert text in inpaint_caption
    assert inpaint_reused == ["img2img", "2", "4", "0.9", "false"]
    assert soft_sent == [{"soft inpainting": {"args": [True]}}, 1] and soft_reused is False
    assert uploaded == ["64", "64", 41]  # 48 x 40 is below the 64 px the server draws at least
    # What stays of the stroke is its left part, binary as A1111's UI makes a painted mask; all erased, none is sent.
    left = np.asarray(_image(half_erased).convert("L"))
    columns = np.nonzero((left == 255).any(axis=0))[0]
    assert left.shape == (41, 50) and set(np.unique(left)) == {0, 255}
    assert columns.min() == 0 and 18 <= columns.max() <= 23 and (left[:, 24:] == 0).all()
    assert all_erased is None
    assert cancelled == ["cancelled", 5, 0]  # (the bar showed full)
    assert (jobs[-1]["request"]["denoising_strength"], jobs[-1]["request"]["hr_scale"]) == (0.33, 1.3)
    assert no_control == "error: ControlNet unit 0 needs its control image"
    [sent_unit, *off] = jobs[3]["request"]["alwayson_scripts"]["ControlNet"]["args"]
    assert off == [{"enabled": False}] * 2  # every unit in its slot, as A1111's UI sends them
    assert {key: sent_unit[key] for key in ("enabled", "model", "module", "weight")} == {
        "enabled": True, "model": "cn", "module": "none", "weight": 0.8}
    assert np.array_equal(np.asarray(_image(sent_unit["image"]).convert("RGB")), np.asarray(control))
    assert np.array_equal(np.asarray(_image(controlled).convert("RGB")), np.asarray(direct.convert("RGB")))
    # (the first image's settings but for the unit: the unit acted)
    assert not np.array_equal(np.asarray(_image(controlled).convert("RGB")), np.asarray(image.convert("RGB")))
    # Two units: both sent in order, drawn as a client's two units are, and not as the first alone.
    assert [(u["weight"], np.array_equal(np.asarray(_image(u["image"]).convert("RGB")), np.asarray(picture)))
            for u, picture in zip(jobs[4]["request"]["alwayson_scripts"]["ControlNet"]["args"][:2], (control, second),
                                  strict=True)] == [(0.8, True), (0.5, True)]
    assert np.array_equal(np.asarray(_image(two_units).convert("RGB")), np.asarray(direct_two.convert("RGB")))
    assert not np.array_equal(np.asarray(_image(two_units).convert("RGB")), np.asarray(direct.convert("RGB")))
    assert units_reused == ["cn", "0.8", "cn", "0.5", "", "1"]
    assert slots == ["", "cn", 3] and cleared is None
    assert Image.open(ARTEFACTS / "serve-page.png").size[0] >= 1100
