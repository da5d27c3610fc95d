#!/bin/sh
# Install powershare-gw on a gateway from this bundle, with no network.
# Made by `powershare-gw bundle`; see the README, "Installing on a gateway".
#
#   sudo ./install.sh [--python PATH]
#       /opt/powershare-gw          a virtual environment holding the bundle's wheels, exactly
#       user and group powershare   the service's (a system user, no login; in dialout for RS-485)
#       /etc/powershare-gw          the configuration: root:powershare 0750; gateway.toml 0640,
#                                   written from the template only when there is none yet
#       /var/lib/powershare-gw      the journal and the gateway's other files: powershare 0750
#       /etc/systemd/system/powershare-gw.service   installed and enabled (not started: configure first)
#   Run again with a newer bundle to upgrade: the configuration and the journal are kept.
#
#   ./install.sh --root DIR [--python PATH]
#       the same files under DIR instead of / (for tests only): no user is created, no ownership
#       changed and systemctl is not run; what would be is printed. Not for building an image: the
#       environment's commands name DIR/opt/powershare-gw/bin/python, which is gone once DIR becomes /.
#
# Exit codes: 0 installed, 1 a step failed, 2 bad arguments or a bundle that does not fit here.
set -eu
umask 022  # what is installed must be readable by the service's user, whatever root's own umask is

SERVICE_USER=powershare
PREFIX=/opt/powershare-gw
CONF_DIR=/etc/powershare-gw
STATE_DIR=/var/lib/powershare-gw
UNIT_DIR=/etc/systemd/system
UNIT=powershare-gw.service

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=
PYTHON_BIN=python3

say() { printf '%s\n' "$*"; }
fail() { printf 'install.sh: %s\n' "$1" >&2; exit "${2:-1}"; }
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root)
            [ $# -ge 2 ] || fail "--root needs a folder" 2
            case "$2" in /*) ROOT=$2 ;; *) ROOT=$(pwd)/$2 ;; esac
            shift 2 ;;
        --python)
            [ $# -ge 2 ] || fail "--python needs the path of a Python interpreter" 2
            PYTHON_BIN=$2
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument: $1 (see --help)" 2 ;;
    esac
done

# Run a command, or under --root only say it would be run (what needs the real system).
as_system() {
    if [ -n "$ROOT" ]; then say "  (--root: would run: $*)"; else "$@"; fi
}

# --- is the bundle whole and undamaged? (before anything in it is read) ----------------------
for needed in bundle.env requirements.txt SHA256SUMS wheels "config/gateway.toml" "config/example.toml" "config/$UNIT"; do
    [ -e "$HERE/$needed" ] || fail "$HERE/$needed: missing: this folder is not a whole bundle (make it again with powershare-gw bundle)" 2
done
listed() {  # is this path (relative to the bundle) in SHA256SUMS?
    awk -v name="$1" '$2 == name { found = 1 } END { exit !found }' "$HERE/SHA256SUMS"
}
for file in install.sh bundle.env requirements.txt "config/gateway.toml" "config/example.toml" "config/$UNIT" "$HERE"/wheels/*; do
    name=${file#"$HERE"/}
    [ -e "$HERE/$name" ] || continue  # no wheels at all (the pattern itself): pip says what is missing
    listed "$name" || fail "$HERE/$name: not in SHA256SUMS (left from another bundle?): remove it, or make the bundle again"
done
(cd "$HERE" && sha256sum --quiet --strict --check SHA256SUMS) \
    || fail "the bundle's files do not match SHA256SUMS (damaged in transfer?): copy the bundle again"

# --- does this bundle fit this machine? ----------------------------------------------------
VERSION=; ARCH=; PYTHON=
# shellcheck source=/dev/null
. "$HERE/bundle.env"
if [ -z "$VERSION" ] || [ -z "$ARCH" ] || [ -z "$PYTHON" ]; then
    fail "$HERE/bundle.env: VERSION, ARCH or PYTHON missing" 2
fi

machine=$(uname -m)
[ "$machine" = "$ARCH" ] || fail "this bundle is for $ARCH, this machine is $machine: make one with powershare-gw bundle --platform $machine" 2
command -v "$PYTHON_BIN" >/dev/null 2>&1 || fail "$PYTHON_BIN: not found: install Python $PYTHON, or name it with --python PATH" 2
have=$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$PYTHON" ] || fail "this bundle is for Python $PYTHON, $PYTHON_BIN is $have: make one with powershare-gw bundle --python $have, or name another interpreter with --python PATH" 2
"$PYTHON_BIN" -c 'import venv, ensurepip' 2>/dev/null || fail "$PYTHON_BIN cannot make virtual environments: install Debian's python3-venv package (from the system's own media when there is no network)" 2
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    fail "run as root (sudo ./install.sh), or with --root DIR to install under DIR" 2
fi

say "powershare-gw $VERSION for $ARCH, Python $PYTHON, from $HERE${ROOT:+, under $ROOT} (every file matches SHA256SUMS)"

# --- the service user ------------------------------------------------------------------------
if [ -z "$ROOT" ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
    say "user $SERVICE_USER: exists"
else
    say "user $SERVICE_USER: creating"  # under --root: DIR's users are not this machine's; always said
    as_system useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "powershare-gw gateway" "$SERVICE_USER"
fi
if getent group dialout >/dev/null 2>&1; then
    as_system usermod --append --groups dialout "$SERVICE_USER"  # RS-485 adapters (/dev/ttyUSB*)
fi
# The environment's bin/python runs this interpreter: one under a private home (root's pyenv under
# /root, 0700) installs fine as root, and then the service can never start. Checked before any change.
if [ -n "$ROOT" ]; then
    say "  (--root: would run as $SERVICE_USER: $PYTHON_BIN -c '')"
elif ! command -v runuser >/dev/null 2>&1; then
    say "$PYTHON_BIN: not checked that $SERVICE_USER can run it: runuser (util-linux) is missing"
elif ! (cd / && runuser -u "$SERVICE_USER" -- "$PYTHON_BIN" -c '') >/dev/null 2>&1; then
    fail "the service user $SERVICE_USER cannot run $PYTHON_BIN (a Python under a private home such as /root/.pyenv?): name one it can with --python PATH, e.g. /usr/bin/python3"
fi

# --- the software ----------------------------------------------------------------------------
venv=$ROOT$PREFIX
# The Python the environment was made for, as its pyvenv.cfg records it. Not what its bin/python runs
# now: that names /usr/bin/python3, which an OS upgrade repoints to the new version, while pip and the
# packages stay in the old version's lib/pythonX.Y, which the new one never reads. The environment is
# kept only when both agree with the bundle and its pip imports; otherwise it is made again. --clear
# empties only $PREFIX: the configuration and the journal, tokens and settings are elsewhere.
# It must also have been made with the interpreter this install uses (--python, or python3 found):
# one made with another of the same X.Y (root's pyenv) was kept, and --python could not replace it.
made_for=$(sed -n 's/^version[[:space:]]*=[[:space:]]*\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' "$venv/pyvenv.cfg" 2>/dev/null | head -n 1) || made_for=
cfg_value() {  # a key of the environment's pyvenv.cfg, or nothing
    sed -n "s/^$1[[:space:]]*=[[:space:]]*//p" "$venv/pyvenv.cfg" 2>/dev/null | head -n 1
}
# The interpreter a venv made now records (a venv's own python makes one for its base interpreter).
uses=$("$PYTHON_BIN" -I -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))') \
    || fail "$PYTHON_BIN: cannot tell where it is installed"
made_with=$(cfg_value executable)
if [ -n "$made_with" ]; then  # Python 3.11 and later record the interpreter itself
    made_with_real=$(readlink -f "$made_with" 2>/dev/null) || made_with_real=$made_with
    [ "$made_with_real" = "$uses" ] && same_python=yes || same_python=no
else  # older ones only its folder
    made_with=$(cfg_value home)
    made_with_real=$(readlink -f "$made_with" 2>/dev/null) || made_with_real=$made_with
    [ -n "$made_with" ] && [ "$made_with_real" = "$(dirname "$uses")" ] && same_python=yes || same_python=no
fi
if [ "$uses" = "$PYTHON_BIN" ]; then uses_said=$uses; else uses_said="$PYTHON_BIN ($uses)"; fi
if [ "$made_for" = "$PYTHON" ] && [ "$same_python" = yes ] && "$venv/bin/python" -I -c 'import pip' >/dev/null 2>&1; then
    :
elif [ -e "$venv/pyvenv.cfg" ]; then
    if [ "$made_for" != "$PYTHON" ]; then
        say "$PREFIX: made for Python ${made_for:-unknown}, this bundle's is $PYTHON: making it again"
    elif [ "$same_python" != yes ]; then
        say "$PREFIX: made with ${made_with:-an unknown Python}, this install uses $uses_said: making it again"
    elif "$venv/bin/python" -I -c '' >/dev/null 2>&1; then
        say "$PREFIX: its Python cannot import pip: making it again"
    else
        say "$PREFIX: made for Python that is no longer installed: making it again"
    fi
    "$PYTHON_BIN" -m venv --clear "$venv"
else
    say "$PREFIX: making the virtual environment"
    "$PYTHON_BIN" -m venv "$venv"
fi
pip_here() {
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated --disable-pip-version-check --no-cache-dir "$@"
}
say "$PREFIX: installing the bundle's wheels (no network: --no-index, no pip configuration read)"
# --force-reinstall: a bundle rebuilt at the same version replaces what an earlier one installed.
pip_here install --quiet --no-index --force-reinstall --find-links "$HERE/wheels" \
    --requirement "$HERE/requirements.txt" || fail "pip could not install the bundle's wheels into $PREFIX"
# What an earlier bundle installed and this one does not hold goes: the environment is exactly this bundle.
leftovers=$("$venv/bin/python" -I - "$HERE/requirements.txt" <<'PYTHON'
import re, sys
from importlib.metadata import distributions
def name(text): return re.sub(r"[-_.]+", "-", text).lower()
wanted = {name(line.split("==")[0]) for line in open(sys.argv[1]) if line.strip()} | {"pip", "setuptools"}
found = {d.metadata["Name"] for d in distributions()} - {None}  # a damaged dist-info names nothing
print(" ".join(sorted(n for n in found if name(n) not in wanted)))
PYTHON
) || fail "cannot list what $PREFIX holds"
if [ -n "$leftovers" ]; then
    say "$PREFIX: removing what this bundle no longer holds: $leftovers"
    # shellcheck disable=SC2086 # one argument per package name
    pip_here uninstall --quiet --yes $leftovers || fail "pip could not remove $leftovers from $PREFIX"
fi
installed=$("$venv/bin/powershare-gw" --version) || fail "$PREFIX/bin/powershare-gw does not run"
say "$PREFIX: $installed"

# --- configuration and state -----------------------------------------------------------------
install -d -m 0750 "$ROOT$CONF_DIR"
as_system chown "root:$SERVICE_USER" "$CONF_DIR"
if [ -e "$ROOT$CONF_DIR/gateway.toml" ]; then
    say "$CONF_DIR/gateway.toml: kept (the template is $CONF_DIR/gateway.toml.template)"
else
    install -m 0640 "$HERE/config/gateway.toml" "$ROOT$CONF_DIR/gateway.toml"
    say "$CONF_DIR/gateway.toml: written from the template: set the keys marked SET"
fi
# A kept file too: a run stopped between writing it and this line left it root's alone, which the
# service cannot read, and every later run kept it as it was.
as_system chown "root:$SERVICE_USER" "$CONF_DIR/gateway.toml"
install -m 0640 "$HERE/config/gateway.toml" "$ROOT$CONF_DIR/gateway.toml.template"
install -m 0640 "$HERE/config/example.toml" "$ROOT$CONF_DIR/example.toml"
as_system chown "root:$SERVICE_USER" "$CONF_DIR/gateway.toml.template" "$CONF_DIR/example.toml"

install -d -m 0750 "$ROOT$STATE_DIR"
as_system chown "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
say "$STATE_DIR: the journal and the gateway's other files (only the service writes here)"

# check-config judges whether the journal, settings and token can be written by the user running it:
# run as root it would call a folder only root can write valid, so it runs as the service's user.
if [ -n "$ROOT" ]; then  # the paths the configuration names are the gateway's, not under DIR
    say "  (--root: would run as $SERVICE_USER: $PREFIX/bin/powershare-gw check-config $CONF_DIR/gateway.toml)"
elif ! command -v runuser >/dev/null 2>&1; then
    say "$CONF_DIR/gateway.toml: not checked: runuser (util-linux) is missing, and run as root check-config would"
    say "  call folders valid that $SERVICE_USER cannot write: check it as the service's user (step 2 below)"
elif ! cannot=$(cd / && runuser -u "$SERVICE_USER" -- "$venv/bin/powershare-gw" --version 2>&1 >/dev/null); then
    # not the configuration: the service itself could never start
    fail "the service user $SERVICE_USER cannot run $PREFIX/bin/powershare-gw: $cannot"
elif problems=$(cd / && runuser -u "$SERVICE_USER" -- "$venv/bin/powershare-gw" check-config "$CONF_DIR/gateway.toml" 2>&1 >/dev/null); then
    say "$CONF_DIR/gateway.toml: valid"
else
    say "$CONF_DIR/gateway.toml: not valid yet:"
    printf '%s\n' "$problems" | sed 's/^/  /'
fi

# --- the service -----------------------------------------------------------------------------
install -d -m 0755 "$ROOT$UNIT_DIR"
install -m 0644 "$HERE/config/$UNIT" "$ROOT$UNIT_DIR/$UNIT"
say "$UNIT_DIR/$UNIT: installed"
if [ -n "$ROOT" ]; then
    as_system systemctl daemon-reload
    as_system systemctl enable "$UNIT"
elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable "$UNIT"
    if systemctl is-active --quiet "$UNIT"; then
        say "the gateway is running the version it started with: sudo systemctl restart $UNIT to run $VERSION"
    fi
else
    say "systemd is not running here: enable the service where it is (systemctl enable $UNIT)"
fi

cat <<EOF

Installed. Next:
  1. edit $CONF_DIR/gateway.toml (every key: $CONF_DIR/example.toml)
  2. sudo -u $SERVICE_USER $PREFIX/bin/powershare-gw check-config $CONF_DIR/gateway.toml
  3. bring up the CAN interface (ip link set can0 up type can bitrate 500000)
  4. sudo systemctl start $UNIT && journalctl -u $UNIT -f
EOF
