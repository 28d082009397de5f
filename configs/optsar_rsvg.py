"""OptiSAR-Net++ on OptSAR-RSVG: the paper's recipe (scale m, 640 px, 300 epochs, batch 64).

Every number of the reference training recipe lives here. Other configs start from this one and change
what they need (see dior_rsvg.py, demo.py, tiny.py).

Usage:
  python scripts/train.py --config configs/optsar_rsvg.py --workdir runs/optsar_m \
      --config.data.data_dir=/data/tfds
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ----------------------------------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.name = 'optsar_rsvg'            # TFDS name (tfds_builders registers optsar_rsvg, dior_rsvg)
  c.data.data_dir = 'data/tfds'          # TFDS data dir
  c.data.train_split = 'train'
  c.data.eval_split = 'val'              # split used for periodic validation / best checkpoint
  c.data.imgsz = 640                     # square letterbox canvas (multiple of 32)
  c.data.max_text_slots = 20             # K: text slots per training image (max_samples)
  c.data.max_boxes = 64                  # padded boxes per training image (mosaic merges 4 images)
  c.data.pad_value = 114                 # letterbox / mosaic fill
  # Resampling of the letterbox and the training warp: 'pil' (Pillow's bilinear, antialiased when reducing,
  # one resample per training tile) or 'opencv' (the reference: cv2 INTER_LINEAR semantics, no antialias;
  # data/augment.py).
  c.data.resize = 'pil'
  # Input (optisar_jax/data/pipeline.py): grain worker processes decode and augment; -1 = automatic (host
  # cores - 1, at most max_auto_workers), 0 = in the training process. Each worker keeps prefetch_buffer
  # batches ready; the loop keeps device_prefetch batches on the devices ahead of the step.
  c.data.worker_count = -1
  c.data.max_auto_workers = 16
  c.data.prefetch_buffer = 2
  c.data.device_prefetch = 2
  # Dynamic adversarial negatives (docs/training-and-data.md section 4).
  c.data.negatives = ml_collections.ConfigDict()
  c.data.negatives.background_text = 'background'
  c.data.negatives.adv_sample_ratio = 0.5        # up to floor(0.5 * #positives) adversarial rewrites
  c.data.negatives.neg_samples = (0, 10)         # in-sample negatives drawn from U{0..10}
  c.data.negatives.global_pool_size = 200        # most frequent training captions used as padding
  c.data.negatives.word_boundary_swaps = False   # False = reference substring swaps ("bright" -> "bleft")
  c.data.negatives.mask_false_negatives = True   # deviation 11.2: mask negatives equal to a positive
  # Training augmentation (docs/training-and-data.md section 6.2).
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.mosaic = 1.0
  c.data.augment.close_mosaic_epochs = 10        # mosaic off for the last 10 epochs
  c.data.augment.degrees = 0.0
  c.data.augment.translate = 0.1                 # translation ~ U[0.5 - t, 0.5 + t] * size
  c.data.augment.scale = 0.5                     # scale ~ U[1 - s, 1 + s]
  c.data.augment.shear = 0.0
  c.data.augment.perspective = 0.0
  c.data.augment.hsv_h = 0.015
  c.data.augment.hsv_s = 0.7
  c.data.augment.hsv_v = 0.4
  c.data.augment.hsv_on_device = True     # the train step applies the gains (data/device_hsv.py), not the host
  c.data.augment.fliplr = 0.5
  c.data.augment.flipud = 0.0
  c.data.augment.rewrite_directions_on_flip = True  # deviation 11.1 (False = reference)
  c.data.augment.min_box_size = 2.0              # px, after the affine
  c.data.augment.max_aspect_ratio = 100.0
  c.data.augment.min_area_ratio = 0.1

  # ----------------------------------------------------------------------------------------- text
  c.text = ml_collections.ConfigDict()
  c.text.mode = 'frozen'                 # 'frozen' (precomputed embedding cache) or 'trainable'
  c.text.encoder = ''                    # local HF-format dir or hf://repo (MobileCLIP2-B converted)
  c.text.embeddings_dir = ''             # output of scripts/prepare_text_embeddings.py
  c.text.dim = 512                       # text embedding width seen by the detector
  c.text.encode_batch_size = 512
  # Small CLIP-architecture tower trained jointly (text.mode = 'trainable').
  c.text.tower = ml_collections.ConfigDict()
  c.text.tower.vocab_size = 2048
  c.text.tower.context_length = 32
  c.text.tower.width = 128
  c.text.tower.layers = 2
  c.text.tower.heads = 4
  c.text.tower.mlp_ratio = 4

  # ---------------------------------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.scale = 'm'
  # [depth, width, max_channels] per scale (the reference yaml's `scales:`).
  c.model.scales = ml_collections.ConfigDict({
      'n': (0.50, 0.25, 1024), 's': (0.50, 0.50, 1024), 'm': (0.50, 1.00, 512),
      'l': (1.00, 1.00, 512), 'x': (1.00, 1.50, 512)})
  c.model.strides = (8, 16, 32)
  c.model.bn_momentum = 0.97             # flax convention (torch momentum 0.03)
  c.model.bn_epsilon = 1e-3
  # 'auto': float32 on the CPU, bfloat16 on GPU/TPU (optisar_jax/platform.py); parameters, BatchNorm
  # statistics, losses and the optimizer stay float32.
  c.model.compute_dtype = 'auto'
  c.model.cpu_forms = 'auto'             # XLA:CPU-tuned conv forms: 'auto' (CPU only), 'on', 'off'
  # Weight gradients under bfloat16 compute: 'float32' produces them in float32 (optisar_jax/models/
  # precision.py), so their cross-device sums are float32; 'compute' (opt-in, half the all-reduce bytes)
  # lets XLA sum them in the compute dtype.
  c.model.weight_grad_dtype = 'float32'
  # BatchNorm (and PL-MoE balance-loss) statistics per group of this many consecutive images, as the
  # reference's per-GPU statistics over 8 images; 0 = statistics of the whole global batch. Groups never
  # straddle devices when the per-device batch is a multiple of it, so no BatchNorm all-reduce is needed.
  c.model.bn_group_size = 8
  # Head (docs/architecture.md section 7).
  c.model.embed_dim = 512                # region embedding / refined text width
  c.model.reg_max = 16
  c.model.num_regions = 16               # P3 region grid (perfect square); P4/P5 get 4
  c.model.bias_init_nc = 16              # class count used in the reference's score-bias init
  c.model.bias_init_imgsz = 640
  c.model.logit_scale_init = -1.0
  c.model.swiglu_hidden = 2048
  c.model.region_hidden = 256
  # TGDF-SSA neck (docs/architecture.md section 6).
  c.model.tgdg = ml_collections.ConfigDict()
  c.model.tgdg.embed_channels = 256      # ec
  c.model.tgdg.num_heads = 4             # nh
  c.model.tgdg.ssa_groups = 32
  c.model.tgdg.guide_hidden = 512        # gc
  c.model.tgdg.ssa_dropout = 0.01
  c.model.tgdg.gate_init = (1.0, 0.0)    # (weight_gate, feature_gate); (0.0, 0.0) = reference (dead gates)
  # 'raw' (ours: the neck sees raw text in training and inference) or 'refined' (the reference at inference;
  # docs/architecture.md section 10).
  c.model.tgdg.neck_text = 'raw'
  # PL-MoE (docs/architecture.md section 5).
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.rank = 256
  c.model.moe.target_patches = 20
  c.model.moe.min_patch = 2
  c.model.moe.max_patch = 32
  c.model.moe.loss_coef = 1e-3
  c.model.moe.gate_dim = 0               # router projection width; 0 = the reference's min(c // 2, 256)
  c.model.moe.noisy_gating = True
  c.model.moe.use_daa = True
  c.model.moe.layer_scale_init = 0.01
  c.model.moe.lora_scale_init = 0.1
  c.model.moe.daa_reduction = 4

  # ----------------------------------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict()
  c.loss.box = 7.5
  c.loss.cls = 0.5
  c.loss.dfl = 1.5
  c.loss.region = 1.0
  c.loss.moe = 1.5
  c.loss.assigner_topk = 10
  c.loss.assigner_alpha = 0.5
  c.loss.assigner_beta = 6.0
  c.loss.small_box_px = 8.0              # gt boxes narrower than this are widened ...
  c.loss.small_box_expand_px = 16.0      # ... to this for the anchor-inside test only
  c.loss.region_fg_weight = 2.0

  # ------------------------------------------------------------------------------------ optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.b1 = 0.9                       # constant, as the reference's AdamW (see warmup_b1)
  c.optim.b2 = 0.999
  # Reference 1e-8 on a loss x64 (batch x world); ours is the global mean, so its gradients are 64x smaller
  # and Adam's m / (sqrt(v) + eps) equals the reference's only with eps / 64.
  c.optim.eps = 1e-8 / 64
  c.optim.weight_decay = 0.025
  # The TGDF-SSA gates (weight_gate, feature_gate): the reference decays them (moot there: they stay 0);
  # with our live gates (model.tgdg.gate_init) decay would pull them back to the dead state. Deviation.
  c.optim.decay_tgdg_gates = False
  c.optim.lrf = 0.01                     # cosine to lr * lrf
  c.optim.warmup_epochs = 3.0
  c.optim.warmup_min_steps = 100
  c.optim.warmup_bias_lr = 0.0
  # The reference's warmup moves `momentum` (0.8 -> 0.9) only in SGD's groups; AdamW's b1 stays 0.9.
  # True (not the reference) warms b1 up from warmup_momentum to b1 over the warmup steps.
  c.optim.warmup_b1 = False
  c.optim.warmup_momentum = 0.8
  c.optim.clip_norm = 10.0 / 64          # reference 10 on a loss x64 (batch x world); ours: global mean

  # ---------------------------------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.epochs = 300
  c.train.num_steps = 0                  # > 0 overrides epochs
  c.train.batch_size = 64                # global batch
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.log_every = 50
  c.train.eval_every_epochs = 20
  c.train.eval_every_steps = 0           # > 0 overrides eval_every_epochs
  c.train.val_examples_shown = 8         # answers drawn into WORKDIR/val/step_N.png and TensorBoard
  c.train.eval_last_epochs = 5           # also after each of the last 5 epochs, as the reference (optimizer.validation_due)
  c.train.ema_decay = 0.9999
  c.train.ema_tau = 2000.0
  # BatchNorm statistics are those of the global batch (XLA reduces over the data axes): see train/step.py.
  c.train.nonfinite = 'stop'             # 'stop' or 'skip'

  # ----------------------------------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'test'
  c.eval.batch_size = 8                  # image slots per DEVICE per eval step
  c.eval.query_slots = 16                # query slots per DEVICE per eval step (OptSAR-RSVG: 1.93 per image)
  c.eval.max_queries_per_image = 0       # 0: all queries of an image share its backbone pass; 1: one pass each
  c.eval.routing_images = 32             # evaluate.py's routing.png/json: PL-MoE routing of up to this many
                                         # images per modality (0: none)
  c.eval.conf_threshold = 1e-4           # top-1 score below this = no prediction
  c.eval.use_ema = True

  # ------------------------------------------------------------------------------------------ xla
  # What XLA:CPU hands to YNNPACK, per program: 'all' (XLA's default), 'reduce' (reductions only) or 'none'
  # (compile_options.py has the measurements). Ignored on GPU/TPU.
  c.xla = ml_collections.ConfigDict()
  c.xla.cpu_ynnpack_train = 'none'       # scale m at 640: 10.3 s per batch-2 step vs 11.9 s with 'all'
  c.xla.cpu_ynnpack_eval = 'reduce'      # scale m at 640: 0.70 s per forward vs 0.86 s with 'all'

  # ----------------------------------------------------------------------------------------- demo
  # The synthetic OptSAR-RSVG-format dataset scripts/demo.py generates when run with this config.
  c.demo = ml_collections.ConfigDict()
  c.demo.num_images = 1500
  c.demo.seed = 0
  c.demo.num_examples_shown = 12

  # ----------------------------------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)
  c.mesh.axes = ('data', 'fsdp')
  # (regex on the parameter path, PartitionSpec entries); first match wins; () = replicated.
  c.mesh.sharding_rules = (('.*', ()),)
  return c
