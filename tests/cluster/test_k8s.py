"""cluster/k8s/rayjob.yaml, validated offline: every pod template against the Kubernetes JSON schema
(kubernetes-validate ships them; strict: unknown fields are errors), the RayJob around them against
the fields and types of KubeRay's ray.io/v1 RayJob CRD that the manifest uses (transcribed below:
KubeRay publishes its CRD as a 1 MB YAML that no package ships), and the pods' Ray resources
against what the config in the entrypoint asks for (the same check as on joining a cluster)."""
import shlex
from pathlib import Path

import pytest
import yaml

from retro_dist.config import load_config
from retro_dist.launch.resources import ResourceError, check_resources

kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "cluster" / "k8s" / "rayjob.yaml"
K8S_VERSION = "1.30"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
_POD_TEMPLATE = {"type": "object"}  # checked against Kubernetes' own PodTemplateSpec below
_GROUP = {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE, "serviceType": {"type": "string"},
          "enableIngress": {"type": "boolean"}}
# KubeRay ray.io/v1 RayJob: spec fields (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec).
RAYJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["entrypoint", "rayClusterSpec"],
                 "properties": {
                     "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                     "ttlSecondsAfterFinished": _INT32, "activeDeadlineSeconds": _INT32,
                     "backoffLimit": _INT32, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                     "suspend": {"type": "boolean"}, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
                     "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                     "submitterPodTemplate": _POD_TEMPLATE,
                     "rayClusterSpec": {
                         "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                         "properties": {
                             "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                             "autoscalerOptions": {"type": "object"},
                             "headGroupSpec": {"type": "object", "additionalProperties": False,
                                               "required": ["template"], "properties": _GROUP},
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["groupName", "template"],
                                 "properties": {**_GROUP, "groupName": {"type": "string"}, "replicas": _INT32,
                                                "minReplicas": _INT32, "maxReplicas": _INT32,
                                                "numOfHosts": _INT32, "suspend": {"type": "boolean"}}}},
                         }},
                 }},
    },
}


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def _pod_templates(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_rayjob_fields_match_kuberay_v1():
    jsonschema.validate(_manifest(), RAYJOB_SCHEMA)


def test_rayjob_schema_catches_a_misspelt_field():
    bad = _manifest()
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(bad, RAYJOB_SCHEMA)


def test_pod_templates_are_valid_kubernetes():
    for i, tpl in enumerate(_pod_templates(_manifest())):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": tpl},
                    K8S_VERSION, strict=True)


def test_kubernetes_schema_catches_a_bad_pod_field():
    tpl = _pod_templates(_manifest())[1]
    tpl["spec"]["containers"][0]["resource"] = tpl["spec"]["containers"][0].pop("resources")
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl},
                    K8S_VERSION, strict=True)


def _offered(job: dict) -> dict:
    """Ray resources of the whole cluster: each group's num-cpus/num-gpus × replicas."""
    spec = job["spec"]["rayClusterSpec"]
    groups = [(spec["headGroupSpec"], 1)] + [(g, g.get("replicas", 1)) for g in spec.get("workerGroupSpecs", [])]
    total = {"CPU": 0.0, "GPU": 0.0}
    for group, n in groups:
        params = group["rayStartParams"]
        total["CPU"] += n * float(params["num-cpus"])
        total["GPU"] += n * float(params.get("num-gpus", 0))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(params.get("num-gpus", 0)) == float(limits.get("nvidia.com/gpu", 0)), "GPUs: Ray vs pod"
        assert float(params["num-cpus"]) <= float(limits["cpu"]), "Ray CPUs beyond the pod's CPU limit"
    return total


def test_cluster_offers_what_the_entrypoint_config_asks_for():
    job = _manifest()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["retro-dist", "train"] and argv[argv.index("--address") + 1] == "auto"
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, sets)
    assert cfg.run.output_dir.startswith("/data/")  # on the volume every pod mounts
    offered = _offered(job)
    check_resources(cfg, offered)
    with pytest.raises(ResourceError):  # one GPU fewer and it could never be placed
        check_resources(cfg, {**offered, "GPU": offered["GPU"] - 1})
