"""Derive strict JSON schemas for KubeRay's kinds from a pinned release's CRDs.

The CRDs in `helm-chart/kuberay-operator/crds/` hold OpenAPI v3 *structural* schemas. The API server
prunes (or, with `kubectl --validate=strict`, rejects) unknown fields; a plain JSON-schema validator
would accept them. So each `v1` schema is converted for offline validation:

- an object with `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false` (typo'd keys fail);
- `x-kubernetes-int-or-string` without `anyOf` becomes `anyOf: [integer, string]`;
- `nullable: true` admits `null`;
- the top-level `metadata` gets a small ObjectMeta schema (name, namespace, labels, annotations, ...);
- `apiVersion` and `kind` are pinned to `ray.io/v1` and the kind.

Usage (from the repo root; KUBERAY is a clone of github.com/ray-project/kuberay):

    python cluster/kuberay/schemas/derive.py --repo KUBERAY --tag v1.7.0

writes `cluster/kuberay/schemas/<kind>.json` and `release.json` (tag, commit, CRD sha256s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["derive_schema", "main"]

CRD_DIR = "helm-chart/kuberay-operator/crds"
CRDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
VERSION = "v1"
OUT = Path(__file__).resolve().parent

OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def _strict(node: Any) -> Any:
    """OpenAPI v3 structural schema node → JSON schema node (see the module docstring)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


def derive_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    """One CRD document → a strict JSON schema (draft 4) for `version` of its kind.

    Raises:
        ValueError: the CRD does not serve `version`.
    """
    kind = crd["spec"]["names"]["kind"]
    group = crd["spec"]["group"]
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"CRD {crd['metadata']['name']} expected version '{version}', but has {sorted(versions)}")
    schema = _strict(versions[version]["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version}"]}
    props["kind"] = {"type": "string", "enum": [kind]}
    props["metadata"] = OBJECT_META
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    schema["additionalProperties"] = False
    return {"$schema": "http://json-schema.org/draft-04/schema#", "title": f"{kind} ({group}/{version})", **schema}


def _git_show(repo: Path, tag: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{tag}:{path}"], check=True, capture_output=True
    ).stdout


def main(argv: list[str] | None = None) -> int:
    """Write one schema per Ray kind and `release.json` next to this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a git clone of ray-project/kuberay")
    parser.add_argument("--tag", required=True, help="the KubeRay release tag, e.g. v1.7.0")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-list", "-n", "1", args.tag], check=True, capture_output=True, text=True
    ).stdout.strip()
    release: dict[str, Any] = {
        "repository": "https://github.com/ray-project/kuberay",
        "tag": args.tag,
        "commit": commit,
        "crd_dir": CRD_DIR,
        "version": VERSION,
        "derived_by": "cluster/kuberay/schemas/derive.py",
        "crds": {},
    }
    for kind, name in CRDS.items():
        raw = _git_show(args.repo, args.tag, f"{CRD_DIR}/{name}")
        schema = derive_schema(yaml.safe_load(raw))
        target = args.out / f"{kind.lower()}.json"
        target.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        release["crds"][kind] = {"file": name, "sha256": hashlib.sha256(raw).hexdigest(), "schema": target.name}
        print(f"{kind}: {target} ({target.stat().st_size // 1024} KiB)")
    (args.out / "release.json").write_text(json.dumps(release, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
