"""The CLI's shared option groups mean the same in every subcommand, and no subcommand module reaches into another."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from cdi.cli import COMMANDS, build_parser

SHARED = ("--batch-size", "--device", "--threads", "--tracking-uri", "--format", "--no-progress", "--access",
          "--reference-model")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _meaning(action: argparse.Action) -> tuple:
    """What an option does, apart from its default: type, choices, destination, action class, help without
    the '(default ...)' part."""
    text = (action.help or "").split("(default")[0]
    return (action.type, tuple(action.choices or ()), action.dest, type(action).__name__, action.nargs,
            text if action.dest not in ("batch_size", "reference_models", "access") else None)


@pytest.mark.parametrize("option", SHARED)
def test_a_shared_option_means_the_same_in_every_subcommand(option):
    found = {}
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if option in action.option_strings:
                found[name] = _meaning(action)
    assert len(found) >= 2, f"{option} is shared by fewer than two subcommands: {sorted(found)}"
    assert len(set(found.values())) == 1, f"{option} differs between subcommands: {found}"


def test_every_model_running_subcommand_has_the_compute_group():
    subs = _subcommands()
    for name in ("audit", "calibrate", "search"):
        options = {o for a in subs[name]._actions for o in a.option_strings}
        assert {"--batch-size", "--device", "--threads", "--tracking-uri"} <= options, name


def test_a_zero_batch_size_is_refused_by_every_subcommand(capsys):
    from cdi.cli import main

    for argv in (["audit", "--model", "m", "--suspect", "s", "--control", "c"], ["search"],
                 ["calibrate", "--model", "m", "--members", "a", "--nonmembers", "b"]):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--batch-size", "0"])
        assert stop.value.code == 2
        assert "--batch-size" in capsys.readouterr().err


def test_subcommand_modules_import_only_the_shared_module_of_the_cli():
    folder = Path(__file__).resolve().parent.parent / "cdi" / "cli"
    for command in COMMANDS:
        tree = ast.parse(Path(command.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdi.cli"):
                assert node.module == "cdi.cli.common", f"{command.__name__} imports {node.module}"
            if isinstance(node, ast.ImportFrom):
                names = [alias.name for alias in node.names]
                assert not [n for n in names if n.startswith("_")], f"{command.__name__} imports private {names}"
    assert {Path(c.__file__).stem for c in COMMANDS} == {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__", "common"}


def test_audit_help_lists_the_features_the_families_declare():
    from cdi.features import FEATURE_NAMES

    (features,) = [a for a in _subcommands()["audit"]._actions if "--features" in a.option_strings]
    listed = features.help.replace(";", ",").replace(":", ",").replace(" ", ",").split(",")
    assert set(FEATURE_NAMES) <= set(listed)
