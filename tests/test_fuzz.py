"""Fuzzing the readers that take files from outside: bundles, manifests, JSON and recipes.

Random and mutated inputs (hypothesis, bounded so CI stays fast). The only allowed outcomes are
success or :class:`~edgekd.errors.EdgekdError`: any other exception type is a crash a user would
see as a traceback, and every case must finish quickly (no hang). Issue 7, "fuzz-style test".
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekd import runtime
from edgekd.bundle import BundleModel, load_bundle_meta, make_bundle
from edgekd.config import apply_overrides, load_recipe, parse_file
from edgekd.errors import EdgekdError
from edgekd.manifest import MANIFEST_NAME, Manifest
from edgekd.atomic import read_json

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON-like values of any shape: what a hand-edited or corrupted file can hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
recipe_keys = st.sampled_from(["name", "seed", "deterministic", "target", "data", "teacher", "student", "distill", "quantize", "export", "bench",
                               "train", "epochs", "lr", "model", "losses", "batches", "root", "augment", "input_size", "1", ""])
recipe_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(recipe_keys, inner, max_size=4),
    max_leaves=20,
)


def only_edgekd_errors(fn, *args):
    """Run ``fn``; an EdgekdError is a fine answer to bad input, anything else fails the test."""
    try:
        return fn(*args)
    except EdgekdError as exc:
        assert "\n" not in str(exc)
        return None


def mutate(data: bytes, draw_ops: list[tuple[int, int, int]]) -> bytes:
    """Bit flips, truncation and byte insertion at positions chosen by hypothesis."""
    buf = bytearray(data)
    for kind, pos, value in draw_ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= 1 << (value % 8)
        elif kind == 1:
            del buf[i:]
        else:
            buf[i:i] = bytes([value % 256])
    return bytes(buf)


mutations = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6)


# ----------------------------------------------------------------------------- JSON and manifests
@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_read_json_takes_any_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.json"
        p.write_bytes(raw)
        only_edgekd_errors(read_json, p)


def _good_manifest(run: Path) -> dict:
    (run / "teacher").mkdir(parents=True, exist_ok=True)
    (run / "teacher" / "best.pt").write_bytes(b"weights")
    m = Manifest(run)
    m.start("teacher", "h1")
    m.finish("teacher", {"checkpoint": run / "teacher" / "best.pt"}, {"val_top1": 0.5})
    return json.loads((run / MANIFEST_NAME).read_text())


def _use_manifest(run: Path) -> None:
    m = Manifest(run)
    m.verify()
    m.is_done("teacher", "h1")
    m.stage("teacher")
    m.artifact_path("teacher", "checkpoint")


@FUZZ
@given(value=json_values, where=st.sampled_from(["root", "stages", "stage", "artifacts", "artifact", "path", "sha256"]))
def test_manifest_with_any_value_anywhere(value, where):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        data = _good_manifest(run)
        stage = data["stages"]["teacher"]
        if where == "root":
            data = value
        elif where == "stages":
            data["stages"] = value
        elif where == "stage":
            data["stages"]["teacher"] = value
        elif where == "artifacts":
            stage["artifacts"] = value
        elif where == "artifact":
            stage["artifacts"]["checkpoint"] = value
        else:
            stage["artifacts"]["checkpoint"][where] = value
        (run / MANIFEST_NAME).write_text(json.dumps(data))
        only_edgekd_errors(_use_manifest, run)


@FUZZ
@given(ops=mutations)
def test_manifest_with_mutated_bytes(ops):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        _good_manifest(run)
        (run / MANIFEST_NAME).write_bytes(mutate((run / MANIFEST_NAME).read_bytes(), ops))
        only_edgekd_errors(_use_manifest, run)


# ----------------------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def small_bundle(pico_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzzbundle") / "bundle"
    pre = pico_model.preprocess.to_dict()
    make_bundle(out, BundleModel({"model": pico_model.onnx}, "model", pico_model.classes, pre), {"name": "x86-cpu", "runtime": "ort-cpu"},
                sample_images=pico_model.images[:2])
    return out


def _resum(root: Path) -> None:
    """Recompute SHA256SUMS so a mutated file passes the checksum step and reaches the parser."""
    lines = []
    for line in (root / runtime.SUMS_NAME).read_text().splitlines():
        rel = line.split("  ", 1)[1]
        if (root / rel).is_file():
            lines.append(f"{runtime.sha256_file(root / rel)}  {rel}")
    (root / runtime.SUMS_NAME).write_text("\n".join(lines) + "\n")


@FUZZ
@given(victim=st.sampled_from([runtime.SUMS_NAME, runtime.BUNDLE_JSON, "labels.txt"]), ops=mutations, resum=st.booleans())
def test_verify_bundle_with_mutated_files(small_bundle, victim, ops, resum):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "b"
        shutil.copytree(small_bundle, root)
        (root / victim).write_bytes(mutate((root / victim).read_bytes(), ops))
        if resum and victim != runtime.SUMS_NAME:
            _resum(root)
        only_edgekd_errors(runtime.verify_bundle, root)
        only_edgekd_errors(load_bundle_meta, root)


@FUZZ
@given(meta=json_values, keep=st.booleans())
def test_verify_bundle_with_any_bundle_json(small_bundle, meta, keep):
    """A bundle.json of any shape whose checksum matches (someone re-signed it): refused or read, never a crash."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "b"
        shutil.copytree(small_bundle, root)
        good = json.loads((root / runtime.BUNDLE_JSON).read_text())
        if keep and isinstance(meta, dict):
            meta = {**good, **meta}
        (root / runtime.BUNDLE_JSON).write_text(json.dumps(meta))
        _resum(root)
        only_edgekd_errors(runtime.verify_bundle, root)


@FUZZ
@given(ops=mutations)
def test_load_bundle_meta_with_mutated_tar(small_bundle, ops):
    tar_path = small_bundle.with_name(small_bundle.name + ".tar.gz")
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "b.tar.gz"
        bad.write_bytes(mutate(tar_path.read_bytes(), ops))
        with tempfile.TemporaryDirectory() as work:
            only_edgekd_errors(lambda: runtime.verify_bundle(runtime.open_bundle(bad, work)))


@FUZZ
@given(names=st.lists(st.text(alphabet="ab./\\:-_ ", min_size=1, max_size=12), min_size=1, max_size=4))
def test_open_bundle_with_odd_member_names(names):
    """Tar members with odd names ('..', absolute, backslashes): extracted inside dest or refused."""
    with tempfile.TemporaryDirectory() as d:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for n in names:
                info = tarfile.TarInfo(n)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
        p = Path(d) / "t.tar.gz"
        p.write_bytes(raw.getvalue())
        dest = Path(d) / "dest"
        only_edgekd_errors(runtime.safe_extract, p, dest)
        outside = [q for q in Path(d).rglob("*") if q.is_file() and q != p and dest not in q.parents]
        assert outside == []


# ----------------------------------------------------------------------------- recipes
@FUZZ
@given(data=recipe_like)
def test_load_recipe_with_any_yaml_structure(data):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(yaml.safe_dump(data))
        only_edgekd_errors(load_recipe, p)


@FUZZ
@given(text=st.text(max_size=200), suffix=st.sampled_from([".yaml", ".toml", ".yml"]))
def test_parse_file_with_any_text(text, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"r{suffix}"
        p.write_text(text)
        only_edgekd_errors(load_recipe, p)


@FUZZ
@given(ops=mutations)
def test_parse_file_with_mutated_real_recipe(ops):
    from edgekd.config import Recipe, recipe_to_yaml

    good = recipe_to_yaml(Recipe()).encode()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_bytes(mutate(good, ops))
        only_edgekd_errors(parse_file, p)
        only_edgekd_errors(load_recipe, p)


override_keys = st.lists(recipe_keys | st.text(alphabet="abc.", max_size=6), min_size=0, max_size=4).map(".".join)
override_values = st.text(max_size=20) | st.sampled_from(["3", "-1", "[1,2]", "{a: 1}", "true", "null", "[", "0.5", "kd", "!!python/object:os.system"])


@FUZZ
@given(items=st.lists(st.tuples(override_keys, override_values).map("=".join) | st.text(max_size=15), max_size=5))
def test_overrides_of_any_shape(items):
    only_edgekd_errors(load_recipe, None, items)
    only_edgekd_errors(apply_overrides, {"seed": 1, "data": {"root": None}}, items)
