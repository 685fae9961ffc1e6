"""What a training config must hold: the checks run before anything compiles, and the `:smoke` shrink.

Config files (`configs/*.py`) build an `ml_collections.ConfigDict` in `get_config(arg)` and end with
`return run_config.finalize(config, arg)`, which applies the `smoke` argument; `validate` runs in the trainer
once the number of devices is known.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jaxret import losses
from jaxret import metrics
from jaxret import models
from jaxret import preclassify
from jaxret import rerank
from jaxret import samplers

SMOKE_ARG = "smoke"
# Where the training images live while training (config.input.cache); see jaxret/input_pipeline.py.
CACHE_MODES = ("device", "host", "stream", "auto")
SCHEDULES = ("warmup_cosine", "exponential_per_epoch")


class ConfigError(ValueError):
  """A config value that cannot run; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  """Every field a training config has, with defaults; config files change what their run needs."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, dropout, batch order and augmentation.
  config.data_dir = placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR.

  config.input = ml_collections.ConfigDict()
  config.input.dataset = "synthetic_inshop/small"  # TFDS name: synthetic_inshop/* or deepfashion_inshop/*.
  config.input.image_size = 64  # Images are resized (and, in training, randomly cropped) to this square.
  config.input.batch_size = 32  # Global batch: P products x K images, split over all devices.
  config.input.images_per_product = 4  # K; P = batch_size // K (pk), batch_size // (C * K) (category_balanced).
  # pk: P products x K images; category_balanced: C categories x P products x K; htl_anchor_neighbour: HTL's
  # anchor classes and their nearest classes in its tree (docs/losses.md).
  config.input.sampler = "pk"
  config.input.categories_per_batch = 2  # C of the category_balanced sampler (unused by pk).
  config.input.classes_per_anchor = 2  # m of htl_anchor_neighbour: each anchor class and its m - 1 nearest.
  config.input.num_threads = 4  # Threads decoding image files for the catalogue (jaxret.index, jaxret.search).
  config.input.crop_scale = (0.6, 1.0)  # Area fraction of the random resized crop (done on the device).
  config.input.color_jitter = 0.2  # Relative strength of brightness and contrast jitter.
  # Crop each image to its garment box (the dataset's `bbox`; the whole image where `has_bbox` is False):
  # training draws its random crop inside the box, evaluation crops to it exactly (docs/deepfashion.md).
  config.input.crop_to_box = False
  config.input.box_margin = 0.1  # Fraction of the box's side added on each side before cropping.
  # Training products held out as a validation query/gallery split (`val/recall@K`), to choose a step
  # without the test split; 0: none. See jaxret/validation.py.
  config.input.validation_products = 0
  # Training images: device (replicated on every device), host (memory map), stream (JPEGs decoded while
  # training), or auto: the first that fits (docs/input_pipeline.md).
  config.input.cache = "auto"
  config.input.cache_size = placeholder(int)  # Side of the decoded (cached) images; None: image_size.
  config.input.cache_dir = placeholder(str)  # Folder for decoded caches; None: decoded/ beside the dataset.
  config.input.cache_memory_fraction = 0.5  # auto: the most of a device's memory (else RAM) the split may take.
  config.input.num_workers = placeholder(int)  # Processes decoding JPEGs (cache build, stream); None: per core.
  config.input.prefetch = 2  # Batches put on the devices ahead of the running step (host, stream).

  # The model's keyword arguments; None keeps the default of the model `name` (see docs/models.md). They are
  # declared here so that any of them can be set from the command line (`--config.model.dropout_rate=0.1`).
  config.model = ml_collections.ConfigDict()
  config.model.name = "rccapsnet"  # See jaxret.models.MODEL_NAMES.
  config.model.num_classes = placeholder(int)  # Class capsules (23 In-shop categories).
  config.model.capsule_dim = placeholder(int)  # Size of each class capsule.
  config.model.primary_capsule_types = placeholder(int)
  config.model.primary_capsule_dim = placeholder(int)
  config.model.routing_iterations = placeholder(int)
  config.model.logit_update = placeholder(str)  # accumulate (Sabour et al.) or replace (published Keras code).
  config.model.share_weights = placeholder(bool)  # One prediction matrix for all primary capsules.
  config.model.embedding = placeholder(str)  # all, predicted, label, label_leaky_eval (leaks labels).
  config.model.dropout_rate = placeholder(float)  # Spatial dropout after the convolution blocks.
  config.model.stem_features = placeholder(int)
  config.model.residual_features = placeholder(tuple)  # RC and QRC only.
  config.model.conv_features = placeholder(tuple)  # SC only.
  # Computation dtype (bfloat16, float32, or auto: bfloat16 on GPU/TPU, float32 on CPU, whose bfloat16
  # convolutions are slow); parameters stay float32.
  config.model.dtype = placeholder(str)
  # Pretrained backbones (resnet50, densenet121, googlenet, vgg16, vit_s16, ...; docs/models.md).
  config.model.pretrained = placeholder(str)  # Weights file or converted dir; read by the trainer, not a model kwarg.
  config.model.embedding_dim = placeholder(int)  # Projection size (512); 0: no projection, the pooled features.
  config.model.pooling = placeholder(str)  # avg, max, gem (learnable p) or token (ViT class token, vit_s16's default).
  config.model.gem_p = placeholder(float)  # Initial GeM exponent (3.0).
  config.model.gem_learnable_p = placeholder(bool)  # Train GeM's p (True).
  config.model.bn_neck = placeholder(bool)  # BatchNorm on the pooled features before the projection (False).
  config.model.l2_normalize = placeholder(bool)  # L2-normalise the embedding (True).
  config.model.freeze_batch_norm = placeholder(bool)  # CNN BatchNorm keeps its (pretrained) statistics (False).
  config.model.drop_path_rate = placeholder(float)  # ViT stochastic depth of the last block (0.0).
  config.model.pos_embed_grid = placeholder(int)  # ViT: side of the weights' position-embedding grid (14).
  # Multi-task heads beside the embedding, on any model (models.heads.TaskHeads; docs/models.md): a category
  # classifier and an attribute classifier, trained by the `category` and `attributes` losses.
  config.model.num_categories = placeholder(int)  # Category classes (23 In-shop, 13 DeepFashion2); None/0: none.
  config.model.num_attributes = placeholder(int)  # Attributes of the dataset's `attributes`; None/0: none.
  config.model.feature_relaxation = placeholder(bool)  # Park et al.'s conv-ReLU-dropout-conv before the classifier.
  config.model.relaxation_features = placeholder(int)  # Its channels (512).
  config.model.relaxation_dropout = placeholder(float)  # Its dropout (0.5).
  # The heads of issue 16's methods (docs/models.md): HDC's levels (googlenet_hdc, resnet50_hdc), ABE-M's
  # attention ensemble (googlenet_abe, resnet50_abe), BIER's learners (googlenet_bier, resnet50_bier).
  config.model.level_stages = placeholder(tuple)  # Backbone stages with a level head, shallow to deep.
  config.model.level_dim = placeholder(int)  # Size of each level's embedding (128).
  config.model.num_learners = placeholder(int)  # ABE-M's M (8); embedding_dim is split among them.
  config.model.split_stage = placeholder(str)  # Last stage of the shared features (inception3b, layer2).
  config.model.attention_features = placeholder(int)  # Channels of the attention modules' 3x3 conv (512).
  config.model.learner_sizes = placeholder(tuple)  # BIER's learners (96, 160, 256), = config.loss.<bier|a_bier>'s.

  # Every loss has its own section, so that `--config.loss.name=triplet` switches losses from the command
  # line; the section of a loss holds its options with their published defaults (jaxret/losses/, and
  # docs/losses.md) and a `weight` for sums of losses (`config.loss.name = "triplet+capsule_margin"`).
  config.loss = ml_collections.ConfigDict()
  config.loss.name = "quadruplet"  # A loss of jaxret.losses.LOSSES, or several joined by "+".
  for name, section in losses.default_sections().items():
    config.loss[name] = section

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # Peak (warmup_cosine) or initial (exponential_per_epoch) rate, Adam.
  config.optim.schedule = "warmup_cosine"  # Or exponential_per_epoch (the capsule papers' Keras schedule).
  config.optim.decay_per_epoch = 0.995  # exponential_per_epoch: rate x this after each pass over the images.
  config.optim.weight_decay = 0.0  # Decoupled (AdamW) weight decay.
  config.optim.grad_clip_norm = 1.0  # Global gradient norm clip; 0 turns it off.
  # Fine-tuning a backbone model (see docs/models.md): the embedding head's rate x this, and the backbone frozen
  # (rate 0) for the first head_only_steps steps. Frozen BatchNorm statistics: config.model.freeze_batch_norm.
  config.optim.head_lr_multiplier = 1.0
  config.optim.head_only_steps = 0

  config.total_steps = 1000
  config.warmup_steps = 50  # Linear warm-up of the learning rate.
  config.log_every = 10  # Steps between lines of metrics.jsonl.
  config.eval_every = 250  # Steps between Recall@K evaluations (also at step 0 and at the end).
  config.checkpoint_every = 250  # Steps between checkpoints (also at the end).
  config.keep_checkpoints = 3  # Checkpoints kept; older ones are deleted.

  config.evals = ml_collections.ConfigDict()
  config.evals.ks = (1, 10, 20, 30, 40, 50)  # Recall@K reported, as in the In-shop papers.
  config.evals.metric = "euclidean"  # euclidean or cosine.
  # Also report metrics after re-ranking (none, aqe, dba, dba+aqe, k_reciprocal; docs/evaluation.md), logged
  # as `rerank/<metric>`; the plain metrics stay the headline numbers. Runs on one device (host gather).
  config.evals.rerank = "none"
  config.evals.batch_size = 128  # Images per embedding step, over all devices.
  config.evals.num_pictures = 8  # Queries shown in retrievals.png.
  # Pre-classification search (docs/evaluation.md): also log `preclassify/recall@K`, each query searching only the
  # gallery images of its top-k predicted categories (1: the predicted one); 0 = off. Needs a model that
  # predicts categories (config.model.num_categories, or a capsule network).
  config.evals.preclassify_top_k = 0
  config.evals.preclassify_gallery = "known"  # The gallery's categories: its "known" labels, or "predicted" (top-1).
  return config


def demo_config() -> ml_collections.ConfigDict:
  """`base_config()` set up as the demo's data, batches and schedule (`synthetic_inshop/small`, 64x64, 32
  images a step, 3,000 steps); configs/demo*.py add model and loss."""
  config = base_config()
  config.input.dataset = "synthetic_inshop/small"
  config.input.image_size = 64
  config.input.batch_size = 32
  config.input.images_per_product = 4
  # The synthetic views already vary pose, zoom and light a lot; a light crop and jitter on top of them.
  config.input.crop_scale = (0.85, 1.0)
  config.input.color_jitter = 0.1
  config.optim.learning_rate = 1e-3
  config.total_steps = 3000
  config.warmup_steps = 50
  config.log_every = 25
  config.eval_every = 500
  config.checkpoint_every = 500
  return config


def inshop_config() -> ml_collections.ConfigDict:
  """`base_config()` set up for DeepFashion In-shop at the papers' scale; the configs add model and loss."""
  config = base_config()
  config.input.dataset = "deepfashion_inshop/all"
  config.input.image_size = 256  # The release's size; the models' strides assume it for 16x16 capsules.
  config.input.batch_size = 64
  config.input.images_per_product = 4
  config.input.num_threads = 16
  # bfloat16 convolutions and routing on GPU/TPU (parameters, loss and evaluation distances stay float32);
  # float32 on CPU, whose bfloat16 convolutions are slower than float32 ones.
  config.model.dtype = "auto"
  config.optim.learning_rate = 1e-3
  config.total_steps = 20_000  # About 50 epochs of the 25,882 training images.
  config.warmup_steps = 500
  config.log_every = 50
  config.eval_every = 2_000
  config.checkpoint_every = 1_000
  config.evals.batch_size = 256
  return config


def parse_arg(arg: str | None) -> set[str]:
  """Comma-separated words after the `:` of `--config path.py:word1,word2`."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = words - {SMOKE_ARG}
  if unknown:
    raise ConfigError(f"Unknown config argument(s) {sorted(unknown)}; the only one is {SMOKE_ARG!r}, as in "
                     "--config configs/demo.py:smoke.")
  return words


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config in place to a run of seconds: tiny model, tiny data, a few steps."""
  if config.input.dataset.startswith("synthetic_inshop/c2s"):  # Keeps consumer-to-shop photos.
    config.input.dataset = "synthetic_inshop/c2s_tiny"
  elif config.input.dataset.startswith("synthetic_inshop"):
    config.input.dataset = "synthetic_inshop/tiny"
  config.input.image_size = 32
  config.input.batch_size = 16
  config.input.images_per_product = 4
  config.input.categories_per_batch = 2  # With category_balanced: 2 categories x 2 products x 4 images.
  config.input.num_threads = 2
  if not config.model.name.endswith("_tiny"):
    config.model.name += "_tiny"
  config.total_steps = 6
  config.warmup_steps = 2
  config.log_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  config.evals.batch_size = 16
  config.evals.num_pictures = 4


def finalize(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config argument (`smoke`) and returns the config."""
  if SMOKE_ARG in parse_arg(arg):
    shrink_for_smoke(config)
  return config


def input_problems(section: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the decoded-cache fields of `config.input` (one sentence each)."""
  problems = []
  if section.cache not in CACHE_MODES:
    problems.append(f"config.input.cache={section.cache!r} must be one of {list(CACHE_MODES)}.")
  if section.cache_size is not None and (not isinstance(section.cache_size, int) or section.cache_size < 1):
    problems.append(f"config.input.cache_size={section.cache_size!r} must be a positive integer or None "
                    "(None: config.input.image_size).")
  if not 0 < section.cache_memory_fraction <= 1:
    problems.append(f"config.input.cache_memory_fraction={section.cache_memory_fraction} must be in (0, 1].")
  if section.num_workers is not None and (not isinstance(section.num_workers, int) or section.num_workers < 0):
    problems.append(f"config.input.num_workers={section.num_workers!r} must be 0 (decode in this process), a "
                    "positive integer, or None (one per CPU core).")
  if not isinstance(section.prefetch, int) or section.prefetch < 1:
    problems.append(f"config.input.prefetch={section.prefetch!r} must be a positive integer.")
  if not isinstance(section.crop_to_box, bool):
    problems.append(f"config.input.crop_to_box={section.crop_to_box!r} must be True or False.")
  if isinstance(section.box_margin, bool) or not isinstance(section.box_margin, (int, float)) \
      or not 0 <= section.box_margin <= 1:
    problems.append(f"config.input.box_margin={section.box_margin!r} must be a number in [0, 1] (the fraction "
                    "of the box's side added on each side).")
  return problems


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1) -> None:
  """Raises a ConfigError listing every field that cannot run on `device_count` devices, before anything runs."""
  problems = []
  for field in ("input.image_size", "input.batch_size", "input.images_per_product", "input.num_threads",
                "evals.batch_size"):
    section, key = field.split(".")
    if not isinstance(config[section][key], int) or config[section][key] < 1:
      problems.append(f"config.{field}={config[section][key]!r} must be a positive integer.")
  if problems:  # The checks below divide by these.
    raise ConfigError("Bad config:\n  " + "\n  ".join(problems))
  batch = config.input.batch_size
  k = config.input.images_per_product
  if k < 2:
    problems.append(f"config.input.images_per_product={k} must be at least 2 (K images of each product make "
                    "the positive pairs).")
  elif batch % k:
    problems.append(f"config.input.batch_size={batch} is not divisible by config.input.images_per_product={k}.")
  elif batch // k < 2:
    problems.append(f"config.input.batch_size={batch} holds fewer than 2 products of "
                    f"config.input.images_per_product={k} images; negatives need at least 2 products.")
  if config.input.sampler not in samplers.SAMPLERS:
    problems.append(f"config.input.sampler={config.input.sampler!r} must be one of {list(samplers.SAMPLERS)}.")
  elif config.input.sampler == "category_balanced":
    c = config.input.categories_per_batch
    if not isinstance(c, int) or c < 1:
      problems.append(f"config.input.categories_per_batch={c!r} must be a positive integer.")
    elif k >= 1 and batch % (c * k):
      problems.append(f"config.input.batch_size={batch} is not divisible by config.input.categories_per_batch={c} "
                      f"x config.input.images_per_product={k} (C categories x P products x K images).")
  elif config.input.sampler == "htl_anchor_neighbour":
    m = config.input.get("classes_per_anchor", 2)
    if "htl" not in [name.strip() for name in config.loss.name.split("+")]:
      problems.append("config.input.sampler='htl_anchor_neighbour' draws batches from the HTL loss's class tree; "
                      f"config.loss.name={config.loss.name!r} has no htl term.")
    if not isinstance(m, int) or m < 1:
      problems.append(f"config.input.classes_per_anchor={m!r} must be a positive integer.")
    elif k >= 1 and batch % (m * k):
      problems.append(f"config.input.batch_size={batch} is not divisible by config.input.classes_per_anchor={m} "
                      f"x config.input.images_per_product={k} (anchors x classes per anchor x images).")
  if config.optim.schedule not in SCHEDULES:
    problems.append(f"config.optim.schedule={config.optim.schedule!r} must be one of {list(SCHEDULES)}.")
  elif config.optim.schedule == "exponential_per_epoch" and not 0 < config.optim.decay_per_epoch <= 1:
    problems.append(f"config.optim.decay_per_epoch={config.optim.decay_per_epoch} must be in (0, 1].")
  for field, value in (("config.input.batch_size", batch), ("config.evals.batch_size", config.evals.batch_size)):
    if value % device_count:
      problems.append(f"{field}={value} is not divisible by the {device_count} devices; use a multiple of "
                      f"{device_count}.")
    elif value % process_count:
      problems.append(f"{field}={value} is not divisible by the {process_count} processes.")
  problems.extend(input_problems(config.input))
  problems.extend(models.config_problems(config.model))
  loss_problems = losses.config_problems(config.loss)
  problems.extend(loss_problems)
  if not loss_problems:  # The embedding blocks of issue 16's method models against the loss's.
    problems.extend(models.loss_layout_problems(config.model, config.loss))
  for field in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[field] < 1:
      problems.append(f"config.{field}={config[field]} must be at least 1.")
  if config.optim.learning_rate <= 0:
    problems.append(f"config.optim.learning_rate={config.optim.learning_rate} must be positive.")
  head_lr_multiplier = config.optim.get("head_lr_multiplier", 1.0)
  head_only_steps = config.optim.get("head_only_steps", 0)
  if not isinstance(head_lr_multiplier, (int, float)) or head_lr_multiplier < 0:
    problems.append(f"config.optim.head_lr_multiplier={head_lr_multiplier!r} must be a number >= 0.")
  if not isinstance(head_only_steps, int) or head_only_steps < 0:
    problems.append(f"config.optim.head_only_steps={head_only_steps!r} must be a whole number >= 0.")
  if (head_lr_multiplier != 1 or head_only_steps) and config.model.name not in models.BACKBONE_NAMES \
      and config.model.name not in models.WEIGHTS_BACKBONE:
    problems.append(f"config.optim.head_lr_multiplier / head_only_steps apply to the backbone models (a "
                    f"backbone and an embedding head), not to {config.model.name}; leave them at 1.0 and 0.")
  if config.evals.metric not in metrics.METRICS:
    problems.append(f"config.evals.metric={config.evals.metric!r} must be one of {list(metrics.METRICS)}.")
  if config.evals.rerank not in rerank.METHODS:
    problems.append(f"config.evals.rerank={config.evals.rerank!r} must be one of {list(rerank.METHODS)}.")
  validation_products = config.input.get("validation_products", 0)
  if not isinstance(validation_products, int) or isinstance(validation_products, bool) or validation_products < 0:
    problems.append(f"config.input.validation_products={validation_products!r} must be a whole number of "
                    "products, 0 (no validation split) or more.")
  if not config.evals.ks or any(int(k) < 1 for k in config.evals.ks):
    problems.append(f"config.evals.ks={tuple(config.evals.ks)} must be positive.")
  preclassify_top_k = config.evals.get("preclassify_top_k", 0)
  if not isinstance(preclassify_top_k, int) or isinstance(preclassify_top_k, bool) or preclassify_top_k < 0:
    problems.append(f"config.evals.preclassify_top_k={preclassify_top_k!r} must be a whole number of categories, "
                    "0 (off) or more.")
  if config.evals.get("preclassify_gallery", "known") not in preclassify.GALLERY_CATEGORIES:
    problems.append(f"config.evals.preclassify_gallery={config.evals.preclassify_gallery!r} must be one of "
                    f"{list(preclassify.GALLERY_CATEGORIES)}.")
  if problems:
    raise ConfigError("Bad config:\n  " + "\n  ".join(problems))
