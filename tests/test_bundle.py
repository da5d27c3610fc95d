"""`powershare-gw bundle` and the bundle's install.sh: a gateway installed with no network.

The slow test builds a real bundle for this machine from this checkout (pip reaches the
package registry: allowed in CI, and a failed download fails the test with pip's words),
then runs its install.sh under a test root inside a network namespace with no network at
all, and runs the installed `powershare-gw` from the fresh virtual environment. No user is
created and systemctl is not run (install.sh's `--root` prints what it would do).
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from firmware_py import bundle
from firmware_py.bundle import Arch, Target
from firmware_py.cli import main
from firmware_py.config import bundled_config
from firmware_py.version import software_version

ROOT = Path(__file__).resolve().parents[1]
SOURCE_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def without_network(command: list[str]) -> list[str]:
    """`command` in a new network namespace (no interface up: nothing can be reached), where the
    machine allows one (root here and in CI); elsewhere as it is: install.sh reads no pip
    configuration and passes --no-index either way."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=30).returncode == 0:
        return [unshare, "--net", *command]
    return command


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)


# --- fast: the version, the arguments, install.sh's refusals --------------------------------------

def test_version_prints_the_installed_distribution_version():
    done = run([sys.executable, "-m", "firmware_py", "--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"powershare-gw {software_version()}"
    assert software_version() == SOURCE_VERSION


@pytest.mark.parametrize("args, message", [
    (["--platform", "armv7l"], "--platform: 'armv7l' is not a gateway processor this bundles for"),
    (["--python", "3.9"], "--python: powershare-gw needs Python 3.11 or newer"),
    (["--python", "three"], "--python: expected MAJOR.MINOR"),
    (["--source", "/"], "--source: not a powershare-gw checkout"),
])
def test_bad_bundle_arguments_exit_2_naming_them(tmp_path, capsys, args, message):
    assert main(["bundle", "--out", str(tmp_path / "b"), "--source", str(ROOT), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_the_bundle_goes_into_a_new_or_empty_folder_only(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.whl").write_text("")
    assert main(["bundle", "--out", str(tmp_path / "b"), "--source", str(ROOT)]) == 2
    assert "--out: must be a new or empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("under", ["a-file", "/proc/self"])
def test_an_out_folder_that_cannot_be_made_exits_2_naming_out_and_why(tmp_path, capsys, under):
    """A traceback (exit 1) came from pip's first mkdir; now the folder is made before anything runs."""
    (tmp_path / "a-file").write_text("")
    out = Path(under) / "bundle" if under.startswith("/") else tmp_path / under / "bundle"
    assert main(["bundle", "--out", str(out), "--source", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: --out: cannot make the folder: " in err and "Traceback" not in err


def test_the_closing_hint_is_a_command_that_pastes_whole_when_the_path_has_a_space(tmp_path, capsys, monkeypatch):
    """`sudo {out}/install.sh` unquoted split a path with a space into two arguments."""
    monkeypatch.setattr(bundle, "build", lambda out, target, source: [])  # the hint, not pip, is under test
    out = tmp_path / "my bundle"
    assert main(["bundle", "--out", str(out), "--source", str(ROOT)]) == 0
    hint = capsys.readouterr().out.splitlines()[-1]
    command = hint.split("then: ", 1)[1]
    assert shlex.split(command) == ["sudo", str(out / "install.sh")]


def test_wheels_are_chosen_for_the_target_not_for_this_machine():
    options = Target(Arch.AARCH64, (3, 11)).pip_options()
    platforms = [options[i + 1] for i, option in enumerate(options) if option == "--platform"]
    assert "manylinux2014_aarch64" in platforms and "manylinux_2_36_aarch64" in platforms
    assert all(p.endswith("_aarch64") for p in platforms) and "--only-binary=:all:" in options
    assert options[options.index("--python-version") + 1] == "3.11" and options[options.index("--abi") + 1] == "cp311"


PIP_OFFLINE = """WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after \
connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f8b>: Failed to \
establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/rich/
ERROR: Could not find a version that satisfies the requirement rich (from versions: none)
ERROR: No matching distribution found for rich
"""


def test_pip_failures_are_told_as_what_to_do():
    """pip's own words (as it printed them here, in a namespace with no network) turned into the reason."""
    assert bundle._why(PIP_OFFLINE).startswith("the package registry could not be reached (NewConnectionError)")
    no_wheel = PIP_OFFLINE.split("\n", 2)[2]  # the registry answered; nothing fits the target
    assert bundle._why(no_wheel) == ("rich: no wheel for this processor and Python in the registry (bundle takes "
                                     "wheels only: the gateway has no compiler)")
    assert bundle._why("ERROR: something else\n") == "pip failed: ERROR: something else"


@pytest.mark.parametrize("made_empty", [False, True])
def test_a_failed_build_leaves_out_as_it_was_so_it_can_simply_run_again(tmp_path, made_empty):
    out = tmp_path / "bundle"
    if made_empty:
        out.mkdir()
    failing_pip = [sys.executable, "-c", "import sys; print('ERROR: no network', file=sys.stderr); sys.exit(1)"]
    with pytest.raises(bundle.BundleError, match="no network"):
        bundle.build(out, bundle.Target(bundle.Arch.X86_64, (3, 11)), bundle.default_source(), pip=failing_pip)
    assert (out.is_dir() and not any(out.iterdir())) if made_empty else not out.exists()


def fake_bundle(folder: Path, arch: str, python: str) -> Path:
    """A bundle's files without wheels: enough for install.sh's checks, which come before any change."""
    (folder / "wheels").mkdir(parents=True)
    (folder / "config").mkdir()
    for name in ("gateway.toml", "example.toml", "powershare-gw.service"):
        shutil.copy2(bundled_config(name), folder / "config" / name)
    shutil.copy2(bundled_config("install.sh"), folder / "install.sh")
    (folder / "bundle.env").write_text(f"VERSION=0.1.0\nARCH={arch}\nPYTHON={python}\n")
    (folder / "requirements.txt").write_text("")
    bundle.write_checksums(folder)
    return folder / "install.sh"


@pytest.mark.parametrize("arch, python, message", [
    ("riscv64", HOST_PYTHON, "this bundle is for riscv64, this machine is"),
    (os.uname().machine, "3.99", "this bundle is for Python 3.99"),
])
def test_install_refuses_a_bundle_made_for_another_machine_saying_what_to_make(tmp_path, arch, python, message):
    installer = fake_bundle(tmp_path / "bundle", arch, python)
    done = run(["sh", str(installer), "--root", str(tmp_path / "root"), "--python", sys.executable])
    assert done.returncode == 2 and message in done.stderr and "powershare-gw bundle --" in done.stderr
    assert not (tmp_path / "root").exists()


def test_install_refuses_an_incomplete_bundle_and_unknown_arguments(tmp_path):
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    (tmp_path / "bundle" / "SHA256SUMS").unlink()
    done = run(["sh", str(installer), "--root", str(tmp_path / "root")])
    assert done.returncode == 2 and "SHA256SUMS: missing: this folder is not a whole bundle" in done.stderr
    done = run(["sh", str(installer), "--prefix", "/usr"])
    assert done.returncode == 2 and "unknown argument: --prefix" in done.stderr


def test_install_refuses_a_wheel_that_sha256sums_does_not_list(tmp_path):
    """pip takes any wheel in the folder: one left from another bundle, or slipped in, is not installed."""
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    wheels = tmp_path / "bundle" / "wheels"
    (wheels / "listed-1.0-py3-none-any.whl").write_bytes(b"listed")
    bundle.write_checksums(tmp_path / "bundle")
    (wheels / "pyserial-9.9-py3-none-any.whl").write_bytes(b"not listed")
    done = run(["sh", str(installer), "--root", str(tmp_path / "root"), "--python", sys.executable])
    assert done.returncode == 1 and "wheels/pyserial-9.9-py3-none-any.whl: not in SHA256SUMS" in done.stderr
    assert not (tmp_path / "root" / "opt").exists()


@pytest.mark.parametrize("damaged", ["config/powershare-gw.service", "bundle.env", "requirements.txt",
                                     "wheels/listed-1.0-py3-none-any.whl"])
def test_install_refuses_a_bundle_with_any_file_damaged_before_reading_it(tmp_path, damaged):
    """Not only the wheels: a unit or a bundle.env damaged on the way would be installed or sourced."""
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    (tmp_path / "bundle" / "wheels" / "listed-1.0-py3-none-any.whl").write_bytes(b"listed")
    bundle.write_checksums(tmp_path / "bundle")
    with (tmp_path / "bundle" / damaged).open("a") as f:
        f.write("\nARCH=riscv64\n")  # in bundle.env this would also make the machine check fail with exit 2
    done = run(["sh", str(installer), "--root", str(tmp_path / "root"), "--python", sys.executable])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "do not match SHA256SUMS (damaged in transfer?)" in done.stderr
    assert not (tmp_path / "root").exists()


def installed_once(tmp_path: Path) -> tuple[Path, Path]:
    """A bundle of one tiny wheel, installed once under `--root`: its installer and that root."""
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    tiny_wheel(tmp_path / "bundle" / "wheels")
    (tmp_path / "bundle" / "requirements.txt").write_text("powershare-gw==0.1.0\n")
    bundle.write_checksums(tmp_path / "bundle")
    root = tmp_path / "root"
    first = run(["sh", str(installer), "--root", str(root), "--python", sys.executable])
    assert first.returncode == 0, first.stdout + first.stderr
    return installer, root


@pytest.mark.slow
@pytest.mark.first  # a virtual environment made and pip run twice (about 11 s)
def test_an_environment_whose_python_an_os_upgrade_removed_is_made_again(tmp_path):
    """A Debian upgrade that drops the Python the environment was made with leaves bin/python pointing at
    nothing: `venv` without --clear then failed on it at every attempt, and the gateway could not be
    upgraded at all. The fake bundle has no wheels, so this run stops later, at the missing command."""
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    root = tmp_path / "root"
    run(["sh", str(installer), "--root", str(root), "--python", sys.executable])
    venv_bin = root / "opt" / "powershare-gw" / "bin"
    for link in venv_bin.glob("python*"):
        link.unlink()
        link.symlink_to(tmp_path / "removed-by-the-os-upgrade" / "python3")
    again = run(["sh", str(installer), "--root", str(root), "--python", sys.executable])
    assert "made for Python that is no longer installed: making it again" in again.stdout, again.stderr
    assert "No such file" not in again.stderr
    assert run([str(venv_bin / "python"), "-c", "print('runs')"]).stdout == "runs\n"


def tiny_wheel(wheels: Path) -> None:
    """A wheel named powershare-gw whose console script prints a version: install.sh then runs to its end."""
    files = {"fakegw.py": "def main():\n    print('powershare-gw 0.1.0')\n",
             "powershare_gw-0.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: powershare-gw\nVersion: 0.1.0\n",
             "powershare_gw-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n",
             "powershare_gw-0.1.0.dist-info/entry_points.txt": "[console_scripts]\npowershare-gw = fakegw:main\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    with zipfile.ZipFile(wheels / "powershare_gw-0.1.0-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr("powershare_gw-0.1.0.dist-info/RECORD",
                     "\n".join([*record, "powershare_gw-0.1.0.dist-info/RECORD,,"]))


@pytest.mark.slow
@pytest.mark.first  # a virtual environment made and pip run twice (about 11 s)
def test_an_environment_an_os_upgrade_left_on_a_newer_python_by_the_same_name_is_made_again(tmp_path):
    """An OS upgrade repoints /usr/bin/python3 (what the environment's bin/python3 names) to the new
    version: the environment then runs on the bundle's Python, but pip and its packages are in the old
    version's lib/pythonX.Y, which the new one never reads. It was kept ("No module named pip", exit 1, the
    gateway left broken). Simulated without a second Python: an environment as an older one made it
    (pyvenv.cfg's version, its lib/python3.10) whose bin/python is now this Python. What the owner keeps
    (configuration, token, journal, settings) lives outside it and is untouched."""
    installer, root = installed_once(tmp_path)
    venv = root / "opt" / "powershare-gw"
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(re.sub(r"(?m)^version *=.*$", "version = 3.10.12", cfg.read_text()))
    (venv / "lib" / f"python{HOST_PYTHON}").rename(venv / "lib" / "python3.10")
    kept = {root / "etc" / "powershare-gw" / "gateway.toml": "version = 1\n[owner]\nreserve_pct = 55\n",
            root / "var" / "lib" / "powershare-gw" / "owner.token": "secret\n",
            root / "var" / "lib" / "powershare-gw" / "journal.sqlite": "the journal\n",
            root / "var" / "lib" / "powershare-gw" / "settings.json": "{}\n"}
    for path, text in kept.items():
        path.write_text(text)

    again = run(["sh", str(installer), "--root", str(root), "--python", sys.executable])
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"made for Python 3.10, this bundle's is {HOST_PYTHON}: making it again" in again.stdout
    assert run([str(venv / "bin" / "powershare-gw")]).stdout == "powershare-gw 0.1.0\n"
    assert f"version = {HOST_PYTHON}." in cfg.read_text() and not (venv / "lib" / "python3.10").exists()
    assert {path: path.read_text() for path in kept} == kept


@pytest.mark.slow
@pytest.mark.first  # a virtual environment made and pip run twice
def test_an_environment_made_with_another_interpreter_of_the_same_version_is_made_again(tmp_path):
    """An environment made with root's pyenv Python (under /root, 0700: the service user cannot run it)
    was kept by every later run, --python /usr/bin/python3 too, as its version matched and pip imported
    as root: only removing /opt/powershare-gw repaired it. Simulated without a second Python: the first
    environment's pyvenv.cfg names another interpreter of the same X.Y, whose bin/python still runs."""
    installer, root = installed_once(tmp_path)
    cfg = root / "opt" / "powershare-gw" / "pyvenv.cfg"
    made = cfg.read_text()
    other = "/root/.pyenv/versions/9.9.9/bin"
    cfg.write_text(re.sub(r"(?m)^executable *=.*$", f"executable = {other}/python{HOST_PYTHON}",
                          re.sub(r"(?m)^home *=.*$", f"home = {other}", made)))

    again = run(["sh", str(installer), "--root", str(root), "--python", sys.executable])
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"made with {other}/python{HOST_PYTHON}, this install uses {sys.executable}" in again.stdout
    assert "making it again" in again.stdout
    def recorded(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(("home", "executable"))]
    assert recorded(cfg.read_text()) == recorded(made)  # made with the interpreter named, not the recorded one
    assert run([str(root / "opt" / "powershare-gw" / "bin" / "powershare-gw")]).stdout == "powershare-gw 0.1.0\n"
    # made with the interpreter named, an environment is kept: test_a_bundle_for_this_machine_installs_… installs twice


@pytest.mark.slow  # the installer makes its virtual environment before the test reads what it said: seconds
def test_install_checks_that_the_service_user_can_run_the_interpreter_before_making_anything(tmp_path):
    """Under --root no user is created, so the check is only said; on a gateway it runs before the
    environment is made (runuser, as the configuration's check)."""
    installer = fake_bundle(tmp_path / "bundle", os.uname().machine, HOST_PYTHON)
    done = run(["sh", str(installer), "--root", str(tmp_path / "root"), "--python", sys.executable])
    said = f"(--root: would run as powershare: {sys.executable} -c '')"
    assert said in done.stdout, done.stdout + done.stderr
    assert done.stdout.index(said) < done.stdout.index("making the virtual environment")
    script = installer.read_text()
    check = script.index('runuser -u "$SERVICE_USER" -- "$PYTHON_BIN" -c')
    assert script.index("useradd") < check < script.index('"$PYTHON_BIN" -m venv')
    assert "the service user $SERVICE_USER cannot run $PYTHON_BIN" in script[check:check + 400]


def test_the_units_start_limit_is_in_the_section_systemd_reads_it_from():
    """In [Service] systemd ignores StartLimitIntervalSec ("Unknown key"): a configuration that exits 2
    would then be restarted every 5 s for ever."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd's keys are case-sensitive
    unit.read_string(bundled_config("powershare-gw.service").read_text())
    assert unit["Unit"]["StartLimitIntervalSec"] == "300" and unit["Unit"]["StartLimitBurst"] == "10"
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(unit["Service"])


# --- slow: a real bundle, installed with no network -----------------------------------------------

@pytest.mark.slow
@pytest.mark.first
def test_a_bundle_for_this_machine_installs_and_runs_with_no_network(tmp_path):
    out = tmp_path / "bundle"
    made = run([sys.executable, "-m", "firmware_py", "bundle", "--out", str(out), "--source", str(ROOT)])
    assert made.returncode == 0, f"bundle failed (it needs the package registry):\n{made.stderr}"
    wheels = {normalized(w.name.split("-")[0]): w for w in (out / "wheels").glob("*.whl")}
    assert {"powershare-gw", "python-can", "cantools", "pymodbus", "pyserial", "aiohttp", "cryptography"} <= set(wheels)
    assert (out / "bundle.env").read_text().splitlines()[1:] == [
        f"VERSION={SOURCE_VERSION}", f"ARCH={os.uname().machine}", f"PYTHON={HOST_PYTHON}"]

    root = tmp_path / "root"
    installed = run(without_network(["sh", "-c", 'umask 077; exec sh "$0" "$@"',  # root's umask must not matter
                                     str(out / "install.sh"), "--root", str(root), "--python", sys.executable]))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    venv = root / "opt" / "powershare-gw"
    package = next((venv / "lib").glob("python3.*/site-packages/firmware_py/__init__.py"))
    assert (mode(venv), mode(package)) == (0o755, 0o644)  # the service's user reads and runs it
    version = run([str(venv / "bin" / "powershare-gw"), "--version"])
    assert version.stdout.strip() == f"powershare-gw {SOURCE_VERSION}"
    frozen = run([str(venv / "bin" / "python"), "-m", "pip", "--isolated", "freeze", "--all"],
                 env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    pins = {normalized(line) for line in (out / "requirements.txt").read_text().split()}
    assert pins <= {normalized(line) for line in frozen.stdout.split()}  # exactly the bundle's wheels

    config_dir, state_dir = root / "etc" / "powershare-gw", root / "var" / "lib" / "powershare-gw"
    unit = root / "etc" / "systemd" / "system" / "powershare-gw.service"
    assert (mode(config_dir), mode(config_dir / "gateway.toml"), mode(state_dir), mode(unit)) == \
        (0o750, 0o640, 0o750, 0o644)
    assert (config_dir / "gateway.toml").read_text() == bundled_config("gateway.toml").read_text()
    assert unit.read_text() == bundled_config("powershare-gw.service").read_text()
    for would in ("useradd --system --user-group --home-dir /var/lib/powershare-gw",
                  "chown root:powershare /etc/powershare-gw", "chown powershare:powershare /var/lib/powershare-gw",
                  "systemctl enable powershare-gw.service",
                  "would run as powershare: /opt/powershare-gw/bin/powershare-gw check-config "
                  "/etc/powershare-gw/gateway.toml"):
        assert would in installed.stdout
    on_the_gateway = tmp_path / "gateway.toml"  # the template, its paths where --root put their folder
    on_the_gateway.write_text((config_dir / "gateway.toml").read_text().replace("/var/lib/powershare-gw",
                                                                                str(state_dir)))
    checked = run([str(venv / "bin" / "powershare-gw"), "check-config", str(on_the_gateway)])
    assert checked.returncode == 0, checked.stderr

    (config_dir / "gateway.toml").write_text("version = 1\n[owner]\nreserve_pct = 55\n")  # the installer's edits
    site = package.parent.parent  # a package an earlier bundle installed and this one does not hold
    (site / "leftover.py").write_text("")
    (site / "leftover-1.0.dist-info").mkdir()
    (site / "leftover-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: leftover\nVersion: 1.0\n")
    (site / "leftover-1.0.dist-info" / "RECORD").write_text("leftover.py,,\nleftover-1.0.dist-info/METADATA,,\n"
                                                           "leftover-1.0.dist-info/RECORD,,\n")
    shipped = package.read_text()
    package.write_text("raise SystemExit('an earlier build of the same version')\n")
    again = run(without_network(["sh", str(out / "install.sh"), "--root", str(root), "--python", sys.executable]))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "gateway.toml: kept" in again.stdout
    assert "making it again" not in again.stdout  # made with the same interpreter: the environment is kept
    # handed to the service's group again: a run stopped after writing it had left it root's alone
    assert "would run: chown root:powershare /etc/powershare-gw/gateway.toml)" in again.stdout
    assert (config_dir / "gateway.toml").read_text() == "version = 1\n[owner]\nreserve_pct = 55\n"
    assert package.read_text() == shipped  # the same version installed again replaces what is there
    assert "removing what this bundle no longer holds: leftover" in again.stdout
    frozen = run([str(venv / "bin" / "python"), "-m", "pip", "--isolated", "freeze", "--all", "--exclude", "pip"],
                 env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert {normalized(line) for line in frozen.stdout.split() if not line.startswith("setuptools==")} == pins
    assert not (site / "leftover.py").exists()
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}

    other = Arch.AARCH64 if os.uname().machine == Arch.X86_64 else Arch.X86_64
    target = Target(other, sys.version_info[:2])
    download = run([sys.executable, "-m", "pip", "download", *target.pip_options(), "--dest", str(tmp_path / other),
                    str(wheels["powershare-gw"])])
    assert download.returncode == 0, f"no wheel of some dependency for {other}:\n{download.stderr}"
    assert {normalized(w.name.split("-")[0]) for w in (tmp_path / other).glob("*.whl")} == set(wheels)
