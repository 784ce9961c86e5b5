"""Quickstart: a small Deformable DETR learns the synthetic shapes on a CPU in minutes.

    python train.py --config configs/quickstart.py --workdir runs/quickstart

Prepares the synthetic dataset (ddetr_jax.data.synthetic) in data/ on first
use (data.synthetic.name names the dataset it is made as; another data.name
must be a prepared dataset). The model is trained from scratch (no pretrained backbone here): a
ResNet-18 with group norm, a 128-wide transformer with 2 encoder and 3
decoder layers, box refinement and two-stage proposals (the fastest-converging
published variant), small images; evaluated with class-wise NMS (the short
schedule leaves duplicate detections). Curve and final AP: docs/benchmarks.md.
"""

from ddetr_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.global_batch_size = 4
    c.total_steps = 1500  # 3 epochs of the 2,000 training images
    c.num_epochs = 3
    c.lr_drop_step = 1325  # the last 175 steps at lr x0.1
    c.log_every_steps = 25
    c.eval_every_steps = 425
    c.checkpoint_every_steps = 425
    c.keep_checkpoints = 2
    # 1,500 steps localise and classify the shapes but do not yet learn to leave out
    # duplicates (the one-to-one matching's job): class-wise NMS at IoU 0.5 in evaluation
    # (docs/benchmarks.md, "Quickstart"; evaluate.py --config.eval_nms_iou=0 turns it off).
    c.eval_nms_iou = 0.5

    c.data.name = "synthetic_shapes"
    c.data.data_dir = "data"
    c.data.synthetic.name = "synthetic_shapes"  # made (or rebuilt) when data.name is this
    c.data.synthetic.train_images = 2000
    c.data.synthetic.val_images = 200
    c.data.synthetic.seed = 0
    c.data.buckets = ((192, 256), (256, 192), (256, 256))
    c.data.eval_buckets = ()  # the same as training
    c.data.max_targets = 16
    c.data.scales = (128, 144, 160, 176, 192)
    c.data.max_size = 256
    c.data.crop_resize_scales = (128, 160, 192)
    c.data.crop_size = (96, 160)
    c.data.val_scale = 160
    c.data.resize_only_prob = 1.0  # no resize-crop-resize branch: a short schedule
    c.data.num_workers = 0
    # Batches are read in the main thread while the device runs the update program: a
    # reader thread would hold the GIL when the matching and the update's dispatch need
    # it (~10 ms a step on 2 cores; docs/benchmarks.md, "Quickstart").
    c.data.num_threads = 0

    c.model.num_classes = 9  # the synthetic category ids go up to 8
    c.model.backbone_depth = 18
    c.model.backbone_norm = "group_norm"
    c.model.backbone_width = 32
    c.model.num_feature_levels = 4
    c.model.dim = 128
    c.model.ffn_dim = 256
    c.model.heads = 4
    c.model.enc_layers = 2
    c.model.dec_layers = 3
    c.model.num_queries = 50
    c.model.dropout = 0.0
    c.model.with_box_refine = True
    c.model.two_stage = True

    c.optimizer.lr = 7e-4
    c.optimizer.lr_backbone = 7e-4
    c.optimizer.clip_max_norm = 1.0
    c.optimizer.warmup_steps = 200
    c.optimizer.freeze_stem = False
    return c
