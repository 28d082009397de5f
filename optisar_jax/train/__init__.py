"""Training: label assignment, losses, optimizer, EMA, the train step and the loop.

Modules (import them directly; this package imports nothing so that importing one piece stays cheap):

* `assigner`: Task-Aligned assigner (anchors <-> ground-truth boxes, soft slot targets).
* `losses`: the detection/grounding objective (box CIoU, DFL, slot BCE, region, MoE balance).
* `optimizer`, `ema`, `step`, `loop`: the training machinery (mesh, sharding, checkpoints and
  multi-host plumbing live in `optisar_jax/runtime/`).
"""
