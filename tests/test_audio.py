"""Audio decoding and AST-style log-mel features, on synthetic WAV files (no espeak needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from tokenmerge.evaluation.audio import load_audio_folder, load_wav, log_mel, mel_frequencies

RATE = 16000


def tone(freq: float, seconds: float = 1.0, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_wav_round_trips(tmp_path):
    audio = tone(440.0)
    path = tmp_path / "a.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    waveform, rate = load_wav(path, sample_rate=RATE)
    assert rate == RATE and waveform.dtype == torch.float32 and waveform.shape == (RATE,)
    assert torch.equal(waveform, torch.from_numpy(audio))


def test_16bit_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(440.0), tone(440.0, amplitude=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), RATE, subtype="PCM_16")
    waveform, _ = load_wav(path)
    assert waveform.shape == (RATE,)
    assert torch.allclose(waveform, torch.from_numpy((left + right) / 2), atol=2 / 32768)


def test_corrupt_wav_names_the_file(tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk-that-is-not-audio")
    with pytest.raises(ValueError, match=r"broken\.wav is not a readable audio file"):
        load_wav(path)


def test_missing_file_and_wrong_rate_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        load_wav(tmp_path / "nothere.wav")
    path = tmp_path / "fast.wav"
    sf.write(path, tone(440.0, rate=22050), 22050)
    with pytest.raises(ValueError, match=r"fast\.wav is sampled at 22050 Hz but 16000 Hz is expected; resample"):
        load_wav(path, sample_rate=RATE)
    assert load_wav(path)[1] == 22050


def test_log_mel_shape_and_padding():
    waveform = torch.from_numpy(tone(440.0))
    features = log_mel(waveform, RATE, num_mel_bins=64)
    assert features.shape == (1 + (RATE - 400) // 160, 64) == (98, 64)  # 25 ms frames every 10 ms
    padded = log_mel(waveform, RATE, num_mel_bins=64, num_frames=100)
    assert padded.shape == (100, 64)
    assert torch.equal(padded[:98], features) and torch.all(padded[98:] == 0)
    assert log_mel(waveform, RATE, num_frames=50).shape == (50, 64)


def test_log_mel_normalises_like_ast():
    waveform = torch.from_numpy(tone(440.0))
    raw = log_mel(waveform, RATE)
    assert torch.allclose(log_mel(waveform, RATE, mean=-3.0, std=2.0), (raw + 3.0) / 4.0)
    with pytest.raises(ValueError, match="both mean and std"):
        log_mel(waveform, RATE, mean=1.0)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    features = log_mel(torch.from_numpy(tone(freq)), RATE, num_mel_bins=64)
    centres = mel_frequencies(64, 20.0, RATE / 2)
    expected = int(torch.argmin((centres - freq).abs()))
    peaks = features.argmax(dim=1)
    assert torch.all((peaks - expected).abs() <= 1), (freq, expected, peaks.unique())
    # Every frame of a steady tone looks the same.
    assert features.std(dim=0).max() < 0.5


def test_folder_labels_follow_sorted_class_folders(tmp_path):
    # Created out of order: labels must follow the sorted names, not creation order.
    for name, freq in (("zeta", 3000.0), ("alpha", 500.0), ("mid", 1500.0)):
        (tmp_path / name).mkdir()
        for i in range(2):
            sf.write(tmp_path / name / f"{1 - i}.wav", tone(freq + 50 * i), RATE)
    (tmp_path / "alpha" / "notes.txt").write_text("not audio")
    features, labels, classes = load_audio_folder(tmp_path, num_mel_bins=32, num_frames=100)
    assert classes == ["alpha", "mid", "zeta"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert features.shape == (6, 100, 32) and features.dtype == torch.float32
    # Files are sorted within a class: "0.wav" (the +50 Hz tone) comes before "1.wav".
    first = log_mel(load_wav(tmp_path / "alpha" / "0.wav")[0], RATE, 32, num_frames=100)
    assert torch.equal(features[0], first)
    # Higher-pitched classes peak in higher mel bins.
    peak_bins = features[:, :98].mean(dim=1).argmax(dim=1)
    assert peak_bins[0] < peak_bins[2] < peak_bins[4]
    assert load_audio_folder(tmp_path, num_mel_bins=32, limit=3)[1].tolist() == [0, 0, 1]


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_audio_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no .wav/.flac files"):
        load_audio_folder(tmp_path)
    sf.write(tmp_path / "a" / "x.wav", tone(440.0, rate=8000), 8000)
    with pytest.raises(ValueError, match=r"x\.wav is sampled at 8000 Hz"):
        load_audio_folder(tmp_path)
