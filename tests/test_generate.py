"""`difftrain generate` end to end on the tiny Stable Diffusion: seeds, infotext, adapters, img2img, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_text2image import sd_config, tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main

FAST = ["--steps", "3", "--width", "32", "--height", "32", "--no-progress"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run(model, out, *args) -> list[Path]:
    assert main(["generate", str(model), "--out", str(out), *FAST, *args]) == 0
    return sorted(Path(out).glob("*.png"))


def test_same_seed_same_image_and_batches_use_seed_plus_i(tiny_sd, tmp_path):  # noqa: F811
    """The promise (README, "Reproducible"): the same seed and batch size give the same pixels on
    one machine; image i of a batch is image `seed + i` generated alone up to float rounding
    (batched and single convolutions may take different CPU kernels), here at most 2/255."""
    args = ("--prompt", "a red circle", "--seed", "10", "--batch-size", "2", "--n-iter", "2")
    batch = run(tiny_sd, tmp_path / "batch", *args)
    again = run(tiny_sd, tmp_path / "again", *args)
    assert len(batch) == 4
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(batch, again))
    for i, path in enumerate(batch):
        single = run(tiny_sd, tmp_path / f"single{i}", "--prompt", "a red circle", "--seed", str(10 + i))
        difference = np.abs(pixels(single[0]).astype(int) - pixels(path).astype(int))
        assert difference.max() <= 2, (i, difference.max())
    assert np.abs(pixels(batch[0]).astype(int) - pixels(batch[1]).astype(int)).max() > 10  # seeds differ


def test_generate_shows_no_future_warning_and_no_bar_under_no_progress(tiny_sd, tmp_path, capsys):  # noqa: F811
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Python shows a FutureWarning to every user (diffusers' pipelines used to give one for `torch_dtype=`).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(tiny_sd, tmp_path, "--prompt", "a red circle")
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []
    # Not even diffusers' "Loading pipeline components" or transformers' "Loading weights" bar, in this
    # process too, where transformers was imported before any command could set its environment.
    transformers_logging.enable_progress_bar()
    run(tiny_sd, tmp_path / "again", "--prompt", "a red circle")
    assert "it/s" not in capsys.readouterr().err
    # Their switches are the libraries' process-wide ones: put back for the next caller.
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()


def test_png_carries_a1111_infotext_and_from_png_repeats_the_image(tiny_sd, tmp_path):  # noqa: F811
    first = run(tiny_sd, tmp_path / "a", "--prompt", "a (red:1.3) circle, [blue]", "--negative-prompt", "blurry",
                "--seed", "7", "--scheduler", "Euler a", "--cfg", "5")[0]
    text = Image.open(first).info["parameters"]
    lines = text.splitlines()
    assert lines[0] == "a (red:1.3) circle, [blue]" and lines[1] == "Negative prompt: blurry"
    assert "Steps: 3" in lines[2] and "Sampler: Euler a" in lines[2] and "Seed: 7" in lines[2] and "Size: 32x32" in lines[2]
    assert main(["generate", str(tiny_sd), "--from-png", str(first), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    again = sorted((tmp_path / "b").glob("*.png"))[0]
    assert np.array_equal(pixels(first), pixels(again))


def test_attention_weights_and_long_prompts_change_the_image_and_do_not_truncate(tiny_sd, tmp_path):  # noqa: F811
    plain = run(tiny_sd, tmp_path / "plain", "--prompt", "a red circle")[0]
    weighted = run(tiny_sd, tmp_path / "weighted", "--prompt", "a (red:1.8) circle")[0]
    assert not np.array_equal(pixels(plain), pixels(weighted))
    long_prompt = ", ".join(["a red circle on a blue square"] * 20)  # ~160 tokens: three chunks
    tail_changed = long_prompt + ", yellow triangle"
    a = run(tiny_sd, tmp_path / "long", "--prompt", long_prompt)[0]
    b = run(tiny_sd, tmp_path / "longer", "--prompt", tail_changed)[0]
    assert not np.array_equal(pixels(a), pixels(b))  # words past token 77 still count


def test_bad_sizes_and_unknown_schedulers_are_refused_before_any_work(tmp_path, capsys):
    # No model exists at this path: the refusal must come first.
    assert main(["generate", str(tmp_path / "none"), "--prompt", "x", "--width", "100"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none"), "--prompt", "x", "--width", "100000"]) == 2
    assert "--width 100000: at most 8192 px" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none"), "--prompt", "x", "--scheduler", "Euler b"]) == 2
    err = capsys.readouterr().err
    assert "Euler b" in err and "DPM++ 2M Karras" in err
    for device, message in (("gpu", "not a device"), ("cuda:3", "there is no such CUDA device here")):
        assert main(["generate", str(tmp_path / "none"), "--prompt", "x", "--device", device]) == 2
        assert f"--device {device}: {message}" in capsys.readouterr().err


def test_lora_by_flag_and_by_prompt_tag_are_the_same_and_a_misfit_is_named(tiny_sd, shapes_dir, tmp_path, capsys):  # noqa: F811
    config = sd_config(tmp_path, shapes_dir, tiny_sd, lora={"enabled": True, "init": "gaussian"},
                       training={"max_steps": 2, "learning_rate": 5e-3})
    assert main(["train", str(config), "--no-progress"]) == 0
    lora = tmp_path / "run" / "model" / "lora.safetensors"
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "mine.safetensors").write_bytes(lora.read_bytes())
    base = run(tiny_sd, tmp_path / "base", "--prompt", "a red circle")[0]
    by_flag = run(tiny_sd, tmp_path / "flag", "--prompt", "a red circle", "--lora", f"{lora}:0.8")[0]
    by_tag = run(tiny_sd, tmp_path / "tag", "--prompt", "a red circle <lora:mine:0.8>", "--lora-dir", str(tmp_path / "loras"))[0]
    assert np.abs(pixels(by_flag) - pixels(by_tag)).max() <= 1
    assert not np.array_equal(pixels(base), pixels(by_flag))
    # The LoRA run itself is a model: base + its adapter.
    from_run = run(tmp_path / "run", tmp_path / "fromrun", "--prompt", "a red circle")[0]
    at_one = run(tiny_sd, tmp_path / "one", "--prompt", "a red circle", "--lora", str(lora))[0]
    assert np.abs(pixels(from_run) - pixels(at_one)).max() <= 1
    # Fused projections would bypass the adapters on q, k and v: refused, with the way out.
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--lora", str(lora), "--fuse-qkv", "--out",
                 str(tmp_path / "fused"), *FAST]) == 2
    assert "fusing them would drop the LoRA" in capsys.readouterr().err

    from difftrain.models.tiny_sd import write_tiny_sd

    other = write_tiny_sd(tmp_path / "other", seed=1, unet_channels=(16, 32))
    assert main(["generate", str(other), "--prompt", "x", "--lora", str(lora), "--out", str(tmp_path / "x"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "LoRA modules do not fit the base model" in err and "to_q" in err


def test_img2img_starts_from_the_image(tiny_sd, tmp_path, capsys):  # noqa: F811
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    common = ["--prompt", "a red circle", "--init-image", str(init), "--steps", "10"]
    weak = run(tiny_sd, tmp_path / "weak", *common, "--strength", "0.1")
    strong = run(tiny_sd, tmp_path / "strong", *common, "--strength", "1.0")
    text = Image.open(weak[0]).info["parameters"]
    assert "Denoising strength: 0.1" in text
    # The tiny VAE has random weights, so compare with the init image as it comes back through it.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    x = torch.from_numpy(np.asarray(Image.open(init), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        round_trip = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    target = ((round_trip[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.int16)
    assert np.abs(pixels(weak[0]) - target).mean() < np.abs(pixels(strong[0]) - target).mean()
    # A batch starts each image from the init image's latents, without diffusers' FutureWarning for one image given
    # to several prompts.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        batch = run(tiny_sd, tmp_path / "batch", *common, "--strength", "0.1", "--batch-size", "2")
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []
    assert np.abs(pixels(batch[0]) - pixels(weak[0])).max() <= 2  # image 0 of a batch is the image alone
    # DDIM takes A1111's 19 steps for 20: at strength 0.05 the tail img2img keeps is empty (a traceback from
    # deep in the pipeline before); said with the fix. One step more strength draws.
    common = ["--prompt", "x", "--init-image", str(init), "--steps", "20", "--scheduler", "DDIM", "--out"]
    assert main(["generate", str(tiny_sd), *common, str(tmp_path / "none"), "--strength", "0.05", *FAST[2:]]) == 2
    assert "leaves this sampler no step to take (0); raise the strength or the steps" in capsys.readouterr().err
    assert main(["generate", str(tiny_sd), *common, str(tmp_path / "one"), "--strength", "0.1", *FAST[2:]]) == 0


def test_every_listed_scheduler_name_generates_a_finite_image(tiny_sd, tmp_path, capsys):  # noqa: F811
    from difftrain.sampling.schedulers import list_schedulers

    assert main(["generate", "--list-schedulers"]) == 0
    listed = capsys.readouterr().out
    names = [display for display, _, _ in list_schedulers()]
    assert all(name in listed for name in names)
    from difftrain.generate.text2image import GenerateOptions, generate

    for name in names:
        try:
            paths = generate(str(tiny_sd), GenerateOptions(prompt="a red circle", scheduler=name, steps=4, width=32,
                                                           height=32), tmp_path / name.replace(" ", "_"), progress=False)
        except Exception as error:  # only a clearly reported missing optional package is acceptable
            assert "torchsde" in str(error), (name, error)
            continue
        image = pixels(paths[0])
        assert image.std() > 0, name  # not a blank (NaN-decoded) image


def test_run_folders_of_other_methods_point_to_sample(tmp_path, make_config, capsys):
    config = make_config(training={"max_steps": 1})
    assert main(["train", str(config), "--no-progress"]) == 0
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x"]) == 2
    assert "difftrain sample" in capsys.readouterr().err


def test_single_file_checkpoints_generate_like_their_folder(tiny_sd, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    from difftrain.models.single_file import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "model.safetensors")
    folder = run(tiny_sd, tmp_path / "folder", "--prompt", "a red circle")[0]
    single = run(tmp_path / "model.safetensors", tmp_path / "single", "--prompt", "a red circle",
                 "--config", str(tiny_sd))[0]
    assert np.abs(pixels(folder) - pixels(single)).max() <= 1


def test_run_folders_give_ema_or_raw_weights_and_textual_inversion_tokens(tiny_sd, shapes_dir, tmp_path):  # noqa: F811
    config = sd_config(tmp_path, shapes_dir, tiny_sd, training={"max_steps": 2, "learning_rate": 1e-2})
    assert main(["train", str(config), "--no-progress"]) == 0
    ema = run(tmp_path / "run", tmp_path / "ema", "--prompt", "a red circle")[0]
    raw = run(tmp_path / "run", tmp_path / "raw", "--prompt", "a red circle", "--no-ema")[0]
    assert not np.array_equal(pixels(ema), pixels(raw))
    assert "EMA: off" in Image.open(raw).info["parameters"]
    # A model with one set of weights is drawn as it is, and its PNG does not claim the raw weights were taken
    plain = run(tiny_sd, tmp_path / "plain", "--prompt", "a red circle", "--no-ema")[0]
    assert "EMA: off" not in Image.open(plain).info["parameters"]

    ti = sd_config(tmp_path, shapes_dir, tiny_sd, "ti", method="textual_inversion",
                   textual_inversion={"token": "<shape>", "initializer": "square", "num_vectors": 2},
                   training={"max_steps": 2, "learning_rate": 0.5})
    assert main(["train", str(ti), "--no-progress"]) == 0
    with_token = run(tmp_path / "ti", tmp_path / "tok", "--prompt", "a photo of <shape>")[0]
    without = run(tmp_path / "ti", tmp_path / "word", "--prompt", "a photo of square")[0]
    assert not np.array_equal(pixels(with_token), pixels(without))


def test_memory_switches_run_and_keep_the_image_close(tiny_sd, tmp_path):  # noqa: F811
    plain = run(tiny_sd, tmp_path / "plain", "--prompt", "a red circle")[0]
    switched = run(tiny_sd, tmp_path / "switched", "--prompt", "a red circle", "--attention-slicing", "--vae-tiling",
                   "--vae-slicing", "--channels-last")[0]
    assert np.abs(pixels(plain) - pixels(switched)).max() <= 2


def test_sample_on_a_stable_diffusion_model_points_to_generate(tiny_sd, tmp_path, capsys):  # noqa: F811
    assert main(["sample", str(tiny_sd), "--num", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "difftrain generate" in err and "Traceback" not in err


def test_a_zero_terminal_snr_model_draws_with_the_default_sampler_and_ddim(tiny_sd, tmp_path):  # noqa: F811
    """diffusers' pipelines set no begin index: Karras sigmas that repeat t = 999 (as a zero-terminal-SNR
    model's do) ran off the end, and the clamped-then-rescaled betas gave NaN, black images."""
    import json
    import shutil

    model = tmp_path / "ztsnr"
    shutil.copytree(tiny_sd, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    for sampler in (None, "DDIM"):  # the default (DPM++ 2M Karras) ran off its end; DDIM drew black
        chosen = ["--scheduler", sampler] if sampler else []
        [image] = run(model, tmp_path / f"out-{sampler}", "--prompt", "a red circle", "--steps", "25", *chosen)
        assert pixels(image).std() > 5, sampler  # not the flat black of NaN latents


def test_the_infotext_says_what_was_drawn_as_a1111_1_9_reads_it(tiny_sd, tmp_path, caplog):  # noqa: F811
    import shutil

    from difftrain.generate.infotext import parse_infotext, read_png_infotext
    from difftrain.models.manifest import Manifest

    model = tmp_path / "skip2"
    shutil.copytree(tiny_sd, model)
    Manifest("stable-diffusion", method="text2image", conditioning={"clip_skip": 2}).write(model)
    [karras] = run(model, tmp_path / "karras", "--prompt", "a red circle")  # default DPM++ 2M Karras
    _, _, params = parse_infotext(read_png_infotext(karras))
    # Schedule type apart (1.9+ reads a missing one as Automatic: Karras for DPM++ 2M), and the clip skip the
    # model was trained with, which A1111 and civitai need to draw it again.
    assert (params["Sampler"], params["Schedule type"], params["Clip skip"]) == ("DPM++ 2M", "Karras", "2")
    [uniform] = run(model, tmp_path / "uniform", "--prompt", "a red circle", "--scheduler", "dpm++_2m")
    _, _, params = parse_infotext(read_png_infotext(uniform))
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Uniform")
    assert "Pad conds" not in params
    # A prompt of two chunks against a one-chunk negative: padded, which A1111 does only with "Pad conds".
    [long] = run(model, tmp_path / "long", "--prompt", "red circle " * 41, "--negative-prompt", "blue")
    assert parse_infotext(read_png_infotext(long))[2]["Pad conds"] == "True"

    # Seed -1 is random, as in A1111 and the server; the PNG records the seed drawn.
    [first] = run(model, tmp_path / "random1", "--prompt", "a red circle", "--seed", "-1")
    [second] = run(model, tmp_path / "random2", "--prompt", "a red circle", "--seed", "-1")
    seeds = [int(parse_infotext(read_png_infotext(p))[2]["Seed"]) for p in (first, second)]
    assert min(seeds) >= 0 and seeds[0] != seeds[1] and first.name.endswith(f"-{seeds[0]}.png")

    # Another tool's PNG: a sampler given on the command line replaces one we lack; features we lack are named.
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Align Your Steps, "
                                "CFG scale: 7, Seed: 5, Size: 32x32, Hires upscale: 2, Tiling: True")
    foreign = tmp_path / "foreign.png"
    Image.new("RGB", (32, 32)).save(foreign, pnginfo=info)
    assert main(["generate", str(model), "--from-png", str(foreign), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 2  # Align Your Steps: no such schedule here
    with caplog.at_level("WARNING"):
        assert main(["generate", str(model), "--from-png", str(foreign), "--scheduler", "euler",
                     "--out", str(tmp_path / "g"), "--no-progress"]) == 0
    assert "Tiling: True not repeated" in caplog.text
    assert "Hires" not in caplog.text  # the hires fix is repeated (test_hires.py)
    # A1111's API default, "Seed resize from: -1x-1", which A1111 up to 1.5 wrote: off, not a refusal
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 32x32, "
                                "Seed resize from: -1x-1, Version: v1.5.1")
    Image.new("RGB", (32, 32)).save(tmp_path / "api.png", pnginfo=info)
    assert main(["generate", str(model), "--from-png", str(tmp_path / "api.png"), "--out", str(tmp_path / "api"),
                 "--no-progress"]) == 0
    assert "Seed resize from" not in read_png_infotext(next((tmp_path / "api").glob("*.png")))
    # A size A1111 rounded down to whole latent cells (it was refused, naming a --width not typed)
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 36x36")
    Image.new("RGB", (32, 32)).save(tmp_path / "odd.png", pnginfo=info)
    assert main(["generate", str(model), "--from-png", str(tmp_path / "odd.png"), "--out", str(tmp_path / "odd"),
                 "--no-progress"]) == 0
    assert Image.open(next((tmp_path / "odd").glob("*.png"))).size == (32, 32) and "Size 36x36" in caplog.text
    # Chunks of unequal count without "Pad conds": A1111 drew the sides apart; ours pads, and says so. Our own
    # padded PNG says "Pad conds", so repeating it is silent.
    info = PngInfo()
    info.add_text("parameters", f"{'red circle ' * 41}\nNegative prompt: blue\nSteps: 2, Sampler: Euler, CFG scale: 7, "
                                "Seed: 5, Size: 32x32")
    Image.new("RGB", (32, 32)).save(foreign, pnginfo=info)
    for png, said in ((foreign, True), (long, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["generate", str(model), "--from-png", str(png), "--out", str(tmp_path / "h"),
                         "--no-progress"]) == 0
        assert ("does not say 'Pad conds'" in caplog.text) is said, png


def test_a1111_settings_we_cannot_repeat_are_named_and_the_rng_is_recorded(tiny_sd, tmp_path, caplog):  # noqa: F811
    from PIL.PngImagePlugin import PngInfo

    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    # Our noise is A1111's "RNG: CPU" (a CPU generator per seed): said, as A1111 reads a missing RNG as its GPU's.
    [ours] = run(tiny_sd, tmp_path / "ours", "--prompt", "a red circle")
    assert parse_infotext(read_png_infotext(ours))[2]["RNG"] == "CPU"

    def repeat(parameters: str, *flags) -> int:
        info = PngInfo()
        info.add_text("parameters", parameters)
        png = tmp_path / "a1111.png"
        Image.new("RGB", (32, 32)).save(png, pnginfo=info)
        caplog.clear()
        with caplog.at_level("WARNING"):
            return main(["generate", str(tiny_sd), "--from-png", str(png), "--out", str(tmp_path / "again"),
                         "--no-progress", *flags])

    a1111 = "a red circle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 32x32, Version: v1.10.1"
    assert repeat(a1111) == 0 and "RNG: GPU not repeated" in caplog.text
    assert repeat(a1111 + ", RNG: CPU") == 0 and "RNG" not in caplog.text
    assert repeat(a1111 + ", Eta DDIM: 0.5, Emphasis: No norm, TI hashes: \"easyneg: 1234\"") == 0
    assert "Emphasis: No norm not repeated" in caplog.text and "--embedding" in caplog.text
    assert "Eta DDIM" not in caplog.text  # (repeated since generate has --eta)
    # An img2img PNG records no init image: drawn from text, and said. A hires-fix PNG's strength is its
    # second pass's, not an img2img strength.
    assert repeat(a1111 + ", Denoising strength: 0.5") == 0 and "give --init-image" in caplog.text
    assert repeat(a1111 + ", Denoising strength: 0.5, Hires upscale: 2") == 0 and "init-image" not in caplog.text
    # A1111 before 1.6 placed prompt edits on its old timeline (and reads such PNGs so): said.
    old = "a [red:blue:0.5] circle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 32x32, Version: v1.5.1"
    assert repeat(old) == 0 and "prompt editing timeline was the old one" in caplog.text
    assert repeat(old.replace("v1.5.1", "v1.6.0")) == 0 and "timeline" not in caplog.text
    # At CFG 1 the negative side is not drawn, so a long negative prompt pads nothing.
    [unguided] = run(tiny_sd, tmp_path / "cfg1", "--prompt", "a red circle", "--negative-prompt", "blue " * 80,
                     "--cfg", "1")
    [plain] = run(tiny_sd, tmp_path / "cfg1-plain", "--prompt", "a red circle", "--cfg", "1")
    assert "Pad conds" not in parse_infotext(read_png_infotext(unguided))[2]
    assert np.array_equal(pixels(unguided), pixels(plain))


def test_prompt_schedules_are_a1111s_own():
    """The web UI's doctests of get_learned_conditioning_prompt_schedules (10 steps), its grammar's odd cases
    included: a prompt it cannot parse is one text for every step."""
    from difftrain.sampling.prompt_schedule import prompt_schedule

    cases = {
        "test": [(10, "test")],
        "a [b:3]": [(3, "a "), (10, "a b")],
        "a [b: 3]": [(3, "a "), (10, "a b")],
        "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
        "[(a:2):3]": [(3, ""), (10, "(a:2)")],
        "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
        "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
        "a [unbalanced": [(10, "a [unbalanced")],
        "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
        "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
        "[a|(b:1.1)]": [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)],
        "[fe|]male": [(step, "female" if step % 2 else "male") for step in range(1, 11)],
        "[fe|||]male": [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)],
        # The web UI's doctest says [(5, 'a  c'), (10, 'a {b|d{ c')] "not handling this right now": its grammar
        # (lark 1.1.2, its pin, and 1.3) cannot parse it, so it is one text there too.
        "a [{b|d{:.5] c": [(10, "a [{b|d{:.5] c")],
        "a [b:20] c": [(10, "a  c")],  # an addition after the last step never comes
    }
    assert {prompt: prompt_schedule(prompt, 10) for prompt in cases} == cases
    from difftrain.sampling.prompts import PromptError

    with pytest.raises(PromptError, match=r"\[\.\.\.:1e400\]: an edit's step must be a finite number"):
        prompt_schedule("a [b:c:1e400]", 10)  # (an OverflowError traceback)


def test_prompt_editing_swaps_the_conditioning_at_a1111s_steps(tiny_sd, tmp_path):  # noqa: F811
    """What the UNet is given at each call: `[red:blue:1]` in 3 steps is red for steps 0 and 1 (A1111 swaps
    after the step a span ends) and blue for step 2; `[red|blue]` red, red, blue, red over 4."""
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.prompts import encode_pair

    drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=3, width=32, height=32, guidance_scale=5.0,
                                                  negative_prompt="ugly"), progress=False)
    seen = []
    drawer.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    pipe = drawer.pipe

    def encoded(text: str) -> torch.Tensor:  # [negative, positive], as the pipeline stacks them
        positive, negative, _ = encode_pair(pipe.tokenizer, pipe.text_encoder, text, "ugly", "cpu")
        return torch.cat([negative, positive])

    red, blue = encoded("a red circle"), encoded("a blue circle")
    drawer.draw("a [red:blue:1] circle", "ugly", [3])
    assert [next(name for name, z in (("red", red), ("blue", blue)) if torch.equal(z, call)) for call in seen] == \
        ["red", "red", "blue"]
    seen.clear()
    drawer.options.steps = 4
    drawer.draw("a [red|blue] circle", "ugly", [3])
    assert [next(name for name, z in (("red", red), ("blue", blue)) if torch.equal(z, call)) for call in seen] == \
        ["red", "red", "blue", "red"]
    # Heun calls the UNet twice a step (5 calls for 3): A1111 sizes the schedule for 6 steps, so [red:blue:0.5]
    # is red for calls 0 to 3.
    heun = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=3, width=32, height=32, guidance_scale=5.0,
                                                negative_prompt="ugly", scheduler="Heun"), progress=False)
    heun.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    seen.clear()
    heun.draw("a [red:blue:0.5] circle", "ugly", [3])
    assert [next(name for name, z in (("red", red), ("blue", blue)) if torch.equal(z, call)) for call in seen] == \
        ["red"] * 4 + ["blue"]
    # An edit at or past the last step is no edit: the plain prompt's image.
    drawer.options.steps = 3
    plain = drawer.draw("a red circle", "ugly", [3])
    assert np.array_equal(np.asarray(drawer.draw("a [red:blue:3] circle", "ugly", [3])[0]), np.asarray(plain[0]))
    # The early steps set the picture: blue for two of three steps is not the red circle.
    assert not np.array_equal(np.asarray(drawer.draw("a [blue:red:1] circle", "ugly", [3])[0]), np.asarray(plain[0]))


def test_running_out_of_memory_is_a_message_not_a_traceback(tiny_sd, tmp_path, capsys, monkeypatch):  # noqa: F811
    """What a GPU says when a size or batch does not fit (here raised where drawing would raise it)."""
    from difftrain.generate.text2image import Drawer

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.6 GiB total)")

    monkeypatch.setattr(Drawer, "draw", too_big)
    assert main(["generate", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB" in err and "--batch-size" in err
    assert "Traceback" not in err
    monkeypatch.setattr(Drawer, "draw", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is still a bug to see whole
        main(["generate", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path / "other"), *FAST])


def test_and_composes_the_guidance_of_its_parts_as_a1111(tiny_sd, tmp_path, capsys):  # noqa: F811
    """uncond + cfg x sum(w_i x (cond_i - uncond)): halves of one prompt are that prompt, a weight of 2 is twice the
    CFG, and every UNet call runs the uncond half and each part (here 1 + 2)."""
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.prompt_schedule import composable_parts

    assert composable_parts("a cat AND  a hat:0.6 AND (red:1.2)") == [("a cat", 1.0), ("  a hat", 0.6),
                                                                       (" (red:1.2)", 1.0)]

    def drawer(cfg: float) -> Drawer:
        return Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=3, width=32, height=32, guidance_scale=cfg),
                      progress=False)

    def pixels_of(draw: Drawer, prompt: str) -> np.ndarray:
        return np.asarray(draw.draw(prompt, "", [4])[0]).astype(int)

    five, ten = drawer(5.0), drawer(10.0)
    batches = []
    five.pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    plain = pixels_of(five, "a red circle")
    halves = pixels_of(five, "a red circle:0.5 AND a red circle:0.5")
    assert batches == [2] * 3 + [3] * 3  # CFG's two halves; then uncond and the two parts
    assert np.abs(halves - plain).max() <= 2  # (a batch of three takes other kernels than one of two)
    assert np.abs(pixels_of(five, "a red circle:2") - pixels_of(ten, "a red circle")).max() <= 2
    assert np.abs(pixels_of(five, "a red circle AND a blue square") - plain).max() > 2
    assert np.array_equal(pixels_of(five, "a red circle:1"), plain)  # one part at weight 1: plain guidance
    # Parts of other lengths are stacked as A1111 stacks them (each padded with its last vector) and run apart
    # from the uncond half, which keeps its own length: nothing is "Pad conds"-padded.
    batches.clear()
    long = "a cat AND " + "red " * 90
    five.draw(long, "", [4])
    assert batches == [1, 2] * 3 and five.padded is False
    assert "forward" not in five.pipe.unet.__dict__  # the UNet's own forward again, no instance attribute left
    # Evaluation reads captions as data: "at 10:30" is a time, not a weight of 30 (compose=False).
    literal = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=3, width=32, height=32, guidance_scale=5.0,
                                                   compose=False), progress=False)
    assert np.array_equal(pixels_of(literal, "a red circle"), plain)
    assert not np.array_equal(pixels_of(literal, "a red circle:2"), pixels_of(five, "a red circle:2"))
    # What cannot compose is said before drawing.
    assert main(["generate", str(tiny_sd), "--prompt", "a red circle AND a blue square", "--cfg", "1",
                 "--out", str(tmp_path / "cfg1"), *FAST]) == 2
    assert "AND or a prompt weight (1, 1) composes prompts, and it needs classifier-free guidance" in \
        capsys.readouterr().err


def test_img2img_takes_a1111s_steps(tiny_sd, tmp_path):  # noqa: F811
    """A1111's k-diffusion samplers take int(steps x strength) + 1 steps of img2img, the first at the schedule's
    (steps - that)th timestep (diffusers took one fewer, from one point lower); DDIM, PLMS and UniPC, A1111's
    timestep samplers with a loop of their own, keep diffusers' (the tail int(steps x strength) leaves of A1111's
    9 DDIM steps for 10). Even steps x strength < 1 takes a step."""
    import copy

    from difftrain.generate.text2image import Drawer, GenerateOptions

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    for scheduler, steps, strength, taken in (("Euler", 10, 0.3, 4), ("DPM++ 2M Karras", 10, 0.55, 6),
                                               ("Euler", 4, 0.1, 1), ("Euler", 10, 1.0, 10), ("DDIM", 10, 0.3, 2)):
        drawer = Drawer(str(tiny_sd), GenerateOptions(prompt="", steps=steps, width=32, height=32, strength=strength,
                                                      scheduler=scheduler, init_image=str(init)), progress=False)
        timesteps = []
        drawer.pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
        drawer.draw("a red circle", "", [1])
        schedule = copy.deepcopy(drawer.runner.scheduler)
        schedule.set_timesteps(steps)
        assert len(timesteps) == taken and timesteps[0] == float(schedule.timesteps[-taken]), scheduler


def test_ddims_eta_is_drawn_recorded_and_repeated(tiny_sd, tmp_path, capsys):  # noqa: F811
    """A1111's Eta DDIM: DDIM's noise per step (0 its default, deterministic); the ancestral samplers draw only their
    default 1, which diffusers' classes fix, so another value is refused; a sampler without noise ignores it."""
    from difftrain.generate.infotext import read_png_infotext

    ddim = ["--prompt", "a cat", "--scheduler", "ddim", "--seed", "1"]
    [plain] = run(tiny_sd, tmp_path / "plain", *ddim)
    [noisy] = run(tiny_sd, tmp_path / "noisy", *ddim, "--eta", "0.5")
    assert np.abs(pixels(plain) - pixels(noisy)).mean() > 1.0
    assert "Eta DDIM: 0.5" in read_png_infotext(noisy) and "Eta DDIM" not in read_png_infotext(plain)
    assert main(["generate", str(tiny_sd), "--from-png", str(noisy), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert np.array_equal(pixels(noisy), pixels(next((tmp_path / "again").glob("*.png"))))
    [euler] = run(tiny_sd, tmp_path / "euler", "--prompt", "a cat", "--scheduler", "euler", "--eta", "0.5")
    assert "Eta" not in read_png_infotext(euler)
    for sampler, eta, said in (("euler_a", "0.5", "0.5 with Euler a: diffusers' sampler has no eta"),
                               ("ddim", "1.5", "1.5: from 0 to 1")):
        assert main(["generate", str(tiny_sd), "--prompt", "x", "--scheduler", sampler, "--eta", eta,
                     "--out", str(tmp_path / "no")]) == 2
        assert f"--eta {said}" in capsys.readouterr().err
