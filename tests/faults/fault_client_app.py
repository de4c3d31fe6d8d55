"""fedcycle's ClientApp with the fault a site's node config names, for tests/test_failures.py.

`fault` in the node config: `nan` (the reply's float weights are NaN), `scale:F` (the reply's
weights times F), `sleep:R:S` (in round R, sleep S seconds before training). A site without
`fault` runs fedcycle's own handlers unchanged. The tests build an app whose clientapp is
this module; the ServerApp is fedcycle's own.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcycle import client_app as fedcycle

app = ClientApp()
app.query()(fedcycle.preflight)
app.evaluate()(fedcycle.evaluate_round)


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind, _, argument = str(context.node_config.get("fault", "")).partition(":")
    if kind == "sleep":
        in_round, seconds = argument.split(":")
        if int(msg.content["config"]["server-round"]) == int(in_round):
            time.sleep(float(seconds))
    reply = fedcycle.train_round(msg, context)
    if kind in ("nan", "scale"):
        factor = float("nan") if kind == "nan" else float(argument)
        arrays = {}
        for key, array in reply.content["arrays"].items():
            values = array.numpy()
            arrays[key] = Array(values * values.dtype.type(factor) if np.issubdtype(values.dtype, np.floating) else values)
        reply.content["arrays"] = ArrayRecord(arrays)
    return reply
