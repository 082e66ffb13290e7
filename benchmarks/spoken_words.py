"""Build a small, real, offline spoken-digit set with espeak-ng (issue 12, item 3).

No audio data set can be downloaded here, so we synthesise one: the ten English words
"zero".."nine" spoken by 20 espeak-ng voices (an accent or language + a voice variant),
at 5 speeds and 3 pitches, resampled to 16 kHz mono, placed at a seeded offset in a 1.0 s
window, with seeded background noise (white, pink or brown) at 30/20/10/5 dB SNR.
20 voices x 10 words x 5 speeds x 3 pitches = 3,000 clips, written as 16-bit WAV files in
an ImageFolder-like layout::

    <root>/{train,val}/<word>/<voice>_s<speed>_p<pitch>.wav
    <root>/manifest.csv          one row per clip: split, word, voice, speed, pitch, noise, snr

The split is by voice: the 4 val voices use an accent/language *and* a voice variant that
no train voice uses, so val accuracy measures words spoken by unseen voices (2,400 train /
600 val clips). Non-English voices (de, sv, da, it, es, fr, pl, hi, nl) read the English
words with their own letter-to-sound rules, which gives accented speech.

Deterministic: sorted loops, a fixed seed hashed with each clip's name (so one clip's noise
does not depend on which others exist), and reruns skip files that already exist.
Needs the ``espeak-ng`` Debian package (``apt-get install espeak-ng``) and ``soundfile``
(``pip install tokenmerge[audio]``).

    python benchmarks/spoken_words.py                      # -> .data/spoken_words (git-ignored)
    python benchmarks/spoken_words.py --root /tmp/words
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (espeak-ng language, voice variant from espeak-ng-data/voices/!v). The mbrola voices that
# `espeak-ng --voices=en` lists need the separate mbrola program, so they are left out.
TRAIN_VOICES = (
    ("en-us", "m1"), ("en-us", "f3"), ("en-gb", "f1"), ("en-gb", "m4"),
    ("en-gb-scotland", "m2"), ("en-gb-x-rp", "f2"), ("en-gb-x-gbclan", "m3"),
    ("en-gb-x-rp", "klatt"), ("de", "f4"), ("sv", "m5"), ("da", "m6"), ("it", "f1"),
    ("es", "m2"), ("fr", "klatt2"), ("pl", "f2"), ("hi", "m3"),
)
# Neither the accent nor the variant of a val voice occurs in TRAIN_VOICES.
VAL_VOICES = (("en-gb-x-gbcwmd", "f5"), ("en-us-nyc", "m7"), ("en-029", "m8"), ("nl", "klatt3"))
SPEEDS = (130, 160, 190, 220, 250)  # words per minute (espeak-ng -s)
PITCHES = (30, 50, 70)  # 0..99 (espeak-ng -p)
SNRS_DB = (30, 20, 10, 5)
NOISES = ("white", "pink", "brown")
SAMPLE_RATE = 16000
DURATION_S = 1.0
SEED = 0


def voice_name(language: str, variant: str) -> str:
    """A file-name-safe voice id, e.g. ``en-gb-x-rp+klatt`` -> ``en-gb-x-rp_klatt``."""
    return f"{language}_{variant}"


def resample(x: np.ndarray, rate_in: int, rate_out: int, half_taps: int = 32) -> np.ndarray:
    """Band-limited resampling of ``x`` [T] with a Hann-windowed sinc -> [round(T * out / in)].

    Written here because neither scipy nor torchaudio is a dependency; the cutoff sits at
    95% of the lower Nyquist frequency so that downsampling does not alias.
    """
    ratio = rate_out / rate_in
    cutoff = 0.95 * min(1.0, ratio)  # as a fraction of the input Nyquist frequency
    n_out = int(round(len(x) * ratio))
    t = np.arange(n_out) / ratio  # output sample positions, in input samples
    offsets = np.arange(-half_taps + 1, half_taps + 1)
    idx = np.floor(t).astype(np.int64)[:, None] + offsets  # [n_out, 2 * half_taps]
    d = t[:, None] - idx
    window = 0.5 + 0.5 * np.cos(np.pi * np.clip(d / half_taps, -1.0, 1.0))
    kernel = cutoff * np.sinc(cutoff * d) * window
    padded = np.concatenate([x, np.zeros(1, x.dtype)])
    taken = padded[np.where((idx >= 0) & (idx < len(x)), idx, len(x))]  # out of range -> 0
    return (taken * kernel).sum(axis=1).astype(np.float32)


def trim_silence(x: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Drop leading/trailing samples below ``threshold`` x the peak: espeak pads with silence."""
    loud = np.flatnonzero(np.abs(x) > threshold * np.abs(x).max())
    return x[loud[0]: loud[-1] + 1] if len(loud) else x


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise [n]: white (flat), pink (1/f power) or brown (1/f^2 power)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[color]
    noise = np.fft.irfft(spectrum / f**exponent, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def place_and_mix(speech: np.ndarray, length: int, snr_db: float, color: str,
                  rng: np.random.Generator) -> np.ndarray:
    """Speech [T] at a random offset in a ``length``-sample window (centre-cropped when longer),
    plus noise at ``snr_db`` relative to the speech's RMS, peak-scaled to 0.3..0.9 -> [length]."""
    if len(speech) > length:
        start = (len(speech) - length) // 2
        speech = speech[start: start + length]
    out = np.zeros(length, np.float64)
    offset = int(rng.integers(0, length - len(speech) + 1))
    out[offset: offset + len(speech)] = speech
    speech_rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2))
    out += colored_noise(length, color, rng) * speech_rms * 10 ** (-snr_db / 20)
    return (out / np.abs(out).max() * rng.uniform(0.3, 0.9)).astype(np.float32)


def synthesise(word: str, language: str, variant: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng's rendering of ``word`` -> float32 [T] at 16 kHz, silence trimmed."""
    import soundfile as sf

    wav = tmp / "espeak.wav"
    subprocess.run(
        ["espeak-ng", "-v", f"{language}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", str(wav), word],
        check=True, capture_output=True,
    )
    data, rate = sf.read(wav, dtype="float32", always_2d=True)
    return trim_silence(resample(data.mean(axis=1), rate, SAMPLE_RATE))


def clip_plan():
    """Every clip as a dict, in a fixed (split, voice, word, speed, pitch) order."""
    for split, voices in (("train", TRAIN_VOICES), ("val", VAL_VOICES)):
        for language, variant in voices:
            for word in WORDS:
                for speed in SPEEDS:
                    for pitch in PITCHES:
                        name = f"{voice_name(language, variant)}_s{speed}_p{pitch}"
                        # crc32, not hash(): Python salts str hashes per process.
                        seed = zlib.crc32(f"{SEED}/{word}/{name}".encode())
                        rng = np.random.default_rng(seed)
                        yield {
                            "split": split, "word": word, "voice": voice_name(language, variant),
                            "language": language, "variant": variant, "speed": speed, "pitch": pitch,
                            "noise": NOISES[int(rng.integers(len(NOISES)))],
                            "snr_db": SNRS_DB[int(rng.integers(len(SNRS_DB)))],
                            "seed": seed, "path": f"{split}/{word}/{name}.wav",
                        }


def build(root: Path, verbose: bool = True) -> dict:
    """Write every missing clip of :func:`clip_plan` under ``root`` and the manifest.

    Returns counts per split. Existing files are kept (reruns are cheap); delete ``root``
    to rebuild.
    """
    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng")
    root.mkdir(parents=True, exist_ok=True)
    plan = list(clip_plan())
    counts = {"train": 0, "val": 0}
    written = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, clip in enumerate(plan):
            counts[clip["split"]] += 1
            path = root / clip["path"]
            if path.exists():
                continue
            speech = synthesise(clip["word"], clip["language"], clip["variant"], clip["speed"], clip["pitch"], Path(tmp))
            # The noise/offset draws continue the stream that picked noise colour and SNR.
            rng = np.random.default_rng(clip["seed"])
            rng.integers(len(NOISES)), rng.integers(len(SNRS_DB))
            audio = place_and_mix(speech, int(SAMPLE_RATE * DURATION_S), clip["snr_db"], clip["noise"], rng)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part.wav")  # an interrupted run leaves no truncated clip
            sf.write(partial, audio, SAMPLE_RATE, subtype="PCM_16")
            partial.rename(path)
            written += 1
            if verbose and written % 250 == 0:
                print(f"{i + 1}/{len(plan)} clips ({time.perf_counter() - start:.0f} s)", flush=True)
    fields = ["path", "split", "word", "voice", "language", "variant", "speed", "pitch", "noise", "snr_db", "seed"]
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(plan)
    if verbose:
        print(f"{root}: {counts['train']} train + {counts['val']} val clips "
              f"({written} written now, {time.perf_counter() - start:.0f} s)")
    return counts


def main(argv=None) -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=repo / ".data" / "spoken_words",
                        help="output folder (default: .data/spoken_words, git-ignored)")
    args = parser.parse_args(argv)
    build(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
