"""Target files: the shipped ones validate and carry the real device facts; broken ones fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, json_out, run_inprocess
from edgekd.errors import EdgekdError
from edgekd.targets import BUILTIN_TARGETS_DIR, TARGETS_ENV, accelerator_present, get_target, host_arch, is_jetson, load_target_file, load_targets, resolve

REQUIRED = {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx", "x86-cuda", "x86-cpu", "arm64-cpu"}


def test_every_shipped_target_validates_and_the_required_ones_exist():
    found = load_targets()
    assert REQUIRED <= set(found)
    for path in sorted(BUILTIN_TARGETS_DIR.glob("*.toml")):
        t = load_target_file(path)
        assert t.name == path.stem
        assert "Sources" in path.read_text() or t.kind != "jetson", f"{path} must name its sources"


def test_jetson_alias_is_the_orin_nano():
    assert get_target("jetson").name == "jetson-orin-nano"


def test_device_facts_match_nvidia_docs():
    nano, nx, agx, xavier = (get_target(n) for n in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx"))
    assert nano.dla.cores == 0 and nano.dla.core is None  # Orin Nano has no DLA
    assert nx.dla.cores == 2 and agx.dla.cores == 2 and xavier.dla.cores == 2
    assert (nano.jetpack, nano.tensorrt) == ("6.1", "10.3")
    assert (xavier.jetpack, xavier.tensorrt) == ("5.1", "8.5")
    assert (nano.power.id, nano.power.name) == (0, "15W")
    assert all(t.engine_build == "device" and t.runtime == "tensorrt" and t.layout == "tensorrt" for t in (nano, nx, agx, xavier))
    assert get_target("x86-cpu").layout == "ort-cpu" and get_target("arm64-cpu").arch == "aarch64"


def _copy_target(tmp_path: Path, name: str, edit) -> Path:
    d = tmp_path / "user-targets"
    d.mkdir(exist_ok=True)
    text = (BUILTIN_TARGETS_DIR / "x86-cpu.toml").read_text()
    path = d / f"{name}.toml"
    path.write_text(edit(text))
    return d


@pytest.mark.parametrize("edit, field", [
    (lambda t: t + "\nbatchsize = 4\n", "batchsize: unknown key"),
    (lambda t: t.replace("batch = 64", 'batch = "lots"'), "batch:"),
    (lambda t: t.replace('runtime = "ort-cpu"', 'runtime = "tflite"'), "runtime:"),
    (lambda t: t.replace("batch1_ms = 1.0", "batch1_ms = -1.0"), "latency_budget.batch1_ms"),
    (lambda t: t + "\n[dla]\ncores = 0\ncore = 0\n", "dla"),
    (lambda t: t.replace('runtime = "ort-cpu"', 'runtime = "tensorrt"'), "layout 'tensorrt'"),
])
def test_broken_target_file_names_the_file_and_the_field(tmp_path, edit, field):
    d = _copy_target(tmp_path, "mine", edit)
    with pytest.raises(EdgekdError) as err:
        load_targets(d)
    assert str(d / "mine.toml") in str(err.value) and field in str(err.value)


def test_bad_toml_syntax_names_the_file(tmp_path):
    d = _copy_target(tmp_path, "mine", lambda t: t + "\nbatch = = 3\n")
    with pytest.raises(EdgekdError, match="mine.toml is not valid TOML"):
        load_targets(d)


def test_unknown_target_lists_known_ones_and_aliases():
    with pytest.raises(EdgekdError) as err:
        get_target("jetson-nano-2gb")
    msg = str(err.value)
    assert all(name in msg for name in REQUIRED) and "jetson -> jetson-orin-nano" in msg


def test_user_folder_adds_and_overrides_targets_and_env_var_works(tmp_path, monkeypatch):
    d = _copy_target(tmp_path, "my-nuc", lambda t: t.replace("batch = 64", "batch = 4").replace('aliases = ["cpu"]', 'aliases = ["nuc"]'))
    shutil.copy(BUILTIN_TARGETS_DIR / "x86-cpu.toml", d / "x86-cpu.toml")
    (d / "x86-cpu.toml").write_text((d / "x86-cpu.toml").read_text().replace("batch = 64", "batch = 2"))
    assert get_target("nuc", d).batch == 4
    assert resolve("x86-cpu", d).path == d / "x86-cpu.toml" and get_target("x86-cpu", d).batch == 2
    monkeypatch.setenv(TARGETS_ENV, str(d))
    assert get_target("my-nuc").batch == 4


def test_duplicate_alias_and_missing_folder_are_refused(tmp_path, monkeypatch):
    d = _copy_target(tmp_path, "other", lambda t: t.replace('aliases = ["cpu"]', 'aliases = ["jetson"]'))
    with pytest.raises(EdgekdError, match="aliases: 'jetson' is already an alias"):
        load_targets(d)
    with pytest.raises(EdgekdError, match="targets folder not found"):
        load_targets(tmp_path / "nope")


def test_accelerator_present_reflects_this_machine():
    cpu = accelerator_present(get_target("x86-cpu"))
    assert cpu.ok == (host_arch() == "x86_64"), cpu.reason
    jetson = accelerator_present(get_target("jetson"))
    assert jetson.ok is False or is_jetson()
    assert jetson.reason


def test_cli_targets_list_show_and_unknown(tmp_path):
    data = json_out(run_inprocess("targets", "list", "--json"))
    assert REQUIRED <= {t["name"] for t in data["targets"]}
    shown = json_out(run_inprocess("targets", "show", "jetson", "--json"))
    assert shown["target"]["name"] == "jetson-orin-nano" and shown["target"]["power"]["name"] == "15W"
    assert_one_line_error(run_inprocess("targets", "show", "nope"), "unknown target 'nope'")
    d = _copy_target(tmp_path, "mine", lambda t: t + "\nfoo = 1\n")
    assert_one_line_error(run_inprocess("targets", "list", "--targets-dir", str(d)), "foo: unknown key")
