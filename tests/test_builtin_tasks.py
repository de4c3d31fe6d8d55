"""The built-in tabular, text and audio tasks on files the tests write, and on real data made
offline (scikit-learn's breast cancer set, Debian's fortunes, espeak-ng's voices): each bad
input stops with one line naming the file, line and column, or the site and what differs; the
statistics the sites send add up to the pooled data's; the ClientApp's pre-flight reports them.
"""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedcycle import client_app
from fedcycle.config import RunSettings
from fedcycle.errors import ConfigError
from fedcycle.preflight import PreflightError, preflight, summed_statistics
from fedcycle.tasks import fingerprint, load_task
from fedcycle.tasks.audio import (
    AudioFormat,
    log_mel,
    mel_filterbank,
    read_wav,
    resample,
)
from fedcycle.tasks.text import encode
from fedcycle.wire import SiteReport
from tests.fakes import Sites, context, preflight_query

PATIENTS = """age,bmi,smoker,outcome
54,31.2,yes,sick
33,22.0,no,well
61,27.5,no,sick
45,24.1,yes,well
29,21.3,no,well
70,29.9,yes,sick
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tabular_config(data_file: str, **extra) -> dict:
    return {"task": "tabular", "tabular.data-file": data_file, "tabular.label-column": "outcome",
            "tabular.categorical": "smoker: yes, no", "classes": "well,sick", "val-fraction": 0.0, **extra}


def reads(run_config: dict, node_config: dict | None = None):
    return load_task(run_config).site_data(node_config or {"partition-id": 0, "num-partitions": 1})


def test_a_table_is_read_with_its_categories_one_hot_and_its_labels_numbered(tmp_path):
    train, _ = reads(tabular_config(write(tmp_path / "p.csv", PATIENTS)))
    assert len(train) == 6
    x, y = train[0]
    assert x.tolist() == [54.0, pytest.approx(31.2), 1.0, 0.0] and int(y) == 1  # age, bmi, yes, no; sick


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("outcome", "result"), "no column 'outcome' (tabular.label-column); its columns are"),
    (lambda t: t.replace("33,22.0", "33,"), "line 3, column 'bmi': missing value"),
    (lambda t: t.replace("61,27.5", "61,heavy"), "line 4, column 'bmi': 'heavy' is not a number"),
    (lambda t: t.replace("45,24.1,yes", "45,24.1,sometimes"),
     "line 5, column 'smoker': category 'sometimes' is not in tabular.categorical's list ['yes', 'no']"),
    (lambda t: t.replace("29,21.3,no,well", "29,21.3,no,unknown"),
     "line 6, column 'outcome': label 'unknown' is not one of the run's classes ['well', 'sick']"),
    (lambda t: t.replace("70,29.9,yes,sick", "70,29.9,yes"), "line 7: 3 values, but the header names 4 columns"),
])
def test_a_bad_table_stops_naming_the_file_line_and_column(tmp_path, change, message):
    path = write(tmp_path / "p.csv", change(PATIENTS))
    with pytest.raises(ConfigError) as failed:
        reads(tabular_config(path, **{"tabular.features": "age,bmi"}))
    # the file's base name, never its folder: the text may reach the server
    assert message in str(failed.value) and str(failed.value).startswith("p.csv") and str(tmp_path) not in str(failed.value)
    # what a site whose policy keeps its values home sends: the place, none of the cell's value
    public = failed.value.without_values or str(failed.value)
    assert public.startswith("p.csv") and not any(v in public for v in ("heavy", "sometimes", "unknown"))


def test_files_that_cannot_be_read_as_tables_are_named(tmp_path):
    index = write(tmp_path / "index.csv", "," + PATIENTS.replace("\n", "\n0,", PATIENTS.count("\n") - 1))
    with pytest.raises(ConfigError, match=r"index.csv: every column needs a name of its own .* a row index"):
        reads(tabular_config(index))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(PATIENTS.replace("yes", "s\xed").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.csv: not UTF-8 text"):
        reads(tabular_config(str(latin), **{"tabular.categorical": "smoker: s\xed, no"}))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + PATIENTS.encode())
    assert len(reads(tabular_config(str(bom)))[0]) == 6  # the byte-order mark is not part of 'age'


def test_parquet_and_jsonl_tables_read_as_the_csv_does(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = write(tmp_path / "p.csv", PATIENTS)
    lines = PATIENTS.strip().splitlines()
    header = lines[0].split(",")
    records = [dict(zip(header, line.split(","))) for line in lines[1:]]
    for r in records:
        r["age"], r["bmi"] = int(r["age"]), float(r["bmi"])
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    expected = torch.stack([x for x, _ in reads(tabular_config(csv_path))[0]])
    for name in ("p.parquet", "p.jsonl"):
        got = torch.stack([x for x, _ in reads(tabular_config(str(tmp_path / name)))[0]])
        assert torch.equal(got, expected)
    records[2]["bmi"] = None
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "gap.parquet")
    with pytest.raises(ConfigError, match=r"gap.parquet, row 3, column 'bmi': missing value"):
        reads(tabular_config(str(tmp_path / "gap.parquet")))


def test_sites_standardise_with_the_pooled_mean_and_variance_without_pooling_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["a,b,smoker,outcome"] + [f"{rng.normal(50, 10):.4f},{rng.normal(-3, 0.5):.4f},no,{rng.choice(['well', 'sick'])}"
                                     for _ in range(200)]
    path = write(tmp_path / "many.csv", "\n".join(rows) + "\n")
    config = tabular_config(path)
    task = load_task(config)
    sites = [task.site_data({"partition-id": i, "num-partitions": 3})[0] for i in range(3)]
    reports = {i + 1: SiteReport(site=f"s{i}", statistics=task.statistics(s)) for i, s in enumerate(sites)}
    task.use_statistics(summed_statistics(reports))
    pooled = torch.cat([s.numeric for s in sites])
    features = torch.stack([x for s in sites for x, _ in s])[:, :2].double()
    assert features.mean(0).abs().max() < 1e-5
    assert torch.allclose(features.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(task.impl.scale.mean, pooled.mean(0))
    lopsided = {**reports, 4: SiteReport(site="s3", statistics={"count": [1.0], "sum": [1.0]})}
    with pytest.raises(PreflightError, match=r"node 4 \(s3\): statistics keys \['count', 'sum'\] differ from"):
        summed_statistics(lopsided)


def test_a_site_whose_file_disagrees_with_the_run_is_named_in_the_preflight(task_identity, tmp_path):
    table = PATIENTS + "".join(PATIENTS.splitlines(keepends=True)[1:])  # 12 rows: a site sends no statistic over fewer than 10
    good = write(tmp_path / "good.csv", table)
    other = write(tmp_path / "other.csv", table.replace("no,well", "no,unknown", 1))
    renamed = write(tmp_path / "renamed.csv", table.replace("smoker", "smokes"))
    run_config = tabular_config(good, **{"tabular.features": "age,bmi"})
    query = preflight_query()
    reports = {node: dict(client_app.preflight(query, context(run_config, {"data-file": f})).content["report"])
               for node, f in ((1, good), (2, other), (3, renamed))}

    class Reporting(Sites):
        def send_and_receive(self, messages, timeout=None):
            return [Message(RecordDict({"report": ConfigRecord(reports[m.metadata.dst_node_id])}), reply_to=m)
                    for m in messages]

    task = load_task(run_config)
    expected = {"model": fingerprint(task.build_model()), "classes": task.classes,
                "metric-names": None, "inputs": None, "targets": None}
    with pytest.raises(PreflightError) as failed:
        preflight(Reporting(reports), RunSettings.from_run_config(run_config), expected)
    lines = str(failed.value).splitlines()[1:]
    assert len(lines) == 2
    assert "node 2 (data-file:other.csv): other.csv, line 3, column 'outcome': label 'unknown' is not one of the run's classes" in lines[0]
    assert "node 3 (data-file:renamed.csv): renamed.csv: no column 'smoker' (tabular.categorical)" in lines[1]
    assert str(tmp_path) not in str(failed.value)  # a file's base name, never its folder
    assert json.loads(reports[1]["statistics"])["count"] == [12.0]


def test_documents_are_bytes_cut_or_padded_and_bad_ones_are_named(tmp_path):
    assert encode("añ", 5).tolist() == [ord("a") + 1, 0xC3 + 1, 0xB1 + 1, 0, 0]
    assert encode("x" * 10, 4).tolist() == [ord("x") + 1] * 4
    docs = [{"text": "guten Tag", "label": "de"}, {"text": "good day", "label": "en"}, {"text": "bonjour", "label": "fr"}]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    config = {"task": "text", "text.data-file": path, "classes": "en,de", "val-fraction": 0.0}
    with pytest.raises(ConfigError, match=r"d.jsonl, line 3, column 'label': label 'fr' is not one of the run's classes"):
        reads(config)
    separators = write(tmp_path / "s.jsonl", json.dumps({"text": "a\u2028b\x85c", "label": "en"}, ensure_ascii=False) + "\n")
    assert len(reads({**config, "text.data-file": separators})[0]) == 1  # JSON strings may hold line separators
    csv_path = write(tmp_path / "d.csv", "body,label\nguten Tag,de\n,en\n")
    with pytest.raises(ConfigError, match=r"d.csv: no column 'text' \(text.text-column\); its columns are \['body', 'label'\]"):
        reads({**config, "text.data-file": csv_path})
    with pytest.raises(ConfigError, match=r"d.csv, line 3, column 'body': missing text"):
        reads({**config, "text.data-file": csv_path, "text.text-column": "body"})
    train, _ = reads({**config, "classes": "en,de,fr", "text.max-length": 8})
    tokens, label = train[0]
    assert tokens.shape == (8,) and int(label) == 1
    for model in ("embedding-bag", "transformer"):
        task = load_task({**config, "classes": "en,de,fr", "text.max-length": 8, "text.model": model})
        assert task.build_model()(torch.stack([train[i][0] for i in range(3)])).shape == (3, 3)


def write_wav(path: Path, rate: int, channels: int = 1, seconds: float = 0.5, hz: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone, channels).tobytes())
    return path


def test_wav_files_of_another_rate_or_channel_count_are_refused_unless_resampling_is_allowed(tmp_path):
    fmt = AudioFormat(sample_rate=16000, channels=1, resample=False, samples=16000, mels=40)
    assert read_wav(write_wav(tmp_path / "ok.wav", 16000), fmt).shape == (16000,)
    other_rate = write_wav(tmp_path / "fast.wav", 22050, hz=1000.0)
    with pytest.raises(ConfigError, match=r"fast.wav: 22050 Hz with 1 channel\(s\), but the run reads 16000 Hz with 1"):
        read_wav(other_rate, fmt)
    with pytest.raises(ConfigError, match=r"stereo.wav: 16000 Hz with 2 channel"):
        read_wav(write_wav(tmp_path / "stereo.wav", 16000, channels=2), fmt)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(other_rate.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=r"cut.wav: .* not a whole number of 1-channel 16-bit frames"):
        read_wav(truncated, AudioFormat(22050, 1, False, 16000, 40))
    allowed = AudioFormat(16000, 1, True, 16000, 40)
    audio = read_wav(other_rate, allowed)
    assert audio.shape == (16000,) and torch.all(audio[8000:] == 0)  # 0.5 s of tone, padded to 1 s
    peak_hz = torch.fft.rfft(audio[:8000]).abs().argmax().item() * 16000 / 8000
    assert abs(peak_hz - 1000) <= 2  # the tone keeps its pitch
    assert resample(torch.ones(300), 300, 100).shape == (100,)


def test_log_mel_features_have_their_shape_and_filters_cover_the_spectrum():
    bank = mel_filterbank(16000, 400, 40)
    assert bank.shape == (201, 40) and torch.all(bank.max(0).values > 0.5)
    fmt = AudioFormat(16000, 1, False, 16000, 40)
    features = log_mel(torch.randn(16000), fmt, bank)
    assert features.shape == (40, 101) and abs(features.mean()) < 1e-4 and math.isclose(features.std(), 1, rel_tol=1e-3)


def test_an_audio_site_without_a_class_is_named_with_its_folder(tmp_path):
    for digit in ("zero", "one"):
        write_wav(tmp_path / "site" / digit / "a.wav", 16000)
    config = {"task": "audio", "classes": "zero,one,two", "val-fraction": 0.0}
    with pytest.raises(ConfigError, match=r"site: no WAV files of class 'two' \(expected .*site/two/\*\.wav\)"):
        reads(config, {"data-dir": str(tmp_path / "site")})
    train, _ = reads({**config, "classes": "zero,one"}, {"data-dir": str(tmp_path / "site")})
    assert len(train) == 2 and train[0][0].shape == (1, 40, 101)
    per_site = {**config, "classes": "zero,one", "audio.data-dir": str(tmp_path / "{partition-id}")}
    (tmp_path / "site").rename(tmp_path / "1")
    assert len(reads(per_site, {"partition-id": 1, "num-partitions": 2})[0]) == 2
    with pytest.raises(ConfigError, match=r"0' is not a folder"):
        reads(per_site, {"partition-id": 0, "num-partitions": 2})


@pytest.mark.e2e  # runs `python -m fedcycle_tools.launcher centralize` as a process
def test_the_centralized_baseline_of_a_builtin_task_on_real_data(tmp_path):
    """`python -m fedcycle_tools.launcher centralize`: the breast cancer table (scikit-learn's), pooled from 3 sites."""
    import subprocess
    import sys

    from fedcycle_tools import demo_data

    config = f"{demo_data.tabular(tmp_path / 'data')} batch-size=32 results-dir='{tmp_path}' run-name='pooled'"
    out = subprocess.run([sys.executable, "-m", "fedcycle_tools.launcher", "centralize", "--sites", "3", "--epochs", "3",
                          "--run-config", config], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "epoch 3/3: test " in out.stdout
    result = json.loads((tmp_path / "pooled" / "centralized.json").read_text())
    assert result["metric"] == "auroc" and len(result["test"]) == 4 and result["sites"] == 3
    assert result["test"][-1] > 0.95 and result["test"][-1] > result["test"][0]
    assert result["run_config"]["task"] == "tabular" and "torch" in result["versions"]
