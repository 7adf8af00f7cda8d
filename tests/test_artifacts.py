"""Artifact stores (local folder; S3 against a real S3-protocol server: moto's server mode over HTTP), keys,
the key layout and the group manifest."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import moto_s3_server

from airflow_comfy.artifacts import layout
from airflow_comfy.artifacts.errors import ArtifactError, ArtifactExistsError, ArtifactNotFound, BadArtifact
from airflow_comfy.artifacts.keys import (
    key_for,
    sanitize_filename,
    sanitize_part,
    validate_key,
    validate_prefix,
)
from airflow_comfy.artifacts.manifest import GroupManifest, ImageRecord, OutputRecord, Timings
from airflow_comfy.artifacts.store import TMP_PREFIX, LocalStore, open_store, read_uri, split_uri

RUN_ID = "manual__2026-11-25T12:00:00+00:00"
SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()

BAD_KEYS = ["", "/abs/key", "a/../b", "..", ".", "a/./b", "a//b", "a/", "a\\b", "..\\x", "a\x00b", "a\nb", "x" * 1025]


def all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- keys -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "a/b.c", "runs/dag-1/run_2/x.safetensors", "with space/ok", ".hidden/x"])
def test_valid_keys_pass(key: str):
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused(key: str, tmp_path: Path):
    with pytest.raises(ValueError, match="artifact key"):
        validate_key(key)
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    assert all_files(tmp_path) == []


def test_prefixes():
    assert validate_prefix("") == "" and validate_prefix("runs/") == "runs/" and validate_prefix("runs/da") == "runs/da"
    for bad in ("/runs", "runs/../x", "a\\b", "a//b"):
        with pytest.raises(ValueError):
            validate_prefix(bad)


def test_key_for_sanitizes_readably_and_deterministically():
    digest = hashlib.sha256(RUN_ID.encode()).hexdigest()[:8]
    assert sanitize_part(RUN_ID) == f"manual__2026-11-25T12_00_00_00_00_{digest}"
    assert key_for("runs", "txt2img", RUN_ID) == f"runs/txt2img/manual__2026-11-25T12_00_00_00_00_{digest}"
    assert key_for("runs", "txt2img", RUN_ID) == key_for("runs", "txt2img", RUN_ID)
    assert key_for("a", 3, "b.c-d_e") == "a/3/b.c-d_e"  # safe parts stay as they are
    assert sanitize_part("a:b") != sanitize_part("a_b") == "a_b"  # replacement never merges two parts
    assert sanitize_part("a/b") != "a/b" and "/" not in sanitize_part("a/b")
    for dotted in (".", "..", ".hidden"):
        assert not sanitize_part(dotted).startswith(".")
    assert len(sanitize_part("x" * 500)) <= 120 and sanitize_part("x" * 500) != sanitize_part("x" * 501)
    assert sanitize_filename("ComfyUI_00001_.png") == "ComfyUI_00001_.png"
    name = sanitize_filename("my image.png")
    assert name.startswith("my_image_") and name.endswith(".png")
    with pytest.raises(ValueError):
        key_for("a", "")
    with pytest.raises(ValueError):
        key_for()


# --- layout ---------------------------------------------------------------------------------------------------


def test_layout_keys():
    run_key = f"txt2img/{RUN_ID}"
    run = f"runs/txt2img/{sanitize_part(RUN_ID)}"
    assert layout.split_run_key(run_key) == ("txt2img", RUN_ID)
    assert layout.run_prefix(run_key) == run
    assert layout.group_prefix(run_key, "inference") == f"{run}/inference"
    assert layout.try_prefix(run_key, "inference", 2) == f"{run}/inference/try-2"
    assert layout.output_key(run_key, "inference", "2", "3", 0, "safetensors") == (
        f"{run}/inference/try-2/3/0.safetensors")
    assert layout.try_manifest_key(run_key, "encode", 1) == f"{run}/encode/try-1/manifest.json"
    assert layout.manifest_key(run_key, "encode") == f"{run}/encode/manifest.json"
    assert layout.manifest_key(run_key, "encode", 3) == layout.try_manifest_key(run_key, "encode", 3)
    assert layout.outputs_prefix(run_key) == f"{run}/outputs/"
    assert layout.outputs_prefix(run_key, "portraits") == f"{run}/outputs/portraits/"
    assert layout.image_key(run_key, "ComfyUI_00001_.png") == f"{run}/outputs/ComfyUI_00001_.png"
    assert layout.image_key(run_key, "", "ComfyUI_00001_.png") == f"{run}/outputs/ComfyUI_00001_.png"
    assert layout.image_key(run_key, "portraits/ComfyUI_00001_.png") == f"{run}/outputs/portraits/ComfyUI_00001_.png"
    assert layout.image_key(run_key, "portraits", "ComfyUI_00001_.png") == f"{run}/outputs/portraits/ComfyUI_00001_.png"
    assert layout.snapshot_key(run_key, "post") == f"{run}/outputs/snapshot.post.json"
    assert layout.staged_image_key(run_key, "post", 2, "9", "sub", "x_00001_.png") == f"{run}/post/try-2/9/saved/sub/x_00001_.png"
    assert layout.staged_image_key(run_key, "post", 2, "9", "", "x.png") == f"{run}/post/try-2/9/saved/x.png"
    assert layout.published_key(run_key, "post", 2) == f"{run}/post/try-2/published.json"
    assert layout.try_number_of("try-12") == 12 and layout.try_number_of("manifest.json") is None
    assert layout.extension_for("LATENT") == "safetensors" and layout.extension_for("INT") == "json"
    escaped = layout.image_key(run_key, "../../etc/passwd")
    assert escaped.startswith(f"{run}/outputs/") and ".." not in escaped.split("/")
    # a subgraph node id ("12:5") and a group called "outputs" stay distinct from everything else
    assert layout.output_key(run_key, "g", 1, "12:5", 0, "json") != layout.output_key(run_key, "g", 1, "12_5", 0, "json")
    assert not (layout.group_prefix(run_key, "outputs") + "/").startswith(layout.outputs_prefix(run_key))
    for key in (layout.manifest_key(run_key, "x"), layout.output_key(run_key, "x", 1, "3", 0, "safetensors")):
        assert validate_key(key) == key


@pytest.mark.parametrize("call", [
    lambda: layout.split_run_key("no-slash"),
    lambda: layout.split_run_key("/run"),
    lambda: layout.split_run_key("dag/"),
    lambda: layout.try_prefix("d/r", "g", "x"),
    lambda: layout.try_prefix("d/r", "g", -1),
    lambda: layout.output_key("d/r", "g", 1, "3", 0, "tar/gz"),
    lambda: layout.image_key("d/r", "/"),
    lambda: layout.image_key("d/r", "", ""),
    lambda: layout.staged_image_key("d/r", "g", "one", "9", "x.png"),
])
def test_layout_refuses_bad_parts(call):
    with pytest.raises(ValueError):
        call()


# --- local store ----------------------------------------------------------------------------------------------


def test_local_store_round_trip(tmp_path: Path):
    store = open_store(f"file://{tmp_path}/store")
    assert isinstance(store, LocalStore) and repr(store) == f"LocalStore({(tmp_path / 'store').as_uri()!r})"
    uri = store.put_bytes("runs/d/r/g/try-1/3/0.safetensors", b"\x00payload")
    assert uri == store.uri("runs/d/r/g/try-1/3/0.safetensors") == f"{(tmp_path / 'store').as_uri()}/runs/d/r/g/try-1/3/0.safetensors"
    assert store.get_bytes("runs/d/r/g/try-1/3/0.safetensors") == b"\x00payload"
    assert store.exists("runs/d/r/g/try-1/3/0.safetensors") and not store.exists("runs/d/r/g")
    assert store.key_of(uri) == "runs/d/r/g/try-1/3/0.safetensors"
    assert read_uri(uri) == store.read_uri(uri) == b"\x00payload"
    store.put_json("runs/d/r/g/manifest.json", {"b": 1, "a": [1.5]})
    assert store.get_json("runs/d/r/g/manifest.json") == {"a": [1.5], "b": 1}
    store.put_bytes("runs/d/r2/x", [b"chunk", bytearray(b"ed"), memoryview(b"!")])
    assert store.get_bytes("runs/d/r2/x") == b"chunked!"
    assert store.list() == ["runs/d/r/g/manifest.json", "runs/d/r/g/try-1/3/0.safetensors", "runs/d/r2/x"]
    assert store.list("runs/d/r/") == ["runs/d/r/g/manifest.json", "runs/d/r/g/try-1/3/0.safetensors"]
    assert store.list("runs/d/r") == store.list()  # a plain string prefix, as in S3
    assert store.list("runs/d/r2/") == ["runs/d/r2/x"] and store.list("nothing/") == []
    with pytest.raises(ValueError, match="not in the artifact store"):
        store.key_of((tmp_path / "elsewhere").as_uri())


def test_local_paths_and_uris_with_odd_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "my store%20"
    store = open_store(root.as_uri())
    uri = store.put_bytes("a b/c.json", b"{}")
    assert "%20" in uri and " " not in uri
    assert read_uri(uri) == b"{}" and store.key_of(uri) == "a b/c.json"
    assert (root / "a b" / "c.json").read_bytes() == b"{}"
    monkeypatch.chdir(tmp_path)
    relative = open_store("relative/store")  # a bare path, made absolute
    assert isinstance(relative, LocalStore) and relative.root == tmp_path / "relative" / "store"


def test_missing_object(tmp_path: Path):
    store = LocalStore(tmp_path)
    with pytest.raises(ArtifactNotFound, match="no artifact at file://") as raised:
        store.get_bytes("runs/x.json")
    assert raised.value.uri == store.uri("runs/x.json") and isinstance(raised.value, ArtifactError)
    store.put_bytes("runs/dir/x", b"1")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("runs/dir")  # a folder is not an object
    with pytest.raises(ArtifactNotFound):
        read_uri((tmp_path / "nope").as_uri())


def test_overwrite_is_refused_unless_asked(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.put_bytes("k/v", b"first")
    with pytest.raises(ArtifactExistsError, match="already exists") as raised:
        store.put_bytes("k/v", b"second")
    assert raised.value.uri == store.uri("k/v")
    assert store.get_bytes("k/v") == b"first"
    store.put_bytes("k/v", b"third", overwrite=True)
    assert store.get_bytes("k/v") == b"third"
    assert all_files(tmp_path) == ["k/v"]


def test_concurrent_writers_of_one_key_have_one_winner(tmp_path: Path):
    store = LocalStore(tmp_path)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("race/key", f"writer {i}".encode() * 1000)
            results.append(f"won {i}")
        except ArtifactExistsError:
            results.append("lost")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == 7
    assert store.get_bytes("race/key") == f"writer {winners[0].split()[1]}".encode() * 1000
    assert all_files(tmp_path) == ["race/key"]


def test_failed_write_leaves_nothing_behind(tmp_path: Path):
    store = LocalStore(tmp_path)

    def broken() -> Iterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("the producer died mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        store.put_bytes("runs/a/out.safetensors", broken())
    assert not store.exists("runs/a/out.safetensors") and store.list() == []
    assert [p.name for p in (tmp_path / "runs" / "a").iterdir()] == []  # no temp file remains either
    with pytest.raises(TypeError):
        store.put_bytes("runs/a/out.safetensors", "text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.put_bytes("runs/a/out.safetensors", [b"ok", 3])  # type: ignore[list-item]
    assert all_files(tmp_path) == []


def test_failed_replace_keeps_the_old_object_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = LocalStore(tmp_path)
    store.put_bytes("k", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ArtifactError, match="No space left") as raised:
        store.put_bytes("k", b"new" * 1000, overwrite=True)
    assert raised.value.uri == store.uri("k") and not isinstance(raised.value, ArtifactExistsError)
    with pytest.raises(ArtifactError):
        store.put_bytes("other", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k") == b"old" and all_files(tmp_path) == ["k"]


def test_temp_files_are_invisible_and_reserved(tmp_path: Path):
    store = LocalStore(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{TMP_PREFIX}abc.tmp").write_bytes(b"partial")  # e.g. left by a killed process
    store.put_bytes("runs/done", b"1")
    assert store.list() == ["runs/done"]
    with pytest.raises(ValueError, match="may not start"):
        store.get_bytes(f"runs/{TMP_PREFIX}abc.tmp")


def test_open_store_and_uri_errors(tmp_path: Path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(tmp_path), LocalStore)
    assert open_store(f"file://localhost{tmp_path}").root == tmp_path  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="three slashes"):
        open_store("file://relative/path")
    with pytest.raises(ValueError, match="unsupported artifact store URI 'https://\\*\\*\\*@host/x'"):
        open_store("https://user:pa55word@host/x")
    with pytest.raises(ValueError, match="empty"):
        open_store("")
    with pytest.raises(TypeError, match="no options"):
        open_store(str(tmp_path), endpoint_url="http://x")
    assert isinstance(open_store(str(tmp_path), endpoint_url=None), LocalStore)
    with pytest.raises(ValueError, match="file:// or s3://"):
        read_uri("gs://bucket/key")
    with pytest.raises(ValueError, match="no object"):
        split_uri("s3://bucket")


# --- manifest -------------------------------------------------------------------------------------------------


def sample_manifest() -> GroupManifest:
    info = {"sha256": SHA_A, "bytes": 123, "shape": [1, 4, 8, 8], "dtype": "float32", "meta": {"noise_mask": False}}
    return GroupManifest(
        workflow_name="txt2img", workflow_sha256=SHA_B, group="inference", run_key=f"txt2img/{RUN_ID}",
        try_number=2,
        outputs=[OutputRecord.from_info("3", 0, "LATENT", "s3://b/runs/x/3/0.safetensors", info),
                 OutputRecord("7", 1, "INT", "file:///s/7/1.json", SHA_B, 5)],
        images=[ImageRecord("9", "s3://b/runs/x/outputs/p/ComfyUI_00001_.png", "ComfyUI_00001_.png", 512, 768, SHA_A,
                            subfolder="p")],
        timings=Timings(nodes={"3": 12.5, "7": 0}, totals={"total": 13.25}),
        models={"checkpoints/sd15.safetensors": SHA_B},
        manifest_uri="s3://b/runs/x/inference/manifest.json",
        package_version="1.2.3",
    )


def test_manifest_round_trip():
    manifest = sample_manifest()
    text = manifest.to_json()
    data = json.loads(text)
    assert data["schema"] == "airflow-comfy/group-manifest" and data["version"] == 1 and data["try"] == 2
    assert data["workflow"] == {"name": "txt2img", "sha256": SHA_B}
    assert data["outputs"][0] == {"node": "3", "output": 0, "type": "LATENT", "uri": "s3://b/runs/x/3/0.safetensors",
                                  "sha256": SHA_A, "bytes": 123, "shape": [1, 4, 8, 8], "dtype": "float32",
                                  "meta": {"noise_mask": False}}
    assert GroupManifest.from_json(text) == manifest
    assert GroupManifest.from_json(text.encode()) == manifest
    assert GroupManifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.output("7", 1).type == "INT"
    with pytest.raises(KeyError, match="persisted no output 0 of node '7'"):
        manifest.output("7", 0)
    minimal = {"schema": "airflow-comfy/group-manifest", "version": 1, "workflow": {"name": "w", "sha256": ""},
               "group": "g", "run_key": "d/r", "try": 1, "outputs": []}
    assert GroupManifest.from_dict(minimal).images == [] and GroupManifest.from_dict(minimal).package_version == ""
    flat = GroupManifest("w", "", "g", "d/r", 1, timings={"nodes": {"3": 1.0}, "total": 2.0, "read": 0.5})
    assert flat.timings == Timings(nodes={"3": 1.0}, totals={"total": 2.0, "read": 0.5})
    assert GroupManifest.from_dict(dict(flat.to_dict(), timings={"nodes": {}, "total": 4})).timings.totals == {"total": 4}


def _broken(change) -> dict:
    data = sample_manifest().to_dict()
    change(data)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(schema="other"), "schema must be"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("group"), "group: missing"),
    (lambda d: d.update(group=""), "group: expected a non-empty string"),
    (lambda d: d.update(**{"try": True}), "try: expected a non-negative integer"),
    (lambda d: d["outputs"][1].pop("sha256"), r"outputs\[1\].sha256: missing"),
    (lambda d: d["outputs"][0].update(sha256="abc"), r"outputs\[0\].sha256: expected a sha256"),
    (lambda d: d["outputs"][0].update(bytes=-1), r"outputs\[0\].bytes: expected a non-negative integer"),
    (lambda d: d["outputs"][0].update(shape=[1, "4"]), r"outputs\[0\].shape\[1\]"),
    (lambda d: d["outputs"][0].update(meta=[]), r"outputs\[0\].meta: expected an object"),
    (lambda d: d["outputs"].append(dict(d["outputs"][0])), "listed twice"),
    (lambda d: d.update(outputs={}), "outputs: expected a list"),
    (lambda d: d["images"][0].update(width="512"), r"images\[0\].width"),
    (lambda d: d["timings"]["nodes"].update({"3": "slow"}), "timings.nodes.3: expected a number"),
    (lambda d: d["timings"].update(nodes=[1]), "timings.nodes: expected an object"),
    (lambda d: d["timings"].update(total="x"), "timings.total: expected a number"),
    (lambda d: d["images"][0].update(subfolder=None), r"images\[0\].subfolder"),
    (lambda d: d.update(models={"m.safetensors": "nothex"}), "models"),
    (lambda d: d["workflow"].pop("name"), "workflow.name: missing"),
])
def test_manifest_validation_names_the_field(change, message: str):
    with pytest.raises(BadArtifact, match=message) as raised:
        GroupManifest.from_dict(_broken(change), uri="s3://b/m.json")
    assert "s3://b/m.json" in str(raised.value) and raised.value.uri == "s3://b/m.json"


def test_manifest_from_bad_json():
    with pytest.raises(BadArtifact, match="not valid JSON"):
        GroupManifest.from_json("{not json", uri="file:///x/manifest.json")
    with pytest.raises(BadArtifact, match="expected an object"):
        GroupManifest.from_json("[]")
    with pytest.raises(BadArtifact, match="not valid JSON"):
        GroupManifest.from_json(b"\xff\xfe")


def test_store_json_helpers_refuse_bad_json(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.put_bytes("m.json", b"{truncated")
    with pytest.raises(BadArtifact, match=r"m.json is not valid JSON"):
        store.get_json("m.json")


# --- S3 against a real S3-protocol server (moto over HTTP) ----------------------------------------------------

FAKE_KEY_ID = "AKIAFAKEKEYID0000001"
FAKE_SECRET = "fake-secret-Zq9Xw8Vu7Ts6"
FAKE_TOKEN = "fake-session-token-Pp1Oo2"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Fake credentials in the standard environment (and no real AWS config); returns the endpoint."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture
def bucket(s3_env: str) -> str:
    import boto3

    name = f"comfy-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


def assert_no_secret(text: str) -> None:
    for secret in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN):
        assert secret not in text


def test_s3_put_get_exists_list(s3_env: str, bucket: str):
    store = open_store(f"s3://{bucket}/comfy/", endpoint_url=s3_env)
    assert store.root_uri == f"s3://{bucket}/comfy"
    key = "runs/d/r/g/try-1/3/0.safetensors"
    uri = store.put_bytes(key, b"\x00\x01tensor")
    assert uri == store.uri(key) == f"s3://{bucket}/comfy/{key}"
    assert store.get_bytes(key) == b"\x00\x01tensor"
    assert store.exists(key) and not store.exists("runs/d/r/g")
    assert store.key_of(uri) == key
    store.put_json("runs/d/r/g/manifest.json", {"ok": True})
    store.put_bytes("runs/d/r2/x.png", [b"\x89PNG", b"..."])
    assert store.get_json("runs/d/r/g/manifest.json") == {"ok": True}
    assert store.list() == ["runs/d/r/g/manifest.json", "runs/d/r/g/try-1/3/0.safetensors", "runs/d/r2/x.png"]
    assert store.list("runs/d/r/") == ["runs/d/r/g/manifest.json", "runs/d/r/g/try-1/3/0.safetensors"]
    assert store.list("runs/none/") == []
    head = store.client.head_object(Bucket=bucket, Key="comfy/runs/d/r2/x.png")  # type: ignore[attr-defined]
    assert head["ContentType"] == "image/png"
    head = store.client.head_object(Bucket=bucket, Key="comfy/runs/d/r/g/manifest.json")  # type: ignore[attr-defined]
    assert head["ContentType"] == "application/json"
    with pytest.raises(ValueError, match="not in the artifact store"):
        store.key_of(f"s3://{bucket}/other/{key}")


def test_s3_bucket_root_and_read_uri_from_environment(s3_env: str, bucket: str, monkeypatch: pytest.MonkeyPatch):
    store = open_store(f"s3://{bucket}", endpoint_url=s3_env)
    uri = store.put_bytes("a/b.json", b"[1]")
    assert uri == f"s3://{bucket}/a/b.json"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)  # how a pod finds MinIO
    assert read_uri(uri) == b"[1]"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    assert read_uri(uri) == b"[1]"
    assert open_store(f"s3://{bucket}").list() == ["a/b.json"]
    assert read_uri(uri, endpoint_url=s3_env) == b"[1]"


def test_s3_overwrite_refusal(s3_env: str, bucket: str):
    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env)
    store.put_bytes("k", b"first")
    with pytest.raises(ArtifactExistsError, match=f"s3://{bucket}/p/k already exists"):
        store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"first"
    store.put_bytes("k", b"third", overwrite=True)
    assert store.get_bytes("k") == b"third"


def test_s3_conditional_write_stops_a_concurrent_writer(s3_env: str, bucket: str, monkeypatch: pytest.MonkeyPatch):
    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env)
    store.put_bytes("k", b"winner")
    monkeypatch.setattr(store, "_head", lambda key: False)  # as if both writers checked before either wrote
    with pytest.raises(ArtifactExistsError, match="written concurrently"):
        store.put_bytes("k", b"loser")
    monkeypatch.undo()
    assert store.get_bytes("k") == b"winner"


def test_s3_missing_objects_and_buckets(s3_env: str, bucket: str):
    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env)
    with pytest.raises(ArtifactNotFound, match=f"no artifact at s3://{bucket}/p/missing.json") as raised:
        store.get_bytes("missing.json")
    assert raised.value.uri == f"s3://{bucket}/p/missing.json"
    with pytest.raises(ArtifactNotFound):
        read_uri(f"s3://{bucket}/p/missing.json", endpoint_url=s3_env)
    errors: list[Exception] = [raised.value]
    nobucket = open_store(f"s3://missing-{bucket}/p", endpoint_url=s3_env)
    for action in (lambda: nobucket.get_bytes("k"), lambda: nobucket.put_bytes("k", b"x"), lambda: nobucket.list()):
        with pytest.raises(ArtifactError, match="NoSuchBucket") as failed:
            action()
        assert not isinstance(failed.value, ArtifactNotFound)
        errors.append(failed.value)
    for error in errors:
        assert_no_secret(str(error))
        assert_no_secret(repr(error))
        assert error.__cause__ is None and error.__suppress_context__


def test_s3_credentials_never_leak(s3_env: str, bucket: str):
    with pytest.raises(ValueError, match="credentials must not be put") as raised:
        open_store(f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@{bucket}/p")
    assert_no_secret(str(raised.value))
    with pytest.raises(ValueError) as raised:
        read_uri(f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@{bucket}/p/k")
    assert_no_secret(str(raised.value))
    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env)
    uri = store.put_bytes("k", b"x")
    for text in (repr(store), str(store), uri, store.root_uri):
        assert_no_secret(text)
    with_userinfo = open_store(f"s3://{bucket}/p", endpoint_url=s3_env.replace("http://", "http://user:pw@"))
    assert "pw" not in repr(with_userinfo) and "***@" in repr(with_userinfo)


def test_s3_error_messages_scrub_credentials(s3_env: str, bucket: str):
    from botocore.exceptions import ClientError

    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env)
    store.client  # noqa: B018 - make the session, whose credentials are scrubbed too
    response = {"Error": {"Code": "SignatureDoesNotMatch",
                          "Message": f"for {FAKE_KEY_ID} signed with {FAKE_SECRET} and {FAKE_TOKEN}"},
                "ResponseMetadata": {"HTTPStatusCode": 403}}
    error = store._failure("read", store.uri("k"), ClientError(response, "GetObject"))  # type: ignore[attr-defined]
    assert "SignatureDoesNotMatch (HTTP 403)" in str(error) and store.uri("k") in str(error)
    assert_no_secret(str(error))


def test_s3_store_without_conditional_writes_falls_back(monkeypatch: pytest.MonkeyPatch):
    from botocore.exceptions import ClientError

    from airflow_comfy.artifacts.s3 import S3Store

    class NoConditionalWrites:
        def __init__(self) -> None:
            self.objects: dict[str, bytes] = {}

        def head_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's names
            if Key not in self.objects:
                raise ClientError({"Error": {"Code": "404"}}, "HeadObject")
            return {}

        def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str, **extra) -> dict:  # noqa: N803
            if extra:
                raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no If-None-Match"}}, "PutObject")
            self.objects[Key] = Body
            return {}

    client = NoConditionalWrites()
    store = S3Store("bucket", "p", client=client)
    assert store.put_bytes("k", b"1") == "s3://bucket/p/k" and client.objects == {"p/k": b"1"}
    with pytest.raises(ArtifactExistsError):
        store.put_bytes("k", b"2")  # the check before the write still refuses
    store.put_bytes("k2", b"3")
    assert client.objects == {"p/k": b"1", "p/k2": b"3"}


@pytest.mark.parametrize("uri", ["s3:///prefix", "s3://b/p?x=1", "s3://Bad_Bucket!/p", "s3://bucket:99/p"])
def test_s3_uri_validation(uri: str):
    with pytest.raises(ValueError):
        open_store(uri)


# --- bounded waiting, copies, deletes, temporary files --------------------------------------------------------


def test_store_limits_text_round_trip(monkeypatch: pytest.MonkeyPatch):
    from airflow_comfy.artifacts.limits import ENV, StoreLimits

    limits = StoreLimits.parse("connect=1.5, read=3,operation=9,attempts=2")
    assert (limits.connect_timeout, limits.read_timeout, limits.operation_timeout, limits.attempts) == (1.5, 3, 9, 2)
    assert StoreLimits.parse(limits.to_text()) == limits
    assert StoreLimits.parse("read=7") == StoreLimits(read_timeout=7)
    monkeypatch.setenv(ENV, "operation=0")
    assert StoreLimits.from_env().operation_timeout == 0 and open_store("/tmp").limits.operation_timeout == 0
    for bad in ("speed=3", "read=fast", "read=0", "attempts=0", "operation=-1"):
        with pytest.raises(ValueError):
            StoreLimits.parse(bad)


def test_bounded_retries_what_may_pass_and_gives_up_in_time():
    import time

    from airflow_comfy.artifacts.errors import StoreUnavailable
    from airflow_comfy.artifacts.limits import StoreLimits, Transient, bounded

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Transient("connection reset")
        return "ok"

    limits = StoreLimits(attempts=3, backoff=0.01, operation_timeout=5)
    assert bounded(flaky, limits, "read", "s3://b/k") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StoreUnavailable, match=r"cannot read s3://b/k: gave up after 2 attempt\(s\).*reset") as raised:
        bounded(flaky, limits.with_values(attempts=2), "read", "s3://b/k")
    assert raised.value.uri == "s3://b/k"
    with pytest.raises(KeyError):  # anything else: at once, as it is
        bounded(lambda: {}["x"], limits, "read", "s3://b/k")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"cannot write s3://b/k: no answer within 0.5 s"):
        bounded(lambda: time.sleep(30), limits.with_values(operation_timeout=0.5), "write", "s3://b/k")
    assert time.monotonic() - began < 2


def test_local_copy_delete_and_temp_files(tmp_path: Path):
    store = LocalStore(tmp_path)
    store.put_bytes("a/src.png", b"png")
    assert store.copy("a/src.png", "out/x.png") == store.uri("out/x.png")
    assert store.get_bytes("out/x.png") == b"png"
    with pytest.raises(ArtifactExistsError):
        store.copy("a/src.png", "out/x.png")
    store.put_bytes("a/other.png", b"other")
    store.copy("a/other.png", "out/x.png", overwrite=True)
    assert store.get_bytes("out/x.png") == b"other"
    with pytest.raises(ArtifactNotFound):
        store.copy("a/missing.png", "out/y.png")
    store.delete("a/src.png")
    store.delete("a/src.png")  # nothing there: nothing happens
    store.delete("a/other.png")
    assert not (tmp_path / "a").exists()  # emptied folders go too
    (tmp_path / "out" / f"{TMP_PREFIX}abc.tmp").write_bytes(b"half")
    assert store.remove_temp("out/", older_than=3600) == []
    assert store.remove_temp("out/") == [f"out/{TMP_PREFIX}abc.tmp"]
    assert store.list() == ["out/x.png"]


def test_local_refusals_and_full_disks_are_told_apart(tmp_path: Path):
    import errno as errnos

    from airflow_comfy.artifacts.errors import StoreRefused
    from airflow_comfy.artifacts.store import os_failure

    with pytest.raises(StoreRefused, match="cannot write file:///proc/forbidden/k"):
        open_store("file:///proc/forbidden").put_bytes("k", b"x")
    full = os_failure("write", "file:///x", OSError(errnos.ENOSPC, "No space left on device"))
    assert type(full) is ArtifactError and "No space left on device" in str(full)
    assert isinstance(os_failure("write", "file:///x", OSError(errnos.EROFS, "Read-only file system")), StoreRefused)


def test_s3_store_that_never_answers_fails_within_its_deadline():
    """A listening socket that accepts and never answers (what a paused server looks like)."""
    import socket
    import time

    from airflow_comfy.artifacts.errors import StoreUnavailable
    from airflow_comfy.artifacts.limits import StoreLimits
    from airflow_comfy.artifacts.s3 import S3Store

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        # (a PUT first waits up to 1 s for "100 Continue", then read_timeout for the answer)
        limits = StoreLimits(connect_timeout=1, read_timeout=0.5, operation_timeout=8, attempts=3, backoff=0.1)
        store = S3Store("bucket", "p", endpoint_url=endpoint, limits=limits,
                        credentials={"aws_access_key_id": "AKIAFAKE", "aws_secret_access_key": "fake"})
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"cannot write s3://bucket/p/k: gave up after 3 attempt") as raised:
            store.put_bytes("k", b"x", overwrite=True)
        assert time.monotonic() - began < 8
        assert "Read timeout" in str(raised.value) and endpoint in str(raised.value)
        store.limits = limits.with_values(read_timeout=5, operation_timeout=1)
        store._client = None  # noqa: SLF001 - a client with the new read timeout
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"cannot read s3://bucket/p/k: no answer within 1 s"):
            store.get_bytes("k")
        assert time.monotonic() - began < 1.5
