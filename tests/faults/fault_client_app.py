"""fedcycle's ClientApp with the fault a site's node config names, for tests/test_failures.py.

`fault` in the node config:
- `nan`: the reply's float weights are NaN; `scale:F`: the reply's weights times F;
- `flip:F`: the reply is global - F x (its update): a sign-flipped update, F times as long;
- `lie:N`: the site claims N training examples, in the pre-flight round and in every reply, with
  the step count and learning rates the server's schedule gives for N (a careful liar);
- `replay`: from round 2 on, the site sends its round-1 weights again;
- `stall:R:PATH`: in round R, create PATH.stalled, then wait before training until the test
  creates the file PATH (the test knows the site is mid-round and decides when it goes on, not a
  sleep racing a timeout).
A site without `fault` runs fedcycle's own handlers unchanged. The tests build an app whose
clientapp is this module (`build_app`); the ServerApp is fedcycle's own.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcycle import client_app as fedcycle
from fedcycle.strategies.cyclical import schedule_summary
from fedcycle.wire import RoundConfig


def build_app(app_dir: Path) -> Path:
    """fedcycle's app in `app_dir`, with this module as its ClientApp."""
    from fedcycle_tools.launcher import project_file

    pyproject = project_file("pyproject.toml").read_text()
    component = 'clientapp = "fedcycle.client_app:app"'
    assert component in pyproject, "pyproject.toml no longer names fedcycle's ClientApp as expected"
    (app_dir / "pyproject.toml").write_text(pyproject.replace(component, 'clientapp = "fault_client_app:app"'))
    shutil.copy(__file__, app_dir)
    return app_dir


app = ClientApp()
app.evaluate()(fedcycle.evaluate_round)


def fault(context: Context) -> tuple[str, str]:
    kind, _, argument = str(context.node_config.get("fault", "")).partition(":")
    return kind, argument


@app.query()
def preflight(msg: Message, context: Context) -> Message:
    reply = fedcycle.preflight(msg, context)
    kind, argument = fault(context)
    if kind == "lie":
        reply.content["report"]["num-train"] = int(argument)
    return reply


def each_float(arrays: ArrayRecord, change) -> ArrayRecord:
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        out[key] = Array(change(key, values) if np.issubdtype(values.dtype, np.floating) else values)
    return ArrayRecord(out)


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind, argument = fault(context)
    config, server_round = msg.content["config"], int(msg.content["config"]["server-round"])
    if kind == "stall":
        in_round, release = argument.split(":", 1)
        if server_round == int(in_round):
            Path(f"{release}.stalled").touch()
        deadline = time.monotonic() + 900  # a test that never releases does not leave a process behind forever
        while server_round == int(in_round) and not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    reply = fedcycle.train_round(msg, context)
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    if kind in ("nan", "scale"):
        factor = float("nan") if kind == "nan" else float(argument)
        reply.content["arrays"] = each_float(arrays, lambda key, v: v * v.dtype.type(factor))
    elif kind == "flip":
        sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        factor = float(argument)
        reply.content["arrays"] = each_float(arrays, lambda key, v: sent[key] - v.dtype.type(factor) * (v - sent[key]))
    elif kind == "lie":
        sent, n = RoundConfig.from_record(config), int(argument)
        per_epoch, epochs = math.ceil(n / sent.batch_size), sent.local_epochs
        schedule = tuple(sorted(sent.schedule.to_config().items()))
        first, peak, last = schedule_summary(schedule, per_epoch, epochs, server_round, sent.epochs_before)
        metrics.update({"num-examples": n, "steps": per_epoch * epochs, "lr-first": first, "lr-peak": peak, "lr-last": last})
    elif kind == "replay":
        kept = Path(tempfile.gettempdir()) / f"fedcycle-replay-{msg.metadata.run_id}-{context.node_id}.npz"
        if server_round == 1:
            np.savez(kept, **{k: a.numpy() for k, a in arrays.items()})
        else:
            with np.load(kept, allow_pickle=False) as old:
                reply.content["arrays"] = ArrayRecord({k: Array(old[k]) for k in arrays.keys()})
    return reply
