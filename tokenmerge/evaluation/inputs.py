"""What a model takes, and how a folder of files becomes it: one loader per modality.

The commands (``eval``, ``bench``) do not branch on the model: :func:`inputs_for` reads what the
model takes from its adapter (:attr:`~tokenmerge.backends.adapter.ModelAdapter.inputs`) and
returns the matching :class:`Inputs`, which loads an ImageFolder-like data folder
(``<root>/<class>/<file>``) into one preloaded tensor, makes random batches of the model's
input shape for timing and FLOP counts, and fingerprints the files for the result cache.

- images (timm, HF and open_clip image models): JPEG/PNG..., resized and centre-cropped,
  normalised as the model's adapter says (:meth:`~tokenmerge.backends.adapter.ModelAdapter.
  image_preprocessing`): ImageNet statistics for timm and Hugging Face models, open_clip's own
  ``preprocess_cfg`` (CLIP's mean and std, bicubic) and transform for open_clip models
  (:mod:`tokenmerge.evaluation.data`);
- spectrograms (AST): WAV/FLAC decoded with soundfile, Kaldi-style log-mel features
  (:mod:`tokenmerge.evaluation.audio`);
- videos (VideoMAE, ViViT): clips decoded with PyAV (:mod:`tokenmerge.evaluation.video`).

Feature and normalisation settings of audio and video models come from the model: its config
(mel bins, frames, frame size) and, for a model loaded from a folder, the folder's
``preprocessor_config.json`` as Hugging Face's feature extractor / image processor writes it
(``sampling_rate``, ``mean``, ``std`` for AST; ``image_mean``, ``image_std``,
``rescale_factor``, ``offset``, ``do_normalize``, ``size`` for VideoMAE and ViViT); without one,
the defaults of those Hugging Face classes (:data:`VIDEO_DEFAULTS`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..backends.adapter import ModelAdapter, adapter_for
from ..preprocessor_config import read_preprocessor_config

__all__ = ["Inputs", "ImageInputs", "SpectrogramInputs", "VideoInputs", "inputs_for", "files_fingerprint"]

# ASTFeatureExtractor's defaults (AudioSet statistics), used when a model folder has no
# preprocessor_config.json, as Hugging Face would.
AST_DEFAULTS = {"sampling_rate": 16000, "mean": -4.2677393, "std": 4.5689974}

# The video image processors' settings that tokenmerge reads, by the config's model_type, used
# when a model folder has no preprocessor_config.json. ViViT: VivitImageProcessor's defaults
# (transformers 5.x): x / 127.5 - 1 (the offset), then (x - 0.5) / 0.5 (do_normalize), so
# pixels lie in [-3, 1]; shorter side 256, crop 224. VideoMAE: ImageNet statistics, what the
# MCG-NJU checkpoints ship (VideoMAEImageProcessor's own default is 0.5 / 0.5); shorter side =
# crop. A model of another frame size keeps the processor's ratio of resize to crop.
VIDEO_DEFAULTS = {
    "videomae": {"do_rescale": True, "rescale_factor": 1 / 255, "offset": False, "do_normalize": True,
                 "image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225),
                 "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}},
    "vivit": {"do_rescale": True, "rescale_factor": 1 / 127.5, "offset": True, "do_normalize": True,
              "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5),
              "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}},
}


def files_fingerprint(root, files) -> str:
    """SHA-256 of the (relative path, byte size, label) of every file used, in order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path, label in files:
        path = Path(path)
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}:{label}\n".encode())
    return digest.hexdigest()[:16]


class Inputs:
    """The input modality of one model: data loading, example batches, cache identity."""

    kind = ""  # the adapter's ``inputs``
    noun = "items"  # what one example is called in messages
    extensions = ""  # the files a data folder holds, for messages
    file_noun = ""  # what one such file is, for messages

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model)

    @property
    def shape(self) -> tuple:
        """The shape of one example (no batch dimension)."""
        raise NotImplementedError

    def default_data(self) -> Path:
        """The data folder used when none is given."""
        raise ValueError(
            f"{self.adapter.architecture_name()} takes {self.kind}: pass --data, a folder with one "
            f"sub-folder per class holding {self.extensions} files"
        )

    def load(self, root, limit: Optional[int] = None, progress: bool = False) -> tuple:
        """``(inputs [N, *shape] float32, labels [N] int64, classes)`` of a data folder in sorted
        (class, file) order; ``limit`` keeps the first ``limit`` files."""
        raise NotImplementedError

    def fingerprint(self, root, limit: Optional[int] = None) -> str:
        """Identifies the files :meth:`load` reads (names, sizes, labels), for the result cache."""
        raise NotImplementedError

    def class_files(self, root) -> tuple:
        """``(classes, [(file, label)])`` of a data folder: the sorted class sub-folders, and
        the files of this modality in sorted (class, file) order (what :meth:`load` reads).
        A missing folder, one without class sub-folders or without such files raises."""
        raise NotImplementedError

    def load_file(self, path) -> torch.Tensor:
        """One file -> one model input ``[*shape]``, prepared as :meth:`load` prepares a folder's."""
        raise NotImplementedError

    def check_file(self, path) -> Path:
        """``path`` as a ``Path``; a clear error when it is missing, a folder, or plainly a file
        of another modality (by its extension) than the model takes."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder: pass one {self.extensions} file, not a folder")
        if not path.is_file():
            raise FileNotFoundError(f"file {str(path)!r} does not exist")
        for kind, suffixes in _file_kinds().items():
            if kind != self.kind and path.suffix.lower() in suffixes:
                raise ValueError(
                    f"{path.name} is {_KINDS[kind].file_noun} but {self.adapter.architecture_name()} "
                    f"takes {self.kind}: pass {'an' if self.extensions[0] in 'aeiou' else 'a'} {self.extensions} file"
                )
        return path

    def example(self, batch_size: int = 1, device="cpu") -> torch.Tensor:
        """A random batch of the model's input shape, for timing and FLOP counts (neither
        depends on the values)."""
        return torch.randn(batch_size, *self.shape, device=device)

    def describe(self) -> str:
        return f"{self.kind} {'x'.join(str(n) for n in self.shape)}"

    def cache_context(self) -> dict:
        """What about the inputs determines a result row, for the result cache's key."""
        return {"inputs": self.describe(), **self._settings()}

    def _settings(self) -> dict:
        return {}


class ImageInputs(Inputs):
    kind, noun, extensions = "images", "images", "image (JPEG, PNG...)"
    file_noun = "an image"

    @property
    def image_size(self) -> int:
        return self.adapter.image_size

    @property
    def shape(self) -> tuple:
        return (3, self.image_size, self.image_size)

    def preprocessing(self) -> dict:
        """The model's image preprocessing settings (its adapter's
        :meth:`~tokenmerge.backends.adapter.ModelAdapter.image_preprocessing`)."""
        return self.adapter.image_preprocessing()

    def _normalisation(self) -> tuple:
        """``(mean, std)`` per channel on [0, 1] pixels."""
        settings = self.preprocessing()
        return settings["mean"], settings["std"]

    def cache_context(self) -> dict:
        context = {"image_size": self.image_size}  # the key of earlier versions: their caches stay valid
        settings = self.preprocessing()
        if settings != ModelAdapter.image_preprocessing(self.adapter):  # open_clip: its own statistics
            context["preprocessing"] = settings
        return context

    def default_data(self) -> Path:
        from .data import EMBEDDED_SUBSET

        return EMBEDDED_SUBSET

    def load(self, root, limit=None, progress=False):
        from .data import load_images

        return load_images(root, image_size=self.image_size, limit=limit, progress=progress,
                           transform=self.adapter.image_transform())

    def fingerprint(self, root, limit=None):
        from .sweep import dataset_fingerprint

        return dataset_fingerprint(root, limit)

    def class_files(self, root):
        from .data import image_folder

        dataset = image_folder(root, transform=lambda image: image)
        return list(dataset.classes), [(Path(path), label) for path, label in dataset.samples]

    def load_file(self, path):
        from .visualize import load_display_image

        mean, std = self._normalisation()
        return load_display_image(self.check_file(path), self.image_size, transform=self.adapter.image_transform(),
                                  mean=mean, std=std)[1]


class SpectrogramInputs(Inputs):
    """AST: ``input_values [B, max_length frames, num_mel_bins]``."""

    kind, noun, extensions = "spectrograms", "clips", "WAV/FLAC"
    file_noun = "an audio file"

    @property
    def _features(self) -> dict:
        config = self.adapter.trunk.config
        saved = read_preprocessor_config(self.model)
        settings = {key: saved.get(key, default) for key, default in AST_DEFAULTS.items()}
        # The config fixes the model's input shape; a feature extractor file disagreeing with it
        # would produce inputs the model cannot take.
        for key in ("num_mel_bins", "max_length"):
            if key in saved and saved[key] != getattr(config, key):
                raise ValueError(
                    f"preprocessor_config.json says {key}={saved[key]} but the model's config.json "
                    f"says {getattr(config, key)}; make them agree"
                )
        return dict(settings, num_mel_bins=int(config.num_mel_bins), num_frames=int(config.max_length))

    @property
    def shape(self) -> tuple:
        features = self._features
        return (features["num_frames"], features["num_mel_bins"])

    def _settings(self) -> dict:
        return self._features

    def class_files(self, root):
        from .audio import class_files

        return class_files(Path(root))

    def load(self, root, limit=None, progress=False):
        from .audio import load_audio_folder

        f = self._features
        return load_audio_folder(root, int(f["sampling_rate"]), f["num_mel_bins"], f["num_frames"],
                                 mean=float(f["mean"]), std=float(f["std"]), limit=limit)

    def fingerprint(self, root, limit=None):
        files = self.class_files(root)[1]
        return files_fingerprint(root, files[:limit] if limit is not None else files)

    def load_file(self, path):
        from .audio import load_wav, log_mel

        f = self._features
        rate = int(f["sampling_rate"])
        return log_mel(load_wav(self.check_file(path), rate)[0], rate, f["num_mel_bins"], num_frames=f["num_frames"],
                       mean=float(f["mean"]), std=float(f["std"]))


class VideoInputs(Inputs):
    """VideoMAE and ViViT: ``pixel_values [B, num_frames, 3, image_size, image_size]``.

    Frame count and size come from the model's config; resizing and pixel statistics from
    its image processor's settings (:meth:`processor`).
    """

    kind, noun, extensions = "videos", "clips", "video (MP4, MKV, AVI, MOV, WebM)"
    file_noun = "a video"

    @property
    def shape(self) -> tuple:
        config = self.adapter.trunk.config
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return (int(config.num_frames), 3, int(size), int(size))

    def processor(self) -> dict:
        """The image processor's settings: the model folder's ``preprocessor_config.json`` over
        the defaults of the model's processor class (:data:`VIDEO_DEFAULTS`)."""
        defaults = VIDEO_DEFAULTS.get(self.adapter.architecture_name(), VIDEO_DEFAULTS["videomae"])
        saved = read_preprocessor_config(self.model)
        settings = {key: saved.get(key, default) for key, default in defaults.items()}
        crop = _edge(saved["crop_size"], "crop_size") if "crop_size" in saved else None
        size = self.shape[-1]
        # The config fixes the frame size the position embeddings were made for.
        if crop is not None and crop != size:
            raise ValueError(
                f"preprocessor_config.json says crop_size={saved['crop_size']} but the model's config.json "
                f"says image_size={size}; make them agree"
            )
        if "size" in saved:
            settings["resize"] = _edge(saved["size"], "size")
        else:  # the processor's own ratio of resize to crop, at the model's frame size
            settings["resize"] = round(size * defaults["size"]["shortest_edge"] / defaults["crop_size"]["height"])
        return settings

    def _normalisation(self) -> tuple:
        """``(mean, std)`` per channel on [0, 1] pixels, doing what the processor's rescale and
        normalise do (:func:`~tokenmerge.evaluation.video.pixel_statistics`)."""
        settings = self._settings()
        return settings["mean"], settings["std"]

    def _settings(self) -> dict:
        """Mean, std and resize edge, from one read of the processor's settings."""
        from .video import pixel_statistics

        settings = self.processor()
        mean, std = pixel_statistics(settings)
        return {"mean": list(mean), "std": list(std), "resize": settings["resize"]}

    def load(self, root, limit=None, progress=False):
        from .video import load_video_folder

        frames, _, size, _ = self.shape
        settings = self._settings()
        return load_video_folder(root, frames, size, mean=settings["mean"], std=settings["std"],
                                 resize=settings["resize"], limit=limit, progress=progress)

    def fingerprint(self, root, limit=None):
        files = self.class_files(root)[1]
        return files_fingerprint(root, files[:limit] if limit is not None else files)

    def class_files(self, root):
        from .audio import class_files
        from .video import VIDEO_EXTENSIONS

        return class_files(Path(root), VIDEO_EXTENSIONS)

    def load_file(self, path):
        from .video import prepare_clip, read_video

        path = self.check_file(path)
        frames, _, size, _ = self.shape
        settings = self._settings()
        return prepare_clip(read_video(path), frames, size, settings["mean"], settings["std"],
                            resize=settings["resize"], where=str(path))


def _edge(value, key: str) -> int:
    """The shorter side a processor's ``size``/``crop_size`` setting asks for: ``N``,
    ``{"shortest_edge": N}`` or a square ``{"height": N, "width": N}``."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(
        f"preprocessor_config.json: {key}={value} is not a size tokenmerge reads (frames are resized on "
        f'the shorter side and centre-cropped to a square): give {{"shortest_edge": N}} or a square '
        f'{{"height": N, "width": N}}'
    )


_KINDS = {cls.kind: cls for cls in (ImageInputs, SpectrogramInputs, VideoInputs)}


def _file_kinds() -> dict:
    """The file extensions that plainly belong to each modality, to name a wrong file early
    (anything else goes to the decoder, whose error names the file)."""
    from .audio import AUDIO_EXTENSIONS
    from .video import VIDEO_EXTENSIONS

    images = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    return {"images": images, "spectrograms": AUDIO_EXTENSIONS, "videos": VIDEO_EXTENSIONS}


def inputs_for(model: nn.Module) -> Inputs:
    """The :class:`Inputs` of what ``model`` takes (from its adapter)."""
    kind = adapter_for(model).inputs
    if kind not in _KINDS:
        raise TypeError(f"{type(model).__name__} takes {kind}, which no tokenmerge data loader reads")
    return _KINDS[kind](model)
