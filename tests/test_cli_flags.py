"""Every subcommand's parser, walked: shared flags mean the same, every option is documented.

An option string used by several subcommands (``--json``, ``-q``, ``--config``,
``--server``, the TLS/SASL and ``--log-*`` options, ``--loop`` ...) must have
the same destination, action, type, choices and metavar everywhere; the
canonical meanings live in ``lmtpfast/cli/_options.py``. ``--help`` must be
complete: a description for every subcommand, a help text for every option.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import pytest

from lmtpfast.cli import build_parser, main

#: Where one subcommand's flag may differ from the others', and why.
ALLOWED: dict[tuple[str, str], str] = {
    # The positional (SPOOL, URL) already has the destination "queue"; the option
    # names a PostgreSQL queue by URL there, as --queue QUEUE does elsewhere.
    ("queue import", "--queue"): "the queue to import into (postgresql://...)",
    ("queue init", "--queue"): "the queue to create, as its positional URL",
}

#: The TLS and SASL options, which go wherever a subcommand connects to --server.
SECURITY = ("--tls", "--ca-file", "--cert-file", "--key-file", "--tls-server-name",
            "--tls-no-verify", "--sasl-user", "--sasl-password-file", "--sasl-password-map",
            "--sasl-mechanisms", "--sasl-allow-plaintext")
#: Subcommands whose --server is not an LMTP delivery with a session to secure.
NO_SECURITY = {"bench": "a load generator over plain sessions (its own engine loop)"}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = parser
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sub in a.choices.items():
                    walk(sub, f"{name} {n}".strip())

    walk(build_parser(), "")
    return out


PARSERS = _parsers()
COMMANDS = {n: p for n, p in PARSERS.items() if n}


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest != "help"
            and not isinstance(a, argparse._VersionAction)]


def _shape(a: argparse.Action) -> tuple[Any, ...]:
    return (a.dest, type(a).__name__, a.nargs, a.const, a.type, tuple(a.choices or ()),
            a.metavar, tuple(sorted(a.option_strings)))


def test_every_subcommand_and_option_is_documented() -> None:
    undocumented = []
    for name, p in COMMANDS.items():
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
        if leaf and not (p.description or "").strip():
            undocumented.append(f"{name}: no description")
        for a in p._actions:
            if a.dest == "help" or isinstance(a, argparse._SubParsersAction):
                continue  # a subcommand's own help is checked with it
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                undocumented.append(f"{name}: {'/'.join(a.option_strings) or a.dest}")
    assert not undocumented, undocumented


def test_shared_flags_mean_the_same_everywhere() -> None:
    seen: dict[str, dict[tuple[Any, ...], list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, p in COMMANDS.items():
        for a in _options(p):
            for opt in a.option_strings:
                if (name, opt) not in ALLOWED:
                    seen[opt][_shape(a)].append(name)
    differ = {opt: {str(k): v for k, v in shapes.items()}
              for opt, shapes in seen.items() if len(shapes) > 1}
    assert not differ, differ


def test_json_and_quiet_mean_one_thing() -> None:
    for name, p in COMMANDS.items():
        for a in _options(p):
            if "--json" in a.option_strings:
                assert isinstance(a, argparse._StoreTrueAction), name
                assert "as JSON on standard output" in (a.help or ""), (name, a.help)
            if "--quiet" in a.option_strings or "-q" in a.option_strings:
                assert sorted(a.option_strings) == ["--quiet", "-q"], name
                assert isinstance(a, argparse._StoreTrueAction), name


def test_tls_and_sasl_wherever_a_server_is_given() -> None:
    for name, p in COMMANDS.items():
        opts = {o for a in _options(p) for o in a.option_strings}
        connects = "--server" in opts or any(a.dest == "server" for a in p._actions)
        if connects and name not in NO_SECURITY:
            missing = [o for o in SECURITY if o not in opts]
            assert not missing, (name, missing)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_prints_and_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*name.split(), "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmtpfast " + name)
    for a in _options(COMMANDS[name]):
        assert a.option_strings[-1] in out, (name, a.option_strings)


# -- replay: --json prints the report, the TLS options reach the agent -------------------


@pytest.mark.postfix
def test_replay_json_on_stdout_and_tls_with_server(smtp_sink: Any, tmp_path: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lmtpfast.spool import Spool

    sink = smtp_sink()
    spool = tmp_path / "spool"
    Spool(spool, create=True).enqueue(b"Subject: x\r\n\r\nbody\r\n", "s@example.org",
                                      ["a@example.org"])
    # TLS required, smtp-sink offers no STARTTLS: deferred 4.7.5, so the option reached it.
    status = main(["replay", str(spool), "--server", sink.destination, "--tls", "encrypt",
                   "--json", "--min-backoff", "0"])
    report = json.loads(capsys.readouterr().out)
    assert status == 75
    (o,) = report["outcomes"]
    assert (o["outcome"], o["enhanced"], o["stage"]) == ("deferred", "4.7.5", "starttls")
    assert report["exit_status"] == 75 and report["summary"]["recipients_deferred"] == 1
    status = main(["replay", str(spool), "--server", sink.destination, "--json", "--flush"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["outcomes"][0]["outcome"] == "delivered"


def test_tls_options_with_config_are_a_usage_error(tmp_path: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text('default = "lmtp:unix:/nowhere"\n')
    (tmp_path / "spool").mkdir()
    status = main(["replay", str(tmp_path / "spool"), "--config", str(cfg), "--tls", "verify"])
    assert status == 64
    assert "go with --server" in capsys.readouterr().err


def test_replay_says_when_a_destination_is_marked_dead(tmp_path: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lmtpfast.spool import Spool

    spool = tmp_path / "spool"
    s = Spool(spool, create=True)
    for i in range(6):
        s.enqueue(b"Subject: x\r\n\r\nbody\r\n", "s@example.org", [f"u{i}@example.org"])
    status = main(["replay", str(spool), "--server", f"unix:{tmp_path}/nobody",
                   "--concurrency", "1", "--json"])
    captured = capsys.readouterr()
    assert status == 75
    assert "marked dead: 5 failed session set-ups in a row" in captured.err
    import json

    outcomes = json.loads(captured.out)["outcomes"]
    assert {o["outcome"] for o in outcomes} == {"deferred"}  # never bounced
    assert sum("marked dead" in o["text"] for o in outcomes) == 1
