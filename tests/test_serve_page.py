"""The web page at `/`, in a real headless browser (Debian's chromium through Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_text2image import tiny_sd  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTEFACTS = Path(__file__).parent / "artefacts"  # the page's screenshot is kept here (git-ignored)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt install chromium)")
def test_the_page_generates_shows_and_reuses_an_image_offline(tiny_sd, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from difftrain.serve.app import BackgroundServer, ServeSettings

    from test_upscalers import original_esrgan

    (tmp_path / "upscalers").mkdir()
    torch.save(original_esrgan(), tmp_path / "upscalers" / "4x-Tiny.pth")
    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)], upscaler_dir=str(tmp_path / "upscalers")))
    outside: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("request", lambda request: None if request.url.startswith((running.url, "data:"))
                    else outside.append(request.url))
            page.goto(running.url + "/")
            page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 10")
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
            # The hires fix, through the server's ESRGAN: the newest figure comes first.
            upscalers = page.eval_on_selector_all("#hr_upscaler option", "options => options.map(o => o.value)")
            page.check("#enable_hr")
            page.fill("#hr_scale", "1.5")
            page.select_option("#hr_upscaler", "4x-Tiny")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('figure img').length == 2", timeout=60_000)
            hires = page.get_attribute("figure img", "src")
            page.uncheck("#enable_hr")
            page.locator("figure button").first.click()  # its settings, the checkbox included
            hires_reused = [page.is_checked("#enable_hr"), *map(page.input_value, ("#hr_scale", "#hr_upscaler"))]
            browser.close()
    finally:
        running.stop()
    image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert image.size == (64, 64)
    assert "Steps: 3, Sampler: DPM++ 2M" in image.info["parameters"] and "Seed: 11," in image.info["parameters"]
    assert caption == image.info["parameters"]
    assert reused == {"prompt": "a red circle", "seed": "11", "steps": "3", "sampler_name": "DPM++ 2M"}
    hires = Image.open(io.BytesIO(base64.b64decode(hires.split(",", 1)[1])))
    assert hires.size == (96, 96) and "Denoising strength: 0.7, Hires upscale: 1.5" in hires.info["parameters"]
    assert "Hires upscaler: 4x-Tiny" in hires.info["parameters"]
    assert upscalers[:2] == ["Latent", "Latent (antialiased)"] and upscalers[-4:] == ["None", "Lanczos", "Nearest",
                                                                                      "4x-Tiny"]
    assert hires_reused == [True, "1.5", "4x-Tiny"]
    assert outside == []  # nothing from a CDN or anywhere else: the page works offline
    assert Image.open(ARTEFACTS / "serve-page.png").size[0] >= 1100
