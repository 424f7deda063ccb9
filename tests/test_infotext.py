"""A1111's infotext: written the way A1111 writes it, read the way A1111 reads it, in PNGs."""

import pytest
from PIL import Image

from difftrain.generate.infotext import (
    InfotextError,
    format_infotext,
    parse_infotext,
    parse_size,
    read_png_infotext,
    typed_params,
    write_png,
)
from difftrain.sampling.schedulers import resolve_name

PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7, "Seed": 1234, "Size": (512, 768)}


def test_layout_is_a1111s():
    params = {
        **PARAMS,
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": 0.75,
        "Hires upscaler": None,  # left out, as A1111 does
        "Lora hashes": "add_detail: 7c6bad76eb54, film: 0123456789ab",
    }
    assert format_infotext("a castle on a hill, sunset", "blurry, lowres", params) == (
        "a castle on a hill, sunset\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.75, "
        'Lora hashes: "add_detail: 7c6bad76eb54, film: 0123456789ab"'
    )
    assert format_infotext("a cat", "", PARAMS) == (
        "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768"
    )


AWKWARD_VALUES = {
    "Model": "model, custom",
    "Lora hashes": "add_detail: 7c6bad76eb54",
    "Note": 'she said "hi"',
    "Quoted": '"already quoted"',
    "Empty": "",
    "Padded": "  spaced  ",
    "Lines": "one\ntwo",
    "Escapes": 'back\\slash, "both"',
    "Unicode": "明亮的湖泊, 模糊",
    "Hires resize": (1024, 1536),
}


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("a castle on a hill", "blurry"),
        ("first line\nsecond line, with a comma\n\nafter a blank line", "ugly,\nsecond negative line"),
        ('a "quoted" word, (masterpiece:1.2), [cat:dog:0.5], <lora:add_detail:0.8>', ""),
        ("Steps: 3, Sampler: in the prompt, Seed: 9", "CFG scale: 1, Seed: 2, Size: 3x4"),
        ("明亮的湖泊, soft light", "模糊"),
        ("", "only a negative prompt"),
        ("no negative prompt at all", ""),
    ],
)
def test_round_trip(prompt, negative):
    params = {**PARAMS, **AWKWARD_VALUES}
    text = format_infotext(prompt, negative, params)
    expected = {key: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v) for key, v in params.items()}
    assert parse_infotext(text) == (prompt, negative, expected)
    assert text.split("\n")[-1].startswith("Steps: 20, "), "newlines in values stay inside quotes"


# AUTOMATIC1111's own example, from the docstring of parse_generation_parameters.
A1111_DOC_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
    "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def test_parses_a1111s_example():
    prompt, negative, params = parse_infotext(A1111_DOC_EXAMPLE)
    assert prompt.startswith("girl with an artist's beret") and prompt.endswith("detailed, intricate")
    assert negative.startswith("ugly, fat") and negative.endswith("messy drawing")
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }
    assert format_infotext(prompt, negative, params) == A1111_DOC_EXAMPLE
    assert resolve_name(params["Sampler"]) == "euler_a"


# The shape A1111 1.9+ saves: sampler and schedule type apart, quoted hash lists, a version.
A1111_19 = (
    "masterpiece, best quality, 1girl, <lora:add_detail:0.6>\n"
    "lake at dawn\n"
    "Negative prompt: lowres, bad anatomy, easynegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3748719078, Size: 768x1024, "
    "Model hash: 19bbe9faa4, Model: fantasticmix_k2, VAE hash: 07af11b95c, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 1.5, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03, badhandv4: 5e40d722fc3d", Downcast alphas_cumprod: True, Version: v1.9.4'
)


def test_parses_a1111_1_9_infotext():
    prompt, negative, params = parse_infotext(A1111_19)
    assert prompt == "masterpiece, best quality, 1girl, <lora:add_detail:0.6>\nlake at dawn"
    assert negative == "lowres, bad anatomy, easynegative"
    assert params["TI hashes"] == "easynegative: c74b4e810b03, badhandv4: 5e40d722fc3d"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["Downcast alphas_cumprod"] == "True" and params["Version"] == "v1.9.4"
    typed = typed_params(params)
    assert (typed["Steps"], typed["CFG scale"], typed["Seed"]) == (28, 6.5, 3748719078)
    assert (typed["Size"], typed["Clip skip"], typed["Denoising strength"]) == ((768, 1024), 2, 0.45)
    assert typed["Sampler"] == "DPM++ 2M"  # strings stay strings
    assert resolve_name(params["Sampler"], params["Schedule type"]) == "dpm++_2m_karras"
    assert format_infotext(prompt, negative, params) == A1111_19


def test_a1111_quirks():
    # A last line with fewer than three pairs is prompt text.
    assert parse_infotext("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    # Lines are stripped, a blank line before any text is dropped, and keys are 2+ characters.
    text = "  padded line  \nNegative prompt:\n  x  \nAa: 1, B: 2, Cc: 3, Dd: 4"
    assert parse_infotext(text) == ("padded line", "x", {"Aa": "1", "Cc": "3", "Dd": "4"})
    # A flag whose value is its own name is written bare, and not read back.
    text = format_infotext("p", "", {**PARAMS, "Tiling": "Tiling"})
    assert text.endswith("Size: 512x768, Tiling") and "Tiling" not in parse_infotext(text)[2]


def test_refuses_what_cannot_be_read_back():
    with pytest.raises(InfotextError, match="at least 3 parameters, got 2"):
        format_infotext("p", "", {"Steps": 20, "Seed": 1})
    for key in ("Bad: key", "a", "x,y", " Steps"):
        with pytest.raises(InfotextError, match="cannot be read back"):
            format_infotext("p", "", {**PARAMS, key: 1})
    with pytest.raises(InfotextError, match="must be text or a number"):
        format_infotext("p", "", {**PARAMS, "List": [1, 2, 3]})
    assert format_infotext("just a prompt", "", {}) == "just a prompt"


def test_typed_values_and_sizes():
    assert parse_size("512x768") == (512, 768)
    with pytest.raises(InfotextError, match="expected WIDTHxHEIGHT"):
        parse_size("512 by 768")
    with pytest.raises(InfotextError, match="Steps: 'twenty' is not a int"):
        typed_params({"Steps": "twenty"})


@pytest.mark.parametrize("prompt, chunk", [("a cat, sunset", b"tEXt"), ("明亮的湖泊", b"iTXt")])
def test_png_round_trip(tmp_path, prompt, chunk):
    text = format_infotext(prompt, "blurry", {**PARAMS, "Lora hashes": "a: 1, b: 2"})
    path = tmp_path / "out.png"
    Image.new("RGB", (8, 8), "red").save(path)  # overwritten in place
    assert write_png(Image.new("RGB", (16, 8), "blue"), path, text) == path
    assert read_png_infotext(path) == text
    with Image.open(path) as image:
        assert image.size == (16, 8) and image.getpixel((0, 0)) == (0, 0, 255)
        assert image.info["parameters"] == text  # where A1111 looks
    assert chunk in path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"], "no temporary file left"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.png"
    write_png(Image.new("RGB", (4, 4)), path, "old")
    with pytest.raises(OSError):
        write_png(Image.new("CMYK", (4, 4)), path, "new")  # PNG cannot hold CMYK
    assert read_png_infotext(path) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_reading_says_what_is_wrong(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(InfotextError, match="no 'parameters' text chunk"):
        read_png_infotext(tmp_path / "plain.png")
    with pytest.raises(InfotextError, match="no such file"):
        read_png_infotext(tmp_path / "missing.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    with pytest.raises(InfotextError, match="a JPEG image; infotext is read from PNG files only"):
        read_png_infotext(tmp_path / "photo.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InfotextError, match="not an image"):
        read_png_infotext(tmp_path / "notes.png")
