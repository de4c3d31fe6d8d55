"""A site's policy (fedcycle.policy), applied where the site runs: which task code it imports,
the fewest records behind what it sends, whether its error text may quote its data, whether the
run config may name its files; and, in a real simulation, a tabular site holding one record
sends nothing that reveals it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedcycle import client_app
from fedcycle.errors import ConfigError, PolicyRefusal
from fedcycle.policy import SitePolicy, load_policy
from fedcycle.site import load_site
from fedcycle.wire import SiteReport
from tests.fakes import context, preflight_query

PATIENTS = "age,bmi,outcome\n" + "".join(f"{30 + i},{20.5 + i / 7:.4f},{'sick' if i % 3 else 'well'}\n" for i in range(40))


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    return str(path)


def tabular(data_file: str, **extra) -> dict:
    return {"task": "tabular", "tabular.data-file": data_file, "tabular.label-column": "outcome",
            "tabular.features": "age,bmi", "classes": "well,sick", "val-fraction": 0.0, **extra}


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """The pre-flight reply is a Message, which Flower stamps with the task's identity."""


def report(run_config: dict, node_config: dict) -> SiteReport:
    reply = client_app.preflight(preflight_query(), context(run_config, node_config))
    return SiteReport.from_record(reply.content["report"])


@pytest.mark.parametrize("text, message", [
    (None, "its policy-file 'site-policy.toml' cannot be read"),
    ("tasks = [", "its policy-file 'site-policy.toml' is not valid TOML"),
    ("task = ['tabular']", "its policy-file 'site-policy.toml' has unknown keys ['task']"),
    ("min-records = 0", "its policy-file 'site-policy.toml': min-records=0 must be a whole number of at least 1"),
    ("[dp]\nmax-epsilon = -1", "its policy-file 'site-policy.toml': dp.max-epsilon=-1 must be a number above 0"),
    ("error-values = 'no'", "its policy-file 'site-policy.toml': error-values='no' must be true or false"),
])
def test_a_policy_file_that_is_missing_or_wrong_is_refused_in_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "site-policy.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PolicyRefusal) as refused:
        load_policy({"policy-file": str(path)})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert str(tmp_path) not in str(refused.value)  # the base name only


def test_without_a_file_the_permissive_default_applies_but_not_below_ten_records():
    policy = load_policy({"partition-id": 0})
    assert policy == SitePolicy() and policy.min_records == 10 and policy.tasks is None
    strict = load_policy.__globals__["parse_policy"]({}, "p.toml")
    assert (strict.tasks, strict.app_code, strict.error_values, strict.data_from_run_config) == (("builtin",), False, False, False)


def test_a_task_the_policy_does_not_list_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    module = tmp_path / "sneaky_task.py"
    witness = tmp_path / "imported"
    module.write_text(f"from pathlib import Path\nPath({str(witness)!r}).write_text('ran')\n"
                      "class Task:\n    def build_model(self): ...\n    def site_data(self, node_config): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"partition-id": 0, "policy-file": policy_file(tmp_path, 'tasks = ["tabular"]\n')}
    refused = report({"task": "sneaky_task:Task"}, node)
    assert refused.refused and not refused.ok and refused.site == "partition 0/?"
    assert refused.error == ("its policy refuses the run (tasks): task='sneaky_task:Task' is not among the tasks it "
                             "runs ['tabular']")
    assert not witness.exists() and "sneaky_task" not in sys.modules
    # a built-in the list leaves out is refused the same way; "builtin" allows every built-in
    assert "(tasks)" in report({"task": "text"}, node).error
    SitePolicy(tasks=("builtin",)).check_task("text", {"text": "fedcycle.tasks.text:TextClassification"})


def test_a_listed_task_from_the_app_the_server_shipped_runs_only_with_app_code(tmp_path, monkeypatch):
    home = tmp_path / "flwr-home"
    bundle = home / "apps" / "fedcycle.fedcycle.1.0.abcdef"
    bundle.mkdir(parents=True)
    (bundle / "shipped_task.py").write_text("raise SystemExit('must not be imported')\n")
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.syspath_prepend(str(bundle))
    with pytest.raises(PolicyRefusal, match=r"\(app-code\): task='shipped_task:Task' comes from the app the server shipped"):
        SitePolicy(tasks=("shipped_task:Task",), app_code=False).check_task("shipped_task:Task", {})
    SitePolicy(tasks=("shipped_task:Task",), app_code=True).check_task("shipped_task:Task", {})


def test_statistics_and_metrics_need_min_records_and_the_refusal_names_the_minimum_not_the_count(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("age,bmi,outcome\n47,31.4159,sick\n")
    refused = report(tabular(str(one)), {"data-file": str(one)})
    assert refused.refused and refused.site == "data-file:one.csv"
    assert refused.error == ("its policy refuses the run (min-records): its train split holds fewer than "
                             "min-records=10 records, and it sends no statistic or metric over fewer")
    assert "31.4159" not in json.dumps(refused.to_record()) and "47" not in refused.error
    # a site may ask for more; its held-out split counts too
    many = tmp_path / "many.csv"
    many.write_text(PATIENTS)
    node = {"data-file": str(many), "policy-file": policy_file(tmp_path, "min-records = 5\n")}
    assert report(tabular(str(many)), node).ok
    assert "held-out split" in report(tabular(str(many), **{"val-fraction": 0.1}), node).error  # 4 held out


def test_error_text_quotes_no_value_of_the_data_unless_the_policy_allows(tmp_path):
    bad = tmp_path / "ward-7.csv"
    bad.write_text(PATIENTS.replace("32,", "thirty-two,", 1))
    strict = {"data-file": str(bad), "policy-file": policy_file(tmp_path, "")}
    hidden = report(tabular(str(bad)), strict)
    assert not hidden.ok and not hidden.refused
    assert hidden.error == "ward-7.csv, line 4, column 'age': not a number"
    allowed = {**strict, "policy-file": policy_file(tmp_path, "error-values = true\n")}
    assert report(tabular(str(bad)), allowed).error == "ward-7.csv, line 4, column 'age': 'thirty-two' is not a number"
    # an error the site's own code raises leaves as its kind only
    assert SitePolicy.strict("p").public_error(KeyError("patient 4711")) == (
        "KeyError (its text stays at the site: error-values=false)")


def test_the_run_config_names_no_file_of_a_site_whose_policy_forbids_it(tmp_path):
    table = tmp_path / "shared.csv"
    table.write_text(PATIENTS)
    node = {"partition-id": 0, "num-partitions": 1, "policy-file": policy_file(tmp_path, "")}
    refused = report(tabular(str(table)), node)
    assert refused.refused and refused.error == (
        "its policy refuses the run (data-from-run-config): the run config names its data (tabular.data-file); "
        "this site reads its data only from its node config (data-file)")
    # the site's own file, named in its node config, is what it reads
    assert report(tabular(str(table)), {**node, "data-file": str(table)}).ok


def test_the_node_config_never_reaches_the_server(tmp_path):
    node = {"partition-id": 0, "num-partitions": 1, "data-file": str(tmp_path / "secret-ward" / "x.csv"),
            "api-token": "s3cr3t"}
    failed = report(tabular(node["data-file"]), node)
    record = json.dumps(failed.to_record())
    assert not failed.ok and "s3cr3t" not in record and "secret-ward" not in record


def test_a_site_is_built_once_its_policy_allows_it(tmp_path):
    table = tmp_path / "ward.csv"
    table.write_text(PATIENTS)
    site = load_site(tabular(str(table)), {"data-file": str(table), "site-name": "ward 7"})
    assert site.label == "ward 7" and site.policy == SitePolicy() and len(site.train) == 40
    with pytest.raises(ConfigError):
        load_site(tabular(str(table)), {"data-file": str(table), "policy-file": str(tmp_path / "none.toml")})


# -- in a real simulation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    from fedcycle_tools.launcher import LocalSimulation

    link = LocalSimulation(tmp_path_factory.mktemp("flwr-home"))
    link.start()
    yield link
    link.stop()


@pytest.mark.e2e  # `flwr run` through the LocalSimulation SuperLink
def test_a_tabular_site_holding_one_record_sends_nothing_that_reveals_it(superlink, tmp_path):
    from fedcycle_tools import demo_data

    demo_data.tabular(tmp_path)
    rows = (tmp_path / "breast-cancer-train.csv").read_text().splitlines()
    (tmp_path / "site-0.csv").write_text("\n".join(rows[:2]) + "\n")  # one patient
    (tmp_path / "site-1.csv").write_text("\n".join([rows[0], *rows[2:]]) + "\n")
    record = [v for v in rows[1].split(",")[:-1] if len(v.replace(".", "").strip("0")) >= 4]
    assert len(record) >= 20  # the patient's distinctive values, as its file writes them
    config = (f"task='tabular' tabular.data-file='{tmp_path}/site-{{partition-id}}.csv' "
              f"tabular.test-file='{tmp_path}/breast-cancer-test.csv' tabular.label-column='diagnosis' "
              f"classes='malignant,benign' num-server-rounds=1 local-epochs=1 batch-size=32 min-sites=1 "
              f"results-dir='{tmp_path / 'results'}' run-name='one-record'")
    out = superlink.run(2, config, stream=False)
    assert out.completed, out.log[-3000:]  # min-sites=1: the run goes on with the other site
    assert ("site partition 0/2 (node " in out.log and "its policy refuses the run (min-records): its train split holds "
            "fewer than min-records=10 records" in out.log and "the run goes on without it" in out.log)
    saved = json.loads((out.results_dir / "config.json").read_text())
    assert list(saved["refused_sites"].values())[0].startswith("site partition 0/2")
    assert [s["site"] for s in saved["sites"].values()] == ["partition 1/2"]
    assert all("statistics" not in s for s in saved["sites"].values())  # not even the other site's sums
    written = [p for p in out.results_dir.rglob("*") if p.is_file()]
    for text in [out.log, *(p.read_bytes().decode("utf-8", "replace") for p in written)]:
        assert not [v for v in record if v in text]
