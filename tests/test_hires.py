"""A1111's hires fix: its sizes, steps and noise, through generate, --from-png and the server's API."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import pixels, run
from test_text2image import sd_config, tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.generate.hires import Hires, HiresError, Target, model_upscaler, pass_steps
from difftrain.generate.text2image import Drawer, GenerateOptions


def a1111_png(path, settings: str):
    """A PNG as A1111 writes it: "a red circle", Euler at 2 steps, seed 5, CPU noise, and these settings."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", f"a red circle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, {settings}, RNG: CPU")
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


def test_target_sizes_are_a1111s(tmp_path):
    """calculate_target_resolution's cases: a scale, one side of a resize (the other kept to the aspect), both
    sides (scaled to cover them, then the latents cropped to them)."""
    assert Hires(scale=2).target(64, 48) == Target(128, 96)
    assert Hires(scale=1.3).target(512, 512) == Target(665, 665) and Target(665, 665).size == (664, 664)
    assert Hires(resize=(100, 0)).target(64, 48) == Target(100, 75)
    assert Hires(resize=(0, 96)).target(64, 48) == Target(128, 96)
    assert Hires(resize=(128, 128)).target(64, 48) == Target(170, 128, 5, 0)  # 8 px cells, as SD's
    assert Hires(resize=(128, 128)).target(64, 48).size == (128, 128)
    assert Hires(resize=(128, 256)).target(64, 48).size == (128, 256)
    for hires, setting in ((Hires(scale=0), "scale"), (Hires(scale=300), "size"), (Hires(steps=-1), "steps"),
                           (Hires(resize=(-8, 0)), "resize")):
        with pytest.raises(HiresError) as caught:
            hires.check(64, 64, 8192)
        assert caught.value.setting == setting
    with pytest.raises(HiresError) as caught:  # a name that is no built-in upscaler nor a file in the folder
        model_upscaler(Hires(upscaler="R-ESRGAN 4x+"), tmp_path)
    assert caught.value.setting == "upscaler" and "Latent, " in str(caught.value)


def test_the_second_pass_takes_exactly_its_steps_from_a1111s_point():
    """A1111 (setup_img2img_steps, handed steps) runs `steps` steps of a schedule int(steps / strength) long: the
    diffusers strength pass_steps gives makes img2img take as many, whatever the float error."""
    from diffusers import EulerDiscreteScheduler

    from difftrain.sampling.schedulers import img2img_steps

    for steps, strength in ((20, 0.7), (10, 0.5), (7, 0.33), (3, 1.0), (15, 0.999), (1, 0.05), (25, 0.35), (28, 0.3)):
        length, diffusers_strength = pass_steps(steps, strength)
        assert length == int(steps / min(strength, 0.999))
        assert img2img_steps(EulerDiscreteScheduler(), length, diffusers_strength) == steps, (steps, strength)


def test_the_hires_pass_redraws_the_upscaled_latents_from_fresh_seed_noise(tiny_sd):  # noqa: F811
    """What the UNet is given: the first pass at 32 px, then the second at 64 px, whose first input is the first
    pass's latents interpolated as A1111's "Latent" upscaler does, noised with a new draw of the seed's noise (A1111
    makes a new ImageRNG) to the schedule's (length - steps)th sigma."""
    from difftrain.generate.text2image import Drawer, GenerateOptions, encode_prompts
    from difftrain.sampling.text2image import sample

    options = GenerateOptions(prompt="", steps=3, width=32, height=32, guidance_scale=5.0, scheduler="Euler",
                              strength=0.5, hires=Hires(scale=2, steps=2))
    drawer = Drawer(str(tiny_sd), options, progress=False)
    seen = []
    hook = drawer.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    [image] = drawer.draw("a red circle", "", [7])
    assert image.size == (64, 64)
    cell = drawer.pipe.vae_scale_factor
    assert [tuple(x.shape[2:]) for x in seen] == [(32 // cell,) * 2] * 3 + [(64 // cell,) * 2] * 2
    hook.remove()
    first = sample(drawer.runner, encode_prompts(drawer.pipe, "a red circle", "", 1, 3), [7], 3, 5.0, **drawer.extra)
    upscaled = torch.nn.functional.interpolate(first, scale_factor=2, mode="bilinear")
    schedule = copy.deepcopy(drawer.runner.scheduler)
    schedule.set_timesteps(4)  # int(2 / 0.5)
    sigma = schedule.sigmas[4 - 2]
    noise = torch.randn((1, *upscaled.shape[1:]), generator=torch.Generator().manual_seed(7))
    expected = (upscaled + noise * sigma) / (sigma**2 + 1) ** 0.5  # Euler's scaled model input
    assert torch.allclose(seen[3], expected.expand(2, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize("upscaler", ["Lanczos", "None"])
def test_image_upscalers_decode_resize_and_encode_again(tiny_sd, upscaler):  # noqa: F811
    """A resize to 64x64 from 32x24: covered at 85x64, the latents cropped to 64x64."""
    from difftrain.generate.text2image import Drawer, GenerateOptions

    options = GenerateOptions(prompt="", steps=2, width=32, height=24, scheduler="Euler",
                              hires=Hires(resize=(64, 64), upscaler=upscaler))
    drawer = Drawer(str(tiny_sd), options, progress=False)
    seen = []
    drawer.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    [image] = drawer.draw("a red circle", "", [7])
    cell = drawer.pipe.vae_scale_factor
    assert image.size == (64, 64) and seen[-1] == (64 // cell, 64 // cell) and seen[0] == (24 // cell, 32 // cell)
    assert np.asarray(image).std() > 1  # an image, not a blank


def test_generate_writes_the_hires_fix_into_the_png_and_repeats_it(tiny_sd, tmp_path, caplog):  # noqa: F811
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    hires = ("--hires-scale", "2", "--hires-steps", "2", "--strength", "0.5")
    [path] = run(tiny_sd, tmp_path / "a", "--prompt", "a red circle", "--seed", "3", *hires)
    params = parse_infotext(read_png_infotext(path))[2]
    assert Image.open(path).size == (64, 64) and params["Size"] == "32x32"  # A1111's Size is the first pass's
    assert (params["Denoising strength"], params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == \
        ("0.5", "2.0", "2", "Latent")
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    [again] = sorted((tmp_path / "b").glob("*.png"))
    assert np.array_equal(pixels(again), pixels(path))
    # Without the hires fix: another picture, at the first pass's size.
    [plain] = run(tiny_sd, tmp_path / "c", "--prompt", "a red circle", "--seed", "3")
    assert Image.open(plain).size == (32, 32)
    # A1111's own PNG: its hires keys are repeated, not warned of.
    foreign = a1111_png(tmp_path / "a1111.png", "Size: 32x24, Denoising strength: 0.6, Hires resize: 64x0, "
                                                "Hires upscaler: Latent (nearest)")
    with caplog.at_level("WARNING"):
        assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--out", str(tmp_path / "d"),
                     "--no-progress"]) == 0
    assert "not repeated" not in caplog.text and "init-image" not in caplog.text
    [repeated] = sorted((tmp_path / "d").glob("*.png"))
    params = parse_infotext(read_png_infotext(repeated))[2]
    assert Image.open(repeated).size == (64, 48) and params["Hires resize"] == "64x0"
    assert params["Hires upscaler"] == "Latent (nearest)" and params["Denoising strength"] == "0.6"


@pytest.mark.parametrize("flags, said", [
    (("--hires-steps", "2"), "give --hires-scale or --hires-resize"),
    (("--hires-resize", "64by64"), "--hires-resize 64by64: give WIDTHxHEIGHT"),
    (("--hires-scale", "1000"), "from 8 to 8192 px"),
    (("--hires-scale", "2", "--init-image", "{image}"), "without --init-image"),
    (("--hires-scale", "2", "--strength", "0"), "--strength 0.0"),
])
def test_bad_hires_options_are_named(tiny_sd, tmp_path, capsys, flags, said):  # noqa: F811
    image = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(image)
    flags = [flag.format(image=image) for flag in flags]
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "o"), *FAST_ARGS, *flags]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


FAST_ARGS = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


def test_a_prompt_edits_timeline_goes_on_into_the_hires_pass(tiny_sd):  # noqa: F811
    """A1111 1.6+'s timeline: the second pass follows the first, so `[red:blue:0.5]` (red for both of the first
    pass's 2 steps: A1111 swaps after the step a span ends) is blue throughout a 4-step second pass, and
    `[red:blue:1.5]`, red for the whole first pass, swaps after step 2 of the second."""
    from difftrain.sampling.prompt_schedule import prompt_schedule

    # The web UI's doctests with a hires pass (get_learned_conditioning_prompt_schedules([p], 10, 10)).
    assert prompt_schedule("a [b:.5] c", 10, first_pass=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, first_pass=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:c:25] d", 10, first_pass=20) == [(5, "a b d"), (10, "a c d")]
    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=2, width=32, height=32, scheduler="Euler",
                                                  negative_prompt="ugly", hires=Hires(scale=1.5, steps=4)),
                    progress=False)
    names = conditioning_names(drawer, {"red": ("a red circle", "ugly"), "blue": ("a blue circle", "ugly")})
    drawer.draw("a [red:blue:0.5] circle", "ugly", [3])
    assert names() == ["red", "red"] + ["blue"] * 4
    drawer.draw("a [red:blue:1.5] circle", "ugly", [3])
    assert names() == ["red", "red"] + ["red", "red", "red", "blue"]


def conditioning_names(drawer, texts: dict[str, tuple[str, str]]):
    """A function naming the (prompt, negative prompt) the UNet was given at each call since it was last asked."""
    from difftrain.sampling.prompts import encode_pair

    pipe, seen = drawer.pipe, []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    encoded = {}
    for name, (text, negative_text) in texts.items():
        positive, negative, _ = encode_pair(pipe.tokenizer, pipe.text_encoder, text, negative_text, "cpu")
        encoded[name] = torch.cat([negative, positive])

    def names() -> list[str]:
        called = [next(name for name, z in encoded.items() if torch.equal(z, call)) for call in seen]
        seen.clear()
        return called

    return names


def test_deepcache_starts_the_hires_pass_with_a_whole_unet_step(tiny_sd):  # noqa: F811
    """DeepCache's deep features are of the first pass's size: the second pass's first step runs the whole UNet."""
    from difftrain.generate.text2image import Drawer, GenerateOptions

    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=2, width=32, height=32, scheduler="Euler",
                                                  deepcache=3, hires=Hires(scale=2, steps=2)), progress=False)
    [image] = drawer.draw("a red circle", "", [3])
    assert image.size == (64, 64) and drawer.deepcache.full_calls == 2  # each pass's first of its two


def test_a_pngs_hires_fix_takes_the_command_lines_changes(tiny_sd, tmp_path, caplog, capsys):  # noqa: F811
    """Each --hires-* flag replaces the PNG's own setting (an A1111 PNG's model upscaler, absent from the upscaler
    folder, is named with the flag that picks another); with --init-image the PNG's hires fix is left out, and
    said."""
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    png = a1111_png(tmp_path / "a1111.png", "Size: 32x32, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, "
                                            "Hires upscaler: R-ESRGAN 4x+")

    def repeat(out: str, *flags) -> int:
        return main(["generate", str(tiny_sd), "--from-png", str(png), "--out", str(tmp_path / out), "--no-progress",
                     *flags])

    assert repeat("a") == 2
    assert "--hires-upscaler: hires upscaler 'R-ESRGAN 4x+' is not one of Latent, " in (err := capsys.readouterr().err)
    assert "no such model file (RealESRGAN_x4plus.pth) in models/upscalers" in err
    assert repeat("b", "--hires-upscaler", "Lanczos") == 0
    params = parse_infotext(read_png_infotext(next((tmp_path / "b").glob("*.png"))))[2]
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == ("2.0", "2", "Lanczos")
    assert repeat("c", "--hires-upscaler", "Latent", "--hires-scale", "1.5") == 0
    [image] = (tmp_path / "c").glob("*.png")
    assert Image.open(image).size == (48, 48) and "Hires steps: 2" in Image.open(image).info["parameters"]
    with caplog.at_level("WARNING"):
        assert repeat("d", "--init-image", str(png)) == 0
    assert "hires fix is not repeated with --init-image" in caplog.text
    assert Image.open(next((tmp_path / "d").glob("*.png"))).size == (32, 32)


def test_a_model_upscaler_found_by_its_a1111_name_or_path_enlarges_the_first_pass(tiny_sd, tmp_path):  # noqa: F811
    """An A1111 PNG's "R-ESRGAN 4x+" is RealESRGAN_x4plus.pth in --upscaler-dir (below it, as in A1111's models
    folder). A compact Real-ESRGAN of zero weights is exactly the nearest enlargement: its hires fix draws what the
    Nearest upscaler draws (to A1111's 8-bit truncation), unlike Lanczos; a file given by path is written by its
    A1111 name, which --from-png finds again."""
    from safetensors.torch import save_file

    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    folder = tmp_path / "models" / "RealESRGAN"
    folder.mkdir(parents=True)
    layers = {f"body.{i}.weight": torch.zeros(8, 3 if i == 0 else 8, 3, 3) for i in (0, 2)}
    layers.update({"body.4.weight": torch.zeros(48, 8, 3, 3), "body.1.weight": torch.zeros(8),
                   "body.3.weight": torch.zeros(8), **{f"body.{i}.bias": torch.zeros(8 if i < 4 else 48)
                                                        for i in (0, 2, 4)}})
    torch.save({"params": layers}, folder / "RealESRGAN_x4plus.pth")
    save_file(layers, tmp_path / "4x-Zero.safetensors")
    png = a1111_png(tmp_path / "a1111.png", "Size: 32x32, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, "
                                            "Hires upscaler: R-ESRGAN 4x+")
    base = ["generate", str(tiny_sd), "--no-progress"]
    assert main([*base, "--from-png", str(png), "--upscaler-dir", str(tmp_path / "models"), "--out",
                 str(tmp_path / "named")]) == 0
    for upscaler in ("Nearest", "Lanczos", str(tmp_path / "4x-Zero.safetensors")):
        assert main([*base, "--from-png", str(png), "--hires-upscaler", upscaler, "--out",
                     str(tmp_path / Path(upscaler).stem)]) == 0
    drawn = {name: pixels(next((tmp_path / name).glob("*.png"))) for name in ("named", "Nearest", "Lanczos", "4x-Zero")}
    assert drawn["named"].shape == (64, 64, 3) and np.array_equal(drawn["named"], drawn["4x-Zero"])
    to_nearest = np.abs(drawn["named"] - drawn["Nearest"]).mean()
    assert to_nearest < 0.5 * np.abs(drawn["named"] - drawn["Lanczos"]).mean(), to_nearest
    info = {name: parse_infotext(read_png_infotext(next((tmp_path / name).glob("*.png"))))[2]["Hires upscaler"]
            for name in ("named", "4x-Zero")}
    assert info == {"named": "R-ESRGAN 4x+", "4x-Zero": "4x-Zero"}
    # The file's path is in the infotext too (a key of ours, as "Init image" keeps its path): --from-png repeats
    # the image without --upscaler-dir.
    by_path = next((tmp_path / "4x-Zero").glob("*.png"))
    assert main([*base, "--from-png", str(by_path), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(pixels(next((tmp_path / "again").glob("*.png"))), drawn["4x-Zero"])


def test_a_hires_pass_that_cannot_be_drawn_is_refused_naming_the_flag(tiny_sd, tmp_path, capsys):  # noqa: F811
    """One hires step at strength 0.5 is a schedule of 2, of which A1111's DDIM places 1 step, leaving the pass
    none; a tiny strength makes a schedule past the model's 1000 steps; a cover past the size limit (8192 wide for
    8192x8192 from 1024x64) is refused before anything is drawn, as is an infinite scale."""
    base = ["generate", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "o"), "--no-progress", "--steps", "2"]
    assert main([*base, "--hires-scale", "2", "--strength", "0.5", "--hires-steps", "1", "--scheduler", "DDIM"]) == 2
    assert "--hires-steps: the hires pass's 1 step(s) at strength 0.5 leave this sampler no" in capsys.readouterr().err
    assert main([*base, "--hires-scale", "2", "--strength", "0.5", "--hires-steps", "1", "--width", "32",
                 "--height", "32"]) == 0  # (the default sampler takes its one step)
    assert main([*base, "--hires-scale", "2", "--strength", "0.01", "--hires-steps", "25"]) == 2
    assert "--strength: the hires pass's 25 steps at strength 0.01 make a schedule of 2500" in capsys.readouterr().err
    assert main([*base, "--width", "1024", "--height", "64", "--hires-resize", "8192x8192"]) == 2
    assert "upscaled to" in capsys.readouterr().err
    assert Hires(resize=(8192, 8192)).target(1024, 64).width > 8192  # (what the check guards)
    with pytest.raises(HiresError) as caught:  # (the command line's --hires-scale takes finite numbers only)
        Hires(scale=float("inf")).check(64, 64, 8192)
    assert caught.value.setting == "scale"


def test_a_hires_sampler_of_its_own(tiny_sd, tmp_path, caplog):  # noqa: F811
    """--hires-sampler draws the second pass with another sampler, made from the model's own scheduler config: the
    first pass's DPM++ 2M Karras leaves no Karras sigmas on the second pass's Euler (its timesteps are Euler's).
    Written as A1111 writes it, repeated, and served from hr_sampler_name."""
    import copy

    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    options = GenerateOptions(prompt="", steps=3, width=32, height=32, scheduler="DPM++ 2M Karras", strength=0.5,
                              hires=Hires(scale=2, steps=2, sampler="Euler"))
    drawer = Drawer(str(tiny_sd), options, progress=False)
    timesteps = []
    drawer.pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    drawer.draw("a red circle", "", [1])
    euler = copy.deepcopy(drawer.hires_scheduler)
    assert type(euler).__name__ == "EulerDiscreteScheduler" and not euler.config.use_karras_sigmas
    euler.set_timesteps(4)  # int(2 / 0.5)
    assert timesteps[3:] == [float(t) for t in euler.timesteps[-2:]]
    [path] = run(tiny_sd, tmp_path / "a", "--prompt", "a red circle", "--scheduler", "DPM++ 2M Karras",
                 "--hires-scale", "2", "--hires-sampler", "Euler a", "--hires-steps", "2")
    params = parse_infotext(read_png_infotext(path))[2]
    assert (params["Hires sampler"], params["Hires schedule type"]) == ("Euler a", "Uniform")
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert np.array_equal(pixels(next((tmp_path / "b").glob("*.png"))), pixels(path))
    foreign = a1111_png(tmp_path / "a1111.png", "Size: 32x32, Denoising strength: 0.5, Hires upscale: 2, "
                                                "Hires sampler: DPM++ 2M, Hires schedule type: Karras")
    with caplog.at_level("WARNING"):
        assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--out", str(tmp_path / "c"),
                     "--no-progress"]) == 0
    assert "not repeated" not in caplog.text
    params = parse_infotext(read_png_infotext(next((tmp_path / "c").glob("*.png"))))[2]
    assert (params["Hires sampler"], params["Hires schedule type"]) == ("DPM++ 2M", "Karras")
    # A1111's hires schedule defaults to the first pass's: Euler a in Karras, which we lack, is drawn without it, and
    # a hires sampler we lack altogether leaves the second pass the first's; both said, neither refused.
    for settings, said in (("Schedule type: Karras, Hires sampler: Euler a", "without its schedule type Karras"),
                           ("Hires sampler: Restart", "hires sampler is not repeated")):
        foreign = a1111_png(tmp_path / "a1111.png", f"Size: 32x32, {settings}, Hires upscale: 2, Hires steps: 2")
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["generate", str(tiny_sd), "--from-png", str(foreign), "--out", str(tmp_path / said),
                         "--no-progress"]) == 0
        assert said in caplog.text
    # A sampler that cannot sample the model (PLMS a zero-terminal-SNR one) is a hires sampler error, which the
    # command line and the server name as --hires-sampler and hr_sampler_name.
    from diffusers import DDIMScheduler

    from difftrain.generate.hires import pass_scheduler

    zero_snr = dict(DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config)
    with pytest.raises(HiresError, match="hires sampler plms: .*cannot sample a zero-terminal-SNR") as caught:
        pass_scheduler(Hires(sampler="plms"), None, zero_snr)
    assert caught.value.setting == "sampler"


def test_a_hires_prompt_of_its_own(tiny_sd, tmp_path, capsys, caplog):  # noqa: F811
    """The second pass draws --hires-prompt (A1111's hr_prompt; "" is the prompt), written as "Hires prompt" where it
    differs and repeated; its <lora:> tags must be the prompt's, as the LoRAs act on both passes."""
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    options = GenerateOptions(prompt="a red circle", steps=2, width=32, height=32, scheduler="Euler",
                              negative_prompt="ugly", hires=Hires(scale=1.5, steps=3, prompt="a blue circle"))
    drawer = Drawer(str(tiny_sd), options, progress=False)
    names = conditioning_names(drawer, {"red": ("a red circle", "ugly"), "blue": ("a blue circle", "ugly")})
    drawer.draw("a red circle", "ugly", [3])
    assert names() == ["red"] * 2 + ["blue"] * 3
    [path] = run(tiny_sd, tmp_path / "a", "--prompt", "a red circle", "--hires-scale", "2", "--hires-prompt",
                 "a blue circle, detailed")
    assert parse_infotext(read_png_infotext(path))[2]["Hires prompt"] == "a blue circle, detailed"
    assert main(["generate", str(tiny_sd), "--from-png", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert np.array_equal(pixels(next((tmp_path / "b").glob("*.png"))), pixels(path))
    caplog.clear()
    with caplog.at_level("WARNING"):  # a new prompt beside the PNG's own hires prompt: said
        assert main(["generate", str(tiny_sd), "--from-png", str(path), "--prompt", "a green square", "--out",
                     str(tmp_path / "b2"), "--no-progress"]) == 0
    assert "its hires prompt ('a blue circle, detailed') is kept" in caplog.text
    [same] = run(tiny_sd, tmp_path / "c", "--prompt", "a red circle", "--hires-scale", "2", "--hires-prompt",
                 "a red circle")
    assert "Hires prompt" not in parse_infotext(read_png_infotext(same))[2]  # (written where it differs)
    # A negative prompt of its own conditions the second pass, and is repeated.
    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="a red circle", steps=2, width=32, height=32,
                                                  scheduler="Euler", negative_prompt="ugly",
                                                  hires=Hires(scale=1.5, steps=2, negative_prompt="blurry, dark")),
                    progress=False)
    names = conditioning_names(drawer, {"ugly": ("a red circle", "ugly"), "dark": ("a red circle", "blurry, dark")})
    drawer.draw("a red circle", "ugly", [3])
    assert names() == ["ugly"] * 2 + ["dark"] * 2
    [negative] = run(tiny_sd, tmp_path / "n", "--prompt", "a red circle", "--negative-prompt", "ugly", "--hires-scale",
                     "2", "--hires-negative-prompt", "blurry, dark")
    assert parse_infotext(read_png_infotext(negative))[2]["Hires negative prompt"] == "blurry, dark"
    assert main(["generate", str(tiny_sd), "--from-png", str(negative), "--out", str(tmp_path / "n2"),
                 "--no-progress"]) == 0
    assert np.array_equal(pixels(next((tmp_path / "n2").glob("*.png"))), pixels(negative))
    assert main(["generate", str(tiny_sd), "--prompt", "a red circle", "--hires-scale", "2", "--hires-prompt",
                 "a <lora:detail:1> circle", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "--hires-prompt: its <lora:...> tags" in capsys.readouterr().err


def test_ensd_follows_the_hires_passs_own_sampler(tiny_sd):  # noqa: F811
    """Euler draws no noise of its own, Euler a does: with an Euler first pass and an Euler a second pass, an ENSD
    moves the image (through the second pass only); the other way round it moves it too, and with Euler in both
    it does not."""
    def image(first: str, second: str, ensd: int) -> np.ndarray:
        options = GenerateOptions(prompt="", steps=3, width=32, height=32, scheduler=first, ensd=ensd, seed=4,
                                  hires=Hires(scale=1.5, steps=3, sampler=second))  # (at 2 steps Euler a's own
        # noise, added at the first step only, barely shows on this random model)
        return np.asarray(Drawer(str(tiny_sd), options, progress=False).draw("a red circle", "", [4])[0], np.int16)

    for first, second, moves in (("Euler", "Euler a", True), ("Euler a", "Euler", True), ("Euler", "Euler", False)):
        moved = bool(np.abs(image(first, second, 31337) - image(first, second, 0)).max() > 10)
        assert moved is moves, (first, second)


def test_a_hires_checkpoint_of_its_own_draws_the_second_pass_with_that_model(tiny_sd, tmp_path, capsys):  # noqa: F811
    """A1111's hr_checkpoint_name: the first pass on the model, the second on the other one (its UNet and text
    encoder, of another width, none of the first's); written as `Hires checkpoint` and repeated by --from-png. An
    A1111 PNG's checkpoint title that is no model here is refused naming the flag; "Use same checkpoint" is none;
    a model of other latents is refused."""
    from difftrain.generate.infotext import parse_infotext, read_png_infotext
    from difftrain.models.tiny_sd import write_tiny_sd

    other = write_tiny_sd(tmp_path / "other", seed=3, text_hidden=48)  # (another text width, as SD 2.x's to 1.x's)
    options = GenerateOptions(prompt="a red circle", steps=2, width=32, height=32, scheduler="Euler",
                              hires=Hires(scale=2, steps=2, checkpoint=str(other)))
    drawer = Drawer(str(tiny_sd), options, progress=False)
    calls = {"first unet": 0, "first text": 0, "second unet": 0, "second text": 0}

    def counting(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    for name, module in (("first unet", drawer.pipe.unet), ("first text", drawer.pipe.text_encoder),
                         ("second unet", drawer.hires_pipe.unet), ("second text", drawer.hires_pipe.text_encoder)):
        module.register_forward_hook(counting(name))
    [image] = drawer.draw("a red circle", "", [5])
    assert image.size == (64, 64) and calls["first unet"] == calls["second unet"] == 2  # (CFG in one batch)
    assert calls["first text"] >= 1 and calls["second text"] >= 1

    base = ["generate", str(tiny_sd), "--prompt", "a red circle", "--steps", "2", "--width", "32", "--height", "32",
            "--scheduler", "Euler", "--seed", "5", "--hires-scale", "2", "--hires-steps", "2", "--no-progress"]
    assert main([*base, "--hires-checkpoint", str(other), "--out", str(tmp_path / "own")]) == 0
    assert main([*base, "--out", str(tmp_path / "same")]) == 0
    [own], [same] = (tmp_path / "own").glob("*.png"), (tmp_path / "same").glob("*.png")
    assert np.array_equal(pixels(own), np.asarray(image, dtype=np.int16))  # the command draws what the Drawer drew
    assert np.abs(pixels(own) - pixels(same)).mean() > 1
    assert parse_infotext(read_png_infotext(own))[2]["Hires checkpoint"] == str(other)
    assert main(["generate", str(tiny_sd), "--from-png", str(own), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(pixels(next((tmp_path / "again").glob("*.png"))), pixels(own))

    titled = a1111_png(tmp_path / "titled.png", "Size: 32x32, Denoising strength: 0.5, Hires upscale: 2, "
                                                "Hires steps: 2, Hires checkpoint: v1-5 [6ce0161689]")
    repeat = ["generate", str(tiny_sd), "--from-png", str(titled), "--out", str(tmp_path / "titled"), "--no-progress"]
    assert main(repeat) == 2
    assert ("--hires-checkpoint: v1-5 [6ce0161689] does not exist (check the path); an A1111 checkpoint title: give "
            "that model's path with --hires-checkpoint") in capsys.readouterr().err
    assert main([*repeat, "--hires-checkpoint", str(other)]) == 0
    assert Hires.from_infotext({"Hires upscale": "2", "Hires checkpoint": "Use same checkpoint"}).checkpoint == ""
    wide = write_tiny_sd(tmp_path / "wide", seed=4, latent_channels=8)
    assert main([*base, "--hires-checkpoint", str(wide), "--out", str(tmp_path / "wide-out")]) == 2
    assert "--hires-checkpoint: hires checkpoint " in (err := capsys.readouterr().err) and "(8, 8, 2)" in err
