"""The command line's table of commands: each command comes from the module it names, and a
command loads only its own module (`run` on a gateway never loads the simulator)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from firmware_py import cli


def commands_of(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_lists_every_command_in_the_tables_order():
    assert commands_of(cli.build_parser()) == list(cli.COMMANDS)


def test_each_command_is_registered_by_the_module_the_table_names():
    for command, module in cli.COMMANDS.items():
        registered = commands_of(cli.build_parser(command))
        assert command in registered, f"{module} does not register {command!r}"
        assert registered == [c for c, m in cli.COMMANDS.items() if m == module]


def test_run_loads_neither_the_simulator_nor_the_other_commands():
    probe = ("import sys; from firmware_py import cli; cli.build_parser('run'); "
             "print(sorted(m for m in sys.modules if m.startswith(('firmware_py.sim', 'firmware_py.commissioning', "
             "'firmware_py.bundle', 'firmware_py.statements.commands', 'firmware_py.journal.commands'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_command_is_named_with_every_command_it_could_have_been(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "nope" in err and all(command in err for command in cli.COMMANDS)


@pytest.mark.parametrize("argv, option", [
    (["sim", "--speed", "nan"], "--speed"),
    (["sim", "bms", "--can-interface", "virtual", "--can-channel", "x", "--load-w", "nan"], "--load-w"),
    (["sim", "bms", "--can-interface", "virtual", "--can-channel", "x", "--soc", "101"], "--soc"),
    (["sim", "inverter", "--unit-id", "300"], "--unit-id"),
    (["bench", "--only", "soak", "--soak-hours", "0"], "--soak-hours"),
    (["bench", "--samples", "-1"], "--samples"),
    (["bench", "--bus-seconds", "inf"], "--bus-seconds"),
    (["bms", "record", "--can-interface", "virtual", "--can-channel", "x", "--duration", "-1", "f.asc"], "--duration"),
    (["bms", "decode", "f.asc", "--every", "abc"], "--every"),
])
def test_a_number_an_option_cannot_take_exits_2_naming_the_option_and_its_range(argv, option, capsys):
    """NaN ran the pack model into NaN and a 0 h soak ended in a traceback after minutes: refused first."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {option}: expected a" in err, err


def test_output_whose_reader_left_ends_141_without_a_traceback(tmp_path):
    """`report --format json | head`: a 1 would read as a failed check, a traceback as a crash."""
    config = tmp_path / "gateway.toml"
    config.write_text("version = 1\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "firmware_py", "check-config", str(config)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_a_command_says_what_failed_in_one_line_without_the_libraries_retry_chatter(tmp_path):
    """pymodbus logs an ERROR and a hex dump of its last frames for every request that times out; an
    installer probing a silent inverter read those before the one line that says what is wrong."""
    import socket

    with socket.socket() as silent:  # the kernel completes the handshake; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = tmp_path / "gateway.toml"
        config.write_text(f'[inverter]\nhost = "127.0.0.1"\nport = {silent.getsockname()[1]}\ntimeout_s = 0.2\n')
        port = silent.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "firmware_py", "inverter", "probe", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: inverter: 127.0.0.1:{port} unit 1: nothing answered for unit id 1 within 0.2 s: "
                           "looking for the 'SunS' marker: no reply within 0.2 s at 40000, 0, 50000; check "
                           "[inverter] unit_id (1)"), line


def test_sim_list_names_each_bundled_scenario_as_scenario_takes_it_and_the_readme_names_it(capsys):
    from firmware_py.sim import scenario

    assert cli.main(["sim", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "fault-garbled" in names and "summer-peak" in names and not any(n.endswith(".toml") for n in names)
    assert [scenario.find(name) for name in names] == [scenario.bundled(f"{name}.toml") for name in names]


def test_a_command_loading_openadr_prints_no_warning_of_another_projects_source(tmp_path):
    """signxml's import made cryptography print two lines of signxml's source (DSA deprecated) at every
    start with OpenADR 2.0b on: an installer reads that as a fault."""
    config = tmp_path / "gateway.toml"
    config.write_text('[dispatch.openadr]\nenabled = true\nven_name = "truck-1"\n'
                      'vtn_url = "http://127.0.0.1:8080/OpenADR2/Simple/2.0b"\n')
    done = subprocess.run([sys.executable, "-W", "default", "-m", "firmware_py", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr



@pytest.mark.slow  # a real `sim` process, stopped once its journal is open
def test_a_stopped_run_ends_130_not_1_which_reads_as_a_failed_check(tmp_path):
    """`sim` stopped by SIGTERM (or Ctrl-C) exited 1, the code of a scenario whose `[expect]` failed: a
    script running scenarios could not tell the interrupted run from a failed one. It ends 130 now,
    as a shell reports a command Ctrl-C ended, and says so in one line."""
    import signal
    import time

    run = subprocess.Popen([sys.executable, "-m", "firmware_py", "sim", "--realtime", "--quiet"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "bench-journal.sqlite").exists():
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert err.strip() == "sim: stopped before it finished", err
    assert not (tmp_path / "summary.json").exists()
