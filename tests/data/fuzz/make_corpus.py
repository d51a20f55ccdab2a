"""Writes the bad-image fuzz corpus beside this file (committed; rerun to regenerate).

    python tests/data/fuzz/make_corpus.py

`expected.json` says which files must load (odd but valid) and which must be skipped and counted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def main() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    expected: dict[str, str] = {}

    def save(name: str, img: Image.Image, ok: bool, **kw) -> None:
        img.save(HERE / name, **kw)
        expected[name] = "load" if ok else "skip"

    save("cmyk.jpg", rgb.convert("CMYK"), True, quality=90)
    save("grey.png", rgb.convert("L"), True)
    save("grey_alpha.png", rgb.convert("LA"), True)
    save("rgba.png", rgb.convert("RGBA"), True)
    save("palette.gif", rgb.convert("P"), True)
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, True)
    save("one_bit.png", rgb.convert("1"), True)
    ramp = (np.linspace(0, 65535, 32 * 24).reshape(24, 32)).astype(np.uint16)
    save("grey_16bit.png", Image.fromarray(ramp), True)
    save("one_pixel.png", rgb.resize((1, 1)), True)
    save("very_wide.jpg", rgb.resize((1200, 3)), True)

    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    (HERE / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (HERE / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (HERE / "empty.jpg").write_bytes(b"")
    (HERE / "not_an_image.jpg").write_bytes(b"caption: a dog runs on the beach\n" * 20)
    expected.update({"truncated.jpg": "skip", "truncated.png": "skip", "empty.jpg": "skip",
                     "not_an_image.jpg": "skip"})
    # decompression bombs: tiny files declaring 100M (PIL warns) and 400M (PIL errors) pixels
    save("bomb_100mpx.png", Image.new("1", (10_000, 10_000)), False, optimize=True)
    save("bomb_400mpx.png", Image.new("1", (20_000, 20_000)), False, optimize=True)
    (HERE / "expected.json").write_text(json.dumps(dict(sorted(expected.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
