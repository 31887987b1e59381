"""Image decoding and the reference preprocessing, in PIL and numpy only.

The reference (`taming.data.base.ImagePaths`) converts every image to RGB,
rescales it so that its smallest side equals the training resolution
(albumentations `SmallestMaxSize`), crops a `resolution x resolution` square
(random for training, centred for evaluation) and maps uint8 pixels to
`x / 127.5 - 1`. We resize with PIL's bicubic filter, which antialiases when
shrinking; the reference's OpenCV bilinear does not, so pixels differ slightly
after a resize but never in layout.
"""
import io
from typing import Any

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC

# File suffixes read by `folder:` datasets (compared in lower case).
IMAGE_SUFFIXES = frozenset({
    '.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
    '.pgm', '.pbm', '.pnm'})

_HIGH_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


def open_image(data: Any) -> Image.Image:
  """Opens and fully decodes an image, so that corrupt data raises here.

  Args:
    data: a file path, encoded bytes, a PIL image, or a uint8 array (H, W) or
      (H, W, C) with C in {1, 3, 4}.

  Returns:
    A decoded PIL image.

  Raises:
    Exception: whatever PIL raises for unreadable, truncated or non-image data.
  """
  if isinstance(data, Image.Image):
    data.load()
    return data
  if isinstance(data, np.ndarray):
    if data.ndim == 3 and data.shape[-1] == 1:
      data = data[..., 0]
    return Image.fromarray(np.asarray(data, np.uint8))
  if isinstance(data, (bytes, bytearray, memoryview)):
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
  with open(data, 'rb') as f:
    image = Image.open(f)
    image.load()
  return image


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
  """Converts any PIL mode to RGB (channels=3) or L (channels=1).

  Alpha is dropped as in the reference (`image.convert('RGB')`); palette
  images go through RGBA first so transparency is handled without warnings;
  16-bit and float images are scaled to 8 bits.

  Args:
    image: a decoded PIL image.
    channels: 1 or 3.

  Returns:
    The image in mode 'L' or 'RGB'.
  """
  target = 'RGB' if channels == 3 else 'L'
  if image.mode == target:
    return image
  if image.mode in _HIGH_DEPTH_MODES:
    image = Image.fromarray(_to_uint8(np.asarray(image)))
  elif image.mode == 'P':
    image = image.convert('RGBA')
  return image.convert(target)


def _to_uint8(array: np.ndarray) -> np.ndarray:
  """Scales a 16-bit or float grayscale array to uint8."""
  if np.issubdtype(array.dtype, np.floating):
    scaled = array * 255.0 if array.max(initial=0.0) <= 1.0 else array
  else:
    scaled = array / 257.0 if array.max(initial=0) > 255 else array
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
  """The (width, height) whose smallest side equals `resolution`.

  Args:
    width: input width.
    height: input height.
    resolution: target length of the smallest side.

  Returns:
    (new_width, new_height), aspect ratio kept up to rounding.
  """
  short = min(width, height)
  scale = resolution / short
  if width == short:
    return resolution, max(resolution, round(height * scale))
  return max(resolution, round(width * scale)), resolution


def resize_smallest_side(image: Image.Image,
                         resolution: int) -> tuple[Image.Image, bool]:
  """Resizes so the smallest side equals `resolution` (bicubic).

  Args:
    image: a PIL image.
    resolution: target length of the smallest side.

  Returns:
    (resized image, whether it had to be enlarged).
  """
  width, height = image.size
  if min(width, height) == resolution:
    return image, False
  size = resized_size(width, height, resolution)
  return image.resize(size, RESAMPLE), min(width, height) < resolution


def center_offsets(height: int, width: int,
                   resolution: int) -> tuple[int, int]:
  """Top-left corner of the centred crop (albumentations `CenterCrop`).

  Args:
    height: image height (>= resolution).
    width: image width (>= resolution).
    resolution: crop side.

  Returns:
    (top, left).
  """
  return (height - resolution) // 2, (width - resolution) // 2


def random_offsets(height: int, width: int, resolution: int,
                   uniform: np.ndarray) -> tuple[int, int]:
  """Top-left corner of a random crop from two uniforms in [0, 1).

  Drawing the uniforms before the image size is known keeps crops
  independent of decode order and thread timing.

  Args:
    height: image height (>= resolution).
    width: image width (>= resolution).
    resolution: crop side.
    uniform: two floats in [0, 1).

  Returns:
    (top, left), each uniform over all valid positions.
  """
  top = min(int(uniform[0] * (height - resolution + 1)), height - resolution)
  left = min(int(uniform[1] * (width - resolution + 1)), width - resolution)
  return top, left


def normalize(pixels: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels to float32 in [-1, 1] as `x / 127.5 - 1`."""
  return pixels.astype(np.float32) / 127.5 - 1.0


# Training augmentations `augment` applies, each drawn per example:
#   flip      mirror left-right with probability 1/2;
#   channels  reorder R, G and B by one of the 6 permutations, uniformly
#             (colours the data lacks, e.g. blue skies from red ones).
AUGMENTATIONS = ('flip', 'channels')
_CHANNEL_ORDERS = np.array([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0),
                            (2, 0, 1), (2, 1, 0)])


def check_augment(names, channels: int) -> tuple[str, ...]:
  """`names` as a tuple, after checking each is in `AUGMENTATIONS` and fits
  the channel count.

  Raises:
    ValueError: an unknown or repeated name, or 'channels' with 1 channel.
  """
  names = tuple(names)
  for name in names:
    if name not in AUGMENTATIONS:
      raise ValueError(f'unknown augmentation {name!r}; valid: '
                       f'{", ".join(AUGMENTATIONS)}')
  if len(set(names)) != len(names):
    raise ValueError(f'augmentation listed twice in {names}')
  if 'channels' in names and channels != 3:
    raise ValueError("augmentation 'channels' reorders R, G and B; the data "
                     f'has {channels} channel(s)')
  return names


def augment(images: np.ndarray, names, uniform: np.ndarray) -> np.ndarray:
  """A batch with the augmentations `names` applied to each example.

  Args:
    images: (b, H, W, C) pixels of any dtype.
    names: a subset of `AUGMENTATIONS` (applied in that order).
    uniform: (b, 2) floats in [0, 1): column 0 decides the flip, column 1
      the channel order, so that each augmentation's draws do not depend on
      which others are on.

  Returns:
    A new array of the same shape and dtype (or `images` when `names` is
    empty).
  """
  names = check_augment(names, images.shape[-1])
  if not names:
    return images
  out = images.copy()
  if 'flip' in names:
    flip = uniform[:, 0] < 0.5
    out[flip] = out[flip, :, ::-1]
  if 'channels' in names:
    orders = _CHANNEL_ORDERS[np.minimum((uniform[:, 1] * 6).astype(int), 5)]
    out = np.take_along_axis(out, orders[:, None, None, :], axis=-1)
  return out


def preprocess(image: Image.Image, resolution: int, channels: int,
               uniform: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
  """Converts, resizes and crops one decoded image.

  Args:
    image: a decoded PIL image of any mode and size.
    resolution: output side.
    channels: 1 or 3.
    uniform: two floats in [0, 1) for a random crop; None for a centre crop.

  Returns:
    (float32 array (resolution, resolution, channels) in [-1, 1],
     whether the image was smaller than the crop and enlarged).
  """
  image, upscaled = resize_smallest_side(convert_mode(image, channels),
                                         resolution)
  pixels = np.asarray(image, np.uint8)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  height, width = pixels.shape[:2]
  if uniform is None:
    top, left = center_offsets(height, width, resolution)
  else:
    top, left = random_offsets(height, width, resolution, uniform)
  crop = pixels[top:top + resolution, left:left + resolution]
  return normalize(crop), upscaled
