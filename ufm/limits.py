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
