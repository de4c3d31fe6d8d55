"""The built-in task `audio`: a site's folder of WAV files, one subfolder per class, classified
from log-mel spectrograms by a small CNN.

torchaudio has no release for the pinned torch, so the features are computed with torch itself:
a short-time Fourier transform (`torch.stft`), a mel filterbank, the log, and each clip
normalised to zero mean and unit variance (no statistics shared between sites).

Run config (`audio.*`; the class folders' names in `classes`, in the order the model numbers them):
- `audio.data-dir`: in simulation, one folder split into sites by the partitioner, or one per
  site with `{partition-id}` in its path (a real site's own folder is `data-dir` in its node
  config); `audio.test-dir`: the server's test set, if it has one;
- `audio.sample-rate`, `audio.channels`: what every file must have; a file that differs stops
  the run naming it, unless `audio.resample = true` (then it is resampled, and mixed down to mono);
- `audio.seconds` (each clip cut or padded to this length), `audio.mels`.
"""

from __future__ import annotations

import functools
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcycle.config import SiteSettings
from fedcycle.errors import ConfigError
from fedcycle.tasks.records import Examples, LabelledSet, RecordError, class_names, site_examples

HOP_SECONDS, WINDOW_SECONDS = 0.010, 0.025  # 10 ms frames of 25 ms windows, as speech features usually are


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int
    channels: int
    resample: bool
    samples: int  # per clip, after cutting or padding
    mels: int


class AudioClassification:
    def __init__(self, run_config: dict[str, Any]) -> None:
        s = self.settings = SiteSettings.from_run_config(run_config)
        options = s.task_options
        rate, channels = options.get("sample-rate", 16000), options.get("channels", 1)
        seconds, mels = float(options.get("seconds", 1.0)), options.get("mels", 40)
        for key, value in (("sample-rate", rate), ("channels", channels), ("mels", mels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"audio.{key}={value!r} must be an integer of at least 1")
        if not 0 < seconds <= 60:
            raise ConfigError(f"audio.seconds={seconds} must be in (0, 60]")
        resample = options.get("resample", False)
        if not isinstance(resample, bool):
            raise ConfigError(f"audio.resample={resample!r} must be true or false")
        self.format = AudioFormat(rate, channels, resample, int(round(seconds * rate)), mels)
        self.classes = class_names(s, "class folders' names")

    def build_model(self) -> nn.Module:
        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

        return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(self.classes)))

    def site_data(self, node_config: dict[str, Any]) -> tuple[LabelledSet, LabelledSet]:
        train, val = site_examples(self.settings, node_config, "data-dir", self.read)
        return LabelledSet(train, self.classes), LabelledSet(val, self.classes)

    def test_data(self) -> LabelledSet | None:
        path = self.settings.task_options.get("test-dir", "")
        return LabelledSet(self.read(str(path), must_have_every_class=False), self.classes) if path else None

    def read(self, folder: str, must_have_every_class: bool) -> Examples:
        return read_clips(folder, tuple(self.classes), self.format, must_have_every_class)


@functools.lru_cache(maxsize=4)
def read_clips(folder: str, classes: tuple[str, ...], fmt: AudioFormat, must_have_every_class: bool) -> Examples:
    """Every `<folder>/<class>/*.wav` as a log-mel spectrogram; a site's own folder must hold
    every class."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{folder!r} is not a folder (one subfolder of WAV files per class)",
                          without_values=f"{root.name!r} is not a folder (one subfolder of WAV files per class)")
    features, labels = [], []
    filterbank = mel_filterbank(fmt.sample_rate, _window(fmt), fmt.mels)
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() == ".wav") if (root / name).is_dir() else []
        if not files and must_have_every_class:
            raise RecordError(f"{root.name}: no WAV files of class {name!r} (expected {root.name}/{name}/*.wav); "
                              f"every site's folder holds every class of {list(classes)}")
        for file in files:
            features.append(log_mel(read_wav(file, fmt), fmt, filterbank))
            labels.append(label)
    if not labels:
        raise RecordError(f"{root.name}: no WAV files in its class folders {list(classes)}")
    return Examples(np.stack(features)[:, None], np.asarray(labels, dtype=np.int64))


def read_wav(path: Path, fmt: AudioFormat) -> torch.Tensor:
    """A PCM WAV file as mono float32 samples in [-1, 1] at the run's sample rate, cut or padded."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise RecordError(f"{path.name}: not a readable PCM WAV file ({err})") from None
    if (rate != fmt.sample_rate or channels != fmt.channels) and not fmt.resample:
        raise RecordError(f"{path.name}: {rate} Hz with {channels} channel(s), but the run reads {fmt.sample_rate} Hz with "
                          f"{fmt.channels} (set audio.resample = true to convert)")
    if len(frames) == 0 or len(frames) % (width * channels):
        raise RecordError(f"{path.name}: {len(frames)} bytes of samples, not a whole number of {channels}-channel "
                          f"{8 * width}-bit frames (an empty or truncated file)")
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(frames, dtype=kind).astype(np.float32) / float(np.iinfo(kind).max)
    else:
        raise RecordError(f"{path.name}: {8 * width}-bit samples; fedcycle reads 8-, 16- and 32-bit PCM")
    audio = torch.from_numpy(samples.reshape(-1, channels).mean(1))
    if rate != fmt.sample_rate:
        audio = resample(audio, rate, fmt.sample_rate)
    audio = audio[: fmt.samples]
    return torch.nn.functional.pad(audio, (0, fmt.samples - len(audio)))


def resample(audio: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Band-limited resampling in the frequency domain (the spectrum cut or zero-padded)."""
    n = int(round(len(audio) * target / rate))
    spectrum = torch.fft.rfft(audio)
    keep = n // 2 + 1
    spectrum = spectrum[:keep] if len(spectrum) >= keep else torch.nn.functional.pad(spectrum, (0, keep - len(spectrum)))
    return torch.fft.irfft(spectrum, n) * (n / len(audio))


def _window(fmt: AudioFormat) -> int:
    return int(WINDOW_SECONDS * fmt.sample_rate)


def mel_filterbank(sample_rate: int, n_fft: int, mels: int) -> torch.Tensor:
    """Triangular filters evenly spaced on the mel scale (HTK's formula), (n_fft // 2 + 1, mels)."""
    def to_mel(hz: float) -> float:
        return 2595 * math.log10(1 + hz / 700)

    edges_mel = torch.linspace(0, to_mel(sample_rate / 2), mels + 2, dtype=torch.float64)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    bins = torch.fft.rfftfreq(n_fft, 1 / sample_rate, dtype=torch.float64)[:, None]
    rising = (bins - edges[:-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[2:] - bins) / (edges[2:] - edges[1:-1])
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


def log_mel(audio: torch.Tensor, fmt: AudioFormat, filterbank: torch.Tensor) -> np.ndarray:
    """A clip's log-mel spectrogram (mels, frames), normalised to zero mean and unit variance."""
    n_fft = _window(fmt)
    power = torch.stft(audio, n_fft, hop_length=int(HOP_SECONDS * fmt.sample_rate), window=torch.hann_window(n_fft),
                       return_complex=True).abs() ** 2
    spectrogram = torch.log(filterbank.T @ power + 1e-6)
    return ((spectrogram - spectrogram.mean()) / (spectrogram.std() + 1e-5)).numpy()
