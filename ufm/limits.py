"""Upper bounds on every size a user can choose, in one place.

Each bound is checked before anything is allocated, and the message names the bound, so a typo
(``--candidates 100000``, ``--feature-size 3000``) ends in one line instead of hours of work or a
MemoryError. The values are far above what the paper or any sensible run needs.
"""

from __future__ import annotations

# Exposure test: K = 99 gives p down to 0.01; 2,000 gives p down to 5e-4 and costs ~20x a
# K = 99 run. Beyond that each candidate only adds minutes (100,000 took ~17 min at 100 images).
MAX_CANDIDATES = 2_000

# Random features per inference image: R = 1 in the paper; 100 already shrinks X_r's noise
# tenfold, more only multiplies the scoring time.
MAX_REPEATS = 100

# Inference images: the default OOD sources have 10,000 test images; 20,000 float32 images of
# 3x64x64 are ~1 GB, the most we let one run hold.
MAX_OOD_SIZE = 20_000

# Side of a feature patch in pixels (glyph/image size, text width): the largest images ufm
# trains on are 64x64 and a user's own folder rarely exceeds 256x256; 256 x 256 is also the
# largest pattern a Feature stores (features.MAX_FEATURE_PIXELS).
MAX_FEATURE_SIDE = 256

# Typed text: a name or an ID. The text is drawn at 64 px before shrinking, so 64 characters
# is a ~3,000 px wide canvas; longer text could not fit any image anyway.
MAX_TEXT_CHARS = 64

# Images read from files or uploads: 40 megapixels (a 7,000 x 5,700 photo) decode to at most
# ~160 MB RGBA; a PNG that declares more is almost certainly a decompression bomb. Pillow's own
# limit (89 MP warning, 179 MP error) is left untouched for other code.
MAX_IMAGE_PIXELS = 40_000_000

# Bytes of one image file or upload: far above any feature logo or dataset image (a 40 MP JPEG
# is ~15 MB), and stops a stray video or archive being read into memory.
MAX_IMAGE_BYTES = 32 * 1024 * 1024

# Bytes of an ONNX model file or upload to audit: a DenseNet-100 is ~3 MB, a ResNet-50 ~100 MB;
# 512 MB covers any image classifier the audit is meant for (the whole graph is read into memory).
MAX_ONNX_BYTES = 512 * 1024 * 1024

# Reference models of the calibrated verdict (ufm.measure.bank): 39 by default, 200 trains for days.
MAX_REFERENCES = 200

# Height and width of a foreign model's input (ufm audit): a ResNet takes 224, a chest X-ray
# model rarely more than 512. A 276-byte ONNX file can declare 20000 x 20000 (9.6 GB a batch of
# three), so the declared size is checked before any image is made.
MAX_INPUT_SIDE = 1024

# Bytes of the float32 images in one forward call of a foreign model: the audit feeds smaller
# chunks when images are large, and a graph whose fixed batch alone needs more is refused.
MAX_BATCH_BYTES = 256 * 1024 * 1024

# Bytes of an audit's inference images as float32 (n x C x H x W x 4). Scoring holds the clean
# set and one stamped copy at a time, so the peak is about twice this plus one batch.
MAX_AUDIT_IMAGE_BYTES = 1024 * 1024 * 1024

# Megabytes of one browser upload (Streamlit's server.maxUploadSize, in .streamlit/config.toml;
# tests/test_hostile.py checks the two agree). The upload is held in the server's memory, so a
# larger model is audited from a path inside the allowed data folders instead.
MAX_UPLOAD_MB = 128


def image_bytes(shape: tuple[int, int, int]) -> int:
    """Bytes of one float32 image of ``(C, H, W)``."""
    c, h, w = (int(v) for v in shape)
    return 4 * c * h * w


def max_images(shape: tuple[int, int, int], budget: int = MAX_AUDIT_IMAGE_BYTES) -> int:
    """How many float32 images of ``shape`` fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // image_bytes(shape))


def check_audit_images(n: int, shape: tuple[int, int, int], flag: str = "--ood-size") -> None:
    """Refuse, before anything is loaded, ``n`` inference images of ``shape`` that would take more
    than :data:`MAX_AUDIT_IMAGE_BYTES`; the message gives the largest ``n`` that fits.

    Raises:
        ValueError: one line naming the limit and what to do.
    """
    need = n * image_bytes(shape)
    if need > MAX_AUDIT_IMAGE_BYTES:
        c, h, w = shape
        raise ValueError(f"{n} inference images of {c}x{h}x{w} take {need / 2**20:,.0f} MB as float32; the limit is "
                         f"{MAX_AUDIT_IMAGE_BYTES / 2**20:,.0f} MB: give {flag} {max_images(shape)} or fewer")
