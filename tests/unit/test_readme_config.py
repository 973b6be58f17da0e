"""The README's configuration reference is a real configuration: it parses, every key it names
exists, and every key that exists is named (with its default)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from authority.config import CaConfig, Config, Limits

README = Path(__file__).resolve().parents[2] / "README.md"


def _reference() -> str:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match is not None, "the Configuration section has no TOML block"
    return match.group(1)


def test_the_readme_configuration_parses_as_the_defaults() -> None:
    document = tomllib.loads(_reference())
    assert Config.from_mapping(document) == Config()


def test_every_key_is_in_the_readme() -> None:
    document = tomllib.loads(_reference())
    tables = {"": (Config, document), "ca": (CaConfig, document["ca"])}
    tables["limits"] = (Limits, document["limits"])
    for name, (cls, table) in tables.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {"ca", "limits"}
        missing = sorted(fields - set(table))
        assert not missing, f"[{name}] keys missing from the README: {missing}"
