import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from difftrain.data.images import BadImage, image_size_from_bytes, load_image, load_image_bytes


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height`: what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("text.png", b"this is not an image at all", "not an image"),
        ("truncated.png", None, "cannot decode"),
        ("bomb.png", huge_png_header(100_000, 100_000), "decompression bomb"),
    ],
)
def test_bad_files_raise_badimage_with_a_reason(tmp_path, name, content, reason):
    if content is None:
        data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
        content = data[: len(data) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        load_image(path)


def test_truncated_jpeg_is_bad(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:600])
    with pytest.raises(BadImage):
        load_image(path)


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    assert load_image(path).size == (300, 300)
    with pytest.raises(BadImage, match="exceeds data.max_image_pixels=50000"):
        load_image(path, max_pixels=50_000)


def test_missing_file(tmp_path):
    with pytest.raises(BadImage, match="cannot read file"):
        load_image(tmp_path / "nope.png")


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue strip is now on top


def test_a_damaged_exif_block_is_not_a_damaged_picture():
    """Damaged the way cameras and editors damage them (3 random bytes of an orientation-6 block): PIL's
    ImageOps.exif_transpose rewrote the block and raised struct.error, past every except, and a whole scan,
    training run or download stopped on one photo."""
    import random

    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110], exif[0x0131] = 6, "maker", "model", "software"
    raw, rng = bytearray(exif.tobytes()), random.Random(98)
    for _ in range(3):
        raw[rng.randrange(8, len(raw))] = rng.randrange(256)
    out = io.BytesIO()
    Image.new("RGB", (20, 40), (200, 10, 10)).save(out, "JPEG", exif=bytes(raw))
    with pytest.warns(UserWarning):  # PIL's own "Corrupt EXIF data" notices
        loaded = load_image_bytes(out.getvalue())
        assert loaded.mode == "RGB" and loaded.size == image_size_from_bytes(out.getvalue())


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    source = Image.new("RGB", (8, 8), (200, 30, 30)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    source.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_alpha_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))
    path = tmp_path / "alpha.png"
    image.save(path)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[1, 1]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 200, 10] + [0, 0, 0] * 255)
    image.info["transparency"] = 1
    image.putpixel((0, 0), 1)
    path = tmp_path / "pal.png"
    image.save(path, transparency=1)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[2, 2]) == (10, 200, 10)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    array = np.full((4, 4), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (4, 4, 3)
    assert 125 <= int(pixels[0, 0, 0]) <= 130  # half of full scale, not 255


def test_a_dark_sixteen_bit_image_stays_dark_and_one_transparent_colour_is_white(tmp_path):
    dark = tmp_path / "dark.png"  # 16 bits whose values all sit below 256: near black, not bright
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(dark)
    assert Image.open(dark).mode.startswith("I")
    assert int(np.asarray(load_image(dark))[0, 0, 0]) == 1
    keyed = tmp_path / "keyed.png"  # an RGB PNG with one colour marked transparent (PNG optimisers write these)
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    image.putpixel((0, 0), (200, 100, 50))
    image.save(keyed, transparency=(10, 20, 30))
    pixels = np.asarray(load_image(keyed))
    assert tuple(pixels[2, 2]) == (255, 255, 255) and tuple(pixels[0, 0]) == (200, 100, 50)


def test_gif_first_frame_and_other_formats(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(gif))[0, 0, 0] > 200  # red: the first frame
    for ext in ("webp", "bmp"):
        path = tmp_path / f"x.{ext}"
        Image.new("RGB", (6, 6), (0, 0, 255)).save(path)
        assert load_image(path).size == (6, 6)
