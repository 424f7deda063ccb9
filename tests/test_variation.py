"""A1111's variation seeds: image i's noise slerped toward subseed + i's, in text-to-image, img2img and the hires
fix; written to the PNG, repeated from it, and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import pixels, run
from test_text2image import sd_config, tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.generate.hires import Hires
from difftrain.generate.text2image import Drawer, GenerateOptions


def drawn(model, seeds=(7,), scheduler="Euler", **settings) -> list[np.ndarray]:
    options = GenerateOptions(prompt="", steps=3, width=32, height=32, scheduler=scheduler, seed=seeds[0], **settings)
    images = Drawer(str(model), options, progress=False).draw("a red circle", "", list(seeds))
    return [np.asarray(image, dtype=np.int16) for image in images]


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a - b).max() <= 1


@pytest.mark.parametrize("mode", [{}, {"hires": Hires(scale=1.5, steps=2)}, {"init_image": "{init}"}],
                         ids=["txt2img", "hires", "img2img"])
def test_strength_0_is_the_seeds_noise_and_1_the_variation_seeds(tiny_sd, tmp_path, mode):  # noqa: F811
    """With a sampler that adds no noise of its own (Euler), all an image's randomness is its starting (or, for
    img2img and the hires pass, added) noise: strength 1 draws seed + i's image from variation seed + i."""
    init = tmp_path / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(init)
    mode = {key: str(init) if value == "{init}" else value for key, value in mode.items()}
    plain = drawn(tiny_sd, (7, 8), **mode)
    assert all(np.array_equal(a, b) for a, b in zip(drawn(tiny_sd, (7, 8), variation_seed=20, **mode), plain))
    others = drawn(tiny_sd, (20, 21), **mode)
    full = drawn(tiny_sd, (7, 8), variation_seed=20, variation_strength=1.0, **mode)
    assert all(close(a, b) for a, b in zip(full, others))
    half = drawn(tiny_sd, (7, 8), variation_seed=20, variation_strength=0.5, **mode)
    assert all(np.abs(h - p).max() > 10 and np.abs(h - o).max() > 10 for h, p, o in zip(half, plain, others))


def test_an_ancestral_sampler_goes_on_with_the_seeds_generator(tiny_sd):  # noqa: F811
    """A1111 draws the seed's noise from its generator and leaves it there for the sampler: a nearly-zero variation
    is the plain image (a generator not moved past the first draw would give the sampler that noise again)."""
    plain = drawn(tiny_sd, (7,), scheduler="Euler a")
    slight = drawn(tiny_sd, (7,), scheduler="Euler a", variation_seed=20, variation_strength=1e-6)
    assert close(slight[0], plain[0])
    # ... and the variation seed's starting noise does not make its plain image: the ancestral noise is seed 7's.
    full = drawn(tiny_sd, (7,), scheduler="Euler a", variation_seed=20, variation_strength=1.0)
    assert np.abs(full[0] - drawn(tiny_sd, (20,), scheduler="Euler a")[0]).max() > 10


def test_the_png_records_each_images_variation_seed_and_repeats_it(tiny_sd, tmp_path, caplog):  # noqa: F811
    from PIL.PngImagePlugin import PngInfo

    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    paths = run(tiny_sd, tmp_path / "a", "--prompt", "a red circle", "--seed", "3", "--batch-size", "2",
                "--variation-seed", "40", "--variation-strength", "0.3")
    params = [parse_infotext(read_png_infotext(path))[2] for path in paths]
    # As A1111 numbers them: variations of one picture, every image at the seed, the variation seed counting up.
    assert [(p["Seed"], p["Variation seed"], p["Variation seed strength"]) for p in params] == \
        [("3", "40", "0.3"), ("3", "41", "0.3")]
    assert main(["generate", str(tiny_sd), "--from-png", str(paths[1]), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    [again] = sorted((tmp_path / "b").glob("*.png"))
    assert close(pixels(again), pixels(paths[1]))  # (alone, not in a batch of two: other kernels)
    # A random variation seed is drawn and recorded, as a random seed is.
    [random] = run(tiny_sd, tmp_path / "c", "--prompt", "a red circle", "--variation-seed", "-1",
                   "--variation-strength", "0.3")
    assert int(parse_infotext(read_png_infotext(random))[2]["Variation seed"]) >= 0
    # A1111's own PNG: its variation seed is repeated, not warned of.
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, "
                                "Variation seed: 40, Variation seed strength: 0.3, RNG: CPU")
    foreign = tmp_path / "a1111.png"
    Image.new("RGB", (32, 32)).save(foreign, pnginfo=info)
    with caplog.at_level("WARNING"):
        assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--scheduler", "euler", "--out",
                     str(tmp_path / "d"), "--no-progress"]) == 0
    assert "not repeated" not in caplog.text
    [repeated] = sorted((tmp_path / "d").glob("*.png"))
    assert parse_infotext(read_png_infotext(repeated))[2]["Variation seed"] == "40"
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--variation-strength", "2", "--out",
                 str(tmp_path / "e")]) == 2


def test_variation_seeds_are_drawn_the_same_through_the_server(tiny_sd, tmp_path):  # noqa: F811
    import base64
    import io

    import requests

    from difftrain.generate.text2image import generate
    from difftrain.serve.app import BackgroundServer, ServeSettings

    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)]))
    try:
        body = {"prompt": "a red circle", "seed": 5, "subseed": 9, "subseed_strength": 0.4, "steps": 3,
                "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 2}
        reply = requests.post(f"{running.url}/sdapi/v1/txt2img", json=body).json()
        refused = [requests.post(f"{running.url}/sdapi/v1/txt2img", json={**body, **change}).json()["field"]
                   for change in ({"subseed_strength": 2}, {"seed_resize_from_w": 64, "seed_resize_from_h": 4},
                                  {"subseed": -2})]
        resized = requests.post(f"{running.url}/sdapi/v1/txt2img", json={
            **body, "batch_size": 1, "seed_resize_from_w": 96, "seed_resize_from_h": 64}).json()
    finally:
        running.stop()
    served = Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
    info = __import__("json").loads(reply["info"])
    assert info["all_seeds"] == [5, 5] and info["all_subseeds"] == [9, 10] and info["subseed_strength"] == 0.4
    assert "Seed: 5, Size: 64x64, Model: sd, Variation seed: 9, Variation seed strength: 0.4" in \
        served.info["parameters"]
    paths = generate(str(tiny_sd), GenerateOptions(prompt="a red circle", steps=3, scheduler="Euler", seed=5,
                                                   variation_seed=9, variation_strength=0.4, width=64, height=64,
                                                   batch_size=2), tmp_path, progress=False)
    second = Image.open(io.BytesIO(base64.b64decode(reply["images"][1])))
    assert np.array_equal(pixels(paths[0]), np.asarray(served.convert("RGB"), dtype=np.int16))
    assert np.array_equal(pixels(paths[1]), np.asarray(second.convert("RGB"), dtype=np.int16))
    assert "Seed: 5, Size: 64x64, Model: sd, Variation seed: 10," in second.info["parameters"]
    assert refused == ["subseed_strength", "seed_resize_from_h", "subseed"]
    # A1111's seed resize, as generate draws it (one image: a batch of one runs other kernels than a batch of two)
    [path] = generate(str(tiny_sd), GenerateOptions(prompt="a red circle", steps=3, scheduler="Euler", seed=5,
                                                    variation_seed=9, variation_strength=0.4, width=64, height=64,
                                                    seed_resize_from=(96, 64)), tmp_path / "resized", progress=False)
    served = Image.open(io.BytesIO(base64.b64decode(resized["images"][0])))
    assert np.array_equal(pixels(path), np.asarray(served.convert("RGB"), dtype=np.int16))
    assert "Seed resize from: 96x64" in served.info["parameters"]
    info = __import__("json").loads(resized["info"])
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (96, 64)
    torch.manual_seed(0)  # (nothing here should depend on torch's global generator)


def test_seed_resize_puts_the_centre_of_the_seeds_noise_at_another_size_on_this_ones_centre():
    """A1111's rule (modules/rng.py): the seed's noise drawn at the other size from a fresh generator of the seed
    (and the variation seed's too, slerped), its centre written over the centre of the noise the seed's own
    generator draws first at this size; where the other size is larger by an odd number, the last row or column
    keeps its own noise (A1111's floor division)."""
    from difftrain.sampling.seed_noise import SeedNoise, slerp

    def randn(shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    own = randn((1, 4, 8, 8), 7)
    assert torch.equal(SeedNoise([0], resize_from=(8, 8)).mix(own, [7]), own)  # the same size: nothing moves
    smaller = SeedNoise([0], resize_from=(4, 6)).mix(own, [7])[0]
    assert torch.equal(smaller[:, 2:6, 1:7], randn((4, 4, 6), 7))
    border = torch.ones(8, 8, dtype=torch.bool)
    border[2:6, 1:7] = False
    assert torch.equal(smaller[:, border], own[0][:, border])
    larger = SeedNoise([0], resize_from=(13, 11)).mix(own, [7])[0]
    assert torch.equal(larger[:, :7, :7], randn((4, 13, 11), 7)[:, 3:10, 2:9])
    assert torch.equal(larger[:, 7], own[0][:, 7]) and torch.equal(larger[:, :, 7], own[0][:, :, 7])
    varied = SeedNoise([20], strength=0.5, resize_from=(4, 6)).mix(own, [7])[0]
    assert torch.equal(varied[:, 2:6, 1:7], slerp(0.5, randn((4, 4, 6), 7), randn((4, 4, 6), 20)))
    assert torch.equal(varied[:, border], own[0][:, border])


def test_a_seed_resized_from_a_size_keeps_that_sizes_picture_in_the_middle(tiny_sd, tmp_path, caplog,  # noqa: F811
                                                                            capsys):
    """What the option is for: a seed's 32x32 picture drawn again at 48x32, its noise resized from 32x32, keeps
    the 32x32 picture's middle; it is recorded in the PNG as A1111 writes it, and repeated from there."""
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    square = drawn(tiny_sd, (7,))[0]
    # At the size it was drawn at, a seed resized from that size is the seed's own noise.
    assert np.array_equal(drawn(tiny_sd, (7,), seed_resize_from=(32, 32))[0], square)
    [wide] = run(tiny_sd, tmp_path / "wide", "--prompt", "a red circle", "--seed", "7", "--steps", "3",
                 "--scheduler", "Euler", "--width", "48", "--height", "32", "--seed-resize-from", "32x32")
    [plain] = run(tiny_sd, tmp_path / "plain", "--prompt", "a red circle", "--seed", "7", "--steps", "3",
                  "--scheduler", "Euler", "--width", "48", "--height", "32")
    # The square's middle, and the same pixels of the wide images, away from the UNet's padded edges.
    middle = square[8:24, 8:24].astype(float)
    resized_gap, plain_gap = (np.abs(pixels(image)[8:24, 16:32] - middle).mean() for image in (wide, plain))
    assert resized_gap < plain_gap / 2, (resized_gap, plain_gap)
    params = parse_infotext(read_png_infotext(wide))[2]
    assert params["Seed resize from"] == "32x32"
    with caplog.at_level("WARNING"):
        assert main(["generate", str(tiny_sd), "--from-png", str(wide), "--out", str(tmp_path / "again"),
                     "--no-progress"]) == 0
    assert "not repeated" not in caplog.text
    assert np.array_equal(pixels(sorted((tmp_path / "again").glob("*.png"))[0]), pixels(wide))
    capsys.readouterr()
    for value, said in (("32", "give WIDTHxHEIGHT in pixels"), ("4x16", "4x16: each side from 8 to 8192 px")):
        assert main(["generate", str(tiny_sd), "--prompt", "x", "--seed-resize-from", value, "--out",
                     str(tmp_path / "bad")]) == 2
        assert f"--seed-resize-from {value}" in (err := capsys.readouterr().err) and said in err, err


def test_ensd_moves_only_an_ancestral_samplers_own_noise(tiny_sd, tmp_path):  # noqa: F811
    """A1111's eta noise seed delta: the starting noise is still the seed's, the sampler's own from seed + ENSD. So
    Euler's images do not move, in text-to-image and img2img; Euler a's do, to what diffusers' pipeline draws from
    the seed's noise and a generator of seed + ENSD."""
    from diffusers import StableDiffusionPipeline

    from difftrain.generate.text2image import encode_prompts
    from difftrain.sampling.text2image import to_images

    init = tmp_path / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(init)
    for mode in ({}, {"init_image": str(init)}):
        assert np.array_equal(drawn(tiny_sd, ensd=31337, **mode)[0], drawn(tiny_sd, **mode)[0])
        # A1111's SDE samplers draw from a Brownian tree of the seeds, which ENSD leaves alone: so here too.
        assert np.array_equal(drawn(tiny_sd, scheduler="DPM++ 2M SDE", ensd=31337, **mode)[0],
                              drawn(tiny_sd, scheduler="DPM++ 2M SDE", **mode)[0])
        assert np.abs(drawn(tiny_sd, scheduler="Euler a", ensd=31337, **mode)[0]
                      - drawn(tiny_sd, scheduler="Euler a", **mode)[0]).max() > 10
    options = GenerateOptions(prompt="", steps=3, width=32, height=32, scheduler="Euler a", seed=7, ensd=31337)
    drawer = Drawer(str(tiny_sd), options, progress=False)
    [ours] = drawer.draw("a red circle", "", [7])
    pipe = StableDiffusionPipeline(**drawer.runner.components, requires_safety_checker=False)
    conditioning = encode_prompts(pipe, "a red circle", "", 1, 3)
    positive, negative = conditioning.pairs[0]
    cell = pipe.vae_scale_factor
    start = torch.randn((1, 4, 32 // cell, 32 // cell), generator=torch.Generator().manual_seed(7))
    latents = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=3, guidance_scale=7.0,
                   width=32, height=32, latents=start, generator=torch.Generator().manual_seed(7 + 31337),
                   output_type="latent").images
    [by_hand] = to_images(pipe, latents)  # (decoded as ours are)
    assert close(np.asarray(ours, dtype=np.int16), np.asarray(by_hand, dtype=np.int16))


def test_ensd_is_written_repeated_and_served(tiny_sd, tmp_path):  # noqa: F811
    import base64
    import io

    import requests

    from difftrain.generate.infotext import parse_infotext, read_png_infotext
    from difftrain.serve.app import BackgroundServer, ServeSettings

    [path] = run(tiny_sd, tmp_path / "a", "--prompt", "a red circle", "--scheduler", "Euler a", "--ensd", "31337")
    assert parse_infotext(read_png_infotext(path))[2]["ENSD"] == "31337"
    [euler] = run(tiny_sd, tmp_path / "e", "--prompt", "a red circle", "--scheduler", "Euler", "--ensd", "31337")
    assert "ENSD" not in parse_infotext(read_png_infotext(euler))[2]  # (A1111 writes it where it acts)
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert np.array_equal(pixels(next((tmp_path / "b").glob("*.png"))), pixels(path))
    running = BackgroundServer(ServeSettings(models=[str(tiny_sd)]))
    try:
        body = {"prompt": "a red circle", "seed": 0, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler a",
                "override_settings": {"eta_noise_seed_delta": 31337}}
        reply = requests.post(f"{running.url}/sdapi/v1/txt2img", json=body).json()
        bad = requests.post(f"{running.url}/sdapi/v1/txt2img",
                            json={**body, "override_settings": {"eta_noise_seed_delta": True}}).json()
        # The server-wide option, as A1111 clients set it, for requests that do not override it.
        assert requests.post(f"{running.url}/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).ok
        assert requests.get(f"{running.url}/sdapi/v1/options").json()["eta_noise_seed_delta"] == 31337
        by_option = requests.post(f"{running.url}/sdapi/v1/txt2img", json={**body, "override_settings": {}}).json()
    finally:
        running.stop()
    served = Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
    assert "ENSD: 31337" in served.info["parameters"]
    assert bad["field"] == "override_settings.eta_noise_seed_delta"
    assert reply["images"][0] == by_option["images"][0]
    [direct] = run(tiny_sd, tmp_path / "d", "--prompt", "a red circle", "--scheduler", "Euler a", "--ensd", "31337",
                   "--seed", "0", "--width", "64", "--height", "64")
    assert np.array_equal(pixels(direct), np.asarray(served.convert("RGB"), dtype=np.int16))


def test_slerp_is_a1111s_over_the_rows():
    """A1111's slerp normalises over dim 1 of an image's (C, H, W) noise: two orthogonal columns meet half way at
    45 degrees; over another dim the norms would divide by zero."""
    from difftrain.sampling.seed_noise import slerp

    low, high = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [1.0]]])
    assert torch.allclose(slerp(0.5, low, high), torch.tensor([[[0.5**0.5], [0.5**0.5]]]))
    assert torch.allclose(slerp(0.25, low, high), torch.tensor([[[np.cos(np.pi / 8)], [np.sin(np.pi / 8)]]]).float())
    near = low + 1e-4 * high  # nearly parallel: A1111's linear fallback, `low` weighed by the value
    assert torch.allclose(slerp(0.3, near, low), near * 0.3 + low * 0.7)
