"""Job files: strict validation with one clear line per problem, overrides, redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from segbatch.cli import main
from segbatch.spec import SpecError, load_job, parse_job

VALID = {
    "name": "street-scenes",
    "input": {"uri": "s3://photos/2026/"},
    "model": {
        "task": "semantic",
        "arch": "deeplabv3_resnet50",
        "weights": "torchvision",
        "num_classes": 21,
        "batch_size": 8,
    },
    "output": {"uri": "s3://labels/street-scenes/"},
    "compute": {"actors": [1, 4], "gpus_per_actor": 1},
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_issue_example_parses(tmp_path: Path) -> None:
    spec = load_job(write(tmp_path, VALID))
    assert spec.model.arch == "deeplabv3_resnet50"
    assert spec.compute.actors == (1, 4)
    assert spec.compute.gpus_per_actor == 1.0
    assert spec.model.batch_size == 8


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["model"].update(colour="red"), "unknown key 'model.colour'"),
        (lambda d: d.update(extra_section={}), "unknown key 'extra_section'"),
        (lambda d: d["output"].pop("uri"), "missing required key 'output.uri'"),
        (lambda d: d.pop("model"), "missing required key 'model'"),
        (lambda d: d["model"].update(task="panoptic"), "key 'model.task' has invalid value \"panoptic\""),
        (lambda d: d["model"].update(arch="resnet9000"), "key 'model.arch' has invalid value \"resnet9000\""),
        (lambda d: d["model"].update(batch_size=0), "key 'model.batch_size' has invalid value 0"),
        (lambda d: d["compute"].update(actors=[4, 1]), "key 'compute.actors'"),
        (lambda d: d["model"].update(task="instance"), "is a semantic model, but task is 'instance'"),
    ],
)
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path: Path, mutate, expected: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_job(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_set_overrides_apply_yaml_values(tmp_path: Path) -> None:
    spec = load_job(write(tmp_path, VALID), ["model.batch_size=16", "compute.actors=[2, 3]", "model.precision=bf16"])
    assert spec.model.batch_size == 16
    assert spec.compute.actors == (2, 3)
    assert spec.model.precision == "bf16"
    with pytest.raises(SpecError, match="unknown key 'model.bogus'"):
        load_job(write(tmp_path, VALID), ["model.bogus=1"])
    with pytest.raises(SpecError, match="dotted.key=value"):
        load_job(write(tmp_path, VALID), ["model.batch_size"])


def test_builtin_weights_need_no_arch() -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["model"] = {"task": "instance", "weights": "builtin:shapes"}
    assert parse_job(data).model.arch is None
    data["model"] = {"task": "instance", "weights": "none"}
    with pytest.raises(SpecError, match="model.arch is required"):
        parse_job(data)


def test_redacted_hides_storage_options() -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["input"]["storage_options"] = {"key": "AKIA-SECRET", "secret": "hunter2"}
    spec = parse_job(data)
    text = str(spec.redacted())
    assert "hunter2" not in text and "AKIA-SECRET" not in text
    assert spec.redacted()["input"]["storage_options"] == {"key": "***", "secret": "***"}


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write(tmp_path, VALID))]) == 0
    assert "ok" in capsys.readouterr().out
    bad = yaml.safe_load(yaml.safe_dump(VALID))
    bad["model"]["task"] = "panoptic"
    assert main(["validate", str(write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.task" in err and "panoptic" in err and "job.yaml" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read job file" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err


def test_shipped_jobs_validate() -> None:
    jobs = sorted(Path(__file__).resolve().parent.parent.joinpath("jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        load_job(job)


def _field_paths(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel
    import typing

    paths = []
    for name, f in model.model_fields.items():
        subs = [c for c in (f.annotation, *typing.get_args(f.annotation)) if isinstance(c, type) and issubclass(c, BaseModel)]
        paths += _field_paths(subs[0], f"{prefix}{name}.") if subs else [f"{prefix}{name}"]
    return paths


def test_readme_documents_every_key() -> None:
    from segbatch.spec import JobSpec

    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    missing = [p for p in _field_paths(JobSpec) if f"| `{p}` |" not in readme]
    assert not missing, f"README.md lacks rows for {missing}"


def test_load_blocks_shrink_so_every_stream_has_work() -> None:
    from segbatch.pipeline import load_block_rows

    assert load_block_rows(16, items=1000, streams=1, batch_size=1) == 16  # one stream: the configured size
    assert load_block_rows(16, items=1000, streams=2, batch_size=1) == 16  # plenty of blocks already
    assert load_block_rows(16, items=12, streams=2, batch_size=1) == 2  # 6 blocks, 3 per stream
    assert load_block_rows(16, items=6, streams=2, batch_size=1) == 1
    assert load_block_rows(16, items=6, streams=2, batch_size=4) == 4  # never below one model batch
    assert load_block_rows(16, items=6, streams=2, batch_size=32) == 16  # nor above the configured size


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["input"].update(url=d["input"].pop("uri")),
            "unknown key 'input.url' (did you mean 'input.uri'?)",
        ),
        (lambda d: d["model"].update(batch_sise=2), "unknown key 'model.batch_sise' (did you mean 'model.batch_size'?)"),
        (lambda d: d["compute"].update(actor=2), "unknown key 'compute.actor' (did you mean 'compute.actors'?)"),
        (lambda d: d.update(modle=d.pop("model")), "unknown key 'modle' (did you mean 'model'?)"),
        (lambda d: d["model"].update(colour="red"), "unknown key 'model.colour'"),  # nothing close: no guess
        # union branches are one problem with one key, not pydantic's `compute.actors.constrained-int`
        (
            lambda d: d["compute"].update(actors="x"),
            "key 'compute.actors' has invalid value \"x\": Input should be a valid integer, unable to parse string as "
            "an integer or Input should be a valid tuple",
        ),
    ],
)
def test_unknown_keys_suggest_the_close_one(tmp_path: Path, mutate, expected: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_job(path)
    assert str(err.value) == f"{path}: {expected}"


def test_every_problem_of_a_job_file_is_reported_at_once(tmp_path: Path) -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["model"].update(task="panoptic", batch_sise=2)
    data["output"].pop("uri")
    data["compute"]["gpus_per_actor"] = -1
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_job(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    problems = message.removeprefix(f"{path}: ").split("; ")
    assert sorted(problems) == sorted(
        [
            "key 'model.task' has invalid value \"panoptic\": Input should be 'semantic' or 'instance'",
            "unknown key 'model.batch_sise' (did you mean 'model.batch_size'?)",
            "missing required key 'output.uri'",
            "key 'compute.gpus_per_actor' has invalid value -1: Input should be greater than or equal to 0",
        ]
    )


def test_set_overrides_with_misspelt_keys_get_the_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, VALID)
    with pytest.raises(SpecError) as err:
        load_job(path, ["model.batch_sise=16", "model.batch_size=0"])
    assert str(err.value) == (
        f"{path}: key 'model.batch_size' has invalid value 0: Input should be greater than 0; "
        "unknown key 'model.batch_sise' in --set (did you mean 'model.batch_size'?)"
    )
    # the same through the command line: exit 2, one line
    assert main(["validate", str(path), "--set", "model.batch_sise=16"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"segbatch: error: {path}: unknown key 'model.batch_sise' in --set (did you mean 'model.batch_size'?)"
    )


LAYERS = [
    {"name": "regions", "task": "semantic", "weights": "builtin:shapes", "storage_options": {"key": "secret"}},
    {"name": "objects", "task": "instance", "weights": "builtin:shapes", "score_threshold": 0.3},
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("model"), "missing required key 'model' (or 'layers', for several models in one pass)"),
        (lambda d: d.update(layers=LAYERS), "expected either 'model' (one model) or 'layers' (several models), but got both"),
        (lambda d: d.update(layers=[LAYERS[0], {**LAYERS[1], "name": "regions"}]) or d.pop("model"),
         "layer names must differ, but 'regions' is used twice"),
        (lambda d: d.update(layers=[{**LAYERS[0], "name": "metadata"}]) or d.pop("model"),
         "key 'layers.0.name' has invalid value \"metadata\": 'metadata' is a folder every output holds"),
        (lambda d: d.update(layers=[{**LAYERS[1], "scor_threshold": 0.2}]) or d.pop("model"),
         "unknown key 'layers.0.scor_threshold' (did you mean 'layers.0.score_threshold'?)"),
        (lambda d: d.update(layers=[{"task": "semantic", "weights": "builtin:shapes"}]) or d.pop("model"),
         "missing required key 'layers.0.name'"),
        (lambda d: d.update(layers=LAYERS, tiling={"size": 256}) or d.pop("model"),
         "layers apply to image jobs; a scene job (`tiling`) takes one `model`"),
        (lambda d: d.update(layers=[]) or d.pop("model"), "layers expected at least one layer"),
    ],
)
def test_layer_mistakes_are_one_line(tmp_path: Path, mutate, expected: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    mutate(data)
    with pytest.raises(SpecError) as err:
        load_job(write(tmp_path, data))
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)


def test_each_layer_is_the_one_model_job_it_equals() -> None:
    from segbatch.spec import parse_job

    data = yaml.safe_load(yaml.safe_dump(VALID))
    alone = parse_job(data)
    data.pop("model")
    layered = parse_job({**data, "layers": LAYERS})
    jobs = dict(layered.layer_jobs())
    assert list(jobs) == ["regions", "objects"]
    assert jobs["regions"].output.uri == alone.output.uri.rstrip("/") + "/regions"
    assert jobs["objects"].model is not None and jobs["objects"].model.score_threshold == 0.3
    same = parse_job({**data, "model": {k: v for k, v in LAYERS[1].items() if k != "name"}})
    assert jobs["objects"].result_fingerprint("abc") == same.result_fingerprint("abc")  # same model, same fingerprint
    assert jobs["objects"].result_fingerprint("abc") != jobs["regions"].result_fingerprint("abc")
    assert layered.redacted()["layers"][0]["storage_options"] == {"key": "***"}
    assert "secret" not in json.dumps(layered.redacted())
