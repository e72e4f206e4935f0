"""The README's configuration table is the one the presets give (regenerate it with
``python -c "from hpd_fast.config import preset_table; print(preset_table())"``)."""

from __future__ import annotations

import re
from pathlib import Path

from hpd_fast.config import preset_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_preset_table_is_current():
    text = README.read_text()
    m = re.search(
        r"<!-- BEGIN preset table \(hpd_fast.config.preset_table\) -->\n(.*?)\n<!-- END preset table -->",
        text,
        re.S,
    )
    assert m, "README.md has no preset table"
    assert m.group(1).strip() == preset_table().strip()
