"""What encoding the served PNG costs on this host: Pillow's encoder (zlib level 1, what the server used before)
against `fluxserve.server.png.encode_png`, on a noise image (what synthetic weights produce) and a smooth one, at
1024x1024. Best of `--repeats`; checks that both decode to the same pixels. Prints one JSON object (and writes
it to `--out`).

    python3 -m perf.diagnostics.png_encode --out $OUT/png_encode.json
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from fluxserve.server.png import encode_png
from perf.diagnostics.report import emit, repeated_run_arguments

SIZE = 1024


def pillow_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    gradient = np.stack([x // 4, y // 4, (x + y) // 8], axis=-1) % 256
    return {"noise": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
            "smooth": (gradient + rng.integers(0, 6, gradient.shape)).clip(0, 255).astype(np.uint8)}


def best_ms(encode, image: np.ndarray, repeats: int) -> tuple[float, bytes]:
    times, data = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode(image)
        times.append(time.perf_counter() - started)
    return round(min(times) * 1000, 2), data


def main() -> None:
    args = repeated_run_arguments("perf.diagnostics.png_encode", __doc__).parse_args()
    results = {}
    for name, image in images().items():
        for encoder, encode in (("pillow_level1", pillow_png), ("encode_png", encode_png)):
            ms, data = best_ms(encode, image, args.repeats)
            decoded = np.asarray(Image.open(io.BytesIO(data)))
            results[f"{name}/{encoder}"] = {"ms": ms, "kib": len(data) // 1024,
                                            "same_pixels": bool((decoded == image).all())}
    emit({"cpus": os.cpu_count(), "size": SIZE, "results": results}, args.out)


if __name__ == "__main__":
    main()
