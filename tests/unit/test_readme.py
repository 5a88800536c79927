"""The README stays true: its settings table lists exactly the settings the code reads."""

from __future__ import annotations

import re

from learner.config import LearnerSettings
from tests.support import ROOT
from thumbtune.core.settings import Settings

README = ROOT / "README.md"


def test_readme_settings_table_matches_settings() -> None:
    documented = set(re.findall(r"^\| `(THUMBTUNE_[A-Z0-9_]+)` \|", README.read_text(), flags=re.M))
    expected = {f"THUMBTUNE_{name.upper()}" for name in Settings.model_fields}
    expected |= {f"THUMBTUNE_LEARNER_{name.upper()}" for name in LearnerSettings.model_fields}
    assert expected - documented == set(), "settings missing from the README table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert text.index("make run") < text.index("## Settings")
    assert text.index("make test") < text.index("## Settings")
