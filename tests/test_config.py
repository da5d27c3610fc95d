"""The configuration contract (docs/configuration.md): typed, checked whole, errors naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firmware_py import config
from firmware_py.cli import main
from firmware_py.config import bundled_config, bundled_dbc
from firmware_py.errors import InputError

DESIGN_EXAMPLE = """
[vehicle]
dbc = "cybertruck_bms.dbc"
usable_capacity_wh = 123000
[can]
interface = "socketcan"
channel = "can0"
[inverter]
transport = "tcp"
host = "127.0.0.1"
port = 502
unit_id = 1
serial_port = "/dev/ttyUSB0"
baudrate = 19200
revert_timeout_s = 10
[owner]
reserve_pct = 40
[dispatch.sunspec_server]
enabled = false
listen = "127.0.0.1:1502"
[dispatch.openadr]
enabled = false
vtn_url = "http://127.0.0.1:8080/OpenADR2/Simple/2.0b"
ven_name = "truck-1"
[journal]
path = "journal.sqlite"
"""


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_design_example_alone_is_a_valid_configuration(tmp_path):
    c = config.load(write(tmp_path, DESIGN_EXAMPLE))
    assert c.vehicle.usable_capacity_wh == 123_000 and c.owner.reserve_pct == 40
    assert c.inverter.revert_timeout_s == 10 and c.dispatch.openadr.ven_name == "truck-1"
    assert c.dbc_path().name == "cybertruck_bms.dbc" and c.dbc_path().exists()


def test_an_empty_file_gives_every_safe_default(tmp_path):
    c = config.load(write(tmp_path, ""))
    assert c.owner.reserve_pct == 40 and c.safety.hard_min_soc_pct == 10
    assert c.dispatch.sunspec_server.enabled is False and c.dispatch.openadr.enabled is False


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    c = config.load(write(tmp_path / "etc", '[journal]\npath = "data/j.sqlite"\n'))
    assert Path(c.journal.path) == (tmp_path / "etc" / "data" / "j.sqlite").resolve()
    assert Path(c.owner.token_file) == (tmp_path / "etc" / "owner.token").resolve()  # defaults too


def test_every_problem_is_reported_at_once(tmp_path):
    bad = write(tmp_path, '[owner]\nreserve_pct = 140\nresrve = 3\n[inverter]\nport = "x"\ntransport = "ble"\n'
                          '[vehicle]\nusable_capacity_wh = 500\n[nonsense]\n')
    with pytest.raises(InputError) as err:
        config.load(bad)
    text = "\n".join(err.value.problems)
    for key in ("owner.reserve_pct", "owner.resrve", "inverter.port", "inverter.transport",
                "vehicle.usable_capacity_wh", "nonsense"):
        assert key in text
    assert all(p.startswith(str(bad)) for p in err.value.problems)


@pytest.mark.parametrize("text, key", [
    ("[can]\nbitrate = true\n", "can.bitrate"),
    ("[owner]\nreserve_pct = -1\n", "owner.reserve_pct"),
    ("[dispatch]\nsunspec_server = 3\n", "dispatch.sunspec_server"),
    ("[dispatch.openadr]\nsimple_levels_pct = [33, \"x\"]\n", "dispatch.openadr.simple_levels_pct"),
    ("[vehicle]\nsignals = { soc_min_pct = 5 }\n", "vehicle.signals"),
    ("owner = 1\n", "owner"),
    ("[owner\n", "not valid TOML"),
])
def test_each_kind_of_bad_value_names_its_key(tmp_path, text, key):
    with pytest.raises(InputError) as err:
        config.load(write(tmp_path, text))
    assert key in str(err.value)


def test_check_config_exits_0_and_prints_the_effective_configuration(capsys):
    assert main(["check-config", str(bundled_config("example.toml"))]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and '"reserve_pct": 40' in out
    assert main(["check-config", str(bundled_config("bench.toml"))]) == 0


def test_check_config_exits_2_naming_the_wrong_key_and_the_out_of_range_reserve(tmp_path):
    bad = write(tmp_path, "[owner]\nreserve_pct = 140\n[inverter]\nprot = 502\n")
    run = subprocess.run([sys.executable, "-m", "firmware_py", "check-config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "inverter.prot: unknown key" in run.stderr and "owner.reserve_pct: 140 is out of range" in run.stderr
    assert "Traceback" not in run.stderr


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bundled_data_is_found():
    for name in ("cybertruck_bms.dbc", "tesla_model3_bms.dbc"):
        assert bundled_dbc(name).read_text().startswith("VERSION")
    assert bundled_config("powershare-gw.service").exists()
