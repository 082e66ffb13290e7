"""Audio inputs for Audio Spectrogram Transformers: WAV decoding and AST-style log-mel features.

Decoding uses ``soundfile`` (the optional ``audio`` extra: ``pip install tokenmerge[audio]``),
not torchaudio, whose wheels must match the installed torch version exactly. The log-mel
filterbank is written with torch ops and follows Kaldi's ``fbank`` as AST uses it: 25 ms
Hann frames every 10 ms, DC removal, pre-emphasis 0.97, power spectrum, triangular filters
on the mel scale ``1127 ln(1 + f / 700)``, natural log; then zero-padding/cropping to a fixed
frame count and AST's normalisation ``(x - mean) / (2 * std)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["AUDIO_EXTENSIONS", "load_wav", "mel_frequencies", "mel_filterbank", "log_mel", "class_files", "load_audio_folder"]

AUDIO_EXTENSIONS = (".wav", ".flac")


def _soundfile():
    try:
        import soundfile
    except ImportError:  # an optional extra: say how to get it
        raise ImportError("decoding audio needs soundfile: pip install 'tokenmerge[audio]' (or pip install soundfile)") from None
    return soundfile


def load_wav(path, sample_rate: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Decode an audio file -> (waveform [T] float32 in [-1, 1], sample rate in Hz).

    Multi-channel files are averaged to mono. With ``sample_rate`` given, a file at another
    rate raises (resampling silently would change what the model hears). Corrupt or
    unreadable files raise ``ValueError`` naming the file.
    """
    sf = _soundfile()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {str(path)!r} does not exist")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # [T, channels]
    except (RuntimeError, OSError, ValueError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"{path} is not a readable audio file ({err}); re-create it or remove it from the dataset folder") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path} holds no audio samples; re-create it or remove it from the dataset folder")
    if sample_rate is not None and rate != sample_rate:
        raise ValueError(
            f"{path} is sampled at {rate} Hz but {sample_rate} Hz is expected; resample it first "
            f"(e.g. sox {path.name} -r {sample_rate} out.wav) or pass sample_rate={rate}"
        )
    return torch.from_numpy(data).mean(dim=1), int(rate)


def _hz_to_mel(hz):
    return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * torch.expm1(torch.as_tensor(mel, dtype=torch.float64) / 1127.0)


def mel_frequencies(num_mel_bins: int, low_freq: float, high_freq: float) -> torch.Tensor:
    """Centre frequency in Hz of each triangular mel filter -> [num_mel_bins] float64."""
    edges = torch.linspace(float(_hz_to_mel(low_freq)), float(_hz_to_mel(high_freq)), num_mel_bins + 2, dtype=torch.float64)
    return _mel_to_hz(edges[1:-1])


def mel_filterbank(num_mel_bins: int, n_fft: int, sample_rate: int, low_freq: float, high_freq: float) -> torch.Tensor:
    """Triangular filters, equally spaced on the mel scale -> [n_fft // 2 + 1, num_mel_bins] float32.

    Filter ``m`` rises linearly (in mel) from centre ``m - 1`` to centre ``m`` and falls to
    centre ``m + 1``; the band edges are ``low_freq`` and ``high_freq``.
    """
    if not 0 <= low_freq < high_freq <= sample_rate / 2:
        raise ValueError(f"need 0 <= low_freq < high_freq <= sample_rate / 2, got {low_freq}, {high_freq}, {sample_rate}")
    edges = torch.linspace(float(_hz_to_mel(low_freq)), float(_hz_to_mel(high_freq)), num_mel_bins + 2, dtype=torch.float64)
    bins = _hz_to_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)[:, None]
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins - left) / (centre - left)
    falling = (right - bins) / (right - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 64,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: Optional[float] = None,
    num_frames: Optional[int] = None,
    mean: Optional[float] = None,
    std: Optional[float] = None,
) -> torch.Tensor:
    """Kaldi-style log-mel filterbank of a mono waveform [T] -> [frames, num_mel_bins] float32.

    ``frames = 1 + (T - window) // shift`` (Kaldi's ``snip_edges``): 98 for 1 s at 16 kHz.
    With ``num_frames``, the result is zero-padded or cropped at the end to that many frames,
    as AST's feature extractor does before normalising. With ``mean`` and ``std`` (statistics
    of the training features), returns ``(x - mean) / (2 * std)`` like AST.
    """
    if waveform.dim() != 1:
        raise ValueError(f"expected a mono waveform [T], got shape {tuple(waveform.shape)}; average the channels first")
    window = int(round(sample_rate * frame_length_ms / 1000))
    shift = int(round(sample_rate * frame_shift_ms / 1000))
    if waveform.numel() < window:
        raise ValueError(f"waveform has {waveform.numel()} samples, fewer than one {frame_length_ms} ms frame ({window})")
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std (to normalise) or neither")
    n_fft = 1 << (window - 1).bit_length()  # Kaldi rounds the FFT size up to a power of two
    frames = waveform.float().unfold(0, window, shift)  # [frames, window]
    frames = frames - frames.mean(dim=1, keepdim=True)
    # Pre-emphasis boosts high frequencies; the first sample is its own predecessor, as in Kaldi.
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(window, periodic=False, dtype=frames.dtype)
    power = torch.fft.rfft(frames, n=n_fft).abs() ** 2  # [frames, n_fft // 2 + 1]
    bank = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq or sample_rate / 2)
    features = torch.log(torch.clamp(power @ bank, min=torch.finfo(torch.float32).eps))
    if num_frames is not None:
        features = features[:num_frames]
        features = torch.nn.functional.pad(features, (0, 0, 0, num_frames - features.shape[0]))
    if mean is not None:
        features = (features - mean) / (2 * std)
    return features


def class_files(root: Path, extensions=AUDIO_EXTENSIONS) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(classes, [(file, label)])`` of an ImageFolder-like ``<root>/<class>/<file>``: the sorted
    sub-folder names, and the files with one of ``extensions`` in sorted (class, name) order."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} is a file: pass the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"dataset folder {str(root)!r} has no class sub-folders (expected <root>/<class>/<file>, e.g. {extensions[0]} files)")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in extensions
    ]
    if not files:
        raise ValueError(f"dataset folder {str(root)!r} has class sub-folders but no {'/'.join(extensions)} files")
    return classes, files


def load_audio_folder(
    root,
    sample_rate: int = 16000,
    num_mel_bins: int = 64,
    num_frames: int = 100,
    mean: Optional[float] = None,
    std: Optional[float] = None,
    limit: Optional[int] = None,
    **mel_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Log-mel features of every audio file in an ImageFolder-like ``<root>/<class>/<file>.wav``.

    Returns (features [N, num_frames, num_mel_bins] float32, labels [N] int64, classes):
    classes are the sorted sub-folder names, label ``i`` is ``classes[i]``, and files come in
    sorted (class, file name) order; ``limit`` keeps the first ``limit`` of them. Every file
    must be at ``sample_rate``. ``mean``/``std`` normalise as in :func:`log_mel`.
    """
    classes, files = class_files(Path(root))
    files = files[:limit] if limit is not None else files
    features = torch.stack([
        log_mel(load_wav(path, sample_rate)[0], sample_rate, num_mel_bins, num_frames=num_frames,
                mean=mean, std=std, **mel_kwargs)
        for path, _ in files
    ])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return features, labels, classes
