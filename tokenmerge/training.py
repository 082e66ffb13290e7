"""Training: DTEM merge embeddings (modular or end-to-end), and fine-tuning a ViT with
ToMe, TC-ViT, EViT-style or pruning reduction in its forward; optional distillation.

- ``method="dtem", mode="modular"``: the ViT is frozen (eval mode, no gradients); only the
  merge embeddings learn, through soft grouping + soft merging.
- ``method="dtem", mode="end2end"``: the ViT is fine-tuned too (its own learning rate,
  ``backbone_lr``). ``init_modules=FILE`` starts either mode from trained merge modules
  (e.g. a modular run's, so end2end fine-tunes the ViT around a metric already learned).
- ``method="dtem", mode="backbone"``: only the ViT learns (at ``backbone_lr``), around
  trained merge modules that stay fixed (``init_modules=FILE`` or a ``best.json`` whose
  options name ``modules``). The modules merge as they do at inference, with the hard plan
  (bipartite, or clustering with ``matching="agglomerative"``), so the ViT adapts to the
  merges it will meet, as in ToMe's fine-tuning; the soft relaxation of the other two modes
  exists to give the modules a gradient, which fixed modules do not need.
- ``method="tome"``: fine-tune the ViT with ToMe's hard merge in the forward; the matching
  has no gradient, the merge back-propagates as the size-weighted average it is.
- ``method="mctf"`` / ``"pitome"``: the same, with those methods' matching (no gradient
  through the scores either). With ``r`` a per-block list, the schedule ``tokenmerge tune``
  found (``best.json``, CLI ``--config``) is the one trained.
- ``method="tcvit"`` / ``"evit"`` / ``"prune"`` (end-to-end only): fine-tune the ViT with
  the method's hard select-and-fuse plan in the forward. The plan (which tokens are
  representatives, where each other token goes) is discrete and gets no gradient, and
  there is no straight-through estimator on the relevance scores: the gradient flows
  through the fused values (size-weighted averages, or nothing for a pruned token) and
  through attention, exactly as in ToMe's training. Why not straight-through: these
  methods have no scorer of their own to learn; their relevance is a function of the
  block's queries and keys, so a surrogate gradient on the selection would pull on the
  attention weights to change which tokens survive, for an objective the forward never
  computed. TC-ViT's paper and EViT fine-tune the ViT with the discrete condensation in
  the forward, as here (DynamicViT needs Gumbel/straight-through only because it trains
  a separate keep/drop predictor).
- Distillation (``distill=True``, any method and mode): the loss mixes cross-entropy with
  ``T^2 KL`` to a frozen teacher's softened logits (:mod:`tokenmerge.distillation`); the
  teacher is the unmodified model (a copy made before patching), ``teacher=CHECKPOINT`` (timm
  key names) or ``teacher="hf:DIR"`` (a Hugging Face classifier folder).
  With ``distill_weight=1`` no labels are used, and ``data`` may be a flat image folder
  (image models; audio and video data keep their class sub-folders).

Models: timm ``VisionTransformer`` s and Hugging Face classifiers (``model="hf:DIR"``:
ViT, DeiT, DINOv2, CLIP ``...ForImageClassification``, the Audio Spectrogram Transformer
``ASTForAudioClassification``, ``VideoMAEForVideoClassification``,
``VivitForVideoClassification``), every method and mode;
the adapter (:mod:`tokenmerge.backends.adapter`) gives what the model takes (images,
spectrograms, videos), the head's class count, the merge policy and the logits. End2end
saves a timm model's weights as ``out/model.safetensors`` (timm key names) and a Hugging Face model with
``save_pretrained`` into ``out/model/``, without the merge policy (DTEM's modules are in
``out/dtem_modules.safetensors``), so ``tokenmerge eval hf:OUT/model`` loads it.

Data (:func:`training_set`): one sub-folder per class of the files the model takes, read
by that modality's loader (:mod:`tokenmerge.evaluation.inputs`), the same one that reads
the evaluation data. Images are augmented, kept simple: RandomResizedCrop(scale 0.35-1) +
horizontal flip, normalised with the mean and std evaluation uses (the model's
``image_preprocessing``: a Hugging Face folder's ``preprocessor_config.json``, timm's
``pretrained_cfg``, else ImageNet's), and optionally Mixup / CutMix of whole batches
(``mixup``, ``cutmix``: :mod:`tokenmerge.mixing`; they mix any modality's inputs, and are
what gives a distillation teacher something to say on images its checkpoint has fitted).
Spectrograms and video clips are not otherwise augmented:
they are decoded once, prepared exactly as for evaluation (log-mel features; sampled,
resized, centre-cropped frames) and held in memory, so an epoch costs no decoding (a
spoken-digit train split of 2,400 clips at 100x64 features is 61 MB; 2,400 VideoMAE
clips of 8x3x64x64 are 0.9 GB: use ``--limit`` on larger video sets).

Optimisation: AdamW, linear warmup then cosine decay (per step), cross-entropy, bf16
autocast on CUDA (fp32 on CPU). ``lr`` left as None is 1e-3 for DTEM's merge embeddings and
1e-5 for the ViT (the other methods), ``backbone_lr`` 1e-5 (:func:`learning_rates`; the CLI's
defaults are these).

Reproducibility and resuming. The data order of epoch ``e`` is a permutation seeded by
``(seed, e)``, and each sample's augmentation is drawn from a generator seeded by
``(seed, e, index)``, so a batch depends on nothing but the step number. A checkpoint
(``out/checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at the
end) holds the trainable weights, optimizer, scheduler, step and RNG states; a resumed
run replays from the last checkpoint and ends with the same parameters as an
uninterrupted one (tested, with dropout and drop-path too: the data loader seeds itself from
``(seed, e)``, never from the global RNG that draws their masks). On resume,
``train_log.jsonl`` is cut back to the checkpoint's step, so no step is logged twice.

Safety (see docs/RELIABILITY.md). A checkpoint is data: tensors, numbers and strings (the
config as JSON, the Python and NumPy RNG states as tensors), loaded with
``weights_only=True``, so a crafted file cannot run code. A non-finite loss stops the run
before the optimizer step, and non-finite weights are never saved: the last checkpoint
stays the last good state. A folder that already holds a run is refused unless the run is
resumed or ``overwrite`` is given. Settings, the class counts of the data and of the
model's head, and the evaluation data are checked before the first step.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU, as the chosen device says; a bare ``cuda``
is each process's ``cuda:LOCAL_RANK``); each process reads every
``world``-th sample of the epoch's permutation, ``batch_size`` is per process, and rank 0
alone writes checkpoints, logs and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy
import torch
from torch import nn

from .api import split_common_options
from .backends.adapter import adapter_for, logits_of
from .core.schedule import Schedule

__all__ = [
    "TrainConfig",
    "TrainingDivergedError",
    "train",
    "train_transform",
    "learning_rates",
    "epoch_indices",
    "warmup_cosine",
    "default_train_root",
]

METHODS = ("dtem", "tome", "mctf", "pitome", "atc", "tcvit", "evit", "prune")
# Reduction policies without parameters of their own: only the ViT can learn (end2end).
PARAMETER_FREE_METHODS = ("tome", "mctf", "pitome", "atc", "tcvit", "evit", "prune")
# DTEM options that have TrainConfig fields of their own.
DTEM_FIELD_OPTIONS = ("tau", "embed_dim", "hidden_dim")
# The defaults of the settings only some methods and modes read (see unused_settings).
DEFAULT_TAU = 0.1
DEFAULT_LR = 1e-3  # dtem's merge embeddings (modular, end2end)
DEFAULT_VIT_LR = 1e-5  # the ViT: lr of the parameter-free methods
DEFAULT_BACKBONE_LR = 1e-5  # the ViT: backbone_lr of dtem end2end/backbone
MODES = ("modular", "end2end", "backbone")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
RESULTS_NAME = "results.json"
MODULES_NAME = "dtem_modules.safetensors"
MODEL_NAME = "model.safetensors"
HF_MODEL_NAME = "model"  # end2end on a Hugging Face model: a save_pretrained folder
# What a run writes into its folder: their presence marks the folder as holding a run.
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, RESULTS_NAME, MODULES_NAME, MODEL_NAME, HF_MODEL_NAME)
CHECKPOINT_FORMAT = "tokenmerge-train-checkpoint"
CHECKPOINT_VERSION = 2  # 1 pickled Python and NumPy objects; 2 holds tensors and JSON only
MAX_SEED = 1_000_000
START_AGAIN = "delete it, or pass --overwrite to start the run again"


class TrainingDivergedError(ValueError):
    """The loss or the weights became NaN/inf: the run stopped, the last checkpoint is kept."""


def default_train_root() -> Path:
    """``../shared/data/imagenette/train`` next to the repository checkout."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette" / "train"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (saved in checkpoints; a resume must use the same)."""

    method: str = "dtem"
    mode: str = "modular"
    data: Optional[str] = None  # one sub-folder per class of the model's inputs; None: default_train_root()
    model: Optional[str] = None  # timm name or hf:DIR; None: the embedded ViT-Tiny Imagenette model
    checkpoint: Optional[str] = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: Optional[int] = None
    r: Schedule = 16  # an int, or per block (a list, e.g. the "r" of tune's best.json)
    # The settings below marked "read by" are ignored by other methods and modes, and the run
    # records them as None there (unused_settings); None where read: the default named.
    tau: Optional[float] = None  # read by dtem modular/end2end (the soft merge); default 0.1
    init_modules: Optional[str] = None  # dtem: start from these trained merge modules (a .safetensors file)
    embed_dim: Optional[int] = None  # read by dtem; default 64 (or a modules= option's file's)
    hidden_dim: Optional[int] = None  # read by dtem; None: an affine merge embedding, no MLP
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 32
    # read by all but dtem backbone: merge embeddings (dtem; default 1e-3), or the ViT (tome...; default 1e-5)
    lr: Optional[float] = None
    backbone_lr: Optional[float] = None  # read by dtem end2end/backbone (the ViT's lr); default 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    limit: Optional[int] = None
    seed: int = 0
    out: str = "runs/train"
    checkpoint_every: int = 50
    num_workers: int = 0
    device: Optional[str] = None
    eval_data: Optional[str] = None
    eval_r: Sequence[int] = ()
    eval_limit: Optional[int] = None
    progress: bool = True
    method_options: dict = dataclasses.field(default_factory=dict)  # e.g. {"order": 2} for tcvit
    # Mixup / CutMix Beta parameters (0: off; timm's ViT recipe uses 0.8 / 1.0): see tokenmerge.mixing.
    mixup: float = 0.0
    cutmix: float = 0.0
    distill: bool = False
    distill_weight: float = 0.5  # share of the distillation term; 1.0: no labels used
    distill_temperature: float = 1.0
    teacher: Optional[str] = None  # checkpoint or hf:DIR; None: the unmodified student (frozen copy)
    teacher_model: Optional[str] = None  # the teacher checkpoint's timm name; None: the student's
    # The teacher weights' fingerprint, filled in by train() and saved in checkpoints so that a
    # resume with another teacher is refused; set it to pin the expected teacher.
    teacher_fingerprint: Optional[str] = None

    def check(self) -> None:
        """Raise on any setting the run cannot use (before anything is loaded or written)."""
        from .core.schedule import validate_schedule
        from .models import is_open_clip_model

        if is_open_clip_model(self.model):
            # The loss reads a classifier's logits; a zero-shot head (text embeddings of class names)
            # is not what the tower was trained against, and open_clip's contrastive training is its own.
            raise ValueError(
                f"tokenmerge train fine-tunes classifiers against labels; {self.model} has no classification "
                "head (it is evaluated zero-shot from class names): use the training-free commands, "
                "tokenmerge tune/eval with --class-names FILE, or patch it in Python (tokenmerge.patch) and "
                "train it with open_clip's own training code"
            )
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS} for training, got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.method in PARAMETER_FREE_METHODS and self.mode == "modular":
            raise ValueError(
                f"{self.method} has no parameters of its own (modular training would train nothing): "
                "train it with --mode end2end"
            )
        if not isinstance(self.method_options, dict):
            raise TypeError(f"method options must be a dict such as {{\"order\": 2}}, got {self.method_options!r}")
        if self.init_modules is not None and self.method != "dtem":
            raise ValueError(f"--init-modules loads DTEM merge modules; --method {self.method} has none: drop it")
        if self.mode == "backbone" and self.method != "dtem":
            raise ValueError(f"--mode backbone trains the ViT around fixed DTEM merge modules; --method "
                             f"{self.method} has none: train it with --mode end2end")
        if self.mode == "backbone" and self.init_modules is None and "modules" not in self.method_options:
            raise ValueError("--mode backbone keeps the merge modules as they are, and untrained modules are "
                             "not a merge metric: give trained ones with --init-modules FILE (or --config "
                             "best.json naming modules)")
        if self.method == "dtem":
            clash = sorted(set(self.method_options) & set(DTEM_FIELD_OPTIONS))
            if clash:
                raise ValueError(f"give dtem's {', '.join(clash)} as --{clash[0].replace('_', '-')} "
                                 "(its own option), not as a method option")
            if self.mode != "backbone" and self.method_options.get("prop_attn") is False:
                # The soft merge keeps every token and fades a merged-away one only through its
                # log-size attention bias; without it the model trained is not the hard one deployed.
                raise ValueError(
                    f"dtem {self.mode} training merges softly: merged-away tokens stay in the sequence and "
                    "leave attention only through proportional attention, so prop_attn=False would train "
                    "another model than the one that merges at inference. Drop prop_attn=False "
                    "(CLI: --method-option prop_attn=false, or the --config file's options) for training; "
                    "evaluate the trained modules with it if you like, or fine-tune the ViT with it in "
                    "--mode backbone (hard merges)"
                )
        self._check_schedule()
        for flag, value in (("--batch-size", self.batch_size), ("--checkpoint-every", self.checkpoint_every)):
            _require_int(flag, value, minimum=1)
        for flag, value in (("--max-steps", self.max_steps), ("--embed-dim", self.embed_dim),
                            ("--hidden-dim", self.hidden_dim),
                            ("--limit", self.limit), ("--eval-limit", self.eval_limit),
                            ("--num-classes", self.num_classes)):
            if value is not None:
                _require_int(flag, value, minimum=1)
        _require_int("--warmup-steps", self.warmup_steps, minimum=0)
        _require_int("--num-workers", self.num_workers, minimum=0)
        # The per-sample seed (seed, epoch, index) must fit torch's 64-bit seed.
        _require_int("--seed", self.seed, minimum=0, maximum=MAX_SEED)
        # A negative learning rate is gradient ascent, NaN/inf a run that diverges at step 1.
        for flag, value in (("--lr", self.lr), ("--backbone-lr", self.backbone_lr), ("--tau", self.tau)):
            if value is not None:
                _require_positive(flag, value)
        _require_positive("--epochs", self.epochs)
        for flag, value in (("--weight-decay", self.weight_decay), ("--mixup", self.mixup), ("--cutmix", self.cutmix)):
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"--model-kwargs must be a JSON object such as '{{\"img_size\": 32}}', got {self.model_kwargs!r}")
        self._check_distillation()
        for r in self.eval_r:
            validate_schedule(r)

    def _check_schedule(self) -> None:
        from .core.schedule import KeepRatio, format_schedule, validate_schedule

        if isinstance(self.r, KeepRatio) or isinstance(self.r, tuple):
            raise ValueError(f"--r {format_schedule(self.r)}: training takes an int r or a per-block list "
                             "(e.g. 16,16,14,...); write the schedule out per block")
        if isinstance(self.r, list):
            self.r = validate_schedule(self.r)
            if not any(self.r):
                raise ValueError(f"--r {format_schedule(self.r)} merges nothing: give some block an r >= 1")
        else:
            _require_int("--r", self.r, minimum=1)

    def _check_distillation(self) -> None:
        if not isinstance(self.distill, bool):
            raise TypeError(f"distill must be True or False, got {self.distill!r}")
        for flag, value in (("--teacher", self.teacher), ("--teacher-model", self.teacher_model),
                            ("teacher_fingerprint", self.teacher_fingerprint)):
            if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value)):
                raise ValueError(f"{flag} must be a non-empty name or path, got {value!r}")
        if not self.distill:
            if self.teacher is not None or self.teacher_model is not None:
                raise ValueError("--teacher/--teacher-model choose the distillation teacher: add --distill")
            return
        if not (_is_real(self.distill_weight) and 0.0 < self.distill_weight <= 1.0):
            raise ValueError(
                f"--distill-weight must lie in (0, 1] (the distillation share of the loss; 1.0 uses "
                f"no labels), got {self.distill_weight!r}; without distillation drop --distill"
            )
        if not (_is_real(self.distill_temperature) and math.isfinite(self.distill_temperature)
                and self.distill_temperature > 0):
            raise ValueError(f"--distill-temperature must be a finite number > 0 (1-4 is usual), "
                             f"got {self.distill_temperature!r}")
        if self.teacher_model is not None and self.teacher is None:
            raise ValueError("--teacher-model names the architecture of --teacher CHECKPOINT: give the checkpoint too")
        if self.teacher_model is not None and str(self.teacher).startswith("hf:"):
            raise ValueError("--teacher hf:DIR is a Hugging Face folder, which names its own architecture: "
                             "drop --teacher-model")

    @property
    def labels_needed(self) -> bool:
        return not (self.distill and self.distill_weight == 1.0)


def unused_settings(method: str, mode: str) -> tuple:
    """The settings among ``lr``, ``backbone_lr``, ``tau``, ``embed_dim`` and ``hidden_dim`` that
    a run of ``method`` in ``mode`` never reads (the CLI refuses them; a run records them as None)."""
    if method != "dtem":
        # No merge embeddings: the ViT is the only thing that learns, at lr.
        return ("backbone_lr", "tau", "embed_dim", "hidden_dim")
    if mode == "modular":
        return ("backbone_lr",)  # the ViT stays frozen
    if mode == "backbone":
        # The modules stay fixed (no lr) and merge hard, as at inference (no soft merge, no tau).
        return ("lr", "tau")
    return ()


def learning_rates(config: TrainConfig) -> tuple:
    """``(lr, backbone_lr)`` a run of ``config`` trains with: the given ones, else the defaults
    (lr: 1e-3 for dtem's merge embeddings, 1e-5 for the ViT of the other methods; backbone_lr:
    1e-5), and None for one the method and mode do not read. The CLI's defaults are these."""
    unused = unused_settings(config.method, config.mode)
    lr = config.lr
    if lr is None:
        lr = DEFAULT_LR if config.method == "dtem" else DEFAULT_VIT_LR
    backbone_lr = DEFAULT_BACKBONE_LR if config.backbone_lr is None else config.backbone_lr
    return (None if "lr" in unused else lr), (None if "backbone_lr" in unused else backbone_lr)


def _with_used_settings(config: TrainConfig, model: nn.Module) -> TrainConfig:
    """``config`` as the patched ``model`` runs it: the DTEM shape and tau its merge modules
    got, the learning rates it trains with (:func:`learning_rates`), and None for every setting
    not read."""
    changes = {name: None for name in unused_settings(config.method, config.mode)}
    changes["lr"], changes["backbone_lr"] = learning_rates(config)
    if config.method == "dtem":
        reducer = adapter_for(model).reducer
        changes.update(embed_dim=reducer.embed_dim, hidden_dim=reducer.hidden_dim)
        if "tau" not in changes:
            changes["tau"] = reducer.tau
    return dataclasses.replace(config, **changes)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(flag: str, value, minimum: int, maximum: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{flag} must be at most {maximum}, got {value}")


def _require_positive(flag: str, value) -> None:
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a finite number > 0, got {value!r}")


# -- data -------------------------------------------------------------------------------
def train_transform(image_size: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """RandomResizedCrop + horizontal flip + normalisation with ``mean``/``std`` (per channel,
    on [0, 1] pixels; default ImageNet's). The trainer passes the model's own statistics."""
    from torchvision import transforms

    from .evaluation.data import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std),
    ])


class PreparedClips(torch.utils.data.Dataset):
    """Spectrograms or video clips, decoded once into memory by the model's loader
    (:meth:`~tokenmerge.evaluation.inputs.Inputs.load_file`, as evaluation prepares them);
    no augmentation. Item ``index`` -> ``(input, label)``; ``classes`` are the folder's."""

    def __init__(self, inputs, classes: list, files: list, progress: bool = False):
        from tqdm.auto import tqdm

        self.classes = list(classes)
        self.inputs = torch.stack([
            inputs.load_file(path)
            for path, _ in tqdm(files, desc=f"decoding {inputs.noun}", disable=not progress, leave=False)
        ])
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.inputs[index], self.labels[index]


def folder_classes(inputs, root, flag: str = "--data") -> tuple:
    """``inputs.class_files(root)``, with an error that names what the model takes when the
    folder does not hold it (e.g. images for an audio model)."""
    try:
        return inputs.class_files(root)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(
            f"{inputs.adapter.architecture_name()} takes {inputs.kind}: {flag} must be a folder with one "
            f"sub-folder per class of {inputs.extensions} files, but {err}"
        ) from None


def training_set(model: nn.Module, root, limit: Optional[int] = None, labels_needed: bool = True,
                 progress: bool = False):
    """The training set of ``root`` in the modality ``model`` takes (its adapter's ``inputs``).

    Images: an augmenting ImageFolder, or, with ``labels_needed=False``, also a flat folder
    (:func:`tokenmerge.distillation.training_images`). Spectrograms and videos: the class
    sub-folders' files, decoded once, not augmented (:class:`PreparedClips`). ``limit``
    keeps evenly spaced files, so that a subset of the class-sorted folder covers every class.
    """
    from .distillation import training_images
    from .evaluation.inputs import inputs_for

    inputs = inputs_for(model)
    if inputs.kind == "images":
        # Evaluation's statistics (the ones the weights came with): train and eval see alike inputs.
        settings = inputs.preprocessing()
        transform = train_transform(inputs.image_size, settings["mean"], settings["std"])
        return training_images(root, transform, limit, labels_needed)
    classes, files = folder_classes(inputs, root)
    if limit is not None and limit < len(files):
        files = [files[i * len(files) // limit] for i in range(limit)]
    return PreparedClips(inputs, classes, files, progress)


class SeededAugment(torch.utils.data.Dataset):
    """Each sample's augmentation drawn from a generator seeded by ``(seed, epoch, index)``.

    Makes a batch a function of the step alone (resumable, identical across worker counts).
    Item ``(epoch, index)`` -> ``(image, label)``.
    """

    def __init__(self, base, seed: int):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.base[index]


def epoch_indices(num_samples: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """This process's samples for ``epoch``: a permutation seeded by ``(seed, epoch)``, every ``world``-th."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    usable = num_samples - num_samples % world
    return order[rank:usable:world]


def _loader_seed(seed: int, epoch: int) -> int:
    """The DataLoader generator's seed for ``epoch`` (apart from the permutation's and the samples')."""
    return (seed * 100_019 + epoch) * 2 + 1


class _StepSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys of the given per-process indices, from ``start``."""

    def __init__(self, epoch: int, indices: list, start: int):
        self.epoch, self.indices, self.start = epoch, indices, start

    def __iter__(self):
        return iter((self.epoch, i) for i in self.indices[self.start:])

    def __len__(self):
        return len(self.indices) - self.start


# -- schedule ---------------------------------------------------------------------------
def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup from ~0 to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- model ------------------------------------------------------------------------------
def load_student(config: TrainConfig) -> nn.Module:
    """The model to train, as loaded (not patched yet)."""
    from .models import load_model

    return load_model(config.model, checkpoint=config.checkpoint, num_classes=config.num_classes,
                      **config.model_kwargs)


def build_model(config: TrainConfig, model: Optional[nn.Module] = None) -> nn.Module:
    """Load (unless given) and patch the model for training."""
    import tokenmerge

    from .methods import create_reducer

    if model is None:
        model = load_student(config)
    adapter = _check_trainable(model)
    # A best.json's options may hold options of every method (keep_norm, ...), which patch takes.
    common, options = split_common_options(config.method_options)
    if config.method == "dtem":
        # None: DTEM's own defaults (embed_dim from a modules= file, else 64; tau 0.1).
        options.update(embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                       tau=DEFAULT_TAU if config.tau is None else config.tau)
    reducer = create_reducer(config.method, **options)
    _check_schedule_fits(config, reducer, adapter)
    tokenmerge.patch(model, method=reducer, r=config.r, **common)
    if config.init_modules is not None:
        tokenmerge.load_merge_modules(model, config.init_modules)
    return model


def _check_schedule_fits(config: TrainConfig, reducer, adapter) -> None:
    """Refuse an ``r`` the first block cannot remove, and a per-block list that some block would
    clamp (training would run another schedule than the one written out). A constant ``r``
    may clamp in late blocks, as ToMe's constant schedules do (r=16 on ViT-Tiny: 10 in the last),
    but DTEM's soft training must clamp every block as the patched model does: with
    ``matching="agglomerative"`` the patch clamps to clustering's limit, which the soft
    bipartite merge cannot reach, so the whole schedule is checked there."""
    from .core.matching import bipartite_max_reduction
    from .core.schedule import format_schedule, resolve_schedule

    num_tokens, prefix = adapter.num_tokens, adapter.num_prefix_tokens
    num_blocks = len(adapter.blocks)
    if isinstance(config.r, list) and len(config.r) > num_blocks:
        raise ValueError(f"--r lists {len(config.r)} blocks but the model has {num_blocks}")
    # Each method's own limit (bipartite matching: half the candidates; select-and-fuse: all but one).
    # DTEM's modular and end2end modes train through the soft bipartite merge, whatever the matching.
    limit = reducer.max_reduction
    if config.method == "dtem" and config.mode != "backbone":
        limit = bipartite_max_reduction
    effective = resolve_schedule(config.r, num_blocks, num_tokens, prefix, limit, warn=False)
    requested = resolve_schedule(config.r, num_blocks, num_tokens, prefix, lambda n, p: num_tokens, warn=False)
    checked = num_blocks if isinstance(config.r, list) else 1
    if effective[:checked] != requested[:checked]:
        block = next(i for i, (a, b) in enumerate(zip(effective, requested)) if a != b)
        clamped = f" (clamped, the model would run {format_schedule(list(effective))})" if checked > 1 else ""
        raise ValueError(
            f"--r {format_schedule(config.r)} asks block {block} to remove {requested[block]} tokens, more "
            f"than it can with {config.method}: the model has {num_tokens} tokens ({prefix} protected), and "
            f"block {block} can remove at most {effective[block]}{clamped}; lower r there"
        )
    if config.method == "dtem" and config.mode != "backbone" and "train_r" not in config.method_options:
        # The patched schedule is clamped with the reducer's own limit (clustering's, for
        # agglomerative matching), which a late block of a constant r may reach while the soft
        # bipartite merge of training cannot (train_r clamps to the soft limit in every block).
        patched = resolve_schedule(config.r, num_blocks, num_tokens, prefix, reducer.max_reduction, warn=False)
        if patched != effective:
            block = next(i for i, (a, b) in enumerate(zip(patched, effective)) if a != b)
            soft, r = list(effective), config.r
            raise ValueError(
                f"--r {format_schedule(config.r)} with matching='agglomerative' removes {patched[block]} tokens "
                f"in block {block}, but dtem {config.mode} training merges through the soft bipartite merge, "
                f"which can remove at most {effective[block]} there: train the schedule it can run, "
                f"r={soft} (CLI: --r {format_schedule(soft)}), or set train_r={r} (CLI: --method-option "
                f"train_r={r}), which clamps each block to what the soft merge can remove; --mode backbone "
                "trains through the clustering itself"
            )


def _check_trainable(model: nn.Module):
    """The adapter of a trainable model: a patchable classifier whose inputs a data loader
    reads, a timm VisionTransformer or a Hugging Face ...ForImageClassification,
    ASTForAudioClassification, VideoMAEForVideoClassification or VivitForVideoClassification
    (checked before the teacher is copied)."""
    from .api import _adapter
    from .evaluation.inputs import inputs_for

    adapter = _adapter(model)
    inputs_for(model)  # a modality no loader reads is refused here, naming it
    if adapter.num_classes is None:
        raise TypeError(
            f"training needs a classifier (the loss reads logits); {type(model).__name__} has no "
            "classification head: load the model as its classification class (e.g. "
            "ViTForImageClassification, ASTForAudioClassification or VideoMAEForVideoClassification "
            ".from_pretrained, then save_pretrained and pass hf:DIR)"
        )
    return adapter


def _labeled(dataset) -> bool:
    """Whether ``dataset`` is an ImageFolder (has classes), not a flat folder of unlabeled images."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return hasattr(base, "classes")


def build_teacher(config: TrainConfig, student: nn.Module) -> nn.Module:
    """The frozen distillation teacher: ``config.teacher``, or a copy of the (unpatched) student.

    Checked against the student (class count, input size) before any training.
    """
    from .distillation import check_teacher, frozen_copy, load_teacher
    from .evaluation.inputs import inputs_for

    adapter = _check_trainable(student)
    if config.teacher is None:
        teacher = frozen_copy(student)
    else:
        architecture = config.teacher_model or config.model or _default_architecture()
        # The student's timm options describe the teacher only when it is the same architecture.
        kwargs = config.model_kwargs if config.teacher_model is None else {}
        teacher = load_teacher(config.teacher, architecture, kwargs)
    inputs = inputs_for(student)
    if inputs.kind == "images":
        check_teacher(teacher, adapter.num_classes, adapter.input_size)
    else:
        check_teacher(teacher, adapter.num_classes, input_shape=inputs.shape, what=inputs.kind)
    _check_teacher_statistics(config, inputs, inputs_for(teacher))
    return teacher


def _input_statistics(inputs) -> dict:
    """How a file becomes this model's input, as far as the values go (mean, std, ...)."""
    if inputs.kind == "images":
        settings = inputs.preprocessing()
        return {"mean": [float(v) for v in settings["mean"]], "std": [float(v) for v in settings["std"]]}
    return inputs._settings()


def _check_teacher_statistics(config: TrainConfig, student, teacher) -> None:
    """The teacher gets the student's input tensors: refuse one whose weights expect others.

    Refused rather than re-normalised: the student and its teacher then read one input, and
    a teacher of other statistics is a choice to make explicit (convert its folder's settings).
    """
    ours, theirs = _input_statistics(student), _input_statistics(teacher)
    if ours != theirs:
        raise ValueError(
            f"the teacher {config.teacher} expects inputs prepared with {theirs}, but the student's (and so "
            f"the teacher's, which sees the same batches) are prepared with {ours}: use a teacher trained with "
            "the student's statistics (for hf:DIR, the normalisation its preprocessor_config.json sets), or drop "
            "--teacher to distil from the unmodified student"
        )


def _default_architecture() -> str:
    from .models import DEFAULT_MODEL

    return DEFAULT_MODEL


def _set_train_mode(model: nn.Module, config: TrainConfig) -> list:
    """Freeze what the mode freezes and unfreeze what it trains; return the optimizer's
    parameter groups (a group left empty raises: the run would train nothing there)."""
    lr, backbone_lr = learning_rates(config)
    if config.method in PARAMETER_FREE_METHODS:
        model.train()
        return _trainable_groups([("the ViT", list(model.parameters()), lr)])
    reducer = adapter_for(model).reducer
    reducer_ids = {id(p) for p in reducer.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in reducer_ids]
    modules = list(reducer.parameters())
    if config.mode == "modular":
        model.eval()  # the frozen ViT: no dropout / drop-path
        reducer.train()  # soft merging
        return _trainable_groups([("the merge modules", modules, lr)], frozen=backbone)
    model.train()
    if config.mode == "backbone":
        reducer.eval()  # the hard merge of inference
        return _trainable_groups([("the ViT", backbone, backbone_lr)], frozen=modules)
    return _trainable_groups([("the merge modules", modules, lr), ("the ViT", backbone, backbone_lr)])


def _trainable_groups(groups: list, frozen: Sequence[nn.Parameter] = ()) -> list:
    """``[(what, parameters, lr)]`` -> AdamW's groups, with ``requires_grad`` set on each side:
    a model passed in keeps the flags of its last use (a modular run freezes the ViT), which
    would silently leave a later run's ViT out of training."""
    for parameter in frozen:
        parameter.requires_grad_(False)
    for what, parameters, _ in groups:
        if not parameters:
            raise ValueError(f"no parameters to train in {what}: the run would leave it as it is; check "
                             "that the model is the one meant, or choose a --mode that trains what it has")
        for parameter in parameters:
            parameter.requires_grad_(True)
    return [{"params": parameters, "lr": lr} for _, parameters, lr in groups]


def _reducer_prefix(model: nn.Module) -> str:
    """The state_dict prefix of the merge policy: ``token_reducer.`` in a timm ViT,
    ``vit.token_reducer.`` (the trunk's) in a Hugging Face classifier."""
    reducer = adapter_for(model).reducer
    return next(f"{name}." for name, module in model.named_modules() if module is reducer)


def _trainable_state(model: nn.Module, config: TrainConfig) -> dict:
    if config.method == "dtem" and config.mode == "modular":
        prefix = _reducer_prefix(model)
        return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    return model.state_dict()


# -- checkpoints ------------------------------------------------------------------------
# A checkpoint holds only tensors, numbers, strings and containers of them, so it loads with
# torch.load(weights_only=True): nothing in it is unpickled as an arbitrary object.
def _rng_state() -> dict:
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _same_run_fields(config: TrainConfig) -> dict:
    """The settings a resumed run must share, as they read back from JSON."""
    fields = dataclasses.asdict(config)
    for volatile in ("progress", "checkpoint_every", "num_workers", "device", "eval_data", "eval_r",
                     "eval_limit", "out"):
        fields.pop(volatile)
    # Settings added after checkpoint version 2 are recorded only when used, so a checkpoint
    # written before them resumes (they were off).
    for added in ("mixup", "cutmix"):
        if not fields[added]:
            fields.pop(added)
    # Settings the run does not read (None since checkpoints recorded only what was used;
    # before, their defaults): a checkpoint of either kind resumes.
    for unused in unused_settings(config.method, config.mode):
        fields.pop(unused)
    fields["model_kwargs"] = json.dumps(fields["model_kwargs"], sort_keys=True)
    fields["method_options"] = json.dumps(fields["method_options"], sort_keys=True)
    return json.loads(json.dumps(fields, sort_keys=True))


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, config: TrainConfig) -> None:
    """Write atomically (temp file + rename): a kill mid-write leaves the previous one intact.

    Non-finite weights are refused (``TrainingDivergedError``), so the previous checkpoint
    stays the last good state.
    """
    from .io import NonFiniteError, atomic_write, check_finite

    trainable = _trainable_state(model, config)
    try:
        check_finite(trainable, f"training diverged by step {step}")
    except NonFiniteError as err:
        raise TrainingDivergedError(
            f"{err}; {path} was not overwritten and keeps the last good state. Lower --lr "
            "(and --backbone-lr) and start again with --overwrite"
        ) from None
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": json.dumps(_same_run_fields(config), sort_keys=True),
        "model": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint's contents, loaded as data (``weights_only=True``) and checked.

    A file that is corrupt, truncated, holds pickled objects or is not a tokenmerge
    checkpoint gets an error naming it.
    """
    from .io import check_finite, load_tensor_file

    state = load_tensor_file(path, "training checkpoint", fix=START_AGAIN)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a tokenmerge training checkpoint; {START_AGAIN}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a version {state.get('version')!r} training checkpoint; this tokenmerge "
                         f"reads version {CHECKPOINT_VERSION}: {START_AGAIN}")
    expected = {"step": int, "config": str, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict}
    wrong = [key for key, kind in expected.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise ValueError(f"{path} is damaged (bad or missing {', '.join(wrong)}); {START_AGAIN}")
    check_finite(state["model"], f"{path} is damaged ({START_AGAIN})")
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, config: TrainConfig) -> int:
    """Restore a run from ``path``; returns its step. Refuses one written with other settings."""
    state = read_checkpoint(path)
    saved, now = json.loads(state["config"]), _same_run_fields(config)
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise ValueError(
            f"cannot resume from {path}: it was written by a run with different settings "
            + ", ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items())
            + "; resume with the same settings, or pass --overwrite to start again with the new ones"
        )
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or (config.mode != "modular" and missing):
        raise ValueError(f"checkpoint {path} does not fit the model (missing {missing}, unexpected {unexpected})")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); {START_AGAIN}") from None
    return int(state["step"])


# -- the run folder ---------------------------------------------------------------------
def _check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder (``resume`` continues the run, ``overwrite`` replaces it)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: pass a folder for the run's files")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a training run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to replace it (or choose another --out)"
        )


def _remove_run_files(out: Path) -> None:
    """``overwrite``: the earlier run's files go only once the new run has passed every check."""
    import shutil

    for name in RUN_FILES:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)


def _trim_log(log: Path, step: int) -> None:
    """Keep the log rows up to ``step`` (the resumed checkpoint's): later ones are replayed."""
    from .io import read_jsonl, rewrite_jsonl

    if log.exists():
        rewrite_jsonl(log, [row for row in read_jsonl(log) if row.get("step", 0) <= step])


def _check_classes(model: nn.Module, root: Path, classes: int, what: str) -> None:
    """The data's class folders must match the model's head (checked before step 1)."""
    adapter = adapter_for(model)
    head = adapter.num_classes
    if head is not None and head != classes:
        other = (f"a Hugging Face model whose config.num_labels is {classes}" if adapter.family == "transformers"
                 else f"a model with {classes} (--num-classes {classes}, or a --checkpoint trained for {classes})")
        raise ValueError(
            f"the model's head predicts {head} classes but the {what} {root} has {classes} class folders: use "
            f"data with {head} classes, or {other}"
        )


def _eval_root(config: TrainConfig) -> Optional[Path]:
    """Where evaluation after training reads images (None: no evaluation)."""
    if not config.eval_r:
        return None
    if config.eval_data:
        return Path(config.eval_data)
    return (Path(config.data) if config.data else default_train_root()).parent / "val"


# -- distributed ------------------------------------------------------------------------
def _process_device(device: Optional[torch.device], local_rank: int, world: int, cuda_available: bool,
                    cuda_count: int = 0) -> torch.device:
    """The device this process trains on: ``device`` as asked, except that under torchrun
    (``world > 1``) a bare ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK`` (a bare one
    would put every process on the current device, GPU 0); None: ``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU."""
    if device is None:
        if not cuda_available:
            return torch.device("cpu")
    elif device.type != "cuda" or device.index is not None or world <= 1:
        return device
    if cuda_count and local_rank >= cuda_count:
        raise ValueError(f"torchrun started local rank {local_rank}, but this machine has {cuda_count} CUDA "
                         f"device(s): start at most {cuda_count} processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def _process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for the others (NCCL cannot reduce CPU tensors, even on a GPU machine)."""
    return "nccl" if device.type == "cuda" else "gloo"


def _distributed(device: Optional[torch.device]) -> tuple:
    """``(rank, world, device)``: this process's device (:func:`_process_device`); under
    torchrun, the process group is initialised with the backend that device needs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    cuda_available = torch.cuda.is_available()
    device = _process_device(device, local_rank, world, cuda_available,
                             torch.cuda.device_count() if cuda_available else 0)
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if not dist.is_initialized():
        dist.init_process_group(_process_group_backend(device))
    return dist.get_rank(), dist.get_world_size(), device


# -- the loop ---------------------------------------------------------------------------
def train(
    config: TrainConfig,
    model: Optional[nn.Module] = None,
    resume: bool = False,
    on_step: Optional[Callable[[int], None]] = None,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) a training run; returns a summary dict (also ``out/results.json``).

    Args:
        config: the run's settings.
        model: an already loaded (unpatched) model instead of ``config.model``.
        resume: continue from ``out/checkpoint.pt`` if it exists.
        on_step: called with the step number after each optimizer step (rank 0 and others).
        overwrite: replace the run already in ``out`` (without it, or ``resume``, an existing
            run is refused rather than mixed with this one).

    Raises:
        TrainingDivergedError: the loss or the weights became NaN/inf; ``out/checkpoint.pt``
            keeps the last good state.
    """
    from tqdm.auto import tqdm

    from .api import is_patched
    from .commands.arguments import parse_device
    from .distillation import teacher_logits, training_loss
    from .evaluation.data import _class_names
    from .evaluation.inputs import inputs_for
    from .io import append_jsonl, atomic_write_json
    from .mixing import mix_batch

    config.check()
    if model is not None and is_patched(model):
        # Its copy would be a merging teacher, and its merge policy would be replaced unseen.
        raise ValueError(
            "the model passed to train is already patched (it merges tokens); train patches it itself, and "
            "the default teacher is a copy of the model as given: unpatch it first: tokenmerge.unpatch(model)"
        )
    device = parse_device(config.device) if config.device is not None else None
    rank, world, device = _distributed(device)
    is_main = rank == 0
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    out = Path(config.out)
    if is_main:
        _check_run_folder(out, resume, overwrite)

    root = Path(config.data) if config.data else default_train_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"training data {str(root)!r} does not exist: pass --data DIR (one sub-folder per class "
            "of what the model takes: images, WAV/FLAC audio or videos)"
        )
    eval_root = _eval_root(config)
    if eval_root is not None and not eval_root.is_dir():
        raise FileNotFoundError(f"evaluation data {str(eval_root)!r} does not exist: pass --eval-data DIR "
                                "(or --eval-r with no value to skip the evaluation)")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model is None:
        model = load_student(config)
    teacher = None
    if config.distill:
        _check_trainable(model)
        # Before patching: the default teacher is the unmodified model.
        teacher = build_teacher(config, model).to(device)
        config = _with_teacher_fingerprint(config, teacher)
    model = build_model(config, model).to(device)
    # What the run reads, and so what its checkpoints and results.json record.
    config = _with_used_settings(config, model)
    groups = _set_train_mode(model, config)
    # a --limit subset is spread over the folder so that it covers every class
    dataset = training_set(model, root, config.limit, config.labels_needed, progress=is_main and config.progress)
    if config.labels_needed or _labeled(dataset):
        _check_classes(model, root, len(_class_names(dataset)), "training data (--data)")
    if eval_root is not None:
        eval_classes = folder_classes(inputs_for(model), eval_root, "--eval-data")[0]
        _check_classes(model, eval_root, len(eval_classes), "evaluation data (--eval-data)")
    data = SeededAugment(dataset, config.seed)

    per_epoch = (len(dataset) // world) // config.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} training examples are fewer than one batch of {config.batch_size} per "
            f"process ({world} processes): lower --batch-size"
        )
    total = config.max_steps or max(1, round(config.epochs * per_epoch))

    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total))
    ckpt = out / CHECKPOINT_NAME
    log = out / LOG_NAME
    step = 0
    if resume and ckpt.is_file():
        step = load_checkpoint(ckpt, model, optimizer, scheduler, config)
        if is_main:
            print(f"resumed from {ckpt} at step {step}/{total}", flush=True)
    if is_main:
        if overwrite:
            _remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _trim_log(log, step)
    saved_step = step if ckpt.is_file() else None

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        schedule = adapter_for(model).schedule()
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not all(schedule),  # a block with r=0 leaves its module unused
        )

    bar = tqdm(total=total, initial=step, desc=f"train {config.method}/{config.mode}", disable=not (is_main and config.progress))
    started = time.time()
    while step < total:
        epoch, start_batch = divmod(step, per_epoch)
        indices = epoch_indices(len(dataset), config.seed, epoch, rank, world)[: per_epoch * config.batch_size]
        loader = torch.utils.data.DataLoader(
            data, batch_size=config.batch_size, sampler=_StepSampler(epoch, indices, start_batch * config.batch_size),
            num_workers=config.num_workers, drop_last=True,
            # Its own seed source: each iter() of a loader without one draws a seed from the
            # global RNG, and a resumed run builds one more iterator than the run it replays,
            # which would shift every later dropout and drop-path mask.
            generator=torch.Generator().manual_seed(_loader_seed(config.seed, epoch)),
        )
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            # Seeded by the step (and rank), so a resumed run mixes its batches as the first did.
            images, mix = mix_batch(images, numpy.random.default_rng([config.seed, step, rank]),
                                    config.mixup, config.cutmix)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = logits_of(train_model(images)).float()
                targets = None if teacher is None else teacher_logits(teacher, images)
            loss = training_loss(logits, labels, targets, config.distill_weight, config.distill_temperature, mix)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                # Stop before the optimizer step: nothing non-finite reaches the weights or a file.
                raise TrainingDivergedError(_diverged_message(loss_value, step + 1, scheduler, ckpt, saved_step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if is_main:
                append_jsonl(log, {"step": step, "epoch": epoch, "loss": loss_value,
                                   "lr": scheduler.get_last_lr()[0], "time": time.time() - started})
            if is_main and (step % config.checkpoint_every == 0 or step == total):
                save_checkpoint(ckpt, model, optimizer, scheduler, step, config)
                saved_step = step
            if on_step is not None:
                on_step(step)
            if step >= total:
                break
    bar.close()
    wall = time.time() - started
    summary = {"steps": total, "train_seconds": wall, "world_size": world, "config": dataclasses.asdict(config)}
    if is_main:
        summary.update(_finish(model, config, out))
        atomic_write_json(out / RESULTS_NAME, summary, indent=2, default=str)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return summary


def _with_teacher_fingerprint(config: TrainConfig, teacher: nn.Module) -> TrainConfig:
    """``config`` with the teacher's weights fingerprint (refusing a pinned one that differs)."""
    from .evaluation.sweep import weights_fingerprint

    found = weights_fingerprint(teacher)
    if config.teacher_fingerprint not in (None, found):
        raise ValueError(
            f"the teacher's weights have fingerprint {found}, not the expected {config.teacher_fingerprint}: "
            "this is another teacher than the run was configured with"
        )
    return dataclasses.replace(config, teacher_fingerprint=found)


def _diverged_message(loss: float, step: int, scheduler, ckpt: Path, saved_step: Optional[int]) -> str:
    kept = (f"{ckpt} keeps the last good state (step {saved_step})" if saved_step is not None
            else "no checkpoint had been written yet")
    return (f"the training loss became {loss} at step {step} (lr {scheduler.get_last_lr()[0]:.3g}): the run "
            f"diverged and was stopped before the update; {kept}. Lower --lr (and --backbone-lr) and "
            "start again with --overwrite")


def _finish(model: nn.Module, config: TrainConfig, out: Path) -> dict:
    """Save the trained weights and evaluate at the requested ``r`` values."""
    import tokenmerge

    from .core.schedule import format_schedule
    from .evaluation.accuracy import evaluate_accuracy
    from .evaluation.inputs import inputs_for

    from .io import save_safetensors

    model.eval()
    files = {}
    if config.method == "dtem":
        files["merge_modules"] = str(tokenmerge.save_merge_modules(model, out / MODULES_NAME))
    adapter = adapter_for(model)
    if config.mode != "modular" and adapter.family == "transformers":
        files["model"] = str(_save_hf_model(model, out / HF_MODEL_NAME))
    elif config.mode != "modular":
        # Without the merge policy, as for Hugging Face: the file loads into the unpatched
        # architecture (load_model(checkpoint=...)); DTEM's modules are in their own file.
        prefix = _reducer_prefix(model)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefix)}
        files["model"] = str(save_safetensors(state, out / MODEL_NAME, what="the trained model"))
    results = {"files": files, "accuracy": {}}
    eval_root = _eval_root(config)
    if eval_root is None:
        return results
    inputs = inputs_for(model)  # the modality's evaluation loader: no augmentation
    images, labels, classes = inputs.load(eval_root, limit=config.eval_limit)
    reducer = adapter.reducer
    device = next(model.parameters()).device
    for r in config.eval_r:
        # The same reducer (trained modules) at every r.
        tokenmerge.patch(model, method=reducer, r=r, **split_common_options(config.method_options)[0])
        acc = evaluate_accuracy(model, images, labels, num_classes=len(classes), device=device)
        label = format_schedule(r)
        results["accuracy"][label] = acc
        print(f"eval {config.method} r={label}: top-1 {acc:.2f}% on {len(labels)} {inputs.noun}", flush=True)
    return results


def _save_hf_model(model: nn.Module, folder: Path) -> Path:
    """``save_pretrained`` a trained Hugging Face model into ``folder``, without its merge
    policy, so that ``tokenmerge eval hf:FOLDER`` (or ``from_pretrained``) loads the unpatched
    classifier with the trained weights; patch it again to merge (DTEM: with the saved modules).

    Written into a temporary folder beside it and renamed: a kill mid-save leaves the
    previous folder or none, never a torn one. Non-finite weights are refused.
    """
    import shutil
    import tempfile

    from .io import _UMASK, check_finite

    prefix = _reducer_prefix(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefix)}
    check_finite(state, f"refusing to write the trained model {str(folder)!r}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        # mkdtemp makes the folder private (0700); give it the permissions a plain mkdir would.
        os.chmod(temporary, 0o777 & ~_UMASK)
        # The patched classes keep their base's __name__, so config.architectures names the
        # unpatched class and the folder loads without tokenmerge.
        model.save_pretrained(temporary, state_dict=state)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder
