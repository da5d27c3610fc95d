"""The configuration contract (docs/configuration.md): typed, checked whole, errors naming file and key."""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from firmware_py import config
from firmware_py.assembly import assemble
from firmware_py.cli import main
from firmware_py.config import bundled_config, bundled_dbc, load
from firmware_py.errors import InputError
from firmware_py.files import MAX_TEXT_BYTES
from firmware_py.journal import Journal

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


def test_a_file_saved_with_a_byte_order_mark_reads_as_without_one(tmp_path):
    """Some editors (Windows Notepad) start a UTF-8 file with one; TOML's parser refuses it as
    'Invalid statement at line 1', which names nothing the installer can see."""
    c = config.load(write(tmp_path, "\ufeff[owner]\nreserve_pct = 55\n"))
    assert c.owner.reserve_pct == 55


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


def test_check_config_points_out_a_listen_address_on_port_0_and_still_calls_it_valid(tmp_path, capsys):
    """Port 0 is a free port picked at each start: right for tests, and nobody's address to connect to."""
    path = write(tmp_path, '[dispatch.sunspec_server]\nenabled = true\nlisten = "127.0.0.1:00"\n'
                           '[metrics]\nlisten = "127.0.0.1:0"\n[owner]\napi_listen = "unix:/run/gw:0"\n')
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "valid" in captured.out
    notes = [line for line in captured.err.splitlines() if ": note: " in line]
    assert len(notes) == 1 and "dispatch.sunspec_server.listen: port 0" in notes[0]  # metrics is off, unix: a path
    assert main(["check-config", str(bundled_config("example.toml"))]) == 0
    assert ": note: " not in capsys.readouterr().err


def test_a_relative_token_file_that_is_a_symbolic_link_is_refused_as_an_absolute_one_is(tmp_path, capsys):
    """Relative paths were resolved when the configuration was read: a token file given as a link became
    its target, and the link check where it is opened never saw it. Folders on the way are still resolved."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "real.token"
    target.write_text("ab" * 32 + "\n")
    target.chmod(0o600)
    (tmp_path / "owner.token").symlink_to(target)
    (tmp_path / "keys").symlink_to(tmp_path / "real")  # a linked folder is fine
    for given in ("owner.token", "sub/../owner.token"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        path = write(tmp_path, f'[owner]\ntoken_file = "{given}"\n[journal]\npath = "j.sqlite"\n')
        assert main(["check-config", str(path)]) == 2, given
        err = capsys.readouterr().err
        assert "owner.token_file: " in err and "the owner API token file is a symbolic link" in err, err
    path = write(tmp_path, '[owner]\ntoken_file = "keys/real.token"\n[journal]\npath = "j.sqlite"\n')
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert load(path).owner.token_file == str(tmp_path.resolve() / "real" / "real.token")


def test_a_relative_journal_path_through_a_symbolic_link_names_the_real_file(tmp_path):
    """The journal's lock, anchor key, anchors and archives are named from its path: a link must lead to
    the real place (as it did), or a second configuration naming the file directly would lock another
    lock file, and a rotation would rename the link."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "journal.sqlite").symlink_to(data / "journal.sqlite")
    config_file = write(tmp_path, '[journal]\npath = "journal.sqlite"\n[owner]\nsettings_file = "../x/.."\n')
    loaded = load(config_file)
    assert loaded.journal.path == str(data.resolve() / "journal.sqlite")
    assert loaded.owner.settings_file == str(tmp_path.parent.resolve())  # normalised, as before


NOBODY = 65_534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only root can give a file to another user "
                             f"(uid {NOBODY}, nobody) to check that it is refused")


def private_token(path: Path, uid: int) -> Path:
    path.write_text("ab" * 32 + "\n")
    path.chmod(0o600)
    os.chown(path, uid, uid)
    return path


@as_root
def test_a_token_file_another_user_owns_is_refused_by_check_config_as_run_refuses_it(tmp_path, capsys):
    """Owned by nobody, mode 0600: `run` (this user) refuses it, so `check-config` (this user, the journal's
    folder this user's) must too; both name the configuration file and the key, not only the token's path."""
    path = write(tmp_path, '[owner]\ntoken_file = "owner.token"\n[journal]\npath = "j.sqlite"\n')
    token = private_token(tmp_path / "owner.token", NOBODY)
    words = f"{path}: owner.token_file: {token}: the owner API token file belongs to user nobody"
    assert main(["check-config", str(path)]) == 2
    assert words in capsys.readouterr().err
    assert main(["run", "--config", str(path)]) == 2
    assert words in capsys.readouterr().err


@as_root
def test_check_config_as_root_checks_private_files_for_the_owner_of_the_journals_folder(tmp_path, capsys):
    """The service's user owns the journal's folder: `check-config` run as root checks the token as that
    user's, as `run` run as that user will, and says in a note whom it took it for."""
    folder = tmp_path / "var"
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    path = write(tmp_path, f'[owner]\ntoken_file = "owner.token"\n[journal]\npath = "{folder}/j.sqlite"\n')
    token = private_token(tmp_path / "owner.token", NOBODY)
    assert main(["check-config", str(path)]) == 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert "run as root" in note and "user nobody" in note and str(folder) in note
    os.chown(token, 0, 0)  # root's now: not the service's
    assert main(["check-config", str(path)]) == 2
    assert f"{path}: owner.token_file: {token}: the owner API token file belongs to user root" in capsys.readouterr().err


@as_root
def test_an_installer_token_another_user_owns_is_refused_by_check_config_as_the_web_app_refuses_it(
        tmp_path, capsys):
    """The web app reads its installer token as `run`'s user at start and refuses one another user owns:
    `check-config` does too, naming the key."""
    path = write(tmp_path, '[web]\nenabled = true\ninstaller_token_file = "installer.token"\n'
                           '[journal]\npath = "j.sqlite"\n')
    token = private_token(tmp_path / "installer.token", NOBODY)
    assert main(["check-config", str(path)]) == 2
    assert f"{path}: web.installer_token_file: {token}: the installer token file belongs to user nobody" in \
        capsys.readouterr().err
    os.chown(token, os.geteuid(), os.getegid())
    assert main(["check-config", str(path)]) == 0


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bundled_data_is_found():
    for name in ("cybertruck_bms.dbc", "tesla_model3_bms.dbc"):
        assert bundled_dbc(name).read_text().startswith("VERSION")
    assert bundled_config("powershare-gw.service").exists()


# --- what check-config says valid, run starts with (one validation path) -------------------------

@pytest.mark.parametrize("text, message", [
    ('[dispatch.sunspec_server]\nenabled = true\nlisten = "999.1.1.1:99999"\n',
     "dispatch.sunspec_server.listen: expected HOST:PORT"),
    ('[owner]\napi_listen = "host:port:extra"\n', "owner.api_listen: 'host:port:extra'"),
    ('[dispatch.sunspec_server]\nenabled = true\nallow_write_from = ["bogus/99"]\n',
     "allow_write_from: 'bogus/99' is not an IP address"),
    ('[vehicle.signals]\nnonsense = "X.Y"\n', "vehicle.signals.nonsense: unknown field"),
    ('[vehicle.signals]\nsoc_min_pct = "NOPE.SoC"\n', "message 'NOPE' is not in the DBC"),
    ('[dispatch.openadr]\nenabled = true\nvtn_url = "ftp://x"\n', "vtn_url: must start with http://"),
    ('[dispatch.openadr]\nenabled = true\nvtn_url = "https://x"\ncert = "ven.crt"\n', "cert and key: give both"),
    ('[journal]\npath = "/dev/null"\n', "/dev/null: the journal must be a regular file, not a device"),
    ('[owner]\nsettings_file = "."\n', "the owner settings file must be a regular file, not a directory"),
    ('[owner]\napi_listen = "127.0.0.1:\u00b2"\n', "owner.api_listen: '127.0.0.1:²'"),  # a digit to isdigit()
    ('[inverter]\npoll_interval_s = 60\n[safety]\ninverter_timeout_s = 0.1\n',
     "safety.inverter_timeout_s: 0.1 s is not above inverter.poll_interval_s (60 s)"),
    ('[journal]\npath = "a\\u0000b"\n', "journal.path: 'a\\x00b' holds a NUL character"),
    # an empty path meant "the current folder" to `run`: a traceback for the journal, a message naming no key
    ('[journal]\npath = ""\n', "journal.path: must not be empty"),
    ('[owner]\ntoken_file = ""\n', "owner.token_file: must not be empty"),
    ('[owner]\nsettings_file = ""\n', "owner.settings_file: must not be empty"),
    ('[web]\nenabled = true\ninstaller_token_file = ""\n', "web.installer_token_file: must not be empty"),
    # two listeners on one address: `run` stopped at the second (under systemd, at every restart)
    ('[owner]\napi_listen = "127.0.0.1:18095"\n[web]\nenabled = true\nlisten = "127.0.0.1:18095"\n',
     "web.listen: 127.0.0.1:18095 and owner.api_listen (127.0.0.1:18095) cannot both listen there"),
    ('[metrics]\nenabled = true\nlisten = "0.0.0.0:9100"\n[dispatch.sunspec_server]\nenabled = true\n'
     'listen = "127.0.0.1:9100"\n', "metrics.listen: 0.0.0.0:9100 and dispatch.sunspec_server.listen "
                                     "(127.0.0.1:9100) cannot both listen there"),
    ('[mqtt]\nenabled = true\nbroker = "127.0.0.1:0"\n', "mqtt.broker: '127.0.0.1:0': port 0 is no broker's port"),
    ('[program]\ncurrency = "dollars!!"\n', "program.currency: expected an ISO 4217 code"),
    # a typo in a folder or an interface: check-config said valid, `run` exited 2 at once
    ('[journal]\npath = "no-such-dir/journal.sqlite"\n', "journal.sqlite: the journal's folder"),
    ('[owner]\ntoken_file = "no-such-dir/owner.token"\n', "owner.token: the owner API token file's folder"),
    ('[can]\ninterface = "socketcann"\n', "can.interface: python-can has no interface 'socketcann'"),
    # a DBC named by key: the reader names only the file it opened (for a typo'd bundled name, a path
    # in the package the installer never wrote), and the bundled names are listed
    ('[vehicle]\ndbc = "/nonexistent/x.dbc"\n', "vehicle.dbc: /nonexistent/x.dbc: DBC file not found"),
    ('[vehicle]\ndbc = "cybertruck_bms.dbcc"\n', "vehicle.dbc: 'cybertruck_bms.dbcc' is neither a file beside"),
    ('[vehicle]\ndbc = "cybertruck_bms.dbcc"\n', "(bundled: cybertruck_bms.dbc, tesla_model3_bms.dbc)"),
    # a folder where os.access says yes to root but no file can be made: valid, then `run` exited 2
    # with SQLite's "unable to open database file"
    ('[journal]\npath = "/sys/journal.sqlite"\n', "journal.path: /sys/journal.sqlite: cannot be"),
    # a folder this user cannot write (under /proc/self, which not even root can): valid, then SQLite's
    # "unable to open database file" at the start, naming neither the key nor the cause
    ('[journal]\npath = "/proc/self/journal.sqlite"\n',
     "journal.path: /proc/self/journal.sqlite: cannot be written by this user"),
    ('[owner]\nsettings_file = "/proc/self/settings.json"\n',
     "owner.settings_file: /proc/self/settings.json: cannot be written by this user"),
    ('[owner]\ntoken_file = "/proc/self/owner.token"\n',
     "owner.token_file: /proc/self/owner.token: cannot be written by this user"),
    # OpenADR 3 uses the SIMPLE levels of [dispatch.openadr] though that section's VEN is off: a level
    # below 0 % turned a shed into a charge.
    ('[dispatch.openadr]\nsimple_levels_pct = [-50.0, 50.0, 100.0]\n[dispatch.openadr3]\nenabled = true\n'
     'client_secret_file = "secret"\n', "dispatch.openadr.simple_levels_pct: three shares 0-100"),
    # two keys naming one file: the owner's token read as the installer's (installer role for the owner),
    # the journal made in the owner settings' file (valid, then every `run` exited 2)
    ('[owner]\ntoken_file = "shared.token"\n[web]\nenabled = true\ninstaller_token_file = "./x/../shared.token"\n',
     "shared.token is also owner.token_file's file"),
    ('[owner]\nsettings_file = "state.db"\n[journal]\npath = "state.db"\n',
     "state.db is the live segment of the journal (journal.path = "),
    ('[owner]\ntoken_file = "j.sqlite-wal"\n[journal]\npath = "j.sqlite"\n',
     "j.sqlite-wal is a segment's SQLite side file of the journal"),
    ('[owner]\nsettings_file = "j.000003.sqlite"\n[journal]\npath = "j.sqlite"\n',
     "j.000003.sqlite is a segment of the journal"),
    ('[journal]\npath = "j.sqlite"\n[dispatch.openadr3]\nenabled = true\nclient_secret_file = "j.sqlite.anchor-key"\n',
     "j.sqlite.anchor-key is the anchor key of the journal"),
    # the inverter at the gateway's own listener: `run` discovered its own DER server and reported healthy
    ('[inverter]\nhost = "127.0.0.1"\nport = 1502\n[dispatch.sunspec_server]\nenabled = true\n'
     'listen = "127.0.0.1:1502"\n', "inverter.host and inverter.port: 127.0.0.1:1502 is the gateway's own "
                                    "dispatch.sunspec_server.listen (127.0.0.1:1502)"),
    ('[inverter]\nhost = "localhost"\nport = 9108\n[metrics]\nenabled = true\nlisten = "0.0.0.0:9108"\n',
     "localhost:9108 is the gateway's own metrics.listen (0.0.0.0:9108)"),
    ('[inverter]\nport = 8765\n', "127.0.0.1:8765 is the gateway's own owner.api_listen"),
    # localhost is loopback: valid, then `run` exited 2 (address in use)
    ('[owner]\napi_listen = "localhost:18096"\n[metrics]\nenabled = true\nlisten = "127.0.0.1:18096"\n',
     "metrics.listen: 127.0.0.1:18096 and owner.api_listen (localhost:18096) cannot both listen there"),
    ('[dispatch.sunspec_server]\nenabled = true\nlisten = "nohost.invalid:1502"\n',
     "dispatch.sunspec_server.listen: 'nohost.invalid' is not an IP address"),
    # accepted, then `run` sat at 0 W reporting the link lost for ever
    ('[can]\nchannel = ""\n', "can.channel: must not be empty"),
    ('[inverter]\nhost = ""\n', "inverter.host: must not be empty"),
    # accepted, then `run` looked the impossible name up at every reconnect, logging all of it each time
    (f'[inverter]\nhost = "{"a" * 3000}"\n', "is too long for a host name (3,000 characters; at most 253)"),
    ('[inverter]\nhost = "inverter 1.local"\n', "inverter.host: 'inverter 1.local' is neither an IP address nor"),
    ('[inverter]\nhost = "192.168.1.300 "\n', "inverter.host: '192.168.1.300 ' is neither an IP address nor"),
    ('[inverter]\nhost = "192.168.1.300"\n', "inverter.host: '192.168.1.300' is not an IP address (each of its"),
    ('[inverter]\ntransport = "rtu"\nserial_port = ""\n', "inverter.serial_port: '' is neither a device path"),
    ('[inverter]\ntransport = "rtu"\nserial_port = "bogus://x"\n',
     "inverter.serial_port: 'bogus://x': invalid URL, protocol 'bogus' not known"),
])
def test_check_config_refuses_what_run_refuses(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(InputError, match=re.escape(message)):
        assemble(config.load(path), lambda: 0.0)


@pytest.mark.parametrize("text, key", [('[journal]\npath = "no-such-dir/journal.sqlite"\n', "journal.path"),
                                       ('[owner]\ntoken_file = "no-such-dir/owner.token"\n', "owner.token_file")])
def test_a_kept_file_that_cannot_be_made_is_named_by_its_key(tmp_path, capsys, text, key):
    """The message named the path only: an installer with the shipped template had to guess which key held it."""
    assert main(["check-config", str(write(tmp_path, text))]) == 2
    assert f": {key}: {tmp_path}/no-such-dir/" in capsys.readouterr().err


def test_a_file_at_the_journals_path_that_is_no_journal_is_refused_as_run_refuses_it(tmp_path, capsys):
    """check-config called a garbage file or another program's database at journal.path valid; `run` exited 2."""
    path = write(tmp_path, '[journal]\npath = "j.sqlite"\n')
    (tmp_path / "j.sqlite").write_text("not a database, not even SQLite's header\n")
    assert main(["check-config", str(path)]) == 2
    assert f"journal.path: {tmp_path}/j.sqlite: not a powershare-gw journal (not an SQLite database" \
        in capsys.readouterr().err
    (tmp_path / "j.sqlite").unlink()
    with sqlite3.connect(tmp_path / "j.sqlite") as other:
        other.execute("CREATE TABLE photos (name TEXT)")
    other.close()
    assert main(["check-config", str(path)]) == 2
    assert "not a powershare-gw journal (foreign SQLite schema; tables: photos)" in capsys.readouterr().err
    with pytest.raises(InputError, match="foreign SQLite schema"):
        assemble(config.load(path), lambda: 0.0)


def test_a_journal_run_cannot_open_is_named_by_file_and_key_as_check_config_names_its_problems(tmp_path):
    """Only what opening tells (live segment gone, its archives beside it) read `journal.path: ...` without
    the configuration file every other refusal of `run` names first."""
    path = write(tmp_path, '[journal]\npath = "j.sqlite"\n')
    with Journal.open(tmp_path / "j.000001.sqlite"):
        pass
    with pytest.raises(InputError) as refused:
        assemble(config.load(path), lambda: 0.0)
    assert refused.value.problems == [f"{path}: journal.path: {tmp_path}/j.sqlite: missing, but archived segments "
                                      "of it are beside it (j.000001.sqlite, ...); restore it, or move the archives "
                                      "away to start a new journal"]


def test_an_empty_file_or_a_journal_at_the_journals_path_is_valid_and_left_as_it_was(tmp_path, capsys):
    path = write(tmp_path, '[journal]\npath = "j.sqlite"\n')
    (tmp_path / "j.sqlite").touch()  # `run` makes the journal in it
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "j.sqlite").stat().st_size == 0
    (tmp_path / "j.sqlite").unlink()
    with Journal.open(tmp_path / "j.sqlite"):
        pass
    before = (tmp_path / "j.sqlite").read_bytes()
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "j.sqlite").read_bytes() == before


def test_the_owner_settings_may_wait_for_their_folder_which_the_first_change_makes(tmp_path, capsys):
    path = write(tmp_path, '[owner]\nsettings_file = "owner/settings.json"\n')
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("metrics, sunspec", [("0.0.0.0:9100", "[::1]:9100"), ("[::]:9100", "127.0.0.1:9100"),
                                               ("127.0.0.1:9100", "127.0.0.2:9100")])
def test_listeners_on_one_port_of_other_addresses_or_families_are_valid(tmp_path, capsys, metrics, sunspec):
    """An IPv4 wildcard and an IPv6 address bind together on one port (IPv6 sockets are IPv6 only)."""
    path = write(tmp_path, f'[metrics]\nenabled = true\nlisten = "{metrics}"\n[dispatch.sunspec_server]\n'
                           f'enabled = true\nlisten = "{sunspec}"\n')
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("text", [
    # the inverter on another machine at the port the gateway serves on every interface
    '[inverter]\nhost = "192.0.2.10"\nport = 502\n[dispatch.sunspec_server]\nenabled = true\nlisten = "0.0.0.0:502"\n',
    '[inverter]\ntransport = "rtu"\nserial_port = "rfc2217://192.0.2.10:4000"\n',
    '[inverter]\ntransport = "rtu"\nserial_port = "/dev/ttyUSB7"\nhost = ""\n',  # the host unused by RTU
    '[inverter]\nhost = "bücher.example"\n',  # IDNA, as the resolver encodes it
    '[inverter]\nhost = "inverter_1.local."\n',  # an /etc/hosts name, a trailing dot
    '[inverter]\nhost = "fe80::1%eth0"\n',  # IPv6 link-local with its zone
    # two keys reading one file: a PEM holding both the certificate and its key
    '[web]\nenabled = true\ntls_cert = "both.pem"\ntls_key = "both.pem"\n',
])
def test_what_looks_alike_but_works_is_valid(tmp_path, capsys, text):
    if "both.pem" in text:
        from test_web import self_signed  # made with cryptography: no openssl command needed

        cert, key = self_signed(tmp_path)
        (tmp_path / "both.pem").write_text(key.read_text() + cert.read_text())
        (tmp_path / "both.pem").chmod(0o600)
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


def test_a_bms_timeout_no_longer_than_the_fastest_message_period_is_refused(tmp_path, capsys):
    """A snapshot is as old as the last frame believed: with every message once a second, a 0.5 s timeout
    would find the data stale between any two frames (0 W, and a bms_stale fault, half the time)."""
    slow = re.sub(r'(BA_ "GenMsgCycleTime" BO_ \d+) \d+;', r"\1 1000;", bundled_dbc("cybertruck_bms.dbc").read_text())
    (tmp_path / "slow.dbc").write_text(slow)
    path = write(tmp_path, '[vehicle]\ndbc = "slow.dbc"\n')
    assert main(["check-config", str(path)]) == 2
    assert "safety.bms_timeout_s: 0.5 s is not above the fastest BMS message's period in the DBC (1 s)" in \
        capsys.readouterr().err
    path.write_text('[vehicle]\ndbc = "slow.dbc"\n[safety]\nbms_timeout_s = 1.5\n')
    assert main(["check-config", str(path)]) == 0


@pytest.mark.parametrize("declared, value, shown", [
    ('BA_DEF_ BO_ "GenMsgCycleTime" STRING;', '"100"', "'100'"),  # a text attribute: a TypeError traceback
    ('BA_DEF_ BO_ "GenMsgCycleTime" INT -65535 65535;', "-100", "-100"),  # every frame stale on arrival
])
def test_a_message_period_that_is_no_period_is_named(tmp_path, capsys, declared, value, shown):
    """An installer's DBC whose GenMsgCycleTime is text or negative for a mapped message: text crashed
    check-config and run with a traceback; a negative period passed, and the gateway then held 0 W for good
    with every BmsSoc frame stale as it came."""
    text = bundled_dbc("cybertruck_bms.dbc").read_text()
    text = text.replace('BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;', declared)
    text = text.replace('BA_DEF_DEF_ "GenMsgCycleTime" 0;', 'BA_DEF_DEF_ "GenMsgCycleTime" "";'
                        if "STRING" in declared else 'BA_DEF_DEF_ "GenMsgCycleTime" 0;')
    text = text.replace('BA_ "GenMsgCycleTime" BO_ 658 100;', f'BA_ "GenMsgCycleTime" BO_ 658 {value};')
    if "STRING" in declared:
        text = re.sub(r'(BA_ "GenMsgCycleTime" BO_ \d+) (\d+);', r'\1 "\2";', text)
    (tmp_path / "theirs.dbc").write_text(text)
    path = write(tmp_path, '[vehicle]\ndbc = "theirs.dbc"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"theirs.dbc: message BmsSoc: GenMsgCycleTime {shown} is not a period in milliseconds above 0" in err, err
    assert "Traceback" not in err


def test_every_bad_signal_entry_is_named_at_once(tmp_path, capsys):
    path = write(tmp_path, '[vehicle.signals]\nsoc_min_pct = "NoSuch.Signal"\nbogus = "A.B"\nsoc_max_pct = "BmsSoc"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "soc_min_pct: message 'NoSuch' is not in the DBC" in err and "bogus: unknown field" in err
    assert "soc_max_pct: 'BmsSoc' is not 'MESSAGE.SIGNAL'" in err


def test_a_signal_entry_of_another_type_is_named_with_every_other(tmp_path, capsys):
    """One non-string value said only "vehicle.signals: expected a table of strings": no entry named,
    and a second wrong entry hidden behind it."""
    path = write(tmp_path, '[vehicle.signals]\nsoc_min_pct = "Foo.Bar"\nsoc_ui_pct = 5\nsoc_max_pct = true\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "vehicle.signals.soc_ui_pct: expected a string ('MESSAGE.SIGNAL'), got 5" in err
    assert "vehicle.signals.soc_max_pct: expected a string ('MESSAGE.SIGNAL'), got True" in err
    assert "table of strings" not in err
    path.write_text('[vehicle]\nsignals = 5\n')
    assert main(["check-config", str(path)]) == 2
    assert "vehicle.signals: expected a table, got 5" in capsys.readouterr().err


def test_check_config_reads_the_owner_settings_and_the_token_as_run_does(tmp_path, capsys):
    """Both were only checked to be files: `check-config` said valid, `run` then exited 2."""
    path = write(tmp_path, '[owner]\nsettings_file = "settings.json"\ntoken_file = "owner.token"\n')
    (tmp_path / "settings.json").write_text('{"reserve_pct": 400')
    (tmp_path / "owner.token").write_text("ab" * 32)
    (tmp_path / "owner.token").chmod(0o644)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"owner.settings_file: {tmp_path}/settings.json: corrupt owner settings" in err
    assert f"owner.token_file: {tmp_path}/owner.token: the owner API token file is accessible by group or others" in err
    (tmp_path / "settings.json").unlink()
    (tmp_path / "owner.token").chmod(0o600)
    assert main(["check-config", str(path)]) == 0  # a private token, and no settings yet: valid


@pytest.mark.parametrize("dbc, message", [
    (b"", "not a valid DBC"),
    (bytes(range(256)) * 4, "the DBC is not UTF-8 text"),
    (b'VERSION ""\nBO_ 100 OTHER: 8 X\n SG_ Speed : 0|16@1+ (1,0) [0|1] "" X\n', "is not in the DBC"),
])
def test_a_random_empty_or_foreign_dbc_is_refused_by_check_config(tmp_path, capsys, dbc, message):
    (tmp_path / "vehicle.dbc").write_bytes(dbc)
    path = write(tmp_path, '[vehicle]\ndbc = "vehicle.dbc"\n')
    assert main(["check-config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_dbc_with_a_29_bit_mapped_message_is_refused_by_check_config(tmp_path, capsys):
    """It passed, and then the gateway dropped every frame of it without a word: 0 W for ever."""
    text = bundled_dbc("cybertruck_bms.dbc").read_text()
    (tmp_path / "vehicle.dbc").write_text(text.replace("BO_ 658 ", f"BO_ {0x80000000 | 0x18FF0292} "))
    path = write(tmp_path, '[vehicle]\ndbc = "vehicle.dbc"\n')
    assert main(["check-config", str(path)]) == 2
    assert "vehicle.dbc: message BmsSoc (0x18FF0292) has a 29-bit id: not supported" in capsys.readouterr().err


# --- special files, huge numbers, deep nesting ------------------------------------------------------

@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "oversized"])
def test_a_config_that_is_not_a_bounded_regular_file_is_refused_without_reading_it(tmp_path, capsys, kind):
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / "config.fifo"
        os.mkfifo(path)  # opening it for reading would block forever
    elif kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "huge.toml"
        with path.open("wb") as out:
            out.truncate(MAX_TEXT_BYTES + 1)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "must be a regular file" in err or "at most" in err


@pytest.mark.parametrize("text, message", [
    ("[owner]\nreserve_pct = 1" + "0" * 400 + "\n", "owner.reserve_pct: expected a finite number, got 1000"),
    ("[safety]\nlockout_faults = 1" + "0" * 400 + "\n", "(401 characters) is out of range (1 to 100)"),
    ("[owner]\nreserve_pct = 1" + "0" * 4400 + "\n", "not valid TOML: a number has more than 4,300 digits"),
    ("[owner]\nx = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML: arrays or tables nested too deeply"),
])
def test_huge_numbers_and_deep_nesting_are_clear_refusals(tmp_path, capsys, text, message):
    assert main(["check-config", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err) < 400


# --- the format's version (top-level `version`) -------------------------------------------------

def test_a_file_without_version_is_read_as_version_1_and_version_1_is_accepted(tmp_path):
    assert config.load(write(tmp_path, "[owner]\nreserve_pct = 45\n")).version == 1
    assert config.load(write(tmp_path, "version = 1\n[owner]\nreserve_pct = 45\n")).version == 1
    for name in ("example.toml", "bench.toml"):
        assert bundled_config(name).read_text().count("\nversion = 1") == 1, name


def test_a_newer_format_is_refused_on_its_version_alone_saying_what_to_do(tmp_path, capsys):
    newer = write(tmp_path, f"version = {config.FORMAT_VERSION + 1}\n[owner]\nreserve_pct = 45\n"
                            "[charger]\nmode = \"solar\"\n")
    assert main(["check-config", str(newer)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # not a list of "unknown key" for keys the newer format has
    assert f"version: {config.FORMAT_VERSION + 1} is a newer configuration format" in err[0]
    assert f"set version = {config.FORMAT_VERSION}" in err[0] and str(newer) in err[0]


@pytest.mark.parametrize("text, message", [
    ("version = 0\n", "version: 0 is out of range"),
    ('version = "1"\n', "version: expected an integer"),
    ("version = 1.5\n", "version: expected an integer"),
])
def test_a_malformed_version_names_the_key(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        config.load(write(tmp_path, text))


def test_the_example_configuration_shows_every_key():
    """config/example.toml is where an installer looks for what can be set: every key of every section."""
    example = tomllib.loads(bundled_config("example.toml").read_text())
    assert missing_all(config.Config, example, "") == []


def missing_all(cls: type, table: dict, prefix: str) -> list[str]:
    """The keys of dataclass `cls` (and of its nested sections) that `table` lacks, dotted; a field the
    schema does not read from the file (no `spec`, not a section) is not a key."""
    hints, gaps = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(hints[f.name])
        if not section and (not f.metadata or f.metadata.get("given_by_loader")):
            continue
        if f.name not in table:
            gaps.append(prefix + f.name)
        elif section:
            gaps += missing_all(hints[f.name], table[f.name], f"{prefix}{f.name}.")
    return gaps


# --- what a stop may wait for -------------------------------------------------------------------

def test_a_journal_busy_timeout_a_stop_could_not_wait_out_is_refused_saying_why(tmp_path):
    """A stop waits for a journal write held by another process's lock up to `busy_timeout_s`: 60 s made a
    SIGTERM take 59 s, and systemd SIGKILLs at 15 s, before the journal is closed."""
    with pytest.raises(InputError, match=r"journal\.busy_timeout_s: 60 is out of range \(0\.01 to 3\): a stop waits"):
        config.load(write(tmp_path, "[journal]\nbusy_timeout_s = 60\n"))
    assert config.load(write(tmp_path, "[journal]\nbusy_timeout_s = 3\n")).journal.busy_timeout_s == 3


def test_the_longest_journal_wait_leaves_the_stop_within_systemds_stop_timeout():
    """The stop's bounded waits in a row (the tasks' ending, safe stop, final meter reading, one journal
    write) plus a second for closing the links fit in the shipped unit's `TimeoutStopSec`."""
    from firmware_py.service import FINAL_READ_S, SAFE_STOP_S, TASKS_END_S

    unit = (Path(__file__).resolve().parents[1] / "config" / "powershare-gw.service").read_text()  # the checkout's
    stop_timeout_s = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
    busy = next(f for f in dataclasses.fields(config.JournalConfig) if f.name == "busy_timeout_s")
    assert TASKS_END_S + SAFE_STOP_S + FINAL_READ_S + busy.metadata["hi"] + 1.0 <= stop_timeout_s
    assert busy.default <= busy.metadata["hi"]


@pytest.mark.parametrize("section, key, url", [
    ("dispatch.openadr3", "vtn_url", "https://alice:hunter2@127.0.0.1:9/openadr3"),
    ("dispatch.openadr3", "token_url", "https://alice:hunter2@127.0.0.1:9/token"),
    ("dispatch.openadr3", "callback_url", "http://alice:hunter2@127.0.0.1:9/cb"),
    ("dispatch.openadr", "vtn_url", "http://alice:hunter2@127.0.0.1:9/OpenADR2/Simple/2.0b"),
    ("dispatch.openadr", "vtn_url", "http://hunter2@127.0.0.1:9/OpenADR2/Simple/2.0b"),  # a token as the user
    # without a scheme (urlsplit reads 'alice:' as one, and no host): printed back by check-config before
    ("dispatch.openadr3", "callback_url", "alice:hunter2@gw.example.com/openadr3/notify"),
    ("dispatch.openadr3", "token_url", "alice:hunter2@127.0.0.1:9/token"),
    ("dispatch.openadr", "vtn_url", "//alice:hunter2@127.0.0.1:9/OpenADR2/Simple/2.0b"),
])
def test_a_url_key_holding_credentials_is_refused_without_repeating_them(tmp_path, capsys, section, key, url):
    """A password in a URL loaded fine, then `commission` printed it (check name, detail, JSON report), as
    every log line naming the peer would: refused at load, naming the key, the secret never echoed."""
    (tmp_path / "secret").write_text("s3cret\n", encoding="utf-8")
    path = write(tmp_path, f'[{section}]\nenabled = true\nclient_secret_file = "secret"\n{key} = "{url}"\n'
                 if section.endswith("3") else f'[{section}]\nenabled = true\n{key} = "{url}"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{section}.{key}: holds a user name or password" in err and "secret file" in err
    assert "hunter2" not in err and "Traceback" not in err
    with pytest.raises(InputError) as raised:
        config.load(path)
    assert "hunter2" not in str(raised.value.problems)
    report = tmp_path / "report.json"
    assert main(["commission", "--config", str(path), "--report", str(report)]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err and "hunter2" not in report.read_text()


@pytest.mark.parametrize("section, key, url", [
    ("dispatch.openadr3", "vtn_url", "https://127.0.0.1:9/openadr3/3.0.1?api_key=hunter2"),
    ("dispatch.openadr3", "token_url", "https://127.0.0.1:9/token#hunter2"),
    ("dispatch.openadr3", "callback_url", "https://gw.example.com/openadr3/notify?token=hunter2"),
    ("dispatch.openadr", "vtn_url", "http://127.0.0.1:9/OpenADR2/Simple/2.0b?key=hunter2"),
    ("dispatch.openadr3", "vtn_url", "https://127.0.0.1:9/openadr3/3.0.1#hunter2"),
    ("dispatch.openadr3", "vtn_url", "https://127.0.0.1:9/openadr3/3.0.1?"),  # empty, still no base to add paths to
])
def test_a_url_key_with_a_query_or_fragment_is_refused_without_repeating_it(tmp_path, capsys, section, key, url):
    """`?api_key=...` passed the check, and the installer page then showed the key (URLs are shown there,
    as they are logged, because they were held to carry no secret). A base URL the gateway adds its own
    paths to has no place for a query either: refused at load, naming the key, the value never echoed."""
    (tmp_path / "secret").write_text("s3cret\n", encoding="utf-8")
    path = write(tmp_path, f'[{section}]\nenabled = true\nclient_secret_file = "secret"\n{key} = "{url}"\n'
                 if section.endswith("3") else f'[{section}]\nenabled = true\n{key} = "{url}"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{section}.{key}: holds a query or fragment" in err and "secret file" in err, err
    assert "hunter2" not in err and "Traceback" not in err


def test_a_token_url_named_with_a_query_is_used_and_shown_with_the_query_hidden(tmp_path, capsys):
    """Some providers name their token endpoint with a query (`?p=policy`): refused with the other URL keys',
    it could not be set though the VEN takes the same URL from the VTN. Allowed, it is never shown whole."""
    from firmware_py.web.installer import redacted

    (tmp_path / "secret").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "secret").chmod(0o600)
    url = "https://login.example.com/tenant/oauth2/v2.0/token?p=B2C_1_hunter2"
    path = write(tmp_path, f'[dispatch.openadr3]\nenabled = true\nclient_secret_file = "secret"\ntoken_url = "{url}"\n')
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert "hunter2" not in capsys.readouterr().out
    loaded = config.load(path)
    assert loaded.dispatch.openadr3.token_url == url
    shown = redacted(config.as_dict(loaded))["dispatch"]["openadr3"]["token_url"]
    assert shown == "https://login.example.com/tenant/oauth2/v2.0/token?(query hidden)"
    from firmware_py.dispatch.openadr3 import TokenSource

    assert "hunter2" not in repr(TokenSource(url, "truck-1", "s3cret"))


@pytest.mark.parametrize("url", ["not a url", "gw.example.com/openadr3/notify", "ftp://gw.example.com/x", "https://"])
def test_the_openadr3_callback_url_must_be_an_http_url_with_a_host(tmp_path, capsys, url):
    """callback_url was never checked: 'not a url' was accepted, and the VTN told to post there."""
    (tmp_path / "secret").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "secret").chmod(0o600)
    path = write(tmp_path, '[dispatch.openadr3]\nenabled = true\nclient_secret_file = "secret"\n'
                 f'callback_listen = "127.0.0.1:8082"\ncallback_url = "{url}"\n')
    assert main(["check-config", str(path)]) == 2
    assert "dispatch.openadr3.callback_url: must be an http:// or https:// URL" in capsys.readouterr().err
    path.write_text(path.read_text().replace(url, "https://gw.example.com:8443/openadr3/notify"))
    assert main(["check-config", str(path)]) == 0


def test_every_url_key_of_the_configuration_is_checked_for_credentials():
    """The rule is on the key's name (`*_url`), in the schema: a URL key added later is covered too."""
    def url_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from url_keys(hint, f"{prefix}{f.name}.")
            elif "url" in f.name and not f.metadata.get("given_by_loader"):
                yield f"{prefix}{f.name}"
    keys = list(url_keys(config.Config))
    assert {"dispatch.openadr.vtn_url", "dispatch.openadr3.vtn_url", "dispatch.openadr3.token_url"} <= set(keys)
    assert all(k.endswith("_url") for k in keys), keys
