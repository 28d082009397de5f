"""Compares `data.resize = 'opencv'` (optisar_jax/data/augment.py) with OpenCV itself, in two steps, since
the project's environment has no cv2 (docs/architecture.md, "Resampling"):

  python scripts/check_opencv_resampling.py --write /tmp/resampling.npz            # project venv
  /tmp/benchvenv/bin/python scripts/check_opencv_resampling.py --compare /tmp/resampling.npz   # has cv2

The first step writes random images and our resize / warp outputs; the second redoes them with cv2.resize
(INTER_LINEAR) and cv2.warpAffine (INTER_LINEAR, constant border 114) and prints the differences.
"""

import argparse

import numpy as np

RESIZES = [(480, 640, 427, 320), (100, 150, 397, 263), (37, 53, 640, 480), (640, 480, 45, 60),
           (1000, 333, 192, 576), (800, 800, 640, 640)]   # (h, w) in, (W, H) out
ANGLE = np.deg2rad(7.0)
WARPS = {
    'axis-aligned': np.array([[0.83, 0.0, -283.2], [0.0, 0.83, -212.7], [0.0, 0.0, 1.0]]),
    'rotated': np.array([[np.cos(ANGLE) * 0.9, np.sin(ANGLE) * 0.9, -300.0],
                         [-np.sin(ANGLE) * 0.9, np.cos(ANGLE) * 0.9, -330.0], [0.0, 0.0, 1.0]]),
}
FILL = (114, 114, 114)


def write(path):
  from optisar_jax.data import augment
  rng = np.random.default_rng(1)
  arrays = {}
  for i, (h, w, out_w, out_h) in enumerate(RESIZES):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arrays[f'resize{i}_in'] = image
    arrays[f'resize{i}_ours'] = augment.resize_bilinear(image, (out_w, out_h))
  canvas = rng.integers(0, 256, (1280, 1280, 3), dtype=np.uint8)
  arrays['canvas'] = canvas
  for name, matrix in WARPS.items():
    arrays[f'warp_{name}_ours'] = augment.warp_bilinear(canvas, matrix, 640, FILL)
  np.savez_compressed(path, **arrays)
  print(f'wrote {path}')


def compare(path):
  import cv2
  data = np.load(path)
  print(f'opencv {cv2.__version__}')
  for i, (h, w, out_w, out_h) in enumerate(RESIZES):
    ref = cv2.resize(data[f'resize{i}_in'], (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    diff = np.abs(ref.astype(int) - data[f'resize{i}_ours'])
    print(f'resize {w}x{h} -> {out_w}x{out_h}: max |diff| {diff.max()}, pixels differing {(diff > 0).mean():.4%}')
  for name, matrix in WARPS.items():
    ref = cv2.warpAffine(data['canvas'], matrix[:2], (640, 640), borderValue=FILL)
    diff = np.abs(ref.astype(int) - data[f'warp_{name}_ours'])
    print(f'warpAffine {name}: max |diff| {diff.max()}, pixels differing {(diff > 0).mean():.4%}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument('--write', metavar='NPZ', help='write inputs and our outputs (project environment)')
  group.add_argument('--compare', metavar='NPZ', help='compare with OpenCV (an environment with cv2)')
  args = parser.parse_args()
  if args.write:
    write(args.write)
  else:
    compare(args.compare)


if __name__ == '__main__':
  main()
