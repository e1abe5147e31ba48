"""Contact sheets (a labelled grid of examples) to look at the rendered data.

  python -m fusion.data.render.sheets --out /tmp/render_sheets [--time 20000]

writes `source_<name>.png` and `task_<name>.png` and, with --time, prints how
long rendering that many examples of each source takes.
"""
import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure  # No pyplot: no global figure state.

from fusion.data import render


def contact_sheet(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  path: str, columns: int = 12, title: str = "") -> None:
  """Saves a PNG grid of images with their class names."""
  if len(images) != len(labels) or not len(images):
    raise ValueError(f"Need as many labels as images (>0), got {len(images)} images and "
                     f"{len(labels)} labels.")
  rows = -(-len(images) // columns)
  fig = Figure(figsize=(columns * 1.0, rows * 1.15 + 0.4))
  for i, (image, label) in enumerate(zip(images, labels)):
    ax = fig.add_subplot(rows, columns, i + 1)
    ax.imshow(image, interpolation="nearest")
    ax.set_title(str(class_names[int(label)]), fontsize=6, pad=2)
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def _spread(labels: np.ndarray, per_class: int, limit: int) -> np.ndarray:
  """Indices of up to `per_class` examples of each class, sorted by class."""
  picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
  return np.concatenate(picks)[:limit]


def write_sheets(out_dir: str, seed: int = 0, limit: int = 96) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for kind, name, examples, class_names in (
      [("source", s.name, s(4 * render.BLOCK_SIZE, seed), s.class_names)
       for s in render.SOURCES.values()] +
      [("task", t.name, t.render_range("test", 0, 4 * render.BLOCK_SIZE, seed), t.class_names)
       for t in render.TASKS.values()]):
    labels = examples["label"]
    per_class = max(1, limit // len(class_names))
    keep = _spread(labels, per_class, limit)
    path = os.path.join(out_dir, f"{kind}_{name}.png")
    contact_sheet(examples["image"][keep], labels[keep], class_names, path,
                  title=f"{kind} {name} ({len(class_names)} classes)")
    paths.append(path)
  return paths


def time_sources(num_examples: int, seed: int = 0) -> dict[str, float]:
  seconds = {}
  for source in render.SOURCES.values():
    start = time.perf_counter()
    source(num_examples, seed)
    seconds[source.name] = time.perf_counter() - start
  return seconds


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/render_sheets")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--time", type=int, default=0, help="examples per source to time")
  args = parser.parse_args(argv)
  for path in write_sheets(args.out, args.seed):
    print(path)
  if args.time:
    for name, sec in time_sources(args.time, args.seed).items():
      print(f"{name}: {args.time} images in {sec:.1f} s")


if __name__ == "__main__":
  main()
