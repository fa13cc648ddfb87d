"""cluster/: every file validated offline by the tools its platform uses, and kept consistent.

- Ray cluster launcher YAMLs: Ray's own `prepare_config` + `validate_config` (the wheel's
  ray-schema.json; `ray up` has no dry run).
- KubeRay Ray kinds (RayJob, RayCluster, RayCronJob): strict JSON schemas derived from a pinned
  KubeRay release's CRDs (cluster/kuberay/schemas, see derive.py).
- Built-in Kubernetes kinds (CronJob, ServiceAccount): kubernetes-validate, strict.
- Dockerfile, manifests and launcher configs agree with pyproject.toml and jobs/nightly.yaml.
Each validator is also shown rejecting a typo'd key.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from segbatch import cli
from segbatch.spec import JobSpec, load_job

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = KUBERAY / "schemas"
LAUNCHER_FILES = sorted((CLUSTER / "ray").glob("*.yaml"))
RAY_KIND_FILES = ["rayjob.yaml", "raycluster.yaml", "raycronjob.yaml"]
BUILTIN_FILES = ["nightly-cronjob.yaml", "serviceaccount.yaml"]
K8S_VERSION = "1.33"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_REQUIREMENT = next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == "ray")
RAY_SPEC = RAY_REQUIREMENT.specifier
PYTHON_SPEC = SpecifierSet(PYPROJECT["project"]["requires-python"])
IMAGE = f"ghcr.io/example/segbatch:{VERSION}"


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _dockerfile_ray() -> tuple[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu\s*$", text, re.M)
    assert m, "cluster/Dockerfile must start FROM a pinned rayproject/ray:<version>-py<XY>-gpu image"
    return m.group(1), f"{m.group(2)}.{m.group(3)}"


@pytest.fixture(scope="module")
def nightly() -> JobSpec:
    return load_job(ROOT / "jobs" / "nightly.yaml")


# ---------------------------------------------------------------- Ray cluster launcher


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validator(path: Path) -> None:
    _prepared(_load(path))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_validator_rejects_a_typo(path: Path) -> None:
    config = _load(path)
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepared(config)


def test_launcher_validator_rejects_fractional_gpus() -> None:
    config = _load(CLUSTER / "ray" / "aws-gpu.yaml")
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        _prepared(config)
    config = _load(CLUSTER / "ray" / "aws-gpu.yaml")
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _prepared(config)


def test_launcher_files_cover_aws_and_local() -> None:
    assert {_load(p)["provider"]["type"] for p in LAUNCHER_FILES} == {"aws", "local"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_pins_image_version_and_token_auth(path: Path) -> None:
    config = _load(path)
    ray_version, python = _dockerfile_ray()
    assert config["docker"]["image"] == f"rayproject/ray:{ray_version}-py{python.replace('.', '')}-gpu"
    assert f"segbatch-{VERSION}-py3-none-any.whl" in " ".join(config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in config[key]), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # copied, never inlined


def test_aws_gpu_workers_fit_the_nightly_job(nightly: JobSpec) -> None:
    prepared = _prepared(_load(CLUSTER / "ray" / "aws-gpu.yaml"))
    c = nightly.compute
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    (worker,) = [t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= c.actors[1]  # type: ignore[index]
    assert worker["resources"]["GPU"] >= math.ceil(c.gpus_per_actor)
    assert worker["resources"]["CPU"] >= c.cpus_per_actor + c.cpus_per_loader
    assert prepared["max_workers"] >= worker["max_workers"]


# ---------------------------------------------------------------- KubeRay kinds (derived schemas)


def _ray_schema(kind: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / f"{kind.lower()}.json").read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    return schema


def _validate_ray_kind(doc: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(_ray_schema(doc["kind"])).validate(doc)


def test_schemas_come_from_a_pinned_kuberay_release() -> None:
    release = json.loads((SCHEMAS / "release.json").read_text())
    assert re.fullmatch(r"v\d+\.\d+\.\d+", release["tag"]) and Version(release["tag"][1:]) >= Version("1.6.0")
    assert re.fullmatch(r"[0-9a-f]{40}", release["commit"])
    assert set(release["crds"]) == {"RayCluster", "RayJob", "RayCronJob"}
    for kind, entry in release["crds"].items():
        assert (SCHEMAS / entry["schema"]).exists(), kind
        assert _ray_schema(kind)["properties"]["apiVersion"]["enum"] == ["ray.io/v1"]


@pytest.mark.parametrize("name", RAY_KIND_FILES)
def test_ray_kind_manifest_matches_kuberay_schema(name: str) -> None:
    doc = _load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1"
    _validate_ray_kind(doc)


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayCronJob": lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"],
    }[doc["kind"]](doc)


@pytest.mark.parametrize("name", RAY_KIND_FILES)
def test_ray_kind_schema_rejects_typos(name: str) -> None:
    doc = _load(KUBERAY / name)
    top = copy.deepcopy(doc)
    top["spec"]["shutdownAfterJobFinished"] = True  # not a field of any Ray kind
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinished"):
        _validate_ray_kind(top)
    nested = copy.deepcopy(doc)
    container = _cluster_spec(nested)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo deep inside the pod template
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        _validate_ray_kind(nested)
    meta = copy.deepcopy(doc)
    meta["metadata"]["label"] = {"a": "b"}
    with pytest.raises(jsonschema.ValidationError, match="label"):
        _validate_ray_kind(meta)


def test_derive_schema_makes_structural_schemas_strict() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive", SCHEMAS / "derive.py")
    assert spec and spec.loader
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    crd = {
        "metadata": {"name": "things.ray.io"},
        "spec": {
            "group": "ray.io",
            "names": {"kind": "Thing"},
            "versions": [
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "port": {"x-kubernetes-int-or-string": True},
                                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                        "note": {"type": "string", "nullable": True},
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    schema = derive.derive_schema(crd)
    ok = {"apiVersion": "ray.io/v1", "kind": "Thing", "metadata": {"name": "x"}, "spec": {"port": "http"}}
    validator = jsonschema.Draft4Validator(schema)
    validator.validate(ok)
    validator.validate({**ok, "spec": {"port": 80, "free": {"anything": 1}, "note": None}})
    for bad in ({**ok, "spec": {"prot": 80}}, {**ok, "kind": "Other"}, {**ok, "spec": {"port": 1.5}}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
    with pytest.raises(ValueError, match="expected version 'v2'"):
        derive.derive_schema(crd, "v2")


# ---------------------------------------------------------------- built-in kinds (kubernetes-validate)


@pytest.mark.parametrize("name", BUILTIN_FILES)
def test_builtin_manifest_passes_kubernetes_validate(name: str) -> None:
    kubernetes_validate.validate(_load(KUBERAY / name), K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", BUILTIN_FILES)
def test_kubernetes_validate_rejects_typos(name: str) -> None:
    doc = _load(KUBERAY / name)
    doc["metadata"]["namespce"] = "default"
    with pytest.raises(kubernetes_validate.ValidationError, match="namespce"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- what the manifests must say


def test_rayjob_runs_the_nightly_job_and_cleans_up(nightly: JobSpec) -> None:
    spec = _load(KUBERAY / "rayjob.yaml")["spec"]
    job_file = spec["entrypoint"].removeprefix("segbatch run ")
    assert re.fullmatch(r"jobs/[\w.-]+\.yaml", job_file) and load_job(ROOT / job_file) == nightly
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] < 24 * 3600  # a nightly run ends before the next one


@pytest.mark.parametrize("name", RAY_KIND_FILES)
def test_ray_clusters_are_sized_from_the_job(name: str, nightly: JobSpec) -> None:
    c = nightly.compute
    lo, hi = c.actors if isinstance(c.actors, tuple) else (c.actors, c.actors)
    cluster = _cluster_spec(_load(KUBERAY / name))
    ray_version, _ = _dockerfile_ray()
    assert cluster["rayVersion"] == ray_version
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["maxReplicas"] >= hi and group["minReplicas"] <= lo
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    gpus = math.ceil(c.gpus_per_actor)
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == gpus
    assert float(res["requests"]["cpu"]) >= c.cpus_per_actor + c.cpus_per_loader
    for pod in (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        assert pod["serviceAccountName"] == "segbatch"
        assert {ctr["image"] for ctr in pod["containers"]} == {IMAGE}


def test_raycronjob_is_the_rayjob_on_a_schedule_and_says_it_is_gated() -> None:
    text = (KUBERAY / "raycronjob.yaml").read_text()
    assert "ALPHA" in text and "feature gate" in text and "RayCronJob=true" in text
    doc = yaml.safe_load(text)
    assert doc["spec"]["schedule"] and doc["spec"]["timeZone"]
    assert doc["spec"]["jobTemplate"] == _load(KUBERAY / "rayjob.yaml")["spec"]


def test_cronjob_submits_to_the_raycluster_once_a_day() -> None:
    cron = _load(KUBERAY / "nightly-cronjob.yaml")
    raycluster = _load(KUBERAY / "raycluster.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    script = " ".join(container["args"])
    assert "$(date -u +%Y%m%d)" in script  # a dated submission id: idempotent retries
    argv = shlex.split(script.replace("$(date -u +%Y%m%d)", "20260101"))
    assert argv[0] == "exec" and argv[1] == "segbatch"
    args = cli._parser().parse_args(argv[2:])
    assert args.command == "submit" and args.wait and args.submission_id == "nightly-20260101"
    assert args.address == f"http://{raycluster['metadata']['name']}-head-svc:8265"
    assert load_job(ROOT / args.job).name == "nightly"
    (token,) = [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    secret = raycluster["spec"]["authOptions"]["secretName"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


# ---------------------------------------------------------------- image, job, secrets


def test_dockerfile_versions_agree_with_pyproject() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    ray_version, python = _dockerfile_ray()
    assert Version(ray_version) in RAY_SPEC, f"Dockerfile's Ray {ray_version} is outside pyproject's {RAY_REQUIREMENT}"
    assert Version(python) in PYTHON_SPEC
    assert re.search(rf"^ARG SEGBATCH_VERSION={re.escape(VERSION)}$", text, re.M)
    assert f"ray.__version__ == '{ray_version}'" in text
    assert "dist/segbatch-${SEGBATCH_VERSION}-py3-none-any.whl" in text
    for line in text.splitlines():
        if re.match(r"\s*(ENV|ARG)\b", line):
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", line, re.I), line


def test_no_secrets_in_cluster_files() -> None:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", "")]
    files.append(ROOT / "jobs" / "nightly.yaml")
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|auth_token:\s*\S{8,}", re.I)
    for path in files:
        assert not pattern.search(path.read_text(errors="replace")), path


def test_nightly_job_is_incremental_and_keyless(nightly: JobSpec) -> None:
    assert "://" in nightly.input.uri and "://" in nightly.output.uri
    assert not nightly.input.storage_options and not nightly.output.storage_options
    assert isinstance(nightly.compute.actors, tuple) and nightly.compute.gpus_per_actor >= 1
