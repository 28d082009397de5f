"""The README demo: a small OptiSAR-Net++ trained on the synthetic OptSAR-RSVG-format dataset on a CPU.

A trainable CLIP-architecture text tower (tokenizer built from the training captions) replaces the frozen
MobileCLIP2-B, which cannot be downloaded here. Sized to finish in minutes on 2 CPU cores.
"""

from optisar_jax.config import load_sibling


def get_config():
  c = load_sibling(__file__, 'optsar_rsvg')
  c.data.data_dir = 'runs/demo/data/tfds'   # where scripts/demo.py --workdir runs/demo builds it
  c.data.imgsz = 128
  c.data.max_text_slots = 8
  c.data.max_boxes = 32
  c.data.negatives.neg_samples = (0, 4)
  c.data.negatives.global_pool_size = 32
  c.data.augment.mosaic = 0.0            # single images: the synthetic captions use absolute positions
  c.data.augment.scale = 0.1
  c.data.augment.translate = 0.05
  c.text.mode = 'trainable'
  c.text.dim = 64
  c.text.tower.vocab_size = 512
  c.text.tower.context_length = 24
  c.text.tower.width = 64
  c.text.tower.layers = 2
  c.text.tower.heads = 4
  c.model.scales['demo'] = (0.5, 0.125, 256)
  c.model.scale = 'demo'
  c.model.bias_init_imgsz = 128
  c.model.embed_dim = 64
  c.model.swiglu_hidden = 128
  c.model.region_hidden = 32
  c.model.tgdg.embed_channels = 32
  c.model.tgdg.ssa_groups = 4
  c.model.tgdg.guide_hidden = 64
  c.model.moe.num_experts = 4
  c.model.moe.rank = 16
  c.model.moe.gate_dim = 16
  c.train.epochs = 26
  c.train.num_steps = 0
  c.train.batch_size = 16
  c.train.checkpoint_every = 200
  c.train.log_every = 20
  c.train.eval_every_steps = 0
  c.train.eval_every_epochs = 0
  c.train.ema_tau = 200.0
  c.optim.warmup_epochs = 1.0
  c.eval.batch_size = 16
  c.eval.query_slots = 48                # the synthetic data has about 3 queries per image
  c.demo.num_images = 1500
  c.xla.cpu_ynnpack_train = 'reduce'     # small maps: 0.248 s per step vs 0.322 s with 'none' (compile_options.py)
  return c
