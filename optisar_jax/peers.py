"""Peer models for speed comparisons: Ultralytics YOLOE-11 (PyTorch), built from its bundled yaml.

`benchmark --against ultralytics` times our model beside the nearest thing a user would run instead:
Ultralytics YOLOE-11 of the same scale letter (n/s/m/l/x), the open-vocabulary YOLO that the official
OptiSAR-Net++ builds on. The peer is built from the yaml that ships inside the `ultralytics` package
(`yoloe-11<scale>.yaml`: the text/visual-prompt detection model, `YOLOEDetect` head, 512-d prompt
embeddings), with random weights, and its text prompt embeddings are random unit vectors of the right
shape, so nothing is downloaded (no checkpoint, no MobileCLIP).

torch and ultralytics are the optional `bench` extra (`pip install -e '.[bench]'`), never a dependency
of the library: this module imports them only inside its functions, so `import optisar_jax.peers` works
without them and the builders raise a one-line ImportError naming the extra.

What one timed unit is:

* `mode='forward'`: `model(x)` on a random float32 (batch, 3, imgsz, imgsz) tensor in
  `torch.inference_mode()`, eval mode, Conv+BatchNorm folded (`model.fuse()`, what Ultralytics'
  predictor does through `AutoBackend(fuse=True)`; `fuse=False` keeps them apart), after setting the
  BatchNorm statistics from one train-mode forward on the input (see `_calibrate_batchnorm`). The class
  prompts are set once with `set_classes` (as the YOLOE text-prompt predictor does), so the head's
  contrastive scores run against `num_prompts` embeddings. Box decoding (DFL + anchors) is inside the
  forward; letterboxing, NMS and any host transfer are not.
* `mode='train_step'`: one step of Ultralytics' text-prompt training recipe on a synthetic batch: train
  mode, forward with `txt_feats` (random unit vectors, (batch, num_prompts, 512), passed through the
  head's trainable text projection `reprta`), the real YOLOE detection loss (`v8DetectionLoss`:
  task-aligned assigner, BCE, CIoU and DFL) against `targets_per_image` random boxes per image,
  backward, gradient clipping at norm 10, AdamW (lr 2e-3, weight decay 0.025, as our config), zero_grad
  and the `ModelEMA` update, i.e. `BaseTrainer.optimizer_step` without AMP (CPU float32).
"""

from __future__ import annotations

import os
from typing import Any, Callable

SCALES = ('n', 's', 'm', 'l', 'x')
MODES = ('forward', 'train_step')
FAMILIES = ('yoloe', 'yolo')
TEXT_EMBED_DIM = 512  # YOLOEDetect's prompt embedding width (MobileCLIP text features)
BENCH_EXTRA_HINT = "pip install -e '.[bench]'"


def _import_bench():
  """Imports torch and ultralytics, or raises a one-line ImportError naming the `bench` extra."""
  # Ultralytics reads these at import: never reach for the network, keep the console quiet.
  os.environ.setdefault('YOLO_OFFLINE', '1')
  os.environ.setdefault('YOLO_VERBOSE', 'False')
  try:
    import torch
    import ultralytics  # noqa: F401
  except ImportError as e:
    missing = getattr(e, 'name', None) or str(e)
    raise ImportError(
        f'the Ultralytics peer needs torch and ultralytics ({missing} is missing): {BENCH_EXTRA_HINT}') from None
  return torch


def peer_yaml(scale: str, family: str = 'yoloe') -> str:
  """Name of the bundled Ultralytics model yaml for `scale`: `yoloe-11<scale>.yaml` or `yolo11<scale>.yaml`.

  The scale letter in the file name is what makes Ultralytics pick that row of the yaml's `scales:`.
  """
  if scale not in SCALES:
    raise ValueError(f'scale must be one of {SCALES}, got {scale!r}')
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')
  return f'yoloe-11{scale}.yaml' if family == 'yoloe' else f'yolo11{scale}.yaml'


def _build_model(scale: str, family: str, seed: int):
  """The Ultralytics nn.Module (random weights, yaml's own nc) and torch, on the CPU in float32."""
  torch = _import_bench()
  from ultralytics.nn.tasks import DetectionModel, YOLOEModel

  yaml = peer_yaml(scale, family)
  torch.manual_seed(seed)
  cls = YOLOEModel if family == 'yoloe' else DetectionModel
  model = cls(yaml, ch=3, verbose=False)
  return model.float().cpu(), torch


def _calibrate_batchnorm(model, images, torch) -> None:
  """Sets every BatchNorm's running statistics to those of one train-mode forward on `images`.

  With random weights and the initial statistics (mean 0, variance 1), eval-mode activations shrink by
  about 10x per stage (to ~1e-9 at the end of YOLOE-11m's backbone), heading for the denormal range; a
  trained model's activations stay near unit scale, and so do these after this.
  """
  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  momenta = [m.momentum for m in norms]
  for m in norms:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: one forward sets the statistics exactly
  model.train()
  with torch.no_grad():
    model(images)
  for m, momentum in zip(norms, momenta):
    m.momentum = momentum


def peer_parameter_count(scale: str, family: str = 'yoloe') -> int:
  """Parameters of the unfused peer (YOLOE-11 counts its text projection and visual-prompt branch too).

  YOLOE-11m: 27,588,598 with ultralytics 8.4.190 (the yaml's own comment, 20.1M, omits those branches).
  """
  model, _ = _build_model(scale, family, seed=0)
  return int(sum(p.numel() for p in model.parameters()))


def build_ultralytics_peer(scale: str, imgsz: int, batch: int, threads: int, mode: str = 'forward', *,
                           family: str = 'yoloe', num_prompts: int = 1, fuse: bool = True,
                           targets_per_image: int = 4, seed: int = 0) -> Callable[[], Any]:
  """Builds the Ultralytics peer and returns a zero-arg callable that runs one timed unit.

  Args:
    scale: scale letter, one of n/s/m/l/x (the row of the yaml's `scales:`).
    imgsz: square input side in pixels (a multiple of 32).
    batch: images per call.
    threads: `torch.set_num_threads(threads)`; this setting is process-wide.
    mode: 'forward' (inference, `torch.inference_mode`) or 'train_step' (see the module docstring).
    family: 'yoloe' (YOLOE-11, the peer) or 'yolo' (plain YOLO11 detection, for reference; it has no
      prompts, so `num_prompts` is ignored and it keeps the yaml's 80 classes).
    num_prompts: text prompts (classes) the YOLOE head scores against; 1 matches one grounding query.
    fuse: fold BatchNorm into the convolutions before timing the forward (ignored for 'train_step').
    targets_per_image: random ground-truth boxes per image for the 'train_step' loss.
    seed: seed of the random weights, input, prompts and targets.

  Returns:
    A callable that runs one forward or one training step on fixed random inputs. The forward returns
    its output's shape, (batch, 4 + classes, anchors); the training step returns its loss (a float).
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if imgsz <= 0 or imgsz % 32:
    raise ValueError(f'imgsz must be a positive multiple of 32, got {imgsz}')
  if batch < 1 or threads < 1 or num_prompts < 1:
    raise ValueError('batch, threads and num_prompts must be >= 1')
  model, torch = _build_model(scale, family, seed)
  torch.set_num_threads(threads)
  generator = torch.Generator().manual_seed(seed)
  images = torch.rand(batch, 3, imgsz, imgsz, generator=generator)
  yoloe = family == 'yoloe'

  def unit_prompts(leading: int):
    emb = torch.randn(leading, num_prompts, TEXT_EMBED_DIM, generator=generator)
    return torch.nn.functional.normalize(emb, dim=-1)

  if mode == 'forward':
    if yoloe:
      # What YOLOE.get_text_pe returns after the head's text projection: unit vectors, (1, P, 512).
      model.set_classes([f'prompt{i}' for i in range(num_prompts)], unit_prompts(1))
    _calibrate_batchnorm(model, images, torch)
    model.eval()
    if fuse:
      model.fuse(verbose=False)

    def forward() -> tuple[int, ...]:
      with torch.inference_mode():
        out = model(images)
      out = out[0] if isinstance(out, (tuple, list)) else out
      return tuple(out.shape)       # (batch, 4 + classes, anchors): checked by tests, cheap to time

    return forward

  from ultralytics.cfg import get_cfg
  from ultralytics.utils.torch_utils import ModelEMA

  model.args = get_cfg()  # default hyperparameters (box/cls/dfl gains) that the loss reads
  model.train()
  if yoloe:
    model.model[-1].nc = num_prompts  # the loss is built with the head's nc, before the first forward
  nc = model.model[-1].nc
  n = batch * targets_per_image
  centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
  sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
  step_batch = {
      'img': images,
      'batch_idx': torch.arange(batch).repeat_interleave(targets_per_image).float(),
      'cls': torch.randint(0, nc, (n, 1), generator=generator).float(),
      'bboxes': torch.cat([centers, sizes], dim=1),  # normalised xywh, as the Ultralytics dataloader gives
  }
  if yoloe:
    step_batch['txt_feats'] = unit_prompts(batch)  # raw text features; `reprta` is trained on them
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=0.025)
  ema = ModelEMA(model)

  def train_step() -> float:
    loss, _ = model.loss(step_batch)
    total = loss.sum()
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    optimizer.step()
    optimizer.zero_grad()
    ema.update(model)
    return float(total.detach())    # the step's loss, before its update

  return train_step
