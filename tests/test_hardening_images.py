"""Every PIL mode becomes the documented 8-bit RGB, the same through every decode path."""
import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.annotations import load_rgb
from pipeline.images import ImageTooLarge, UnreadableImage, decode_rgb
from pipeline.samples import SampleDecoder
from pipeline.shards import RawSample
from pipeline.transforms import ImageTransform

WHITE, RED = (255, 255, 255), (255, 0, 0)


def _grey(*values):
    return [(v, v, v) for v in values]


def _image(mode, pixels, **info):
    """A 1 x N image of `mode` with `pixels`, saved (PNG, or TIFF where PNG cannot hold the mode)."""
    image = Image.new(mode, (len(pixels), 1))
    image.putdata(pixels)
    image.info.update(info)
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"transparency": info["transparency"]} if info else {}))
    return buf.getvalue()


def _palette_with_transparency():
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    image.putdata([0, 1, 2])
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


CASES = {
    # 16-bit: round(v / 257); 257 * 100 is exactly 100, 32768 is 127.5 -> 128
    "I;16": (_image("I;16", [0, 25700, 32768, 65535]), _grey(0, 100, 128, 255)),
    # 32-bit integers read as 16-bit values, clipped to 0..65535
    "I": (_image("I", [0, 25700, 65535, 70000, -5]), _grey(0, 100, 255, 255, 0)),
    # floats as fractions of full scale, clipped
    "F": (_image("F", [0.0, 0.25, 1.0, 2.0, -1.0]), _grey(0, 64, 255, 255, 0)),
    # alpha over white: c * a / 255 + 255 - a, rounded (200 * 128/255 + 127 = 227.4)
    "LA": (_image("LA", [(200, 255), (200, 0), (200, 128)]), _grey(200, 255, 227)),
    "RGBA": (_image("RGBA", [(10, 20, 30, 255), (10, 20, 30, 0), (255, 0, 0, 128)]),
             [(10, 20, 30), WHITE, (255, 127, 127)]),
    "P+transparency": (_palette_with_transparency(), [WHITE, RED, (0, 0, 255)]),
    "CMYK": (_image("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), [WHITE, (0, 255, 255), (0, 0, 0)]),
    "1": (_image("1", [0, 1]), _grey(0, 255)),
    "L": (_image("L", [0, 77, 255]), _grey(0, 77, 255)),
    "RGB": (_image("RGB", [(1, 2, 3), RED]), [(1, 2, 3), RED]),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_every_mode_decodes_to_the_documented_rgb(mode, tmp_path):
    data, expected = CASES[mode]
    expected = np.array([expected], dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_rgb(data)), expected)
    path = tmp_path / "image"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_rgb(str(path))), expected)  # the annotation-folder path
    # the shard path, through a resize to the image's own size (an exact copy)
    decoder = SampleDecoder(ImageTransform(expected.shape[1], train=False))
    decoded, reason = decoder(RawSample("k", "u", {"png": data, "txt": b"a dog"}), random.Random(0))
    assert reason is None
    assert np.array_equal(decoded.pixels[:1], expected)


def test_decode_failures_have_their_own_types():
    data, _ = CASES["RGB"]
    with pytest.raises(ImageTooLarge):
        decode_rgb(data, max_pixels=1)
    with pytest.raises(UnreadableImage):
        decode_rgb(data[: len(data) // 2])
    with pytest.raises(UnreadableImage):
        decode_rgb(b"not an image")
