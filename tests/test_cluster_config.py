"""ray-cluster.yaml is a valid Ray autoscaler config for the installed Ray."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml


def test_cluster_yaml_validates_against_installed_autoscaler_schema(repo_root):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((repo_root / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert ray.__version__ in config["docker"]["image"]
