"""Real data for the built-in tasks' demos, made offline from packages (README, "Built-in tasks"):

    python -m fedcycle_tools.demo_data tabular DIR   # scikit-learn's breast cancer set (binary: AUROC)
    python -m fedcycle_tools.demo_data text DIR      # fortune cookies in 5 languages (Debian's fortunes-*)
    python -m fedcycle_tools.demo_data audio DIR     # spoken digits from espeak-ng, one voice set per site

Each writes the files the task reads and prints the run config that points the task at them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedcycle.files import atomic_write

FORTUNES = Path("/usr/share/games/fortunes")
# Language -> the fortune folders that hold it (fortunes, fortunes-de, -es, -it, -pl).
LANGUAGES = {"en": [FORTUNES], "de": [FORTUNES / "de"], "es": [FORTUNES / "es"], "it": [FORTUNES / "it"],
             "pl": [FORTUNES / "pl"]}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# One accent and three voice variants per site; the test set's accents belong to no site.
VOICE_SETS = {
    "site-0": ("en-us", ("m1", "m3", "f1")),
    "site-1": ("en-gb-x-rp", ("m2", "f2", "f4")),
    "site-2": ("en-gb-scotland", ("m4", "m6", "f3")),
    "site-3": ("en-029", ("m5", "m7", "f5")),
    "test": ("en-gb-x-gbclan", ("m2", "f2", "m6")),
}


def tabular(out: Path, seed: int = 0) -> str:
    """The Wisconsin breast cancer set as CSV files (80% train, 20% test, seeded)."""
    # lazily: scikit-learn is the optional `demo` extra
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.target))
    cut = int(0.8 * len(order))
    for name, index in (("train", order[:cut]), ("test", order[cut:])):
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow([*data.feature_names, "diagnosis"])
        for i in np.sort(index):
            writer.writerow([*(repr(float(v)) for v in data.data[i]), data.target_names[data.target[i]]])
        atomic_write(out / f"breast-cancer-{name}.csv", table.getvalue().encode())
    return (f"task='tabular' tabular.data-file='{out / 'breast-cancer-train.csv'}' "
            f"tabular.test-file='{out / 'breast-cancer-test.csv'}' tabular.label-column='diagnosis' "
            f"classes='malignant,benign'")


def fortunes(folder: Path) -> list[str]:
    """The fortune cookies of one folder's files (entries between '%' lines), whitespace collapsed."""
    texts = []
    # fortunes-it links its Italian files into the top (English) folder: only real files count
    for file in sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")):
        for entry in re.split(r"\n%\n", file.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(entry.split())
            if 20 <= len(text) <= 400 and "\ufffd" not in text:
                texts.append(text)
    return texts


def text(out: Path, per_language: int = 1500, test_per_language: int = 300, seed: int = 0) -> str:
    """Language identification on fortune cookies: JSONL of {text, label}, train and test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for language, folders in LANGUAGES.items():
        texts = sorted({t for f in folders if f.is_dir() for t in fortunes(f)})
        if len(texts) < per_language + test_per_language:
            sys.exit(f"fedcycle: {len(texts)} fortunes in {language} ({folders[0]}); install Debian's fortunes "
                     "fortunes-de fortunes-es fortunes-it fortunes-pl (make demo-text does)")
        picked = [texts[i] for i in rng.permutation(len(texts))[: per_language + test_per_language]]
        train += [{"text": t, "label": language} for t in picked[:per_language]]
        test += [{"text": t, "label": language} for t in picked[per_language:]]
    for name, records in (("train", train), ("test", test)):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write(out / f"fortunes-{name}.jsonl", lines.encode())
    return (f"task='text' text.data-file='{out / 'fortunes-train.jsonl'}' text.test-file='{out / 'fortunes-test.jsonl'}' "
            f"classes='{','.join(LANGUAGES)}'")


def audio(out: Path, speeds: tuple[int, ...] = (130, 160, 190), pitches: tuple[int, ...] = (35, 50, 65),
          voice_sets: dict[str, tuple[str, tuple[str, ...]]] = VOICE_SETS) -> str:
    """Spoken digits synthesised by espeak-ng: `<out>/<set>/<digit>/*.wav`, one accent per set."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("fedcycle: espeak-ng is not installed (Debian: apt-get install espeak-ng; make demo-audio does)")
    for name, (accent, variants) in voice_sets.items():
        for digit in DIGITS:
            folder = out / name / digit
            folder.mkdir(parents=True, exist_ok=True)
            for variant in variants:
                for speed in speeds:
                    for pitch in pitches:
                        wav = folder / f"{accent}+{variant}-s{speed}-p{pitch}.wav"
                        if not wav.exists():
                            subprocess.run([espeak, "-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch),
                                            "-w", str(wav), digit], check=True, capture_output=True)
    return audio_run_config(out)


def audio_run_config(out: Path) -> str:
    """The run config of the spoken digits that `audio(out)` makes."""
    return (f"task='audio' audio.data-dir='{out}/site-{{partition-id}}' audio.test-dir='{out / 'test'}' "
            f"audio.sample-rate=22050 classes='{','.join(DIGITS)}'")


def main(argv: list[str] | None = None, prog: str = "python -m fedcycle_tools.demo_data") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Make the built-in tasks' demo data from offline packages "
                                                            "and print the run config that points at it.")
    parser.add_argument("kind", choices=("tabular", "text", "audio"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run_config = {"tabular": tabular, "text": text, "audio": audio}[args.kind](args.out.resolve())
    print(run_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
