"""The pre-flight round: before any training, every connected site reports what it would train
and the server stops the run, naming each site and what differs, unless all can take part.

A site's report (`fedcycle.wire.SiteReport`, made by `Site.report`) holds its data sizes, the task's metric names, the structure of
one example (inputs and targets), the model's fingerprint (every array's name, dtype and shape),
its class names if its data has them, device and versions. The server compares each with its
own: the model it built, the task's classes, and one batch of its test split (when it has one);
what the server cannot know, the sites must agree on (the most common answer is the run's).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedcycle.config import RunSettings
from fedcycle.tasks import add_up, statistics_mismatch
from fedcycle.wire import EvaluateConfig, SiteReport, superlink_errors


class PreflightError(RuntimeError):
    """A site cannot take part; the message names each site and its reason."""


def wait_for_min_sites(grid: Grid, settings: RunSettings) -> list[int]:
    deadline = time.monotonic() + settings.round_timeout
    while len(nodes := list(grid.get_node_ids())) < settings.min_sites:
        if time.monotonic() > deadline:
            raise PreflightError(
                f"only {len(nodes)} site(s) connected within round-timeout={settings.round_timeout}s; "
                f"min-sites={settings.min_sites}"
            )
        log(INFO, "Waiting for sites: %d connected, min-sites=%d", len(nodes), settings.min_sites)
        time.sleep(1)
    return nodes


def preflight(grid: Grid, settings: RunSettings, expected: dict[str, Any],
              needs_val: bool = False) -> tuple[dict[int, SiteReport], dict[int, str]]:
    """Ask every connected site for its report; return the reports of those that take part, and
    {node: reason} for those whose policy refuses the run (they stay out; the run goes on while
    `min-sites` of the others remain). Raise PreflightError unless every other site fits
    `expected` (`model`: the server's fingerprint; `classes`, `metric-names`, `inputs`, `targets`
    where the server knows them, else what most sites say). With `needs_val` (the sites'
    held-out data is the only evaluation there is), a site without held-out data cannot take part."""
    nodes = wait_for_min_sites(grid, settings)
    messages = [
        Message(RecordDict({"config": ConfigRecord(EvaluateConfig(0, settings.batch_size).to_record())}),
                message_type=MessageType.QUERY, dst_node_id=n)
        for n in nodes
    ]
    replies, unreachable = superlink_errors(messages, grid.send_and_receive(messages, timeout=settings.round_timeout))
    reports, problems, refused = {}, [], {}
    answered = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node}: {reply.error.reason}")
            continue
        try:
            report = SiteReport.from_record(reply.content["report"])
        except KeyError as missing:
            problems.append(f"node {node}: its pre-flight report lacks {missing.args[0]} (another fedcycle version?)")
            continue
        if report.refused:
            refused[node] = f"site {report.site or '?'} (node {node}) {report.error}"
            continue
        if not report.ok:
            problems.append(f"node {node} ({report.site}): {report.error}" if report.site else f"node {node}: {report.error}")
            continue
        malformed = report_malformed(report)
        if malformed:
            problems.append(f"node {node}: its pre-flight report has {malformed}")
            continue
        answered[node] = report
    want = {k: v for k, v in expected.items() if v is not None}
    for key in ("metric-names", "train-metric-names", "inputs", "targets", "classes"):  # what the server cannot know: the majority's
        if key not in want and any(_field(r, key) is not None for r in answered.values()):
            votes = Counter(json.dumps(list_or_value(_field(r, key))) for r in answered.values())
            want[key] = json.loads(votes.most_common(1)[0][0])
    for node, report in answered.items():
        difference = report_difference(report, want)
        if not difference and needs_val and not report.num_val:
            difference = ("it holds no held-out data (num-val=0), and the run has no test split: every site's "
                          "held-out data is the evaluation; give it some (val-fraction, or its validation set)")
        if difference:
            problems.append(f"node {node} ({report.site}): {difference}")
            continue
        reports[node] = report
        log(
            INFO,
            "Site %s (node %d): %d train / %d val examples on %s, torch %s, flwr %s",
            report.site, node, report.num_train, report.num_val, report.device, report.torch, report.flwr,
        )
    missing = set(nodes) - {r.metadata.src_node_id for r in replies}
    problems += [f"node {n}: " + unreachable.get(n, f"no pre-flight reply within round-timeout={settings.round_timeout}s")
                 for n in sorted(missing)]
    if problems:
        raise PreflightError("pre-flight failed, no training started:\n  " + "\n  ".join([*problems, *refused.values()]))
    if refused and len(reports) < settings.min_sites:
        raise PreflightError(f"pre-flight failed, no training started: {len(reports)} site(s) take part, fewer than "
                             f"min-sites={settings.min_sites}, because:\n  " + "\n  ".join(refused.values()))
    for reason in refused.values():
        log(WARNING, "fedcycle: %s; the run goes on without it", reason)
    return reports, refused


# The most examples a site may declare: far beyond any one data center's split, and small enough
# that every number the server derives from it (steps, batch counters) stays within int64.
MAX_EXAMPLES = 10**12


def _field(report: SiteReport, key: str) -> Any:
    """A report's value under its wire key (`metric-names` -> `metric_names`)."""
    return getattr(report, key.replace("-", "_"))


def report_malformed(report: SiteReport) -> str | None:
    """What in a report has the wrong kind of value, in one line; None if nothing."""
    for key in ("num-train", "num-val"):
        value = _field(report, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXAMPLES:
            return f"{key}={value!r}; expected a whole number of examples, 0 to {MAX_EXAMPLES:.0e}"
    if not report.num_train:
        return "num-train=0; a site needs training data"
    for key in ("model", "metric-names", "train-metric-names"):
        value = _field(report, key)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return f"{key}={_short(value)}; expected a list of strings"
    if report.classes is not None and not (isinstance(report.classes, (list, tuple))
                                           and all(isinstance(c, str) for c in report.classes)):
        return f"classes={_short(report.classes)}; expected a list of class names"
    sums = report.statistics
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in sums.values())):
        return f"statistics={_short(sums)}; expected JSON of name -> list of numbers"
    return None


def summed_statistics(reports: dict[int, SiteReport]) -> dict[str, list[float]] | None:
    """The task statistics of all sites added up, key by key (None: the task keeps none).
    Raise PreflightError naming each site whose statistics do not fit the others'."""
    sums, problems = [], []
    for node, report in sorted(reports.items()):
        if report.statistics is None:
            continue
        site = report.statistics
        problem = statistics_mismatch(site, sums[0] if sums else None)
        if problem:
            problems.append(f"node {node} ({report.site}): {problem}")
        else:
            sums.append(site)
    if problems:
        raise PreflightError("pre-flight failed, no training started:\n  " + "\n  ".join(problems))
    return add_up(sums) if sums else None


def report_difference(report: SiteReport, want: dict[str, Any]) -> str | None:
    """What in a site's report differs from what the run expects, in one line; None if nothing."""
    if list(report.model) != list(want["model"]):
        theirs, ours = list(report.model), list(want["model"])
        pairs = [(a, b) for a, b in zip(theirs, ours) if a != b]
        detail = (f"the site has {pairs[0][0]!r}, the server {pairs[0][1]!r}" if pairs
                  else f"the site's has {len(theirs)} arrays, the server's {len(ours)}")
        return f"the task builds another model than the server's (key model: {detail})"
    for key in ("classes", "metric-names", "train-metric-names", "inputs", "targets"):
        theirs, ours = list_or_value(_field(report, key)), list_or_value(want.get(key))
        if key in want and theirs != ours:
            if isinstance(theirs, list) and isinstance(ours, list) and len(theirs) == len(ours):
                i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
                return f"{key} differ from the run's at position {i}: {theirs[i]!r}, the run's {ours[i]!r}"
            return f"{key} {_short(theirs)} differ from the run's {_short(ours)}"
    return None


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
