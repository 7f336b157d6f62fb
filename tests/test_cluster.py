"""The `ray up` YAMLs pass Ray's own cluster-config validator (the schema `ray up` checks before it
launches anything), not only a key-presence check. Runs offline: validation reads no cloud API."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RAY_UP_YAMLS = ("aws.yaml", "gcp.yaml")


def validated(config: dict) -> dict:
    """What `ray up` does first: fill defaults (prepare_config), then check the JSON schema and the
    cross-field rules (validate_config). Raises on an invalid config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", RAY_UP_YAMLS)
def test_ray_up_yaml_passes_rays_validator(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    prepared = validated(config)
    assert prepared["provider"]["type"] == name.split(".")[0]
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "training and serving stay off the head node"
    assert any("ray start --head" in cmd for cmd in prepared["head_start_ray_commands"])
    # the pinned Ray version is what the nodes install or run
    text = (CLUSTER / name).read_text()
    assert "2.60.0" in text


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["available_node_types"][c["head_node_type"]].update(bogus=1), "bogus"),
    (lambda c: c.update(head_node_type="no-such-type"), "head_node_type"),
    (lambda c: c.pop("provider"), "provider"),
])
def test_the_validator_rejects_a_damaged_config(damage, message):
    """The check above can fail: the same validator refuses each damaged copy of aws.yaml."""
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    damage(config)
    with pytest.raises(Exception) as err:
        validated(config)
    assert message in str(err.value)
