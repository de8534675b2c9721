"""fluxserve.server.png: the served PNG, encoded on several threads, decodes to the image's exact pixels."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxserve.server.png import ROWS_PER_BAND, encode_png


def image_data(png: bytes) -> bytes:
    """The zlib stream of a PNG's IDAT chunks, joined."""
    data, position = b"", 8
    while position < len(png):
        (length,), kind = struct.unpack(">I", png[position:position + 4]), png[position + 4:position + 8]
        if kind == b"IDAT":
            data += png[position + 8:position + 8 + length]
        position += 12 + length
    return data


@pytest.mark.parametrize("shape", [(1, 1, 3), (17, 5, 3), (ROWS_PER_BAND, 8, 3), (3 * ROWS_PER_BAND + 1, 40, 3),
                                   (256, 256, 3), (33, 40), (20, 20, 1), (70, 20, 4)])
def test_encode_png_decodes_to_the_same_pixels(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image[: shape[0] // 2] = 7  # flat rows too, which the run-length deflate compresses
    png = encode_png(image)
    channels = image.shape[2] if image.ndim == 3 else 1
    # One complete zlib stream, checksum included (Pillow's decoder would accept a stream left unfinished).
    assert len(zlib.decompress(image_data(png))) == shape[0] * (1 + shape[1] * channels)
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape[:2] == shape[:2]
    assert np.array_equal(decoded.reshape(image.shape), image)


def test_encode_png_compresses_flat_images():
    assert len(encode_png(np.zeros((512, 512, 3), dtype=np.uint8))) < 512 * 512 * 3 // 50


def test_encode_png_refuses_what_png_cannot_hold_as_is():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
