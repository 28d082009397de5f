"""Tiny model and data for tests: every code path runs in seconds on a CPU.

Widths, the MoE and the text widths are shrunk; the structure (layers, blocks, heads) is the paper's.
"""

from optisar_jax.config import load_sibling


def get_config():
  c = load_sibling(__file__, 'optsar_rsvg')
  c.data.data_dir = 'runs/tiny/tfds'
  c.data.worker_count = 0                # tests run the input in process unless they ask for workers
  c.data.imgsz = 64
  c.data.max_text_slots = 6
  c.data.max_boxes = 16
  c.data.negatives.neg_samples = (0, 2)
  c.data.negatives.global_pool_size = 8
  c.text.mode = 'trainable'
  c.text.dim = 32
  c.text.tower.vocab_size = 256
  c.text.tower.context_length = 16
  c.text.tower.width = 32
  c.text.tower.layers = 1
  c.text.tower.heads = 2
  c.model.scales['t'] = (0.5, 0.0625, 256)   # 8..32 channels
  c.model.scale = 't'
  c.model.bias_init_imgsz = 64
  c.model.embed_dim = 32
  c.model.swiglu_hidden = 64
  c.model.region_hidden = 16
  c.model.tgdg.embed_channels = 16
  c.model.tgdg.num_heads = 4
  c.model.tgdg.ssa_groups = 4
  c.model.tgdg.guide_hidden = 32
  c.model.moe.num_experts = 4
  c.model.moe.rank = 8
  c.model.moe.gate_dim = 8
  c.train.epochs = 1
  c.train.num_steps = 4
  c.train.batch_size = 8                 # divisible by the 8 simulated test devices
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.eval_every_steps = 0
  c.train.eval_every_epochs = 0          # no periodic validation in tests
  c.train.ema_tau = 2.0
  c.optim.warmup_epochs = 0.0
  c.optim.warmup_min_steps = 2
  c.eval.batch_size = 4
  c.eval.query_slots = 12                # the synthetic data has about 3 queries per image
  c.demo.num_images = 24
  c.xla.cpu_ynnpack_train = 'reduce'     # as the demo
  return c
