"""fedcycle's ClientApp with the faults a site is told to have, for tests/test_failures.py and the
measurements beside this file (rogues.py, colluders.py).

A site's faults come from `fault` in its node config; in simulation, where the sites have no node
config of their own, from the run config's `fault.partitions` (declared by
`build_app(partition_faults=True)`): "6,7=collude+lie:10000000;0=stale" gives partitions 6 and 7
one fault and partition 0 another. Faults join with `+` and apply in that order to the site's
honest reply (`amplify:2.9+lie:8000`: a longer update, then a bigger claim). Train replies:
- `nan`: the reply's float weights are NaN; `scale:F`: the reply's weights times F;
- `flip:F`: the reply is global - F x (its update): a sign-flipped update, F times as long;
- `amplify:F`: the reply is global + F x (its update);
- `stale`: the reply is the global model it received (a zero update);
- `stale-previous`: from round 2 on, the reply is the global model it received the round before;
- `bn-poison:V`: channel 0 of every BatchNorm `running_var` is V;
- `push:F[:SEED]`: the site's honest reply plus F times its update's length along one fixed random
  direction (SEED, default 0; the same every round and at every site with that seed): a slow
  drift, or colluders whose replies differ but pull one way;
- `collude[:SEED]`: every colluder sends the same weights: the global model plus a fixed random
  direction (SEED, default 0), as long as the honest update of the first colluder to finish the
  round, which leaves them in a shared file for the others (they share a machine);
- `lie:N`: the site claims N training examples, in the pre-flight round and in every reply, with
  the step count and learning rates the server's schedule gives for N (a careful liar);
- `replay`: from round 2 on, the site sends its round-1 weights again;
- `stall:R:PATH`: in round R, create PATH.stalled, then wait before training until the test
  creates the file PATH (the test knows the site is mid-round and decides when it goes on, not a
  sleep racing a timeout).
Evaluations:
- `evallie:V`: every task metric of an evaluate reply is V, and so is every `received-` metric of
  a train reply but `received-loss`;
- `evalcount:N`: an evaluate reply counts N examples, and so does a train reply's `val-examples`.
A site without faults runs fedcycle's own handlers unchanged. The tests build an app whose
clientapp is this module (`build_app`); the ServerApp is fedcycle's own.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcycle import client_app as fedcycle
from fedcycle.wire import RoundConfig

PARTITION_FAULTS = "fault.partitions"  # a table of its own: the server reads no options of an unknown table


def build_app(app_dir: Path, partition_faults: bool = False) -> Path:
    """fedcycle's app in `app_dir`, with this module as its ClientApp (`partition_faults`: its run
    config declares `fault.partitions`, for simulated sites)."""
    from fedcycle_tools.launcher import project_file

    pyproject = project_file("pyproject.toml").read_text()
    component, config = 'clientapp = "fedcycle.client_app:app"', "[tool.flwr.app.config]\n"
    assert component in pyproject and config in pyproject, "pyproject.toml no longer reads as build_app expects"
    pyproject = pyproject.replace(component, 'clientapp = "fault_client_app:app"')
    if partition_faults:
        pyproject = pyproject.replace(config, f'{config}{PARTITION_FAULTS} = ""\n')
    (app_dir / "pyproject.toml").write_text(pyproject)
    shutil.copy(__file__, app_dir)
    return app_dir


app = ClientApp()


def faults(context: Context) -> list[tuple[str, str]]:
    """The site's faults in the order they apply, as (kind, argument); an unknown kind is an error,
    not an honest site."""
    spec = str(context.node_config.get("fault", "")) or partition_fault(context)
    found = [(kind, argument) for kind, _, argument in (part.partition(":") for part in spec.split("+") if part)]
    for kind, _ in found:
        if kind not in (*TRAIN_FAULTS, *EVALUATE_FAULTS, "stall"):
            raise ValueError(f"fault {kind!r} is unknown")
    return found


def partition_fault(context: Context) -> str:
    """The faults `fault.partitions` gives this site's partition ('' for none)."""
    for group in str(context.run_config.get(PARTITION_FAULTS, "")).split(";"):
        partitions, _, spec = group.partition("=")
        if str(context.node_config.get("partition-id")) in [p.strip() for p in partitions.split(",")]:
            return spec
    return ""


@app.query()
def preflight(msg: Message, context: Context) -> Message:
    reply = fedcycle.preflight(msg, context)
    for kind, argument in faults(context):
        if kind == "lie":
            reply.content["report"]["num-train"] = int(argument)
    return reply


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def each_float(arrays: ArrayRecord, change) -> ArrayRecord:
    return ArrayRecord({key: Array(change(key, v) if np.issubdtype(v.dtype, np.floating) else v)
                        for key, v in as_numpy(arrays).items()})


def kept(msg: Message, context: Context, what: str) -> Path:
    """A file this site keeps weights in between rounds of this run."""
    return Path(tempfile.gettempdir()) / f"fedcycle-{what}-{msg.metadata.run_id}-{context.node_id}.npz"


def nan(msg: Message, reply: Message, context: Context, argument: str) -> None:
    reply.content["arrays"] = each_float(reply.content["arrays"], lambda key, v: v * v.dtype.type(float("nan")))


def scale(msg: Message, reply: Message, context: Context, argument: str) -> None:
    reply.content["arrays"] = each_float(reply.content["arrays"], lambda key, v: v * v.dtype.type(float(argument)))


def flip(msg: Message, reply: Message, context: Context, argument: str) -> None:
    sent, factor = as_numpy(msg.content["arrays"]), float(argument)
    reply.content["arrays"] = each_float(reply.content["arrays"],
                                         lambda key, v: sent[key] - v.dtype.type(factor) * (v - sent[key]))


def amplify(msg: Message, reply: Message, context: Context, argument: str) -> None:
    sent, factor = as_numpy(msg.content["arrays"]), float(argument)
    reply.content["arrays"] = each_float(reply.content["arrays"],
                                         lambda key, v: sent[key] + v.dtype.type(factor) * (v - sent[key]))


def stale(msg: Message, reply: Message, context: Context, argument: str) -> None:
    reply.content["arrays"] = ArrayRecord({key: Array(v) for key, v in as_numpy(msg.content["arrays"]).items()})


def stale_previous(msg: Message, reply: Message, context: Context, argument: str) -> None:
    """Each round's global model is kept under its round, so a retried round sends the same."""
    server_round = int(msg.content["config"]["server-round"])
    path = kept(msg, context, "stale-previous")
    if server_round > 1:
        with np.load(path.with_suffix(f".{server_round - 1}.npz"), allow_pickle=False) as old:
            reply.content["arrays"] = ArrayRecord({k: Array(old[k]) for k in reply.content["arrays"]})
    np.savez(path.with_suffix(f".{server_round}.npz"), **as_numpy(msg.content["arrays"]))


def bn_poison(msg: Message, reply: Message, context: Context, argument: str) -> None:
    def poison(key: str, v: np.ndarray) -> np.ndarray:
        if not key.endswith("running_var"):
            return v
        v = v.copy()
        v[0] = float(argument)
        return v

    reply.content["arrays"] = each_float(reply.content["arrays"], poison)


def collude(msg: Message, reply: Message, context: Context, argument: str) -> None:
    """The first colluder to get here publishes its crafted weights with a hard link, which fails
    if another was first: every colluder then sends the one file's weights."""
    server_round = int(msg.content["config"]["server-round"])
    shared = Path(tempfile.gettempdir()) / f"fedcycle-collude-{msg.metadata.run_id}-{server_round}.npz"
    if not shared.exists():
        sent, mine = as_numpy(msg.content["arrays"]), as_numpy(reply.content["arrays"])
        floats = [key for key, v in sent.items() if np.issubdtype(v.dtype, np.floating)]
        rng = np.random.default_rng(int(argument or 0))
        direction = {key: rng.standard_normal(sent[key].shape) for key in floats}
        length = math.sqrt(sum(float(np.sum((mine[k] - sent[k]).astype(np.float64) ** 2)) for k in floats))
        length /= math.sqrt(sum(float(np.sum(d**2)) for d in direction.values()))
        crafted = {key: (sent[key] + length * direction[key]).astype(sent[key].dtype) if key in floats else mine[key]
                   for key in sent}
        own = shared.with_suffix(f".{context.node_id}.npz")
        np.savez(own, **crafted)
        try:
            os.link(own, shared)
        except FileExistsError:
            pass
        own.unlink()
    with np.load(shared, allow_pickle=False) as agreed:
        reply.content["arrays"] = ArrayRecord({k: Array(agreed[k]) for k in reply.content["arrays"]})


def push(msg: Message, reply: Message, context: Context, argument: str) -> None:
    factor, _, seed = argument.partition(":")
    sent, mine = as_numpy(msg.content["arrays"]), as_numpy(reply.content["arrays"])
    floats = [key for key, v in sent.items() if np.issubdtype(v.dtype, np.floating)]
    rng = np.random.default_rng(int(seed or 0))
    direction = {key: rng.standard_normal(sent[key].shape) for key in floats}
    length = math.sqrt(sum(float(np.sum((mine[k] - sent[k]).astype(np.float64) ** 2)) for k in floats))
    length *= float(factor) / math.sqrt(sum(float(np.sum(d**2)) for d in direction.values()))
    reply.content["arrays"] = each_float(reply.content["arrays"],
                                         lambda key, v: (v + length * direction[key]).astype(v.dtype))


def lie(msg: Message, reply: Message, context: Context, argument: str) -> None:
    """The steps and learning rates are what an honest site with N examples reports: the server's
    schedule for ceil(N / batch size) steps an epoch."""
    sent, n = RoundConfig.from_record(msg.content["config"]), int(argument)
    per_epoch, epochs, schedule = math.ceil(n / sent.batch_size), sent.local_epochs, sent.schedule
    start = schedule.start_step(per_epoch, epochs, sent.server_round, sent.epochs_before)
    lrs = schedule.lrs(start, per_epoch * epochs, schedule.cycle_steps(per_epoch, epochs),
                       steps_before=sent.epochs_before * per_epoch)
    reply.content["metrics"].update({"num-examples": n, "steps": per_epoch * epochs, "lr-first": lrs[0],
                                     "lr-peak": max(lrs), "lr-last": lrs[-1]})


def replay(msg: Message, reply: Message, context: Context, argument: str) -> None:
    arrays, path = reply.content["arrays"], kept(msg, context, "replay")
    if int(msg.content["config"]["server-round"]) == 1:
        np.savez(path, **as_numpy(arrays))
    else:
        with np.load(path, allow_pickle=False) as old:
            reply.content["arrays"] = ArrayRecord({k: Array(old[k]) for k in arrays})


def received_lie(msg: Message, reply: Message, context: Context, argument: str) -> None:
    metrics = reply.content["metrics"]
    for key in [k for k in metrics if k.startswith("received-") and k != "received-loss"]:
        metrics[key] = float(argument)


def received_count(msg: Message, reply: Message, context: Context, argument: str) -> None:
    if "val-examples" in reply.content["metrics"]:
        reply.content["metrics"]["val-examples"] = int(argument)


Fault = Callable[[Message, Message, Context, str], None]  # (message, reply to change, context, argument)
TRAIN_FAULTS: dict[str, Fault] = {
    "nan": nan, "scale": scale, "flip": flip, "amplify": amplify, "stale": stale, "stale-previous": stale_previous,
    "bn-poison": bn_poison, "collude": collude, "push": push, "lie": lie, "replay": replay, "evallie": received_lie,
    "evalcount": received_count,
}


def evaluation_lie(msg: Message, reply: Message, context: Context, argument: str) -> None:
    metrics = reply.content["metrics"]
    for key in [k for k in metrics if k not in ("loss", "num-examples")]:
        metrics[key] = float(argument)


def evaluation_count(msg: Message, reply: Message, context: Context, argument: str) -> None:
    reply.content["metrics"]["num-examples"] = int(argument)


EVALUATE_FAULTS: dict[str, Fault] = {"evallie": evaluation_lie, "evalcount": evaluation_count}


@app.train()
def train(msg: Message, context: Context) -> Message:
    found, server_round = faults(context), int(msg.content["config"]["server-round"])
    for kind, argument in found:
        if kind == "stall":
            in_round, release = argument.split(":", 1)
            if server_round == int(in_round):
                Path(f"{release}.stalled").touch()
            deadline = time.monotonic() + 900  # a test that never releases does not leave a process behind forever
            while server_round == int(in_round) and not Path(release).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
    reply = fedcycle.train_round(msg, context)
    for kind, argument in found:
        if kind in TRAIN_FAULTS:
            TRAIN_FAULTS[kind](msg, reply, context, argument)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = fedcycle.evaluate_round(msg, context)
    for kind, argument in faults(context):
        if kind in EVALUATE_FAULTS:
            EVALUATE_FAULTS[kind](msg, reply, context, argument)
    return reply
