"""Every site the deployment tooling starts runs under a policy file (fedcycle.policy).

Without a `policy-file` in its node config a site runs the permissive default, meant for
simulation: any task, values in error text, data paths from the run config. So `deploy site`
and the loopback deployment write the strict default below for a site that names no policy of
its own, and add its name (`site-name`) so the coordinator knows the site by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from flwr.common.config import parse_config_args

from fedcycle_tools.launcher import project_file

DEFAULT_POLICY_NAME = "fedcycle-site-policy.toml"

# The strict default, one file for every recipe: the tooling's sites and docker-compose.yml's.
STRICT_POLICY = project_file("deploy/site-policy.toml").read_text(encoding="utf-8")


def write_strict_policy(path: Path) -> bool:
    """Write the strict default policy to `path` unless a file is there; True if written."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:  # never over a file that appeared meanwhile
        f.write(STRICT_POLICY)
    return True


def parse_node_config(node_config: str) -> dict[str, Any]:
    """A `--node-config` string as the SuperNode reads it."""
    try:
        return parse_config_args([node_config]) if node_config.strip() else {}
    except click.ClickException as err:  # a string the SuperNode would refuse too
        raise ValueError(f"--node-config {node_config!r} does not parse: {err.message}") from None


def quoted(value: str) -> str:
    """A string value for a `--node-config` string (a TOML literal or basic string)."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError(f"{value!r} cannot be written in a --node-config string: rename it")
    return f'"{value}"'


def with_keys(node_config: str, **values: str) -> str:
    """The node config with each of `values` (`site_name` -> `site-name`) appended, unless it
    has that key already."""
    present = parse_node_config(node_config)
    extra = [f"{key.replace('_', '-')}={quoted(str(value))}" for key, value in values.items()
             if key.replace("_", "-") not in present]
    return " ".join([node_config.strip(), *extra]).strip()
