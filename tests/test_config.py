"""Configs: typed, validated, frozen; --set overrides; one-line errors naming file, key, expected, got."""

import dataclasses

import pytest

from robot_mbrl.config import load_config, packaged_configs
from robot_mbrl.typedconfig import ConfigError


def test_packaged_configs_load_and_are_frozen():
    assert {"cartpole_swingup", "cartpole_balance", "inverted_pendulum_gym"} <= set(packaged_configs())
    for name in packaged_configs():
        cfg = load_config(name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.seed = 3  # type: ignore[misc]
    assert load_config().twin.task == "swingup"


def test_set_overrides_are_typed():
    cfg = load_config(None, ["twin.pole_mass_kg=0.3", "seed=7", "run.gate=false", "twin.task=balance"])
    assert (
        cfg.twin.pole_mass_kg == 0.3
        and cfg.seed == 7
        and cfg.run.gate is False
        and cfg.twin.task == "balance"
    )
    cfg = load_config(
        None, ["twin.schedule=[{at_s: 3.0, kind: param_scale, target: pole_mass_kg, value: 2.0}]"]
    )
    assert cfg.twin.schedule[0].value == 2.0 and cfg.twin.schedule[0].kind == "param_scale"
    assert (
        load_config(None, ["monitor.arl0_ticks=1e8"]).monitor.arl0_ticks == 1e8
    )  # YAML 1.1 reads 1e8 as str


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("twin.pole_mas_kg=0.3", "twin.pole_mas_kg", "did you mean 'pole_mass_kg'"),  # misspelled key
        ("twin.pole_mass_kg=heavy", "twin.pole_mass_kg", "a number"),  # wrong type
        ("twin.pole_mass_kg=-0.2", "twin.pole_mass_kg", ">= 0.001"),  # negative mass
        ("planner.method=newton", "planner.method", "one of"),
        ("seed=1.5", "seed", "an integer"),
    ],
)
def test_bad_values_name_file_key_expected_got(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("cartpole_swingup.yaml (--set)") and key in msg and expected in msg and "got" in msg


def test_bad_file(tmp_path):
    p = tmp_path / "rig.yaml"
    p.write_text("twin:\n  cart_mass_kg: -1\n")
    with pytest.raises(ConfigError, match=r"rig.yaml: twin.cart_mass_kg: expected a value >= 0.01"):
        load_config(str(p))
    p.write_text("twin: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_config(str(tmp_path / "missing.yaml"))
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(
        ConfigError, match="rig.yaml: <file>: expected UTF-8 text, got 'undecodable bytes at offset 0'"
    ):
        load_config(str(p))
    with pytest.raises(ConfigError, match="expected an existing YAML file, got 'a directory'"):
        load_config(str(tmp_path))
    p.write_text("!!python/object/apply:os.system ['true']\n")  # the safe loader refuses
    with pytest.raises(ConfigError):
        load_config(str(p))


def test_cross_field_errors_show_the_values_they_name():
    with pytest.raises(ConfigError, match=r"\(--set\): twin: expected safe_x_m must be < end_stop_x_m, got "
                       r"'end_stop_x_m=0.45, safe_x_m=0.5'"):  # fmt: skip
        load_config(None, ["twin.safe_x_m=0.5"])


def test_infinite_values_are_refused():
    with pytest.raises(ConfigError, match="gate.disagreement_threshold: expected a finite number"):
        load_config(None, ["gate.disagreement_threshold=.inf"])


def test_yaml_merge_keys_still_load(tmp_path):
    merged = tmp_path / "merged.yaml"  # "<<:" merges a mapping in: not a key given twice
    merged.write_text("fallback:\n  <<: {kind: brake, kv: 3.0}\n  kx: 2.0\n")
    cfg = load_config(str(merged))
    assert cfg.fallback.kv == 3.0 and cfg.fallback.kx == 2.0


def test_a_key_given_twice_and_an_empty_file_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nplanner:\n  horizon: 5\n  horizon: 7\n")
    with pytest.raises(ConfigError, match=r"line 4: expected valid YAML, got \"key 'horizon' given twice"):
        load_config(str(twice))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="expected a mapping of sections.*got 'an empty file'"):
        load_config(str(empty))
