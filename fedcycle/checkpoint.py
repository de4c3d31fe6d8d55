"""Checkpoints: what a run needs to continue after its last finished round.

One file per round, `<run>/checkpoints/round-0003.safetensors`, written atomically
(`fedcycle.files`: a crash leaves the previous one whole); the last
`checkpoints-keep` are kept. Its tensors are the global model (`model/...`), the best model
so far (`best/...`), the server's arrays (`server/...`: the strategy's server optimizer
moments and momentum, the reply screen's memory), the server's running sum of cycle-end models (`swa/...`) and torch's RNG state; its metadata the round, the metrics lines so far, the best
value of the task's primary metric, the screen memory's plain data (replay digests, each site's
drift), Python's RNG state (Flower samples sites with it), what the run trains (dataset,
model, strategy, classes) and a SHA-256 of the tensors and that metadata, so that a truncated or corrupted
file is refused with a clear error instead of resuming from garbage. safetensors: loading a
checkpoint runs no code.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fedcycle.config import current_keys
from fedcycle.files import atomic_write, fsync_folder
from fedcycle.results import jsonable

FORMAT = 4  # 4: the screen's memory (3: the checksum covers the metadata too)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, or from another kind of run."""


@dataclass
class Checkpoint:
    round: int
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    best_value: float | None  # the best model's primary metric (None: no model evaluated yet)
    metrics: list[dict[str, Any]]
    identity: dict[str, Any]  # what the run trains: a resumed run must train the same
    server_arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # Coordinator.state
    screen_state: dict[str, Any] = field(default_factory=dict)
    swa_total: dict[str, torch.Tensor] = field(default_factory=dict)  # fedcycle.averaging's float64 sum
    swa_rounds: list[int] = field(default_factory=list)
    python_rng: Any = None
    torch_rng: torch.Tensor | None = None
    path: Path | None = None


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, keep: int) -> Path:
    """Write `ckpt` atomically as round-NNNN.safetensors; drop all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        **{f"model/{k}": v for k, v in ckpt.model.items()},
        **{f"best/{k}": v.clone() for k, v in ckpt.best_model.items()},  # often the same tensors as model/
        **{f"server/{k}": v for k, v in ckpt.server_arrays.items()},
        **{f"swa/{k}": v for k, v in ckpt.swa_total.items()},
        "rng/torch": torch.get_rng_state() if ckpt.torch_rng is None else ckpt.torch_rng,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    state = {
        "format": FORMAT,
        "round": ckpt.round,
        "best_value": ckpt.best_value,
        "metrics": ckpt.metrics,
        "identity": ckpt.identity,
        "swa_rounds": ckpt.swa_rounds,
        "screen": ckpt.screen_state,
        "python_rng": _jsonable_rng(random.getstate() if ckpt.python_rng is None else ckpt.python_rng),
    }
    text = json.dumps(state, default=jsonable)
    metadata = {"fedcycle": text, "sha256": _digest(tensors, text)}
    path = atomic_write(folder / f"round-{ckpt.round:04d}.safetensors", save(tensors, metadata=metadata))
    old = checkpoint_files(run_dir)[:-keep]
    for stale in old:
        stale.unlink(missing_ok=True)
    if old:
        fsync_folder(folder)
    return path


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest round first (by number: round-10000 after round-9999)."""
    files = [p for p in checkpoint_dir(run_dir).glob("round-*.safetensors") if p.stem[len("round-"):].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[len("round-"):]))


def load_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint file; CheckpointError if it is truncated, corrupted or not fedcycle's."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = metadata["fedcycle"]
        state = json.loads(text)
        digest = metadata["sha256"]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupted?): {err}") from None
    if _digest(tensors, text) != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its tensors and metadata do not match the checksum written with them"
        )
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')}; this fedcycle reads format {FORMAT}")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    rng = state["python_rng"]
    return Checkpoint(
        round=int(state["round"]),
        model=part("model/"),
        best_model=part("best/"),
        best_value=None if state["best_value"] is None else float(state["best_value"]),
        metrics=state["metrics"],
        identity=state["identity"],
        server_arrays=part("server/"),
        screen_state=state.get("screen", {}),
        swa_total=part("swa/"),
        swa_rounds=[int(r) for r in state.get("swa_rounds", [])],
        python_rng=(rng[0], tuple(rng[1]), rng[2]),
        torch_rng=tensors.get("rng/torch"),
        path=path,
    )


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest checkpoint of the run that loads; each unreadable newer one is logged and skipped."""
    files = checkpoint_files(run_dir)
    if not files:
        raise CheckpointError(
            f"no checkpoint in {checkpoint_dir(run_dir)}: resume-from needs a run folder in which at least "
            "one round finished"
        )
    problems = []
    for path in reversed(files):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            log(WARNING, "%s; trying the one before", err)
            continue
        return ckpt
    raise CheckpointError("no checkpoint of the run can be read:\n  " + "\n  ".join(problems))


def check_identity(ckpt: Checkpoint, identity: dict[str, Any], model: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless the checkpoint was made by a run that trains the same thing."""
    where = ckpt.path or "the checkpoint"
    made = current_keys(ckpt.identity)  # a checkpoint from before a key moved names it the old way
    for key, value in identity.items():
        if made.get(key) != value:
            raise CheckpointError(
                f"cannot resume from {where}: it was made with {key}={made.get(key)!r}, "
                f"this run has {key}={value!r}; resume with the same {key}, or start a new run"
            )
    saved = {k: (str(v.dtype), list(v.shape)) for k, v in ckpt.model.items()}
    wanted = {k: (str(v.dtype), list(v.shape)) for k, v in model.items()}
    if saved != wanted:
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise CheckpointError(
            f"cannot resume from {where}: its model does not fit this run's model "
            f"({len(differ)} arrays differ, e.g. {differ[:3]})"
        )


def _digest(tensors: dict[str, torch.Tensor], metadata: str) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and of the metadata (round, metrics,
    best value, RNG state, identity)."""
    h = hashlib.sha256(metadata.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable_rng(state: Any) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
