"""A vision input pipeline on worker threads: JPEG decode with Pillow, a random crop and flip, a
normalize with numpy, batches of torch tensors.

    for images, labels in threadloom.DataLoader(JpegImages(folder), batch_size=32, num_workers=4):
        ...                                # images: float32 (32, 3, 224, 224), labels: int64 (32,)

The per-sample code is what torchvision's RandomResizedCrop-less ImageNet recipe does by hand
(RandomCrop + RandomHorizontalFlip + Normalize), with no torch in it: the same class runs
under torch's DataLoader with worker processes on a GIL interpreter, and bench/bench_vision.py
measures both on one folder (the report's "Vision pipeline" section). Pillow's decoder and
numpy's arithmetic release a GIL build's lock too; on the free-threaded interpreter the Python
between them runs in parallel as well, and the batches never leave the process.

The crop and flip of sample i are drawn from a generator seeded with (seed, i), not from the
worker's generator, so every loader and every worker count delivers the same batches for one
seed (this program checks that against the batches loaded in the loop, without workers).

The images are written at start-up (write_jpegs: smooth random colour fields with some grain,
320 x 256, JPEG quality 90; the same bytes for the same seed and Pillow): no download.

    python examples/vision_pipeline.py [--images 64] [--samples 512] [--workers 2]
                                       [--batch-size 32] [--seed 0] [--dir DIR]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# ImageNet's channel statistics, as every torchvision recipe normalizes with
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def write_jpegs(folder, count, seed=0, size=(320, 256), quality=90):
    """Writes `count` JPEGs img00000.jpg... of `size` (width, height) into `folder` (made if
    missing) and returns their paths: each a smooth random colour field (an 8 x 10 grid of colours
    scaled up bicubically) with Gaussian grain, from numpy's generator seeded with (seed, k).
    Existing files of the same name are overwritten."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        field = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        img = np.asarray(field.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        img = img + rng.normal(0.0, 6.0, img.shape).astype(np.float32)
        path = os.path.join(folder, "img%05d.jpg" % k)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


class JpegImages:
    """A map-style dataset over JPEG files: sample i is image i % len(paths), decoded to RGB,
    cropped to `crop` x `crop` at a random offset, flipped left-right with probability 1/2,
    scaled to [0, 1] and normalized per channel, as a float32 numpy array (3, crop, crop); its
    label is i % classes. `n` samples (default: one per file)."""

    def __init__(self, paths, n=None, crop=224, seed=0, classes=10):
        if not paths:
            raise ValueError("JpegImages: no image files given (write_jpegs() makes some)")
        self.paths = list(paths)
        self.n = len(self.paths) if n is None else n
        self.crop, self.seed, self.classes = crop, seed, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError("JpegImages: index %d out of range for %d samples" % (i, self.n))
        rng = np.random.default_rng([self.seed, i])  # this sample's crop and flip, in any worker
        with Image.open(self.paths[i % len(self.paths)]) as img:
            img = img.convert("RGB")                 # the decode (Pillow releases the lock)
        w, h = img.size
        if w < self.crop or h < self.crop:
            raise ValueError("JpegImages: %s is %dx%d, smaller than the %d-pixel crop"
                             % (self.paths[i % len(self.paths)], w, h, self.crop))
        x, y = int(rng.integers(0, w - self.crop + 1)), int(rng.integers(0, h - self.crop + 1))
        img = img.crop((x, y, x + self.crop, y + self.crop))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(img, dtype=np.float32)        # (crop, crop, 3), a new array
        a *= 1.0 / 255.0
        a -= MEAN
        a /= STD
        return np.ascontiguousarray(a.transpose(2, 0, 1)), i % self.classes


def epoch(loader):
    """Iterates one epoch: (samples, seconds, seconds to the first batch, batches as numpy)."""
    t0 = time.perf_counter()
    first, count, kept = None, 0, []
    for images, labels in loader:
        if first is None:
            first = time.perf_counter() - t0
        count += len(labels)
        kept.append((np.asarray(images), np.asarray(labels)))
    return count, time.perf_counter() - t0, first, kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="JPEG files to write (default 64)")
    ap.add_argument("--samples", type=int, default=512, help="samples per epoch (default 512)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="where to write the images (default: a temporary directory)")
    a = ap.parse_args(argv)
    if a.images < 1 or a.samples < 1 or a.workers < 1 or a.batch_size < 1:
        ap.error("--images, --samples, --workers and --batch-size must be at least 1")

    import torch  # noqa: F401  (loaded: threadloom's default_collate stacks into torch tensors)
    import threadloom

    with tempfile.TemporaryDirectory(prefix="tl-vision-") as tmp:
        folder = a.dir or tmp
        t = time.perf_counter()
        paths = write_jpegs(folder, a.images, a.seed)
        print("vision_pipeline: %d JPEGs of 320x256 in %s (%.2f s to write; %.0f KiB each)"
              % (len(paths), folder, time.perf_counter() - t,
                 sum(os.path.getsize(p) for p in paths) / len(paths) / 1024))
        ds = JpegImages(paths, n=a.samples, seed=a.seed)
        n0, dt0, _, ref = epoch(threadloom.DataLoader(ds, batch_size=a.batch_size))
        print("in the loop (num_workers=0): %6.0f samples/s" % (n0 / dt0))
        dl = threadloom.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers)
        n, dt, first, got = epoch(dl)
        dl.close()
        print("threadloom.DataLoader, %d worker threads: %6.0f samples/s, first batch after "
              "%.1f ms" % (a.workers, n / dt, first * 1e3))
        images, labels = got[0]
        print("a batch: images %s %s (mean %.3f, std %.3f), labels %s %s"
              % (images.dtype, tuple(images.shape), images.mean(), images.std(), labels.dtype,
                 tuple(labels.shape)))
        same = n == n0 and len(got) == len(ref) and all(
            np.array_equal(x, y) and np.array_equal(u, v) for (x, u), (y, v) in zip(got, ref))
        print("same batches as in the loop: %s" % ("yes" if same else "NO"))
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
