"""The README's configuration table matches the settings the code reads."""

import pathlib
import re

from collector.settings import SETTINGS

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_readme_table_with_its_default():
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.MULTILINE)}
    for setting in SETTINGS:
        assert setting.env in rows, f"{setting.env} is missing from README.md"
        expected = ("(required)" if setting.default is None
                    else "(empty)" if setting.default == "" else f"`{setting.default}`")
        assert rows[setting.env].strip() == expected, setting.env


def test_readme_names_no_setting_the_code_does_not_read():
    documented = set(re.findall(r"^\| `(COLLECTOR_[A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    assert documented <= {s.env for s in SETTINGS}
