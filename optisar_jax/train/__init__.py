"""Training: label assignment, losses, optimizer, EMA, sharding, checkpoints, the train step and loop.

Modules (import them directly; this package imports nothing so that importing one piece stays cheap):

* `assigner`: Task-Aligned assigner (anchors <-> ground-truth boxes, soft slot targets).
* `losses`: the detection/grounding objective (box CIoU, DFL, slot BCE, region, MoE balance).
* `optimizer`, `ema`, `sharding`, `checkpoint`, `step`, `loop`: the training machinery.
"""
