"""Image decoding shared by the readers, the sharding job, the shard pipeline and prediction."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Images above this many pixels are refused before they are decoded (a 20000 x 20000 PNG header
# would ask for 1.2 GB): the image is skipped with its reason. A 10000 x 10000 photo (1e8) passes.
MAX_PIXELS = int(os.environ.get("RGNN_MAX_PIXELS", 120_000_000))


def decode_image(data: bytes | str | Path, name: str | None = None) -> np.ndarray:
    """Decode a JPEG/PNG/... file or its bytes to RGB.

    Grayscale (8- and 16-bit: 16-bit values are scaled to 8, not clipped), palette, RGBA, CMYK and
    grey+alpha images become RGB; an animated file gives its first frame. A truncated or corrupt file
    is an error, not a half-grey picture: PIL raises on truncation where OpenCV only warns. An image
    over MAX_PIXELS is refused from its header, before it is decoded.

    Args:
        data: the encoded bytes, or a path to read them from.
        name: what to call the input in errors (defaults to the path).

    Returns:
        uint8 ndarray[H, W, 3], RGB.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the bytes are not a readable image (the message names the input).
    """
    if isinstance(data, (str, Path)):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {name}") from None
    name = name or "<bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ValueError(f"{w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS} (RGNN_MAX_PIXELS)")
                im.load()
                if im.mode.startswith("I"):  # 16- or 32-bit integer grey: convert("RGB") would clip it to white
                    grey = np.asarray(im, np.float64)
                    grey = grey / 257 if im.mode.startswith("I;16") or grey.max(initial=0) > 255 else grey
                    return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
                return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:  # PIL's own limit, above ours
        raise ValueError(f"cannot decode image {name}: over the pixel limit of {MAX_PIXELS} (RGNN_MAX_PIXELS): {e}") from None
    except UnidentifiedImageError:  # PIL's message would name its in-memory buffer, not the input
        raise ValueError(f"cannot decode image {name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {name}: {e}") from None
