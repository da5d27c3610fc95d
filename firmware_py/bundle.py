"""`powershare-gw bundle`: everything a gateway needs to install with no network, in one folder.

A gateway in a garage often has no route to a package registry. So the bundle is
made on a machine that has one (pip's own configuration decides which registry),
for the gateway's processor and Python, and carried to the gateway (a USB stick,
scp); there its `install.sh` installs from the folder alone (docs/command-line.md#bundle):

    DIR/install.sh                the installer (config/install.sh)
    DIR/bundle.env                version, processor and Python the wheels are for
    DIR/requirements.txt          every wheel pinned: install.sh installs exactly these
    DIR/SHA256SUMS                every other file's checksum, checked before anything is read or installed
    DIR/wheels/*.whl              powershare-gw and every dependency, built or downloaded
    DIR/config/gateway.toml       the installed gateway's configuration template
    DIR/config/example.toml       every key with its default, for reference
    DIR/config/powershare-gw.service   the systemd unit

Only wheels are taken (`--only-binary=:all:`): a source package would need a
compiler and headers on the gateway. A dependency with no wheel for the target is
named, and nothing is half-made: the folder must not exist or be empty.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from firmware_py.config import bundled_config
from firmware_py.errors import InputError
from firmware_py.quoting import printable, shown

GLIBC_NEWEST_MINOR = 36
"""Wheels for glibc 2.17 (manylinux2014) up to 2.36 (Debian 12, the oldest gateway OS with Python 3.11)."""
GLIBC_OLDEST_MINOR = 17
OLDEST_PYTHON = (3, 11)
PIP_TIMEOUT_S = 1_800
"""One pip step at most: downloading some 40 wheels over a slow link, never for ever."""
CONFIG_FILES = ("gateway.toml", "example.toml", "powershare-gw.service")


class Arch(StrEnum):
    """The gateway processors there are manylinux wheels for (as `uname -m` names them)."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class BundleError(Exception):
    """The bundle could not be completed (a download failed, a dependency has no wheel for the target)."""


@dataclass(frozen=True)
class Target:
    """What the gateway runs: its processor and its Python (major, minor)."""

    arch: Arch
    python: tuple[int, int]

    @property
    def python_text(self) -> str:
        return f"{self.python[0]}.{self.python[1]}"

    def pip_options(self) -> list[str]:
        """pip's options to choose wheels for this target rather than for the machine pip runs on."""
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(GLIBC_OLDEST_MINOR, GLIBC_NEWEST_MINOR + 1)]
        tags.append(f"manylinux2014_{self.arch}")  # pip expands this one to the manylinux1/2010 tags too
        cp = f"cp{self.python[0]}{self.python[1]}"
        platform_options = [option for tag in tags for option in ("--platform", tag)]
        return ["--only-binary=:all:", *platform_options, "--python-version", self.python_text,
                "--implementation", "cp", "--abi", cp]  # pip adds abi3 and pure-Python wheels itself


def parse_arch(text: str) -> Arch:
    aliases = {"amd64": Arch.X86_64, "arm64": Arch.AARCH64}
    try:
        return aliases.get(text.lower()) or Arch(text.lower())
    except ValueError:
        raise InputError(f"--platform: {shown(text)} is not a gateway processor this bundles for "
                         f"(one of: {', '.join(Arch)})") from None


def parse_python(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not match:
        raise InputError(f"--python: expected MAJOR.MINOR (such as 3.11), got {shown(text)}")
    version = (int(match.group(1)), int(match.group(2)))
    if version < OLDEST_PYTHON:
        raise InputError(f"--python: powershare-gw needs Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} or newer, "
                         f"got {shown(text)}")
    return version


def default_source() -> Path:
    """The checkout this package runs from, when it runs from one; else the current folder."""
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def check_source(source: Path) -> Path:
    """`source` is a powershare-gw checkout (pyproject.toml naming the distribution); InputError otherwise."""
    pyproject = source / "pyproject.toml"
    try:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        name = None
    if name != "powershare-gw":
        raise InputError(f"{source}: --source: not a powershare-gw checkout (no pyproject.toml naming it); "
                         "run bundle from the checkout, or name it with --source DIR")
    return source.resolve()


def check_out(out: Path) -> bool:
    """The bundle goes into a new or empty folder, so no wheel of another target is ever mixed in.

    The folder is made here (True: this made it), before pip runs, so a path no folder can be made at
    (under a file, under /proc, not this user's) is refused naming --out and the reason, not a traceback."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: --out: must be a new or empty folder")
    try:
        out.mkdir(parents=True)
    except FileExistsError:  # an empty folder: it must take the bundle's files
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{out}: --out: this user cannot write in the folder") from None
        return False
    except OSError as err:
        raise InputError(f"{out}: --out: cannot make the folder: {err.strerror or err}") from None
    return True


def build(out: Path, target: Target, source: Path, pip: list[str] | None = None) -> list[Path]:
    """Make the bundle in `out`; the wheels it holds. BundleError when pip cannot complete it, and
    then `out` is as it was (absent or empty), so the same command can simply be run again."""
    made = check_out(out)
    try:
        return _fill(out, target, source, pip or [sys.executable, "-m", "pip"])
    except BaseException:
        _empty(out, remove=made)
        raise


def _empty(out: Path, *, remove: bool) -> None:
    """Take away what a failed build made in `out` (the folder too, when the build made it)."""
    if remove:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _fill(out: Path, target: Target, source: Path, pip: list[str]) -> list[Path]:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    own = _own_wheel(pip, source, wheels)
    _run_pip(pip, ["download", *target.pip_options(), "--dest", str(wheels), str(own)],
             f"downloading the dependencies for {target.arch} / Python {target.python_text}")
    found = sorted(wheels.glob("*.whl"))
    not_wheels = sorted(p.name for p in wheels.iterdir() if p.suffix != ".whl")
    if not_wheels:
        raise BundleError(f"pip left files that are not wheels: {', '.join(not_wheels)}")
    (out / "config").mkdir()
    for name in CONFIG_FILES:
        shutil.copy2(bundled_config(name), out / "config" / name)
    installer = out / "install.sh"
    shutil.copy2(bundled_config("install.sh"), installer)
    installer.chmod(0o755)
    version = _wheel_version(own)
    (out / "bundle.env").write_text("# Written by `powershare-gw bundle`; read by install.sh.\n"
                                    f"VERSION={version}\nARCH={target.arch}\nPYTHON={target.python_text}\n")
    (out / "requirements.txt").write_text("".join(f"{_wheel_name(w)}=={_wheel_version(w)}\n" for w in found))
    write_checksums(out)
    return found


def write_checksums(out: Path) -> None:
    """Every file of the bundle, by its path in it: install.sh checks them all before it reads
    bundle.env or installs a wheel, so a file damaged on the USB stick stops it, whichever it is."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p != out / "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{_sha256(p)}  {p.relative_to(out).as_posix()}\n" for p in files))


def _own_wheel(pip: list[str], source: Path, wheels: Path) -> Path:
    """powershare-gw's own wheel, built from the checkout (pure Python: one wheel serves every target)."""
    with tempfile.TemporaryDirectory(prefix="powershare-gw-wheel-") as built:
        _run_pip(pip, ["wheel", "--no-deps", "--wheel-dir", built, str(source)], "building powershare-gw's wheel")
        (wheel,) = Path(built).glob("powershare_gw-*.whl")
        return Path(shutil.copy2(wheel, wheels / wheel.name))


def _run_pip(pip: list[str], args: list[str], doing: str) -> None:
    try:
        done = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{doing}: pip took more than {PIP_TIMEOUT_S} s") from None
    except OSError as err:
        raise BundleError(f"{doing}: cannot run pip: {err}") from None
    if done.returncode != 0:
        raise BundleError(f"{doing}: {_why(done.stderr)}")


UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|ConnectTimeout|ProxyError|"
                         r"SSLError|Could not fetch URL|Network is unreachable|Temporary failure in name resolution")
"""pip's words when the registry could not be reached: then "no matching distribution" means nothing more."""


def _why(stderr: str) -> str:
    """pip's reason, shortest first: an unreachable registry, or a dependency with no wheel for the target."""
    unreachable = UNREACHABLE.search(stderr)
    if unreachable:
        return (f"the package registry could not be reached ({unreachable.group(0)}): bundle runs on a machine "
                "with access to it (pip's configuration names it)")
    missing = re.findall(r"No matching distribution found for ([^\s]+)", stderr)
    if missing:
        return (f"{', '.join(sorted(set(missing)))}: no wheel for this processor and Python in the registry "
                "(bundle takes wheels only: the gateway has no compiler)")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "pip failed: " + " | ".join(lines[-6:]) if lines else "pip failed without saying why"


def _wheel_name(wheel: Path) -> str:
    return wheel.name.split("-")[0]


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle", help="make a folder that installs the gateway with no network (run where the registry is "
                       "reachable; carry the folder to the gateway and run its install.sh)",
        description="Make a folder of wheels for the gateway's processor and Python, the configuration "
                    "template, the systemd unit and install.sh. Runs on a machine that can reach the package "
                    "registry; the folder is carried to the gateway, where `sudo ./install.sh` installs "
                    "into /opt/powershare-gw with no network.")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle's folder (new or empty)")
    p.add_argument("--platform", metavar="ARCH", help=f"the gateway's processor: {' or '.join(Arch)} "
                                                      "(default: this machine's)")
    p.add_argument("--python", metavar="X.Y", help="the gateway's Python, e.g. 3.11 for Debian 12 "
                                                   "(default: the Python running this)")
    p.add_argument("--source", metavar="DIR", help="the powershare-gw checkout to build the gateway's own wheel "
                                                   "from (default: the checkout this runs from, else the "
                                                   "current folder)")
    p.set_defaults(handler=bundle_command)


def bundle_command(args: argparse.Namespace) -> int:
    target = Target(parse_arch(args.platform or platform.machine()),
                    parse_python(args.python) if args.python else (sys.version_info.major, sys.version_info.minor))
    source = check_source(Path(args.source) if args.source else default_source())
    out = Path(args.out)
    try:
        wheels = build(out, target, source)
    except BundleError as err:
        print(f"error: bundle not made: {printable(str(err))}", file=sys.stderr)
        return 1
    print(f"{out}: powershare-gw for {target.arch}, Python {target.python_text}: {len(wheels)} wheels, "
          "the configuration template, the systemd unit and install.sh")
    print(f"carry it to the gateway, then: sudo {shlex.quote(str(out / 'install.sh'))}")
    return 0
