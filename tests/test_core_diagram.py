"""The state diagram in the core's README is the one the code generates."""

import re
from pathlib import Path

import firmware_py.core
from firmware_py.core.machine import TRANSITIONS, Mode, diagram

README = Path(firmware_py.core.__file__).parent / "README.md"


def test_readme_diagram_matches_transition_table():
    text = README.read_text()
    block = re.search(r"```mermaid\n(.*?)\n```", text, re.S)
    assert block, "README.md has no mermaid block"
    assert block.group(1).strip() == diagram().strip()


def test_every_mode_is_reachable_and_left():
    targets = {rule.target for rule in TRANSITIONS}
    sources = set().union(*(rule.sources for rule in TRANSITIONS))
    assert targets | {Mode.STARTUP} == set(Mode)
    assert sources == set(Mode)
