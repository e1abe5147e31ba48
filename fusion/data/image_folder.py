"""A task from a folder of images: one sub-folder per class.

  flowers/            task "flowers", classes "daisy", "rose", ... (sorted)
    daisy/*.jpg
    rose/*.png

`task(path, seed=0)` gives it VTAB-1k splits: the images (.jpg, .jpeg, .png, as
TFDS's `ImageFolder` reads) are listed in sorted order and permuted by `seed`;
the first 800 are `train800`, the next 200 `val200`, both together
`train800val200`, and the rest `test`. The same folder and seed give the same
splits on every machine. The splits are laid out under
$FUSION_HOME/image_folders/ as symbolic links (`<split>/<class>/<file>`), which
`tfds.ImageFolder` reads like any TFDS dataset; the images are not copied.

The task's fingerprint (the feature caches' key) covers the file list, sizes
and modification times and the seed: change an image and its features are
computed anew.
"""
import functools
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds

import fusion
from fusion import config_lib

EXTENSIONS = (".jpg", ".jpeg", ".png")  # What tfds.ImageFolder reads.
TRAIN, VAL = 800, 200
SPLITS = ("train800", "val200", "train800val200", "test")


def looks_like_path(name: str) -> bool:
  """Whether a task name names a folder rather than a registered task."""
  return config_lib.is_path(name)


def list_images(root: str) -> dict[str, list[str]]:
  """class -> sorted image file names, for each sub-folder of `root` (sorted)."""
  if not os.path.isdir(root):
    raise ValueError(f"Image folder {root!r} does not exist or is not a directory; a "
                     "task from images is a folder with one sub-folder of images per "
                     "class, e.g. flowers/daisy/1.jpg.")
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  return {c: sorted(f for f in os.listdir(os.path.join(root, c))
                    if f.lower().endswith(EXTENSIONS) and not f.startswith("."))
          for c in classes}


def check(root: str, images: dict[str, list[str]]) -> None:
  """Errors that say how many images there are and what a task needs."""
  count = sum(map(len, images.values()))
  empty = [c for c, files in images.items() if not files]
  if len(images) < 2:
    raise ValueError(f"Image folder {root!r} has {len(images)} class sub-folder(s) "
                     f"{sorted(images)}; a task needs at least 2, one sub-folder of "
                     f"{'/'.join(EXTENSIONS)} images per class.")
  if empty:
    raise ValueError(f"Image folder {root!r}: class sub-folders {empty} hold no "
                     f"{'/'.join(EXTENSIONS)} images; remove them or add images.")
  if count <= TRAIN + VAL:
    raise ValueError(f"Image folder {root!r} has {count:,} images in {len(images)} "
                     f"classes; a VTAB-1k task needs more than {TRAIN + VAL:,}: {TRAIN} "
                     f"for train800, {VAL} for val200 and the rest as test.")


def split_indices(count: int, seed: int) -> dict[str, np.ndarray]:
  """Positions (in sorted listing order) of each split's images."""
  order = np.random.default_rng(seed).permutation(count)
  return {"train800": order[:TRAIN], "val200": order[TRAIN:TRAIN + VAL],
          "train800val200": order[:TRAIN + VAL], "test": order[TRAIN + VAL:]}


def fingerprint(root: str, images: dict[str, list[str]], seed: int) -> str:
  """sha256 of what the splits hold: class/file names, sizes, mtimes, and the seed."""
  listing = []
  for c, files in images.items():
    for f in files:
      stat = os.stat(os.path.join(root, c, f))
      listing.append([c, f, stat.st_size, stat.st_mtime_ns])
  text = json.dumps({"images": listing, "seed": int(seed)})
  return hashlib.sha256(text.encode()).hexdigest()


def stage(root: str, images: dict[str, list[str]], seed: int, digest: str) -> str:
  """The split layout of `root` (symbolic links) under $FUSION_HOME; made once."""
  root = os.path.abspath(root)
  where = hashlib.sha256(root.encode()).hexdigest()[:8]
  target = os.path.join(fusion.fusion_home(), "image_folders",
                        f"{os.path.basename(root)}-{where}-{digest[:16]}")
  if os.path.isdir(target):
    return target
  files = [(c, f) for c, names in images.items() for f in names]
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".staging-")
  try:
    for split, index in split_indices(len(files), seed).items():
      for c in images:  # Every class in every split: tfds.ImageFolder's label set.
        os.makedirs(os.path.join(tmp, split, c))
      for i in index:
        c, f = files[i]
        os.symlink(os.path.join(root, c, f), os.path.join(tmp, split, c, f))
    os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(target):  # Else another process staged it first: same content.
      raise
  return target


@functools.lru_cache(maxsize=16)
def builder(staged: str) -> tfds.core.DatasetBuilder:
  """TFDS's ImageFolder over a staged layout (lists the files once per process)."""
  return tfds.ImageFolder(staged)
