"""`difftrain serve` on loopback, driven by webuiapi (the most used A1111 client) and by plain HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from test_personalise import lora_run  # noqa: F401
from test_text2image import tiny_sd  # noqa: F401
from test_upscalers import original_esrgan

from difftrain.cli import main
from difftrain.serve.app import BackgroundServer


@pytest.fixture(scope="module")
def server(tiny_sd, lora_run, tmp_path_factory):  # noqa: F811
    from difftrain.models.tiny_sd import write_tiny_controlnet, write_tiny_sd
    from difftrain.serve.app import ServeSettings
    from difftrain.serve.requests import Limits

    root = tmp_path_factory.mktemp("serve")
    other = write_tiny_sd(root / "other", seed=3)
    (root / "loras").mkdir()
    (root / "loras" / "shapes.safetensors").write_bytes((lora_run / "model" / "lora.safetensors").read_bytes())
    write_tiny_controlnet(tiny_sd, root / "controlnets" / "cn", seed=1)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from difftrain.models.control import adapter_for_unet

    torch.manual_seed(0)
    levels = len(AutoencoderKL.load_config(tiny_sd / "vae")["block_out_channels"])
    adapter_for_unet(UNet2DConditionModel.from_pretrained(tiny_sd / "unet"), levels, num_res_blocks=1).save_pretrained(
        root / "controlnets" / "adapter")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              root / "embeddings" / "shiny.safetensors")  # A1111's layout: the token is the file name
    save_file({"emb_params": torch.randn(1, 48)}, root / "embeddings" / "wide.safetensors")
    # Its token is one "shiny" brings (shiny, shiny_1): diffusers refuses it, and the model must still load.
    save_file({"emb_params": torch.randn(1, 32)}, root / "embeddings" / "shiny_1.safetensors")
    (root / "upscalers" / "ESRGAN").mkdir(parents=True)  # A1111's models folder: ESRGAN/ and RealESRGAN/ below
    torch.save(original_esrgan(), root / "upscalers" / "ESRGAN" / "4x-Tiny.pth")
    settings = ServeSettings(models=[str(tiny_sd), str(other), str(lora_run)], lora_dir=str(root / "loras"),
                             controlnet_dir=str(root / "controlnets"), embeddings_dir=str(root / "embeddings"),
                             upscaler_dir=str(root / "upscalers"),
                             limits=Limits(max_width=128, max_height=128, max_steps=40, max_queue=2))
    running = BackgroundServer(settings)
    yield running
    running.stop()


def client(server):
    import webuiapi

    host, port = server.url.rsplit(":", 1)
    return webuiapi.WebUIApi(host=host.split("//")[1], port=int(port), sampler="Euler a", steps=3)


def test_webuiapi_txt2img_gives_what_generate_gives_with_its_infotext(server, tiny_sd, tmp_path):  # noqa: F811
    from difftrain.generate.text2image import GenerateOptions, generate

    api = client(server)
    result = api.txt2img(prompt="a red (circle:1.2)", negative_prompt="blue", seed=5, width=64, height=64,
                         cfg_scale=6.0)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [5] and result.info["sd_model_name"] == "sd"
    text = result.image.info["parameters"]
    assert text.startswith("a red (circle:1.2)\nNegative prompt: blue\n")
    assert "Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.0, Seed: 5, Size: 64x64, Model: sd" in text
    assert result.info["infotexts"] == [text]
    # The same image `difftrain generate` draws for the same settings.
    [path] = generate(str(tiny_sd), GenerateOptions(prompt="a red (circle:1.2)", negative_prompt="blue", steps=3,
                                                    scheduler="Euler a", guidance_scale=6.0, seed=5, width=64,
                                                    height=64), tmp_path, progress=False)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(result.image.convert("RGB")))
    # A batch of two over two iterations: seeds 7..10, each PNG with its own.
    batch = api.txt2img(prompt="a cat", seed=7, width=64, height=64, batch_size=2, n_iter=2)
    assert batch.info["all_seeds"] == [7, 8, 9, 10]
    assert [f"Seed: {seed}," in image.info["parameters"] for seed, image in zip(range(7, 11), batch.images)] == [True] * 4
    # The repeated prompt's encoding came from the prompt cache; the image is the same as uncached.
    before = requests.get(f"{server.url}/v1/stats").json()["prompt_cache"]
    repeat = api.txt2img(prompt="a red (circle:1.2)", negative_prompt="blue", seed=5, width=64, height=64,
                         cfg_scale=6.0)
    after = requests.get(f"{server.url}/v1/stats").json()["prompt_cache"]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert np.array_equal(np.asarray(repeat.image), np.asarray(result.image))
    info = api.png_info(result.image)
    assert info.parameters["Seed"] == "5" and info.parameters["Prompt"] == "a red (circle:1.2)"
    # Prompt editing through the server's own step callback (which can interrupt) is generate's too.
    edited = api.txt2img(prompt="a [blue:red:1] (circle:1.2)", negative_prompt="blue", seed=5, width=64, height=64,
                         cfg_scale=6.0)
    [path] = generate(str(tiny_sd), GenerateOptions(prompt="a [blue:red:1] (circle:1.2)", negative_prompt="blue",
                                                    steps=3, scheduler="Euler a", guidance_scale=6.0, seed=5, width=64,
                                                    height=64), tmp_path / "edited", progress=False)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(edited.image.convert("RGB")))
    assert not np.array_equal(np.asarray(edited.image), np.asarray(result.image))
    # webuiapi sends eta 1 whatever the sampler: DDIM draws it, as A1111 does (it was drawn at 0), and says so.
    ddim = api.txt2img(prompt="a cat", seed=5, width=64, height=64, sampler_name="DDIM")
    assert "Eta DDIM: 1.0" in ddim.image.info["parameters"]
    [path] = generate(str(tiny_sd), GenerateOptions(prompt="a cat", steps=3, scheduler="DDIM", seed=5, width=64,
                                                    height=64, eta=1.0), tmp_path / "ddim", progress=False)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(ddim.image.convert("RGB")))
    with pytest.raises(RuntimeError, match=r'"field":"eta","detail":"eta: 0.5 with Euler a: diffusers'):
        api.txt2img(prompt="a cat", seed=5, width=64, height=64, eta=0.5)


def test_webuiapi_hires_fix_is_generates(server, tiny_sd, tmp_path):  # noqa: F811
    from difftrain.generate.hires import Hires
    from difftrain.generate.text2image import GenerateOptions, generate

    api = client(server)

    def generated(image, name: str, upscaler_dir: str = "models/upscalers", **hires) -> bool:
        """Whether `generate` draws the served image with these hires settings."""
        [path] = generate(str(tiny_sd), GenerateOptions(prompt="a red circle", steps=3, scheduler="Euler a", seed=5,
                                                        width=64, height=64, strength=0.6, upscaler_dir=upscaler_dir,
                                                        hires=Hires(scale=1.5, steps=2, **hires)),
                          tmp_path / name, progress=False)
        return np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image.convert("RGB")))

    result = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                         hr_second_pass_steps=2, denoising_strength=0.6)  # webuiapi sends hr_upscaler Latent
    assert result.image.size == (96, 96) and result.info["width"] == 64 and result.info["denoising_strength"] == 0.6
    text = result.image.info["parameters"]
    assert "Size: 64x64" in text and "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2" in text
    assert generated(result.image, "plain")
    # A hires checkpoint of its own (hr_checkpoint_name): another served model, by its title.
    [other] = [entry for entry in api.get_sd_models() if entry["model_name"] == "other"]
    checkpoint = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                             hr_second_pass_steps=2, denoising_strength=0.6, hr_checkpoint_name=other["title"])
    assert f"Hires checkpoint: {other['title']}" in checkpoint.image.info["parameters"]
    assert generated(checkpoint.image, "checkpoint", checkpoint=other["filename"])
    assert not np.array_equal(np.asarray(checkpoint.image), np.asarray(result.image))
    same = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                       hr_second_pass_steps=2, denoising_strength=0.6, hr_checkpoint_name="Use same checkpoint")
    assert np.array_equal(np.asarray(same.image), np.asarray(result.image))
    # A model upscaler of the server's folder, by the name /upscalers lists.
    listed = {entry["name"]: entry for entry in api.get_upscalers()}
    assert list(listed)[:3] == ["None", "Lanczos", "Nearest"] and listed["4x-Tiny"]["scale"] == 4
    assert [mode["name"] for mode in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]
    esrgan = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                         hr_second_pass_steps=2, denoising_strength=0.6, hr_upscaler="4x-Tiny")
    assert "Hires upscaler: 4x-Tiny" in esrgan.image.info["parameters"]
    folder = str(Path(listed["4x-Tiny"]["model_path"]).parents[1])
    assert generated(esrgan.image, "esrgan", folder, upscaler="4x-Tiny")
    assert not np.array_equal(np.asarray(esrgan.image), np.asarray(result.image))
    # A hires sampler of its own ("Use same sampler" is A1111's UI's word for none).
    own = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                      hr_second_pass_steps=2, denoising_strength=0.6, hr_sampler_name="DPM++ 2M", hr_scheduler="Karras")
    assert "Hires sampler: DPM++ 2M, Hires schedule type: Karras" in own.image.info["parameters"]
    assert generated(own.image, "own", sampler="dpm++_2m_karras")
    same = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                       hr_second_pass_steps=2, denoising_strength=0.6, hr_sampler_name="Use same sampler")
    assert np.array_equal(np.asarray(same.image), np.asarray(result.image))
    # An old-style sampler name's schedule type carries over to the hires sampler, as A1111's API splits it off.
    karras = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                         hr_second_pass_steps=2, denoising_strength=0.6, sampler_name="DPM++ 2M Karras",
                         hr_sampler_name="Euler")
    assert "Hires sampler: Euler, Hires schedule type: Karras" in karras.image.info["parameters"]
    # A hires prompt of its own.
    blue = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5,
                       hr_second_pass_steps=2, denoising_strength=0.6, hr_prompt="a blue circle")
    assert "Hires prompt: a blue circle" in blue.image.info["parameters"]
    assert generated(blue.image, "blue", prompt="a blue circle")
    assert not np.array_equal(np.asarray(blue.image), np.asarray(result.image))
    # img2img has no hires fix in A1111's API: asked there, it is refused, naming the field.
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    response = requests.post(f"{server.url}/sdapi/v1/img2img", json={
        "prompt": "x", "enable_hr": True, "init_images": [base64.b64encode(png.getvalue()).decode()]})
    assert response.status_code == 422 and response.json()["field"] == "enable_hr"


def test_webuiapi_extras_upscale_as_the_upscale_command_does(server, tmp_path, capsys):
    """A1111's Extras API (extra-single-image, extra-batch-images) through webuiapi: the folder's ESRGAN by name,
    "Upscale by" and "Upscale to" with its crop, a second upscaler blended in; the same pixels as `difftrain
    upscale`, the source PNG's parameters kept beside the postprocessing text; face restoration and paths refused."""
    from PIL.PngImagePlugin import PngInfo

    api = client(server)
    [tiny] = [entry for entry in api.get_upscalers() if entry["name"] == "4x-Tiny"]
    folder = str(Path(tiny["model_path"]).parents[1])
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Seed: 5, Size: 40x24")
    source.save(tmp_path / "source.png", pnginfo=info)
    sent = Image.open(tmp_path / "source.png")
    result = api.extra_single_image(sent, upscaler_1="4x-Tiny", upscaling_resize=4)
    assert result.image.size == (160, 96)
    assert result.info == "<p>Postprocess upscale by: 4, Postprocess upscaler: 4x-Tiny</p>"
    assert result.image.info["parameters"] == "a red circle\nSteps: 2, Seed: 5, Size: 40x24"
    assert main(["upscale", str(tmp_path / "source.png"), "--upscaler", "4x-Tiny", "--upscaler-dir", folder,
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    written = Image.open(tmp_path / "cli" / "source.png")
    assert np.array_equal(np.asarray(written), np.asarray(result.image.convert("RGB")))
    assert written.info["postprocessing"] == result.image.info["postprocessing"]
    to = api.extra_single_image(sent, resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64,
                                upscaler_1="4x-Tiny", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    assert to.image.size == (64, 64) and to.info == (
        "<p>Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: 4x-Tiny, "
        "Postprocess upscaler 2: Lanczos</p>")
    batch = api.extra_batch_images([sent, sent.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], upscaler_1="Lanczos",
                                   upscaling_resize=2)
    assert [image.size for image in batch.images] == [(80, 48), (80, 48)]
    url = f"{server.url}/sdapi/v1/extra-single-image"
    for payload, field in (({"gfpgan_visibility": 0.5, "upscaler_1": "Lanczos"}, "gfpgan_visibility"),
                           ({"upscaler_1": "upscalers/ESRGAN/4x-Tiny.pth"}, "upscaler_1"),
                           ({"upscaler_1": "4x-Tiny", "upscaling_resize": 200}, "upscaling_resize"),
                           ({"upscaler_1": "Lanczos", "upscaling_resize": 0.01}, "upscaling_resize"),
                           ({"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize"),
                           ({"upscaler_1": "Lanczos", "upscaling_resize": 0.25}, "upscaling_resize"),  # 10x6: 8x0
                           ({"upscaler_1": "Lanczos", "image": "not base64!"}, "image")):
        body = {"image": base64.b64encode((tmp_path / "source.png").read_bytes()).decode(), **payload}
        answer = requests.post(url, json=body)
        assert answer.status_code in (404, 422) and answer.json()["field"] == field, (payload, answer.text)
    # A batch holds at most the pixels of one request image (read from the headers, before any is decoded).
    big = io.BytesIO()
    Image.new("RGB", (2048, 2048), (9, 9, 9)).save(big, "PNG")  # 4.2 MP in a few KB
    entry = {"data": base64.b64encode(big.getvalue()).decode(), "name": "big.png"}
    answer = requests.post(f"{server.url}/sdapi/v1/extra-batch-images",
                           json={"imageList": [entry] * 5, "upscaler_1": "Lanczos", "upscaling_resize": 1})
    assert answer.status_code == 422 and answer.json()["field"] == "imageList", answer.text
    assert "5 images of 20,971,520 pixels in all: a batch holds at most 16,777,216" in answer.json()["detail"]


def test_webuiapi_img2img_samplers_models_and_loras(server):
    api = client(server)
    start = api.txt2img(prompt="a blue square", seed=1, width=64, height=64).image
    out = api.img2img(images=[start], prompt="a blue square", seed=2, width=64, height=64, denoising_strength=0.5,
                      steps=4)
    assert out.image.size == (64, 64) and "Denoising strength: 0.5" in out.image.info["parameters"]
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    titles = api.util_get_model_names()
    assert len(titles) == 3 and api.util_get_current_model().startswith("sd [")
    other = next(title for title in titles if title.startswith("other"))
    api.util_set_model(other)
    assert api.util_get_current_model() == other
    drawn_by_other = api.txt2img(prompt="x", seed=1, width=64, height=64).image
    assert "Model: other" in drawn_by_other.info["parameters"]
    engine = server.app.state.engine
    assert [model.pipe is not None for model in engine.models.values()] == [False, True, False]  # one in memory
    api.util_set_model(next(title for title in titles if title.startswith("sd")))
    assert [model.pipe is not None for model in engine.models.values()] == [True, False, False]
    api.set_options({"CLIP_stop_at_last_layers": 2})
    skipped = api.txt2img(prompt="a cat", seed=1, width=64, height=64)
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2 and skipped.info["clip_skip"] == 2
    assert "Clip skip: 2" in skipped.image.info["parameters"]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert [lora["name"] for lora in api.get_loras()] == ["shapes"]
    plain = api.txt2img(prompt="a red circle", seed=3, width=64, height=64).image
    tagged = api.txt2img(prompt="a red circle <lora:shapes:1>", seed=3, width=64, height=64).image
    again = api.txt2img(prompt="a red circle", seed=3, width=64, height=64).image
    assert not np.array_equal(np.asarray(plain), np.asarray(tagged))  # the LoRA acts ...
    assert np.array_equal(np.asarray(plain), np.asarray(again))  # ... and only on the request that names it
    assert "<lora:shapes:1>" in tagged.info["parameters"]
    # A LoRA file written again (a new epoch under its name) is loaded again, as A1111 does: zeroed, it draws
    # the plain image; restored, the tagged one.
    from safetensors.torch import load_file, save_file

    file = Path(server.app.state.engine.lora_dir) / "shapes.safetensors"
    original = file.read_bytes()
    save_file({key: torch.zeros_like(value) for key, value in load_file(file).items()}, file)
    os.utime(file, ns=(10**18, 10**18))
    zeroed = api.txt2img(prompt="a red circle <lora:shapes:1>", seed=3, width=64, height=64).image
    file.write_bytes(original)
    assert np.array_equal(np.asarray(zeroed), np.asarray(plain))
    restored = api.txt2img(prompt="a red circle <lora:shapes:1>", seed=3, width=64, height=64).image
    assert np.array_equal(np.asarray(restored), np.asarray(tagged))
    # A LoRA run keeps its own adapter under a prompt LoRA, and after it.
    run = {"override_settings": {"sd_model_checkpoint": "run"}, "seed": 3, "width": 64, "height": 64}
    own = api.txt2img(prompt="a red circle", **run).image
    both = api.txt2img(prompt="a red circle <lora:shapes:0.5>", **run).image
    own_again = api.txt2img(prompt="a red circle", **run).image
    assert np.array_equal(np.asarray(own), np.asarray(own_again)) and not np.array_equal(np.asarray(own),
                                                                                           np.asarray(both))
    assert not np.array_equal(np.asarray(own), np.asarray(plain))  # the run's LoRA acts on its own


def test_embeddings_of_the_folder_that_fit_are_loaded_as_generate_loads_them(server, tiny_sd, tmp_path):  # noqa: F811
    from difftrain.generate.text2image import GenerateOptions, generate

    listed = requests.get(f"{server.url}/sdapi/v1/embeddings").json()
    assert listed["loaded"]["shiny"]["vectors"] == 2 and "48-wide" in listed["skipped"]["wide"]["reason"]
    # (a skipped one is A1111's EmbeddingItem too: clients read its shape)
    assert listed["skipped"]["wide"]["shape"] == 48 and listed["skipped"]["wide"]["vectors"] == 1
    assert "diffusers did not load it" in listed["skipped"]["shiny_1"]["reason"]
    served = client(server).txt2img(prompt="a shiny circle", seed=4, width=64, height=64).image
    folder = Path(server.app.state.engine.embeddings_dir)
    options = dict(prompt="a shiny circle", steps=3, scheduler="Euler a", seed=4, width=64, height=64)
    [with_it] = generate(str(tiny_sd), GenerateOptions(**options, embeddings=[str(folder / "shiny.safetensors")]),
                         tmp_path / "with", progress=False)
    [without] = generate(str(tiny_sd), GenerateOptions(**options), tmp_path / "without", progress=False)
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(Image.open(with_it).convert("RGB")))
    assert not np.array_equal(np.asarray(served.convert("RGB")), np.asarray(Image.open(without).convert("RGB")))


def test_a_prompt_lora_brings_its_bundled_embeddings_as_generate_loads_them(server, tiny_sd, tmp_path):  # noqa: F811
    """sd-scripts' pivotal-tuning LoRAs bundle embeddings ("bundle_emb.<token>.string_to_param.*"): loaded with
    the LoRA, as A1111 loads them, and drawn as `generate --lora` draws them; the file written again with other
    vectors replaces them."""
    from safetensors.torch import load_file

    from difftrain.generate.text2image import GenerateOptions, generate

    folder = Path(server.app.state.engine.lora_dir)
    layers = load_file(folder / "shapes.safetensors")
    bundle = folder / "bundled.safetensors"

    def write_bundle(seed: int) -> None:
        vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
        save_file({**layers, "bundle_emb.glint.string_to_param.*": vectors}, bundle)
        os.utime(bundle, ns=(10**18 + seed, 10**18 + seed))  # a new mtime: the server loads it again

    api = client(server)
    api.util_set_model(next(title for title in api.util_get_model_names() if title.startswith("sd")))
    options = dict(prompt="a glint circle", steps=3, scheduler="Euler a", seed=4, width=64, height=64)
    drawn = {}
    try:
        for seed in (0, 1):
            write_bundle(seed)
            served = api.txt2img(prompt="a glint circle <lora:bundled:1>", seed=4, width=64, height=64).image
            [direct] = generate(str(tiny_sd), GenerateOptions(**options, loras=[(str(bundle), 1.0)]),
                                tmp_path / str(seed), progress=False)
            assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(Image.open(direct).convert("RGB")))
            drawn[seed] = np.asarray(served.convert("RGB"))
        listed = requests.get(f"{server.url}/sdapi/v1/embeddings").json()
        assert listed["loaded"]["glint"]["vectors"] == 2
    finally:
        bundle.unlink()
    assert not np.array_equal(drawn[0], drawn[1])  # the second file's vectors, not the first's kept


def test_controlnet_units_in_alwayson_scripts_as_the_extension_takes_them(server):
    import webuiapi

    api = client(server)
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (8, 8, 40, 40))
    plain = api.txt2img(prompt="a red circle", seed=2, width=64, height=64).image
    unit = webuiapi.ControlNetUnit(image=mask, module="none", model="cn [0123abcd]", weight=1.0)
    # (alwayson_scripts given each time: webuiapi's default is one shared dict that its ControlNet
    # code writes into, so without it the units leak into every later request of the process)
    steered = api.txt2img(prompt="a red circle", seed=2, width=64, height=64, controlnet_units=[unit],
                          alwayson_scripts={}).image
    assert not np.array_equal(np.asarray(plain), np.asarray(steered))
    text = steered.info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: cn [' in text and "Weight: 1," in text
    # webuiapi's default resize mode is the extension's "Resize and Fill", and it is what was drawn.
    assert "Resize Mode: Resize and Fill" in text and "Control Mode: Balanced" in text
    prompt_first = api.txt2img(prompt="a red circle", seed=2, width=64, height=64, alwayson_scripts={},
                               controlnet_units=[webuiapi.ControlNetUnit(image=mask, module="none", model="cn",
                                                                         control_mode=1)]).image
    assert "Control Mode: My prompt is more important" in prompt_first.info["parameters"]
    assert not np.array_equal(np.asarray(prompt_first), np.asarray(steered))
    # One ControlNet in two units of two modes, as A1111 draws it (it was a 422: "load it once per mode").
    both = [webuiapi.ControlNetUnit(image=mask, module="none", model="cn", control_mode=mode, weight=0.5,
                                    resize_mode="Crop and Resize") for mode in (1, 0)]
    mixed = api.txt2img(prompt="a red circle", seed=2, width=64, height=64, alwayson_scripts={},
                        controlnet_units=both).image
    assert "ControlNet 1: " in mixed.info["parameters"]
    assert not np.array_equal(np.asarray(mixed), np.asarray(steered))
    assert requests.get(f"{server.url}/controlnet/model_list").json() == {"model_list": ["adapter", "cn"]}
    # canny at the unit's processor_res (webuiapi sends 512), or at the drawn size with pixel_perfect; both were
    # ignored, and the infotext said 64 and False whatever was sent.
    lines = Image.new("RGB", (256, 256), "white")
    for x in range(8, 256, 12):
        ImageDraw.Draw(lines).line([(x, 0), (x + 40, 255)], fill="black", width=2)
    drawn = {}
    for name, settings in (("512", {}), ("perfect", {"pixel_perfect": True})):
        units = [webuiapi.ControlNetUnit(image=lines, module="canny", model="cn", **settings)]
        drawn[name] = api.txt2img(prompt="x", seed=2, width=64, height=64, steps=2, controlnet_units=units,
                                  alwayson_scripts={}).image
    assert "Processor Res: 512, Threshold A: 64, Threshold B: 64" in drawn["512"].info["parameters"]
    assert "Processor Res: 64" in drawn["perfect"].info["parameters"] and "Pixel Perfect: True" in \
        drawn["perfect"].info["parameters"]
    assert not np.array_equal(np.asarray(drawn["512"]), np.asarray(drawn["perfect"]))
    # A T2I-Adapter unit draws through diffusers' adapter pipeline, whose step hook is the older one.
    adapted = api.txt2img(prompt="a red circle", seed=2, width=64, height=64, alwayson_scripts={},
                          controlnet_units=[webuiapi.ControlNetUnit(image=mask, module="none", model="adapter")]).image
    assert not np.array_equal(np.asarray(plain), np.asarray(adapted))
    with pytest.raises(RuntimeError, match="enable_hr: the hires fix draws without ControlNet units"):
        api.txt2img(prompt="x", width=64, height=64, enable_hr=True, alwayson_scripts={},
                    controlnet_units=[webuiapi.ControlNetUnit(image=mask, module="none", model="cn")])
    bad = webuiapi.ControlNetUnit(image=mask, module="depth_midas", model="cn")
    with pytest.raises(RuntimeError, match="module"):
        api.txt2img(prompt="x", width=64, height=64, controlnet_units=[bad], alwayson_scripts={})
    missing = webuiapi.ControlNetUnit(image=mask, module="none", model="../../cn")
    with pytest.raises(RuntimeError, match=r"ControlNet folder \(adapter, cn\)"):
        api.txt2img(prompt="x", width=64, height=64, controlnet_units=[missing], alwayson_scripts={})


def test_interrupt_progress_and_the_job_api(server):
    api = client(server)
    results = {}
    worker = threading.Thread(target=lambda: results.update(long=api.txt2img(
        prompt="a slow one", seed=1, width=128, height=128, steps=40, n_iter=3)))
    worker.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = api.get_progress()
        if state["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    assert 0 < state["progress"] < 1 and (state["state"]["job_no"], state["state"]["job_count"]) == (0, 3)
    # A model switch waits for the job in progress: it never lets go of the model a job is drawing with.
    titles = api.util_get_model_names()
    other = next(title for title in titles if title.startswith("other"))
    switch = threading.Thread(target=lambda: api.util_set_model(other))
    switch.start()
    time.sleep(0.5)
    assert switch.is_alive()
    api.interrupt()
    worker.join(timeout=60)
    switch.join(timeout=60)
    long = results["long"]
    assert len(long.images) == 1 and long.info["interrupted"] is True  # the image in progress, no more
    assert "Model: sd" in long.images[0].info["parameters"] and api.util_get_current_model() == other
    api.util_set_model(next(title for title in titles if title.startswith("sd")))

    url = server.url
    job = requests.post(f"{url}/v1/jobs", json={"type": "txt2img", "request": {
        "prompt": "a queued one", "seed": 4, "width": 64, "height": 64, "steps": 3}}).json()
    assert job["state"] in ("queued", "running")
    while job["state"] in ("queued", "running"):
        time.sleep(0.05)
        job = requests.get(f"{url}/v1/jobs/{job['id']}").json()
    assert job["state"] == "done" and job["progress"] == 1.0
    image = Image.open(io.BytesIO(base64.b64decode(job["result"]["images"][0])))
    assert "Seed: 4," in image.info["parameters"]
    # A full queue says so (429) and recovers; a queued job can be cancelled.
    busy = requests.post(f"{url}/v1/jobs", json={"request": {"prompt": "busy", "width": 128, "height": 128,
                                                             "steps": 40}}).json()
    while requests.get(f"{url}/v1/jobs/{busy['id']}").json()["state"] == "queued":
        time.sleep(0.02)
    queued = [requests.post(f"{url}/v1/jobs", json={"request": {"prompt": "q", "width": 64, "height": 64, "steps": 2}})
              for _ in range(3)]
    assert [r.status_code for r in queued] == [202, 202, 429]
    assert queued[2].json()["error"] == "QueueFull" and queued[2].headers["Retry-After"]
    cancelled = requests.delete(f"{url}/v1/jobs/{queued[1].json()['id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["result"] is None
    requests.delete(f"{url}/v1/jobs/{busy['id']}")
    assert requests.get(f"{url}/v1/jobs/nope").status_code == 404


def test_a_client_that_hangs_up_cancels_its_job(server):
    queue = server.app.state.queue
    body = b'{"prompt": "abandoned", "seed": 2, "width": 128, "height": 128, "steps": 40, "n_iter": 3}'
    host, port = server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline, job = time.time() + 60, None
        while time.time() < deadline:  # (a job of an earlier test may still run first)
            running = queue.current
            request = running.request if running is not None else None
            if request is not None and request.prompt == "abandoned" and running.steps_done >= 2:
                job = running
                break
            time.sleep(0.02)
        assert job is not None
    # The socket is closed: the job stops at its next step instead of drawing 3 x 40 steps for nobody.
    assert job.done.wait(60)
    assert job.state == "cancelled" and job.steps_done < job.total_steps
    assert queue.get(job.id) is None  # forgotten, as an answered A1111 call is


@pytest.mark.parametrize("payload,field", [
    ({"width": 70}, "width"), ({"steps": 500}, "steps"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_checkpoint_name": "/etc/passwd"}, "hr_checkpoint_name"),
    ({"enable_hr": True, "hr_upscaler": "upscalers/ESRGAN/4x-Tiny.pth"}, "hr_upscaler"),  # a name, never a path
    ({"enable_hr": True, "hr_scale": 100}, "hr_scale"),
    ({"enable_hr": True, "hr_sampler_name": "Euler z"}, "hr_sampler_name"),
    ({"enable_hr": True, "hr_sampler_name": "Euler", "hr_scheduler": "Align Your Steps"}, "hr_scheduler"),
    ({"enable_hr": True, "hr_sampler_name": "Euler", "sampler_name": "DPM++ 2S a"}, "sampler_name"),
    ({"enable_hr": True, "hr_prompt": "x <lora:shapes:1>"}, "hr_prompt"),
    ({"enable_hr": True, "hr_second_pass_steps": 500}, "hr_second_pass_steps"),
    ({"sampler_name": "Euler z"}, "sampler_name"), ({"prompt": "<lora:../../secret:1>"}, "prompt"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "override_settings.sd_model_checkpoint"),
    ({"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint"), ({"s_churn": 0.5}, "s_churn"),
    ({"s_noise": 1.003}, "s_noise"),
    ({"prompt": "a <lora:shapes:abc>"}, "prompt"), ({"seed": 2**40}, "seed"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, "override_settings.CLIP_stop_at_last_layers"),
])
def test_bad_requests_get_json_naming_the_field(server, payload, field):
    response = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                       "steps": 2, **payload})
    body = response.json()
    assert response.status_code in (404, 422) and body["field"] == field and field in body["detail"]


def test_bad_bodies_and_urls_are_refused_without_a_traceback(server):
    url = f"{server.url}/sdapi/v1/img2img"
    fetched = requests.post(url, json={"init_images": ["http://example.com/a.png"], "width": 64, "height": 64})
    assert fetched.status_code == 422 and "fetches no URL" in fetched.json()["detail"]
    broken = requests.post(url, json={"init_images": ["not base64!"], "width": 64, "height": 64})
    assert broken.json()["field"] == "init_images[0]"
    typed = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"width": "wide"})
    assert typed.status_code == 422 and typed.json()["errors"][0]["field"] == "width"
    assert "Traceback" not in typed.text
    huge = requests.post(f"{server.url}/sdapi/v1/txt2img", data=b"{" + b" " * (21 * 2**20) + b"}",
                         headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    chunked = requests.post(f"{server.url}/sdapi/v1/txt2img", data=iter([b'{"prompt": ', b'"x"}']),
                            headers={"Content-Type": "application/json"})
    assert chunked.status_code == 411 and chunked.json()["error"] == "LengthRequired"
    mask = io.BytesIO()
    Image.new("RGB", (64, 64)).save(mask, "PNG")
    for weight, status in ((None, 200), ("strong", 422)):  # null is the extension's default; text is refused
        unit = {"model": "cn", "image": base64.b64encode(mask.getvalue()).decode(), "weight": weight}
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={
            "prompt": "x", "width": 64, "height": 64, "steps": 2, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert answer.status_code == status, answer.text
    assert answer.json()["field"] == "alwayson_scripts.controlnet.args[0].weight"
    unit = {"model": "cn", "image": base64.b64encode(mask.getvalue()).decode()}
    for units, field, words in [([{**unit, "resize_mode": "Stretch"}], "args[0].resize_mode", "'Just Resize'"),
                                ([{**unit, "control_mode": 2}, unit], "args", "some units and not others")]:
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={
            "prompt": "x", "width": 64, "height": 64, "steps": 2, "alwayson_scripts": {"controlnet": {"args": units}}})
        assert answer.status_code == 422 and answer.json()["field"] == f"alwayson_scripts.controlnet.{field}"
        assert words in answer.json()["detail"], answer.text
    # A decompression bomb in a request: a 20,000 x 20,000 PNG is a few hundred KB.
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, "PNG")
    refused = requests.post(url, json={"init_images": [base64.b64encode(bomb.getvalue()).decode()], "width": 64,
                                       "height": 64})
    assert refused.status_code == 422 and "exceeds" in refused.json()["detail"]


def test_numbers_json_cannot_write_back_and_fields_that_ask_for_what_is_not_served_are_refused(server):
    """JSON's 1e400 parses as infinity: such a job drew, then answered 500 (its parameters could not be written as
    JSON) and lost its images. A1111 fields that ask for something difftrain does not draw were ignored."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    image = base64.b64encode(png.getvalue()).decode()
    base = '"prompt": "x", "width": 64, "height": 64, "steps": 2'
    for route, body, field in (
            ("txt2img", '"enable_hr": true, "hr_scale": 1e400', "hr_scale"),
            ("txt2img", '"refiner_switch_at": 1e400', "refiner_switch_at"),
            ("txt2img", '"denoising_strength": NaN', "denoising_strength"),
            ("txt2img", '"alwayson_scripts": {"controlnet": {"args": [{"model": "cn", "image": "%s", '
                        '"threshold_a": 1e400}]}}' % image, "alwayson_scripts.controlnet.args[0].threshold_a"),
            ("txt2img", '"alwayson_scripts": {"controlnet": {"args": [{"model": "cn", "image": "%s", '
                        '"weight": -1e400}]}}' % image, "alwayson_scripts.controlnet.args[0].weight"),
            ("extra-single-image", '"image": "%s", "upscaling_resize": 1e400, "upscaler_1": "Lanczos"' % image,
             "upscaling_resize")):
        answer = requests.post(f"{server.url}/sdapi/v1/{route}", data="{%s, %s}" % (base, body),
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, (field, answer.text)
        assert field in answer.text and "Traceback" not in answer.text
    queued = requests.post(f"{server.url}/v1/jobs", data='{"request": {%s, "refiner_switch_at": 1e400}}' % base,
                           headers={"Content-Type": "application/json"})
    assert queued.status_code == 422, queued.text  # refused before it is queued, not a job that cannot answer
    for extra, field in (({"s_min_uncond": 5}, "s_min_uncond"), ({"infotext": "x\nSteps: 5"}, "infotext"),
                         ({"firstpass_image": image}, "firstpass_image"),
                         ({"override_settings": {"CLIP_stop_at_last_layers": 2},
                           "override_settings_restore_afterwards": False}, "override_settings_restore_afterwards"),
                         ({"override_settings": {"token_merging_ratio": 0.5}}, "override_settings.token_merging_ratio"),
                         ({"override_settings": {"eta_ddim": "half"}}, "override_settings.eta_ddim")):
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                       "steps": 2, **extra})
        assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    # ... and those difftrain draws are honoured: DDIM's eta from override_settings, as the request's own eta;
    # disable_extra_networks draws without the prompt's LoRAs (here one the server does not even have).
    ddim = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 4, "sampler_name": "DDIM"}
    drawn = {name: requests.post(f"{server.url}/sdapi/v1/txt2img", json={**ddim, **extra}).json()
             for name, extra in (("eta", {"eta": 0.7}), ("setting", {"override_settings": {"eta_ddim": 0.7}}),
                                 ("plain", {}), ("untagged", {"prompt": "a red circle <lora:nowhere:1>",
                                                              "disable_extra_networks": True}))}
    assert drawn["setting"]["images"] == drawn["eta"]["images"] != drawn["plain"]["images"]
    assert "Eta DDIM: 0.7" in json.loads(drawn["setting"]["info"])["infotexts"][0]
    pixels = {name: np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
              for name, answer in drawn.items()}
    assert np.array_equal(pixels["untagged"], pixels["plain"])  # (its infotext keeps the prompt as sent, tag and all)
    # Each eta setting is its samplers': DDIM's default 0 beside an ancestral hires pass draws; one eta cannot be
    # both DDIM's 0.5 and the ancestral pass's 1, nor an ancestral sampler's 0.5 (diffusers' draw 1)
    hires = {**ddim, "steps": 2, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1,
             "hr_sampler_name": "Euler a"}
    for settings, status, field in (({"eta_ddim": 0}, 200, None),
                                    ({"eta_ddim": 0.5}, 422, "override_settings.eta_ddim"),
                                    ({"eta_ancestral": 0.5}, 422, "override_settings.eta_ancestral")):
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**hires, "override_settings": settings})
        assert answer.status_code == status and (field is None or answer.json()["field"] == field), answer.text


def test_a_loopback_server_answers_its_own_names_and_reads_requests_as_a1111_does(server):
    # DNS rebinding (another name pointed at 127.0.0.1) and posts from other sites' pages are refused.
    rebound = requests.get(f"{server.url}/sdapi/v1/options", headers={"Host": "rebound.example:7860"})
    assert rebound.status_code == 421 and "answers only 127.0.0.1" in rebound.json()["detail"]
    for origin, status in (("https://evil.example", 403), ("null", 403), (server.url, 200)):
        answer = requests.post(f"{server.url}/sdapi/v1/interrupt", headers={"Origin": origin})
        assert answer.status_code == status, (origin, answer.text)
    # null is "the default" (A1111 declares every field optional); no scheduler is Automatic, and a schedule
    # in the sampler's name wins over the scheduler field.
    body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 2, "sampler_name": "DPM++ 2M"}
    drawn = {}
    for name, extra in (("nulls", {"negative_prompt": None, "override_settings": None, "alwayson_scripts": None}),
                        ("karras", {"scheduler": "Karras"}), ("named", {"sampler_name": "DPM++ 2M Karras",
                                                                         "scheduler": "Karras"}),
                        ("uniform", {"scheduler": "Uniform"})):
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, **extra})
        assert answer.status_code == 200, (name, answer.text)
        drawn[name] = answer.json()["images"][0]
    assert drawn["nulls"] == drawn["karras"] == drawn["named"] != drawn["uniform"]
    # Our job API names the field a request got wrong.
    job = requests.post(f"{server.url}/v1/jobs", json={"request": {"width": "wide"}})
    assert job.status_code == 422 and job.json()["field"] == "request.width", job.text


def test_a_name_a_proxy_keeps_is_answered_once_allowed(tiny_sd):  # noqa: F811
    from difftrain.serve.app import ServeSettings

    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)], allowed_hosts=["Studio.lan"], port=0))
    try:
        for host, status in (("studio.lan:8080", 200), ("other.lan", 421), ("[::1]:7860", 200)):
            answer = requests.get(f"{running.url}/sdapi/v1/options", headers={"Host": host})
            assert answer.status_code == status, (host, answer.text)
    finally:
        running.stop()


def test_png_info_reads_the_file_as_sent_and_wrapped_base64(server):
    from difftrain.generate.infotext import png_bytes
    from difftrain.serve.requests import Limits, Txt2ImgRequest

    text = "a fox\nSteps: 3, Sampler: Euler, CFG scale: 6.0, Seed: 7, Size: 64x64"
    transparent = Image.open(io.BytesIO(png_bytes(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), text)))
    sent = png_bytes(transparent, text)
    assert Image.open(io.BytesIO(sent)).mode == "RGBA"
    answer = requests.post(f"{server.url}/sdapi/v1/png-info", json={"image": base64.encodebytes(sent).decode()})
    assert answer.status_code == 200 and answer.json()["info"] == text  # line-wrapped base64, an RGBA PNG
    assert answer.json()["parameters"]["Seed"] == "7" and answer.json()["items"] == {}  # A1111 keeps it out of items
    large = io.BytesIO()
    Image.new("L", (5000, 4000)).save(large, "PNG")  # 20 MP: its text is read only by decoding it
    refused = requests.post(f"{server.url}/sdapi/v1/png-info",
                            json={"image": base64.b64encode(large.getvalue()).decode()})
    assert refused.status_code == 422 and "5000x4000 pixels" in refused.json()["detail"]
    # The last seeds A1111 takes, and its default sampler.
    Txt2ImgRequest(seed=2**32 - 1).check(Limits())
    Txt2ImgRequest(seed=2**32 - 4, batch_size=2, n_iter=2).check(Limits())
    assert Txt2ImgRequest().sampler == "Euler"


def test_memory_reports_the_process_and_asks_no_gpu_it_does_not_serve_on(server, monkeypatch):
    memory = requests.get(f"{server.url}/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0
    assert memory["cuda"] == {"error": "not serving on a CUDA device"}

    def asked(*args):
        raise RuntimeError("a GPU the server does not use was asked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host, serving on its CPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", asked)
    answer = requests.get(f"{server.url}/sdapi/v1/memory")
    assert answer.status_code == 200 and answer.json()["cuda"] == memory["cuda"]


def test_credentials_guard_every_route(tiny_sd):  # noqa: F811
    import webuiapi

    from difftrain.serve.app import ServeSettings

    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)], users=[("ann", "s3cret"), ("bob", "pw")], token="tok"))
    try:
        url = f"{running.url}/sdapi/v1/options"
        assert requests.get(url).status_code == 401
        assert requests.get(url).headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url, auth=("ann", "wrong")).status_code == 401
        assert requests.get(url, auth=("bob", "pw")).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer tok"}).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer nope"}).json()["error"] == "Unauthorized"
        assert requests.get(url, headers={"Authorization": "Bearer \u00e9t\u00e9"}).status_code == 401
        assert requests.get(url, headers={"Authorization": "Basic \u00e9t\u00e9".encode("latin-1")}).status_code == 401
        api = webuiapi.WebUIApi(port=int(running.url.rsplit(":", 1)[1]), username="ann", password="s3cret")
        assert api.get_options()["sd_model_checkpoint"].startswith("sd [")
    finally:
        running.stop()


def test_serve_command_listens_on_loopback_and_refuses_open_addresses(tiny_sd, capsys):  # noqa: F811
    assert main(["serve", str(tiny_sd), "--host", "0.0.0.0"]) == 2
    assert "--api-auth or --token" in capsys.readouterr().err
    assert main(["serve", str(tiny_sd), "--api-auth", "nocolon"]) == 2
    with socket.socket() as taken:  # a port another server holds: said before any model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_sd), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen there" in capsys.readouterr().err
    # --port 0: a free port, and the address printed is the one it listens on.
    process = subprocess.Popen([sys.executable, "-m", "difftrain", "serve", str(tiny_sd), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        first = process.stdout.readline()
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+)/sdapi/v1", first).group(1))
        assert port != 0
        deadline, samplers = time.time() + 60, None
        while time.time() < deadline and samplers is None:
            try:
                samplers = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=2).json()
            except requests.ConnectionError:
                time.sleep(0.2)
        assert samplers and any(row["name"] == "Euler a" for row in samplers)
        flags = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/cmd-flags").json()
        assert flags["listen"] is False and flags["port"] == port
        drawn = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img",  # loads the model: its first request
                              json={"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}, timeout=60)
        assert len(drawn.json()["images"]) == 1
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert first.startswith("serving sd [")
    assert "it/s" not in err  # no progress bar in a server's log, not even diffusers' pipeline loading bar


def test_finished_jobs_are_kept_within_a_byte_budget(monkeypatch):
    from difftrain.serve import jobs
    from difftrain.serve.requests import Txt2ImgRequest

    monkeypatch.setattr(jobs, "FINISHED_BYTES", 2_500)
    queue = jobs.JobQueue(lambda job, on_step: {"images": ["x" * 1_000]}, max_queue=8)
    try:
        done = []
        for _ in range(4):
            job = queue.submit(jobs.Job("txt2img", Txt2ImgRequest()))
            assert job.done.wait(10)
            done.append(job)
        # 4 results of 1,000 bytes against 2,500: the oldest two go, the newest two stay answerable.
        assert [queue.get(job.id) is not None for job in done] == [False, False, True, True]
        monkeypatch.setattr(jobs, "FINISHED_BYTES", 10)
        last = queue.submit(jobs.Job("txt2img", Txt2ImgRequest()))
        assert last.done.wait(10) and queue.get(last.id) is last  # the newest is kept whatever its size
    finally:
        queue.close()


def test_a_queued_jobs_position_counts_the_job_running_before_it():
    """The page said "queued (0 ahead)" of a job waiting for another client's running one."""
    import threading

    from difftrain.serve import jobs
    from difftrain.serve.requests import Txt2ImgRequest

    release = threading.Event()
    queue = jobs.JobQueue(lambda job, on_step: release.wait(10) and {"images": []}, max_queue=8)
    try:
        running = queue.submit(jobs.Job("txt2img", Txt2ImgRequest()))
        while running.state != "running":
            release.wait(0.01)
        waiting = [queue.submit(jobs.Job("txt2img", Txt2ImgRequest())) for _ in range(2)]
        assert [queue.position(job) for job in (running, *waiting)] == [0, 1, 2]
        release.set()
        assert all(job.done.wait(10) for job in waiting) and queue.position(waiting[1]) == 0
    finally:
        release.set()
        queue.close()


def test_prompt_loras_and_controlnets_past_their_caps_are_let_go_and_load_again(server, monkeypatch):
    import webuiapi

    from difftrain.serve import engine as serve_engine

    monkeypatch.setattr(serve_engine, "MAX_PROMPT_LORAS", 1)
    monkeypatch.setattr(serve_engine, "MAX_CONTROLNETS", 1)
    api, engine = client(server), server.app.state.engine
    api.util_set_model(next(title for title in api.util_get_model_names() if title.startswith("sd")))
    folder = Path(engine.lora_dir)
    second = folder / "second.safetensors"
    second.write_bytes((folder / "shapes.safetensors").read_bytes())
    try:
        sized = {"seed": 3, "width": 64, "height": 64}
        first = api.txt2img(prompt="a red circle <lora:shapes:1>", **sized).image
        api.txt2img(prompt="a red circle <lora:second:1>", **sized)
        model = engine.current
        assert [Path(path).stem for path in model.loras] == ["second"]  # shapes let go ...
        assert len(model.pipe.get_list_adapters()["unet"]) == 1  # ... and its adapter deleted
        again = api.txt2img(prompt="a red circle <lora:shapes:1>", **sized).image
        assert np.array_equal(np.asarray(again), np.asarray(first))  # loaded again as it was
    finally:
        second.unlink()
    mask = Image.new("RGB", (64, 64))
    mask.paste((255, 255, 255), (8, 8, 40, 40))

    def steered(net: str) -> np.ndarray:
        unit = webuiapi.ControlNetUnit(image=mask, module="none", model=net)
        return np.asarray(api.txt2img(prompt="a red circle", controlnet_units=[unit], alwayson_scripts={},
                                      **sized).image)

    by_cn = steered("cn")
    steered("adapter")
    assert [Path(net).name for _, net, _ in engine.nets] == ["adapter"]  # the least recently used ControlNet let go
    assert np.array_equal(steered("cn"), by_cn)


def test_a_skip_keeps_the_first_pass_and_a_stop_in_the_hires_pass_ends_the_batches(server):
    """Skipped in the first pass, the image is that pass's (A1111 returns an interrupted first pass so); a stop
    asked during the second pass (a pipeline of its own) still ends the job's later batches. A job's progress
    counts both passes."""
    from difftrain.serve import jobs
    from difftrain.serve.requests import Txt2ImgRequest

    engine = server.app.state.engine
    request = Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, enable_hr=True, hr_second_pass_steps=2,
                             denoising_strength=0.5, n_iter=2, seed=1)
    assert jobs.Job("txt2img", request).total_steps == (3 + 2) * 2
    calls = []

    def skip_first(pipe):  # jobs.py: a skip ends the image in progress, and the job goes on
        calls.append(type(pipe).__name__)
        pipe._interrupt = True

    drawn = engine.draw(request, skip_first)
    assert [image.size for image in drawn.images] == [(64, 64)] * 2 and "Img2Img" not in "".join(calls)

    def stop_in_second_pass(pipe):
        calls.append(type(pipe).__name__)
        if "Img2Img" in calls[-1]:
            pipe._interrupt = pipe._difftrain_stop = True

    calls.clear()
    drawn = engine.draw(request, stop_in_second_pass)
    assert drawn.interrupted and [image.size for image in drawn.images] == [(128, 128)]
    assert calls == ["StableDiffusionPipeline"] * 3 + ["StableDiffusionImg2ImgPipeline"]


def test_progress_is_a1111s_per_sampling_run_with_heun_hires_passes_and_a_skip(server):
    """A1111 counts a job in sampling runs (n_iter batches, two passes each with the hires fix): job_no is the
    run drawing now, sampling_step/sampling_steps that run's. Heun calls back 2 x steps - 1 times a pass, which
    the plan cannot know: progress once reached 1 halfway through such a job and the step count passed its total."""
    from difftrain.serve import jobs
    from difftrain.serve.requests import Txt2ImgRequest

    engine = server.app.state.engine
    request = Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, enable_hr=True, hr_second_pass_steps=2,
                             hr_scale=1.25, denoising_strength=0.5, n_iter=2, seed=1, sampler_name="Heun")
    job, seen = jobs.Job("txt2img", request), []
    job.state = "running"

    def on_step(pipe):
        job.count_step(pipe._num_timesteps)
        seen.append((job.run_no, job.run_step, job.sampling_steps, job.progress))

    engine.draw(request, on_step)
    assert job.runs == 4 and [run for run, *_ in seen] == sorted(run for run, *_ in seen)
    assert {run for run, *_ in seen} == {0, 1, 2, 3}
    assert all(step <= steps for _, step, steps, _ in seen)
    progress = [value for *_, value in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and progress.count(1.0) == 1
    per_run = {run: steps for run, _, steps, _ in seen}
    assert per_run[0] == per_run[2] == 2 * 3 - 1  # Heun's callbacks for 3 steps
    # A skip in the first batch's first pass: that batch ends (its first pass's image kept), the next begins.
    job, seen = jobs.Job("txt2img", request), []
    job.state = "running"

    def skip_at_two(pipe):
        on_step(pipe)
        if (job.run_no, job.run_step) == (0, 2):
            pipe._interrupt = True
            job.skip_run()

    engine.draw(request, skip_at_two)
    assert seen[2][:2] == (2, 1) and seen[-1][3] == 1.0


def test_img2img_that_leaves_no_step_is_refused_before_it_queues(server):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    body = {"prompt": "x", "init_images": [base64.b64encode(png.getvalue()).decode()], "width": 64, "height": 64,
            "sampler_name": "DDIM", "steps": 20, "denoising_strength": 0.05}
    queued = len(server.app.state.queue._jobs) if hasattr(server.app.state, "queue") else None
    response = requests.post(f"{server.url}/v1/jobs", json={"type": "img2img", "request": body})
    assert response.status_code == 422 and response.json()["field"] == "denoising_strength"
    assert "no step to take" in response.json()["detail"]
    if queued is not None:
        assert len(server.app.state.queue._jobs) == queued  # no job was made
    # A1111's Euler takes int(4 x 0.1) + 1 = 1 step: drawn, not refused.
    drawn = requests.post(f"{server.url}/sdapi/v1/img2img", json={**body, "sampler_name": "Euler", "steps": 4,
                                                                    "denoising_strength": 0.1})
    assert drawn.status_code == 200 and len(drawn.json()["images"]) == 1
    # A hires pass of one step at 0.5 is a schedule of 2, of which A1111's DDIM places one: none left for it.
    hires = {"prompt": "x", "width": 64, "height": 64, "sampler_name": "DDIM", "steps": 2, "enable_hr": True,
             "hr_second_pass_steps": 1, "denoising_strength": 0.5}
    response = requests.post(f"{server.url}/v1/jobs", json={"type": "txt2img", "request": hires})
    assert response.status_code == 422 and response.json()["field"] == "hr_second_pass_steps"


def test_webuiapi_inpainting_draws_what_generate_draws(server, tiny_sd, tmp_path):  # noqa: F811
    """A1111's API defaults (only masked, no padding, masked content "fill", blur 4) against `difftrain generate`
    with the same settings; bad inpainting fields are refused by name."""
    import webuiapi

    api = client(server)
    init = Image.new("RGB", (96, 64), (200, 30, 30))
    ImageDraw.Draw(init).ellipse((10, 10, 40, 50), fill=(20, 20, 220))
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 0))  # a transparent mask: its alpha marks the area
    ImageDraw.Draw(mask).rectangle((50, 20, 70, 40), fill=(255, 255, 255, 255))
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    served = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=4, width=64, height=64,
                         denoising_strength=0.8, steps=4)
    assert served.image.size == (96, 64)  # "only masked": the box drawn at 64 x 64, pasted back into the image
    text = served.image.info["parameters"]
    assert "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0" in text and "Mask: " not in text
    assert main(["generate", str(tiny_sd), "--prompt", "a blue square", "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--only-masked", "--only-masked-padding", "0",
                 "--masked-content", "fill", "--scheduler", "Euler a", "--steps", "4", "--strength", "0.8",
                 "--seed", "4", "--width", "64", "--height", "64", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    [drawn] = sorted((tmp_path / "out").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(served.image.convert("RGB")))
    # A1111 echoes neither unless asked, keeping their keys as None
    assert (served.parameters["init_images"], served.parameters["mask"]) == (None, None)
    whole = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=4, width=64, height=64,
                        denoising_strength=0.8, steps=4, inpaint_full_res=False, inpainting_fill=1,
                        include_init_images=True)
    assert whole.image.size == (64, 64)  # the whole image, drawn at the request's size
    # Plain img2img with A1111's resize mode 1, crop and resize: generate's --resize-mode.
    cropped = api.img2img(images=[init], prompt="a blue square", seed=4, width=64, height=64, denoising_strength=0.8,
                          steps=4, resize_mode=1).image
    assert "Resize mode: Crop and resize" in cropped.info["parameters"]
    assert main(["generate", str(tiny_sd), "--prompt", "a blue square", "--init-image", str(tmp_path / "init.png"),
                 "--resize-mode", "crop and resize", "--scheduler", "Euler a", "--steps", "4", "--strength", "0.8",
                 "--seed", "4", "--width", "64", "--height", "64", "--out", str(tmp_path / "crop"),
                 "--no-progress"]) == 0
    [drawn] = sorted((tmp_path / "crop").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(cropped.convert("RGB")))
    # And resize mode 3, the latent upscale: generate's 'just resize (latent upscale)'.
    latent = api.img2img(images=[init], prompt="a blue square", seed=4, width=64, height=64, denoising_strength=0.8,
                         steps=4, resize_mode=3).image
    assert "Resize mode: Just resize (latent upscale)" in latent.info["parameters"]
    assert main(["generate", str(tiny_sd), "--prompt", "a blue square", "--init-image", str(tmp_path / "init.png"),
                 "--resize-mode", "just resize (latent upscale)", "--scheduler", "Euler a", "--steps", "4",
                 "--strength", "0.8", "--seed", "4", "--width", "64", "--height", "64", "--out",
                 str(tmp_path / "latent"), "--no-progress"]) == 0
    [drawn] = sorted((tmp_path / "latent").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(latent.convert("RGB")))
    sent = whole.parameters["init_images"][0], whole.parameters["mask"]  # as webuiapi sent them: data URLs
    echoed = [Image.open(io.BytesIO(base64.b64decode(text.split(",")[-1]))) for text in sent]
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(echoed, (init, mask))] == [True, True]
    url, body = f"{server.url}/sdapi/v1/img2img", {"init_images": [_b64(init)], "mask": _b64(mask), "steps": 2,
                                                    "width": 64, "height": 64}
    for field, value, words, *unmasked in [("inpainting_fill", 7, "0 fill, 1 original"),
                                           ("mask_blur", 99, "from 0 to 64"),
                                ("initial_noise_multiplier", 0.5, "only 1"), ("mask", "not base64!", "base64"),
                                ("initial_noise_multiplier", 0.5, "only 1", "no mask"),
                                ("mask_round", False, "rounded mask"), ("resize_mode", 3, "latent upscale"),
                                ("resize_mode", 4, "3 just resize (latent upscale)")]:
        answer = requests.post(url, json={**body, field: value, **({"mask": None} if unmasked else {})})
        assert answer.status_code == 422 and answer.json()["field"] == field and words in answer.json()["detail"], \
            answer.text
    # With a ControlNet, "only masked" cuts the control image to the mask's box as it cuts the init image: the
    # server draws what generate draws.
    control = Image.new("RGB", (96, 64))
    ImageDraw.Draw(control).rectangle((45, 15, 75, 45), fill=(255, 255, 255))
    control.save(tmp_path / "control.png")
    unit = webuiapi.ControlNetUnit(image=control, module="none", model="cn")
    served = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=4, width=64, height=64,
                         denoising_strength=0.8, steps=4, controlnet_units=[unit],
                         alwayson_scripts={}).image  # (webuiapi fills its default dict otherwise)
    assert main(["generate", str(tiny_sd), "--prompt", "a blue square", "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--only-masked", "--only-masked-padding", "0",
                 "--masked-content", "fill", "--scheduler", "Euler a", "--steps", "4", "--strength", "0.8",
                 "--seed", "4", "--width", "64", "--height", "64", "--controlnet",
                 str(Path(server.app.state.engine.controlnet_dir) / "cn"), "--control-image",
                 str(tmp_path / "control.png"), "--out", str(tmp_path / "cn"), "--no-progress"]) == 0
    [drawn] = sorted((tmp_path / "cn").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(served.convert("RGB")))


def _b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_engine_holds_drawn_sizes_to_the_limits_behind_the_requests_check(tiny_sd):  # noqa: F811
    """The request's check() refuses every size past the limits; should a slip there let one through (it once
    let a 6400x6400 hires pass reach the sampler), the engine refuses it too, naming the field, before drawing."""
    from difftrain.serve.engine import Engine
    from difftrain.serve.requests import Limits, RequestError, Txt2ImgRequest

    engine = Engine([str(tiny_sd)], limits=Limits(max_width=128, max_height=128))
    drawn = []
    unchecked = [(Txt2ImgRequest(width=64, height=192, steps=2), "height", "64x192"),
                 (Txt2ImgRequest(width=256, height=64, steps=2), "width", "256x64"),
                 (Txt2ImgRequest(width=64, height=64, steps=2, enable_hr=True, hr_scale=3), "hr_scale", "192x192"),
                 (Txt2ImgRequest(width=64, height=64, steps=2, enable_hr=True, hr_resize_x=256), "hr_resize_x",
                  "256x256")]
    for request, field, size in unchecked:
        with pytest.raises(RequestError, match=f"draws {size}: this server draws at most 128x128") as refused:
            engine.draw(request, drawn.append)
        assert refused.value.field == field and refused.value.status == 422
    assert drawn == []  # refused before any step
    image = engine.draw(Txt2ImgRequest(width=64, height=128, steps=2, seed=1), drawn.append).images[0]
    assert image.size == (64, 128) and len(drawn) == 2
