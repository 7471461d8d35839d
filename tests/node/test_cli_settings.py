"""``aidp-node run`` flags made from NodeSettings: one per field, over AIDP_NODE_* only when
given, and a --help that shows each default and variable."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic.fields import FieldInfo

from node_agent import cli
from node_agent.settings import NodeSettings

FIELDS = NodeSettings.model_fields


@pytest.fixture(autouse=True)
def no_node_environment(monkeypatch, tmp_path) -> None:
    """No AIDP_NODE_* variable nor .env of the machine running the tests leaks in."""
    monkeypatch.chdir(tmp_path)
    for name in FIELDS:
        monkeypatch.delenv(f"AIDP_NODE_{name.upper()}", raising=False)


def _kind(field: FieldInfo) -> Any:
    kinds = [a for a in get_args(field.annotation) if a is not type(None)]
    return kinds[0] if get_origin(field.annotation) is not Literal and kinds else field.annotation


def sample(name: str, field: FieldInfo, nth: int) -> tuple[str, Any]:
    """The ``nth`` value unlike the default: as typed (flag or variable) and as parsed."""
    kind, default = _kind(field), field.default
    if get_origin(kind) is Literal:
        value = [c for c in get_args(kind) if c != default][nth]
        return str(value), value
    if kind is int:
        return str((default or 0) + 7 + nth), (default or 0) + 7 + nth
    if kind is float:
        return str((default or 0) + 1.5 + nth), (default or 0) + 1.5 + nth
    if kind is Path:
        return f"/tmp/{name}-{nth}", Path(f"/tmp/{name}-{nth}")
    assert kind is str, f"no sample for NodeSettings.{name}: {field.annotation!r}"
    return f"{name}-{nth}", f"{name}-{nth}"


def settings_for(*argv: str) -> NodeSettings:
    return cli.settings_from_args(cli.build_parser().parse_args(["run", *argv]))


def run_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # wrapping undone


def test_every_field_has_a_flag_that_sets_it() -> None:
    for name, field in FIELDS.items():
        text, value = sample(name, field, 0)
        settings = settings_for(f"--{name.replace('_', '-')}={text}")
        assert getattr(settings, name) == value, name


def test_a_flag_given_overrides_the_variable(monkeypatch) -> None:
    for name, field in FIELDS.items():
        monkeypatch.setenv(f"AIDP_NODE_{name.upper()}", sample(name, field, 0)[0])
    flags = [f"--{n.replace('_', '-')}={sample(n, f, 1)[0]}" for n, f in FIELDS.items()]
    settings = settings_for(*flags)
    for name, field in FIELDS.items():
        assert getattr(settings, name) == sample(name, field, 1)[1], name


def test_a_flag_not_given_leaves_the_variable(monkeypatch) -> None:
    for name, field in FIELDS.items():
        monkeypatch.setenv(f"AIDP_NODE_{name.upper()}", sample(name, field, 0)[0])
    settings = settings_for("--region=flagged")
    assert settings.region == "flagged"
    for name, field in FIELDS.items():
        if name != "region":
            assert getattr(settings, name) == sample(name, field, 0)[1], name


def test_no_flag_no_variable_is_the_default() -> None:
    settings = settings_for()
    for name, field in FIELDS.items():
        assert getattr(settings, name) == field.default, name


def test_the_flags_of_before_keep_working() -> None:
    settings = settings_for("--market", "http://m:1", "--ctx", "512")
    assert (settings.market_url, settings.n_ctx) == ("http://m:1", 512)


def test_help_shows_each_flag_its_description_default_and_variable(capsys, monkeypatch) -> None:
    out = run_help(capsys, monkeypatch).split(" options: ", 1)[1]  # past the usage
    for name, field in FIELDS.items():
        default = field.default
        shown = "unset" if default is None else '""' if default == "" else str(default)
        assert field.description, f"NodeSettings.{name} has no description"
        flag = re.escape(f"--{name.replace('_', '-')}")
        value = r"(?:\{[^}]*\}|[A-Z][^\s,]*)"  # a metavar, or the choices
        entry = re.search(rf"{flag} {value}(?:, --\S+ {value})? (.*?) \(default: ", out)
        assert entry and entry.group(1) == " ".join(field.description.split()), name
        assert f"(default: {shown}; env AIDP_NODE_{name.upper()})" in out, name


def test_an_invalid_flag_value_is_refused_by_argparse(capsys) -> None:
    with pytest.raises(SystemExit):
        settings_for("--engine", "tensorrt")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_for("--n-ctx", "lots")


def test_bool_and_optional_fields_get_fitting_flags() -> None:
    """No NodeSettings field is a bool yet: the one that comes gets --x / --no-x."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    flag = FieldInfo(annotation=bool | None, default=False, description="a switch")
    parser.add_argument("--switch", **cli._flag_kwargs("switch", flag))
    assert vars(parser.parse_args(["--no-switch"])) == {"switch": False}
    assert vars(parser.parse_args(["--switch"])) == {"switch": True}
    assert vars(parser.parse_args([])) == {}
    count = FieldInfo(annotation=int | None, default=None, description="a count")
    parser.add_argument("--count", **cli._flag_kwargs("count", count))
    assert vars(parser.parse_args(["--count", "3"])) == {"count": 3}
