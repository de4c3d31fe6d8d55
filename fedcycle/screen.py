"""The reply screen: which of a round's train replies are averaged, with what weight and scale.

It takes a round's replies (each site's arrays and metrics, as plain numpy), the global model
that was sent, what the sites declared in the pre-flight round and the round's config, and
returns a `Verdict` per reply: left out, or averaged with a weight (its example count, capped)
and a scale on its update (clipped), with the reasons. It knows nothing of Flower.

A reply is first checked on its own: its form, its metrics within their meaning, the server's
schedule (in closed form: a claimed size costs nothing to check), finite values, a variance that
is not negative, its change to the global model. Then against memory: an exact replay of any
earlier reply and, with three or more replies, a near-duplicate of an earlier reply or of a
global model, the current one included (stale work). Then, with three or more, against its
peers, whose medians no single site controls:

- an update that pulls the model back against the round's coordinate-wise median update by more
  than `peer-pullback-ratio` median norms is left out;
- every update is clipped to `peer-clip-ratio` times the round's (lower) median update norm
  (centered clipping, Karimireddy et al. 2021), and one longer than `peer-norm-ratio` times it
  is named;
- a weight above `max-weight-ratio` times the round's lower median example count is capped;
- a site whose updates keep leaving the median in the same direction round after round (their
  sum as long as `drift-consistency` of their summed lengths, over `drift-rounds` rounds or more,
  and `drift-margin` above its peers') is left out and named.

Bounded influence: below half of the replies colluding, the lower medians are honest sites'
values, so no reply moves the aggregate by more than max-weight-ratio x peer-clip-ratio times a
median honest reply's part. What the screen remembers across rounds (`ScreenMemory`) goes into
every checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcycle.config import RunSettings
from fedcycle.wire import RoundConfig

SKETCH_PER_ARRAY = 128  # coordinates of each float array a sketch keeps
MEMORY_ROUNDS = 10  # rounds of sketches kept for the near-duplicate checks (digests: the whole run)


@dataclass(frozen=True)
class Declared:
    """What a site said of itself in the pre-flight round."""

    num_train: int
    num_val: int
    site: str = ""


@dataclass
class Reply:
    """A train reply as the screen reads it: its arrays (decoded) and its metrics."""

    node: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]


@dataclass
class Verdict:
    """What becomes of one reply: averaged with `weight` and its update times `scale`, or left
    out (`weight` None); `events` name what the screen did, with the reason."""

    node: int
    weight: float | None = None
    scale: float = 1.0
    events: list[tuple[str, str]] = field(default_factory=list)
    measured: dict[str, float | None] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.weight is not None

    def reject(self, reason: str) -> Verdict:
        self.weight = None
        self.events.append(("rejected", reason))
        return self


# A metric's meaning: its allowed range, by the name a task gives it. Train replies carry
# `train-<name>` and `received-<name>`; a task may widen or add ranges (Task.metric_ranges).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, math.inf),
    "accuracy": (0.0, 1.0),
    "auroc": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "mae": (0.0, math.inf),
    "mse": (0.0, math.inf),
    "rmse": (0.0, math.inf),
}


def metric_problem(metrics: dict[str, Any], ranges: dict[str, tuple[float, float]]) -> str | None:
    """A metric that is not a finite number, or outside its range."""
    for key, value in metrics.items():
        if not _finite_number(value):
            return f"metric {key}={value!r} is not a finite number"
        low, high = ranges.get(key.removeprefix("train-").removeprefix("received-"), (-math.inf, math.inf))
        if not low <= value <= high:
            return f"metric {key}={value!r} is outside its range [{low:g}, {high:g}]"
    return None


def evaluation_problem(node: int, metrics: dict[str, Any], keys: frozenset[str],
                       ranges: dict[str, tuple[float, float]], declared: dict[int, Declared]) -> str | None:
    """What is wrong with a site's evaluate reply: its keys, a metric out of range, or more
    examples than the site declared it holds out."""
    if set(metrics) != keys:
        return f"evaluate metric keys are {sorted(metrics)}, not {sorted(keys)}"
    problem = _examples_problem(metrics["num-examples"]) or metric_problem(
        {k: v for k, v in metrics.items() if k != "num-examples"}, ranges)
    return problem or _count_problem(node, "num-examples", metrics["num-examples"], declared, held_out=True)


class Screen:
    """The screen of one run: its settings, what the sites declared, and its memory."""

    def __init__(self, settings: RunSettings, declared: dict[int, Declared], metric_keys: frozenset[str],
                 ranges: dict[str, tuple[float, float]] | None = None, memory: ScreenMemory | None = None) -> None:
        self.settings, self.declared, self.metric_keys = settings, declared, metric_keys
        self.ranges = METRIC_RANGES if ranges is None else ranges
        self.memory = memory or ScreenMemory()

    def site(self, node: int) -> str:
        return self.declared[node].site if node in self.declared else f"node {node}"

    def drift_key(self, node: int) -> str:
        """What a site's drift is kept under: its name, which outlives a resume (node ids may not),
        unless another site has the same name."""
        name = self.site(node)
        shared = sum(d.site == name for d in self.declared.values()) > 1
        return f"node {node}" if shared else name

    def screen(self, server_round: int, replies: list[Reply], reference: dict[str, np.ndarray],
               sent: RoundConfig | None = None) -> list[Verdict]:
        """A verdict for each reply, in their order; the memory learns the round."""
        self.memory.forget_attempt(server_round)
        floats = {k: v for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)}
        global_norm = math.sqrt(sum(_squared(v) for v in floats.values()))
        sketch = self.memory.sketcher(floats, self.settings.seed)
        verdicts, updates, norms, sketches = [], {}, {}, {}
        for reply in replies:
            verdict = Verdict(reply.node)
            verdicts.append(verdict)
            problem = self._form_problem(reply, reference)
            if problem is None and floats:  # only a reply of the global model's shapes can be sketched
                sketches[reply.node] = sketch(reply.arrays)
            problem = problem or self._schedule_problem(server_round, reply.metrics, sent) or _value_problem(reply.arrays)
            if problem is None and floats:
                update = {k: reply.arrays[k] - ref for k, ref in floats.items()}  # in the model's dtype: one copy
                norm = math.sqrt(sum(_squared(u) for u in update.values()))
                problem = self._norm_problem(norm, global_norm)
                updates[id(verdict)], norms[id(verdict)] = update, norm
                verdict.measured["update-ratio"] = norm / global_norm if global_norm else None
            if problem:
                verdict.reject(problem)
            else:
                verdict.weight = float(reply.metrics["num-examples"])
        fresh = self._against_memory(server_round, replies, verdicts, norms, floats, sketches)
        if len(fresh) >= 3 and floats:
            self._against_peers(server_round, fresh, updates, norms, sketch)
        self._cap_weights([v for v in verdicts if v.accepted])
        self.memory.remember(server_round, sketch(floats) if floats else None, sketches, MEMORY_ROUNDS)
        return verdicts

    # -- each reply on its own --------------------------------------------------------

    def _form_problem(self, reply: Reply, reference: dict[str, np.ndarray]) -> str | None:
        node, arrays, metrics = reply.node, reply.arrays, reply.metrics
        if self.declared and node not in self.declared:
            return "the site did not take part in the pre-flight round"
        if list(arrays) != list(reference):
            diff = sorted(set(reference) ^ set(arrays))
            return f"array names differ from the global model's ({diff[:3]}{' ...' if len(diff) > 3 else ''})"
        for key, ref in reference.items():
            got = arrays[key]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                return f"array {key!r} is {got.dtype}{list(got.shape)}, the global model's is {ref.dtype}{list(ref.shape)}"
        if set(metrics) != self.metric_keys:
            got = set(metrics)
            return (f"metric keys differ: missing {sorted(self.metric_keys - got)}, "
                    f"unexpected {sorted(got - self.metric_keys)}")
        n = metrics["num-examples"]
        return (_examples_problem(n) or _count_problem(node, "num-examples", n, self.declared, held_out=False)
                or ("val-examples" in metrics
                    and _count_problem(node, "val-examples", metrics["val-examples"], self.declared, held_out=True))
                or metric_problem({k: v for k, v in metrics.items() if k != "num-examples"}, self.ranges))

    @staticmethod
    def _schedule_problem(server_round: int, metrics: dict[str, Any], sent: RoundConfig | None) -> str | None:
        """Why the steps and learning rates a reply reports are not the server's schedule for its
        example count. In closed form: the rates at the round's first and last step, and a peak
        between them and the round's peak; a claimed size costs no more to check than an honest one."""
        if sent is None:
            return None
        n, steps = metrics["num-examples"], metrics["steps"]
        batch, epochs = sent.batch_size, sent.local_epochs
        per_epoch = math.ceil(n / batch)
        if steps != per_epoch * epochs:
            return (f"steps={steps}, but the server's schedule has {per_epoch * epochs} optimizer steps "
                    f"({epochs} local epochs of {per_epoch} batches of {batch} for num-examples={n})")
        s = sent.schedule
        start, cycle, before = s.site_clock(per_epoch, epochs, server_round, sent.epochs_before)
        first = s.lr_at(start, cycle, steps_before=before)
        last = s.lr_at(start + steps - 1, cycle, steps_before=before + steps - 1)
        for key, expected in (("lr-first", first), ("lr-last", last)):
            if not math.isclose(metrics[key], expected, rel_tol=1e-6, abs_tol=1e-12):
                return f"{key}={metrics[key]:.6g}, but the server's schedule gives {expected:.6g} for round {server_round}"
        low, high = max(first, last), max(s.lr_max, s.lr_min)
        if not low * (1 - 1e-6) - 1e-12 <= metrics["lr-peak"] <= high * (1 + 1e-6) + 1e-12:
            return f"lr-peak={metrics['lr-peak']:.6g} is outside [{low:.6g}, {high:.6g}], the server's schedule for round {server_round}"
        return None

    def _norm_problem(self, norm: float, global_norm: float) -> str | None:
        s = self.settings
        ratio = norm / global_norm if global_norm else None
        if not math.isfinite(norm):
            return "its change to the global model overflows"
        if ratio is not None and s.max_update_ratio and not ratio <= s.max_update_ratio:
            return f"its change to the global model has {ratio:.3g} times the model's norm, above max-update-ratio={s.max_update_ratio}"
        if s.dp.site_level and norm > s.dp.site_clip_norm * (1 + 1e-5):
            return (f"its update's norm {norm:.4g} is above dp.site-clip-norm={s.dp.site_clip_norm}: "
                    "a site that does not clip its update")
        return None

    # -- against what came before ----------------------------------------------------

    def _against_memory(self, server_round: int, replies: list[Reply], verdicts: list[Verdict],
                        norms: dict[int, float], floats: dict[str, np.ndarray],
                        sketches: dict[int, np.ndarray]) -> list[Verdict]:
        """The accepted verdicts that are no replay and no near-duplicate: of an earlier reply
        (exact, by digest, over the whole run; near, by sketch, over the last MEMORY_ROUNDS
        rounds and this round's other replies) or of a global model (the current one: an update
        shorter than near-duplicate-ratio times the round's median update norm)."""
        memory, ratio = self.memory, self.settings.near_duplicate_ratio
        accepted = [v for v in verdicts if v.accepted]
        # with 3 or more, as the peer checks: of two replies, a long one would make the other look stale
        median = statistics.median([norms[id(v)] for v in accepted]) if len(accepted) >= 3 and floats else 0.0
        close = ratio * median
        # a site told to take few steps at low rates moves the model little: its share of the
        # round's work (steps x peak rate, both checked against the schedule) scales its bound
        work = {r.node: float(r.metrics["steps"]) * float(r.metrics["lr-peak"]) for r, v in zip(replies, verdicts)
                if v.accepted}
        typical_work = statistics.median(work.values()) if work else 0.0
        fresh = []
        for reply, verdict in zip(replies, verdicts):
            if not verdict.accepted:
                continue
            seen = digest(reply.arrays)
            earlier = memory.digests.setdefault(seen, (server_round, reply.node))
            if earlier != (server_round, reply.node):  # a retried round may bring back a site's own reply
                verdict.reject(f"its weights are identical to {self.site(earlier[1])}'s reply in round {earlier[0]} (a replay)")
                continue
            if floats and close > 0:
                norm = norms[id(verdict)]
                share = min(1.0, work[reply.node] / typical_work) if typical_work > 0 else 1.0
                found = None
                if norm <= close * share:
                    found = f"the global model it was sent (its update is {norm / median:.2g} of the round's median norm)"
                else:
                    found = self._near(server_round, reply.node, sketches[reply.node], sketches, close)
                if found:
                    verdict.reject(f"its weights are a near-duplicate of {found}: stale work, not training "
                                   f"(near-duplicate-ratio={ratio})")
                    continue
            fresh.append(verdict)
        return fresh

    def _near(self, server_round: int, node: int, mine: np.ndarray, others_now: dict[int, np.ndarray],
              close: float) -> str | None:
        """What earlier model or reply `mine` is within `close` of, by sketch."""
        memory = self.memory
        for r, g in sorted(memory.globals.items(), reverse=True):
            if _distance(mine, g) <= close:
                return f"the global model of round {r}"
        for other, s in others_now.items():
            if other != node and _distance(mine, s) <= close:
                return f"{self.site(other)}'s reply in this round"
        for (r, other), s in sorted(memory.replies.items(), reverse=True):
            if r != server_round and _distance(mine, s) <= close:
                return f"{'its own' if other == node else self.site(other) + chr(39) + 's'} reply in round {r}"
        return None

    # -- against the round's peers -----------------------------------------------------

    def _against_peers(self, server_round: int, fresh: list[Verdict], updates: dict[int, dict],
                       norms: dict[int, float], sketch: Sketcher) -> None:
        s = self.settings
        rows = [updates[id(v)] for v in fresh]
        median_update = {k: np.median(np.stack([u[k] for u in rows]), axis=0) for k in rows[0]}
        median_sq = sum(_squared(m) for m in median_update.values())
        lower = statistics.median_low([norms[id(v)] for v in fresh])
        median_sketch = sketch(median_update)
        drifts = []
        for v, update in zip(fresh, rows):
            norm = norms[id(v)]
            dot = sum(float(np.dot(update[k].ravel().astype(np.float64), median_update[k].ravel().astype(np.float64)))
                      for k in update)
            cosine = dot / (norm * math.sqrt(median_sq)) if norm and median_sq else 1.0
            relative = norm / lower if lower else 1.0
            pullback = max(0.0, -cosine * relative)
            v.measured.update({"update-norm-to-median": relative, "peer-cosine": cosine, "peer-pullback": pullback})
            if s.peer_pullback_ratio and pullback > s.peer_pullback_ratio:
                v.reject(f"its update pulls the model back against the round's median update by {pullback:.3g} times the "
                         f"round's median update norm, above peer-pullback-ratio={s.peer_pullback_ratio} (cosine "
                         f"{cosine:.3f}, norm {relative:.3g} times the round's median)")
                continue
            if s.peer_clip_ratio and lower and norm > s.peer_clip_ratio * lower:
                v.scale = s.peer_clip_ratio * lower / norm
            v.measured["clip-factor"] = v.scale
            if s.peer_norm_ratio and lower and norm > s.peer_norm_ratio * lower:
                v.events.append(("clipped", f"its update's norm is {relative:.3g} times the round's median, above "
                                            f"peer-norm-ratio={s.peer_norm_ratio}; it is averaged scaled down to "
                                            f"{v.scale * relative:.3g} times the median"))
            drift = self.memory.drift_of(self.drift_key(v.node))
            drift.add(server_round, sketch({k: u * v.scale for k, u in update.items()}) - median_sketch)
            v.measured["drift-consistency"] = drift.consistency
            drifts.append((v, drift))
        self._judge_drift(drifts)

    def _judge_drift(self, drifts: list[tuple[Verdict, "SiteDrift"]]) -> None:
        """Leave out a site whose updates have kept leaving the median one way for drift-rounds
        rounds, more than its peers' do: under label skew every honest site keeps one direction
        too (consistency 0.71 to 0.79 after 4 rounds at Dirichlet 0.3 and 0.1, measured), so a
        site is judged against the lower median of its peers' consistencies plus drift-margin."""
        s = self.settings
        judged = [(v, d) for v, d in drifts if d.rounds >= s.drift_rounds]
        if not s.drift_consistency or len(judged) < 3:
            return
        typical = statistics.median_low([d.consistency for _, d in judged])
        bound = max(s.drift_consistency, typical + s.drift_margin)
        for v, d in judged:
            if d.consistency > bound:
                v.reject(f"its updates have left the round's median in the same direction for {d.rounds} rounds "
                         f"(consistency {d.consistency:.3f}; its peers' {typical:.3f}, above both drift-consistency="
                         f"{s.drift_consistency} and theirs plus drift-margin={s.drift_margin}): a slow drift")

    def _cap_weights(self, accepted: list[Verdict]) -> None:
        ratio = self.settings.max_weight_ratio
        cap = weight_cap([v.weight for v in accepted], ratio)
        for v in accepted:
            if cap is not None and v.weight > cap:
                v.events.append(("weight-capped", f"num-examples={v.weight:g} is above max-weight-ratio={ratio} times the "
                                                  f"round's lower median; it is averaged with weight {cap:g}"))
                v.weight = cap


def weight_cap(weights: list[float], ratio: float) -> float | None:
    """The most one reply may weigh: `ratio` times the lower median of the round's weights (None:
    no cap, with fewer than 3). The lower median, not the mean of the two middle values: with an
    even count, half the sites claiming huge sizes would otherwise move the cap with them."""
    if not ratio or len(weights) < 3:
        return None
    return ratio * statistics.median_low(weights)


class Sketcher:
    """A model's float arrays as a short vector whose distances estimate the full distances: a
    fixed random sample of each array's coordinates, scaled by sqrt(size / sample). Every
    array is sampled, so an update confined to one layer still shows."""

    def __init__(self, floats: dict[str, np.ndarray], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.picks = {k: np.sort(rng.choice(v.size, min(v.size, SKETCH_PER_ARRAY), replace=False))
                      for k, v in floats.items()}
        self.scales = {k: math.sqrt(floats[k].size / max(1, len(p))) for k, p in self.picks.items()}

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([arrays[k].ravel()[p].astype(np.float64) * self.scales[k] for k, p in self.picks.items()])


@dataclass
class SiteDrift:
    """A site's updates less the round's median, summed (sketched), and their summed lengths."""

    total: np.ndarray | None = None
    lengths: float = 0.0
    rounds: int = 0
    last: tuple[int, np.ndarray] | None = None  # this run's last round and its deviation: a retry replaces it

    def add(self, server_round: int, deviation: np.ndarray) -> None:
        self.total = deviation if self.total is None else self.total + deviation
        self.lengths += float(np.linalg.norm(deviation))
        self.rounds += 1
        self.last = (server_round, deviation)

    @property
    def consistency(self) -> float:
        """1: every round the same direction; about 1/sqrt(rounds) for directions at random."""
        return float(np.linalg.norm(self.total)) / self.lengths if self.lengths else 0.0


@dataclass
class ScreenMemory:
    """What the screen keeps across rounds, and a checkpoint keeps across a resume."""

    digests: dict[str, tuple[int, int]] = field(default_factory=dict)  # reply's weights -> (round, node)
    globals: dict[int, np.ndarray] = field(default_factory=dict)  # round -> sketch of the model sent
    replies: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (round, node) -> sketch
    drift: dict[str, SiteDrift] = field(default_factory=dict)  # site -> its drift
    _sketcher: Sketcher | None = None

    def sketcher(self, floats: dict[str, np.ndarray], seed: int) -> Sketcher:
        if self._sketcher is None or set(self._sketcher.picks) != set(floats):
            self._sketcher = Sketcher(floats, seed)
        return self._sketcher

    def drift_of(self, site: str) -> SiteDrift:
        return self.drift.setdefault(site, SiteDrift())

    def forget_attempt(self, server_round: int) -> None:
        """Take back what an earlier attempt at this round added to any site's drift: only the
        attempt that is averaged counts."""
        for d in self.drift.values():
            if d.last is not None and d.last[0] == server_round:
                d.total = d.total - d.last[1]
                d.lengths -= float(np.linalg.norm(d.last[1]))
                d.rounds -= 1
                d.last = None

    def remember(self, server_round: int, global_sketch: np.ndarray | None, replies: dict[int, np.ndarray],
                 keep: int) -> None:
        if global_sketch is not None:  # None: no float array to sketch
            self.globals[server_round] = global_sketch
        self.replies.update({(server_round, node): s for node, s in replies.items()})
        oldest = server_round - keep + 1
        self.globals = {r: s for r, s in self.globals.items() if r >= oldest}
        self.replies = {k: s for k, s in self.replies.items() if k[0] >= oldest}

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and plain data for a checkpoint."""
        arrays = {f"global/{r}": s for r, s in self.globals.items()}
        arrays.update({f"reply/{r}/{node}": s for (r, node), s in self.replies.items()})
        sites = sorted(self.drift)
        arrays.update({f"drift/{i}": self.drift[site].total for i, site in enumerate(sites) if self.drift[site].total is not None})
        state = {"digests": {d: list(v) for d, v in self.digests.items()},
                 "drift": [[site, self.drift[site].lengths, self.drift[site].rounds] for site in sites]}
        return arrays, state

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> ScreenMemory:
        memory = cls(digests={d: (int(r), int(n)) for d, (r, n) in state.get("digests", {}).items()})
        for key, value in arrays.items():
            kind, _, rest = key.partition("/")
            if kind == "global":
                memory.globals[int(rest)] = value
            elif kind == "reply":
                r, node = rest.split("/")
                memory.replies[(int(r), int(node))] = value
        for i, (site, lengths, rounds) in enumerate(state.get("drift", [])):
            memory.drift[site] = SiteDrift(arrays.get(f"drift/{i}"), float(lengths), int(rounds))
        return memory


def digest(arrays: dict[str, np.ndarray]) -> str:
    """A SHA-256 of a reply's arrays (names and bytes): the same weights sent twice match."""
    h = hashlib.sha256()
    for key, values in arrays.items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def _count_problem(node: int, key: str, count: float, declared: dict[int, Declared], held_out: bool) -> str | None:
    """A count above what the site declared in the pre-flight round."""
    if node not in declared:
        return None
    limit = declared[node].num_val if held_out else declared[node].num_train
    if count > limit:
        kind = "held-out" if held_out else "training"
        return f"{key}={count!r} is more than the {limit} {kind} examples the site declared in the pre-flight round"
    return None


def _value_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """NaN or Inf in a float array, or a negative BatchNorm running variance (averaged in, it
    turns every later evaluation into NaN)."""
    for key, v in arrays.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return f"array {key!r} holds NaN or Inf"
        if key.endswith("running_var") and (v < 0).any():
            return f"array {key!r} holds a negative variance ({float(v.min()):.3g})"
    return None


def _examples_problem(n: Any) -> str | None:
    return None if _finite_number(n) and n > 0 else f"num-examples={n!r} must be a positive finite number"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _squared(a: np.ndarray) -> float:
    """||a||^2 in float64 (non-finite if a holds NaN or Inf)."""
    flat = a.astype(np.float64).ravel()
    return float(np.dot(flat, flat))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))
