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


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_the_header_size_is_the_upright_size_the_decode_gives(fmt):
    import io

    from difftrain.data.images import image_size_from_bytes, load_image_bytes

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = io.BytesIO()
    image.save(stored, fmt, exif=exif.tobytes())
    # (Pillow's TIFF reader turns the size on open itself: turned again, a portrait TIFF went to a landscape bucket.)
    assert image_size_from_bytes(stored.getvalue()) == load_image_bytes(stored.getvalue(), 10**6).size == (20, 40)


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


def adobe_rgb_profile() -> bytes:
    """An ICC v2 display profile with Adobe RGB (1998)'s primaries (D50-adapted, as the profile stores
    them) and its 563/256 gamma, written byte by byte: no such file ships with PIL."""
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    name = b"Test Adobe RGB (1998)"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(name) + 1) + name + b"\0" + bytes(4 + 4 + 2 + 1 + 67)
    gamma = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.60974, 0.31111, 0.01947)),
            (b"gXYZ", xyz(0.20528, 0.62567, 0.06087)), (b"bXYZ", xyz(0.14919, 0.06322, 0.74457)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma), (b"cprt", b"text\0\0\0\0none\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
              + bytes(24) + struct.pack(">I", 0) + xyz(0.9642, 1.0, 0.8249)[8:] + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + table + data


def adobe_to_srgb(rgb) -> np.ndarray:
    """Adobe RGB (1998) 8-bit values to sRGB ones by the two standards' own formulas (D65, no ICC)."""
    linear = (np.asarray(rgb, dtype=np.float64) / 255.0) ** (563 / 256)
    to_xyz = np.array([[0.57667, 0.18556, 0.18823], [0.29734, 0.62736, 0.07529], [0.02703, 0.07069, 0.99134]])
    to_srgb = np.linalg.inv(np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]))
    srgb = np.clip(to_srgb @ to_xyz @ linear, 0.0, 1.0)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return encoded * 255.0


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_an_embedded_colour_profile_is_applied(tmp_path, kind):
    colours = [(60, 170, 80), (200, 120, 40), (128, 128, 128), (30, 60, 200)]
    picture = Image.new("RGB", (4, 1))
    picture.putdata(colours)
    picture = picture.resize((32, 8), Image.NEAREST)
    path = tmp_path / f"wide.{kind}"
    quality = {"quality": 100, "subsampling": 0} if kind == "jpeg" else {}
    picture.save(path, icc_profile=adobe_rgb_profile(), **quality)

    pixels = np.asarray(load_image(path), dtype=np.float64)
    for i, colour in enumerate(colours):
        got = pixels[4, 8 * i + 4]
        tolerance = 2.5 if kind == "png" else 4.0  # a JPEG at quality 100 still moves a value or two
        assert np.abs(got - adobe_to_srgb(colour)).max() <= tolerance, (colour, got, adobe_to_srgb(colour))
    assert np.abs(pixels[4, 4] - colours[0]).max() > 20  # Adobe RGB's green really is another green in sRGB

    # An sRGB profile, a damaged one, and one that does not fit the image leave the pixels as stored.
    from PIL import ImageCms

    # One colour marked transparent (PNG's tRNS) is still white under a profile.
    keyed = Image.new("RGB", (4, 4), (0, 0, 0))
    keyed.putpixel((0, 0), (200, 50, 50))
    keyed.save(tmp_path / "keyed.png", icc_profile=adobe_rgb_profile(), transparency=(0, 0, 0))
    assert (np.asarray(load_image(tmp_path / "keyed.png"))[1:, 1:] == 255).all()

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile, image in [(srgb, picture), (b"not a profile", picture), (adobe_rgb_profile(), picture.convert("L"))]:
        image.save(tmp_path / "stored.png", icc_profile=profile)
        assert np.array_equal(np.asarray(load_image(tmp_path / "stored.png")), np.asarray(image.convert("RGB")))


def test_a_pixel_limit_above_pils_own_is_the_one_that_counts(tmp_path, monkeypatch):
    from difftrain.data.sources import open_source

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL's ~89M, scaled down: it refuses past 2,000 pixels
    Image.new("RGB", (100, 50), (10, 200, 30)).save(tmp_path / "wide.png")
    source = open_source("folder", tmp_path, max_pixels=6_000, progress=False)  # the user allows 6,000
    assert len(source) == 1 and source.skipped == []
    assert load_image(tmp_path / "wide.png", max_pixels=6_000).size == (100, 50)
    with pytest.raises(BadImage, match="exceeds data.max_image_pixels=4000"):
        load_image(tmp_path / "wide.png", max_pixels=4_000)  # ours still decides


def test_a_png_whose_exif_follows_its_pixels_is_sized_upright_from_its_header_alone():
    """Some editors write a PNG's eXIf chunk after IDAT, where open() does not look and load() does: the header
    size was the stored one while the decoded image was turned a quarter, so its bucket and pixels disagreed."""
    stored = png_bytes(Image.new("RGB", (40, 20), (200, 0, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turned a quarter
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    end = stored.rindex(b"IEND") - 4
    trailing = stored[:end] + chunk + stored[end:]
    assert load_image_bytes(trailing).size == image_size_from_bytes(trailing) == (20, 40)
    assert image_size_from_bytes(stored) == (40, 20)  # without one, the stored size


def test_a_16_bit_grey_png_with_a_transparent_value_shows_it_white():
    """8-bit transparency became white (as viewers show it); a 16-bit grey PNG's tRNS value was drawn as its grey."""
    values = np.full((4, 4), 1000, dtype=np.uint16)
    values[0, 0] = 5000
    buffer = io.BytesIO()
    Image.frombytes("I;16", (4, 4), values.tobytes()).save(buffer, format="PNG", transparency=5000)
    pixels = np.asarray(load_image_bytes(buffer.getvalue()))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [4, 4, 4]  # 1000 / 65535 x 255
