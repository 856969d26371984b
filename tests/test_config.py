"""The TOML configuration: validation, inheritance, errors naming file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtpfast import Agent, ConfigurationError, Destination, PoolSettings, Route, Timeouts
from lmtpfast._config import (
    AgentConfig,
    Transport,
    _TimeoutsTable,
    config_from_dict,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lmtpfast.toml"


def write(tmp_path: Path, text: str, transport: str | None = None) -> Path:
    if transport is not None:
        (tmp_path / "transport").write_text(transport)
    path = tmp_path / "lmtpfast.toml"
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "virtual").write_text("mlist@example.org mlist@localhost\n")
    path = write(tmp_path, """
lhlo_name = "mx1.example.org"
default = "lmtp:unix:/var/imap/socket/lmtp"
transport_map = "transport"
virtual_map = "virtual"
recipient_delimiter = "+"

[defaults]
recipient_limit = 20
pool = { max_connections = 8, idle_timeout = 5 }
timeouts = { connect = 5 }

[transports.lmtp1]
destination = "unix:/path/name"
pool = { max_connections = 4 }

[transports.LMTP2]
timeouts = { final = 60 }
recipient_limit = 100
""", transport="domain1.name lmtp1:unix:/path/name\ndomain2.name lmtp2:lmtp2host\n")
    cfg = load_config(path)
    assert cfg.lhlo_name == "mx1.example.org"
    assert cfg.default == Route("lmtp", "unix:/var/imap/socket/lmtp",
                                Destination("unix", path="/var/imap/socket/lmtp"))
    assert set(cfg.transports) == {"lmtp", "lmtp1", "lmtp2"}
    t1 = cfg.transports["lmtp1"]
    assert t1.dest == Destination("unix", path="/path/name")
    # pool tables merge key by key over [defaults]
    assert t1.pool == PoolSettings(max_connections=4, idle_timeout=5)
    assert t1.recipient_limit == 20 and t1.timeouts.connect == 5
    t2 = cfg.transports["lmtp2"]
    assert t2.recipient_limit == 100
    assert (t2.timeouts.final, t2.timeouts.connect, t2.timeouts.rcpt) == (60, 5, Timeouts().rcpt)
    # the implicit lmtp transport gets the defaults too
    assert cfg.transports["lmtp"].pool.max_connections == 8
    assert cfg.transport_map is not None and len(cfg.transport_map) == 2
    assert cfg.virtual_map is not None and cfg.virtual_map.rewrite("mlist@example.org") == (
        "mlist@localhost")
    agent = Agent.from_config(path)
    r = agent.route("u@domain2.name")
    assert (r.transport, r.destination) == ("lmtp2", Destination("inet", "lmtp2host", 24))
    r = agent.route("mlist@example.org")  # rewritten, then the default route
    assert (r.address, r.key, r.transport) == ("mlist@localhost", "default", "lmtp")


def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.transport_map is not None and cfg.default is not None


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("lhlo_nmae = 'x'", "lhlo_nmae", "unknown key"),
        ("[transports.lmtp1]\ndestinaton = 'x'", "transports.lmtp1.destinaton", "unknown key"),
        ("[transports.lmtp1.pool]\nmax_connections = 0", "transports.lmtp1.pool.max_connections",
         ">= 1"),
        ("[transports.lmtp1.pool]\nmax_connections = 'many'",
         "transports.lmtp1.pool.max_connections", "Expected `int`"),
        ("[transports.lmtp1.pool]\nprobe = 'ping'", "transports.lmtp1.pool.probe",
         "Invalid enum value 'ping'"),
        ("[transports.lmtp1.timeouts]\nfinal = -1", "transports.lmtp1.timeouts.final", "> 0"),
        ("[transports.lmtp1.timeouts]\nfinl = 1", "transports.lmtp1.timeouts.finl", "unknown key"),
        ("[transports.lmtp1]\ndestination = 'host:70000'", "transports.lmtp1.destination",
         "out of range"),
        ("[transports.lmtp1]\nrecipient_limit = 0", "transports.lmtp1.recipient_limit", ">= 1"),
        ("[defaults]\nrecipient_limit = 'x'", "defaults.recipient_limit", "Expected `int`"),
        ("[defaults.pool]\nbogus = 1", "defaults.pool.bogus", "unknown key"),
        ("default = 'lmtp-no-colon'", "default", "expected 'transport:nexthop'"),
        ("default = 'lmtp9:'", "default", "not declared"),
        ("[transports.error]\n", "transports.error", "built-in"),
        ("[transports.'bad name']\n", "transports.bad name", "bad transport name"),
        ("transports = 3", "transports", "Expected `object`"),
        ("lhlo_name = 'has space'", "lhlo_name", "bad LHLO name"),
        ("transport_map = 'missing-file'", None, "cannot read map file"),
    ],
)
def test_bad_config_names_file_key_problem(
    tmp_path: Path, text: str, key: str | None, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    exc = info.value
    assert problem in exc.problem, exc
    if key is not None:
        assert exc.source == str(path)
        assert exc.field == key
        assert str(exc).startswith(f"{path} [{key}]: ")
    else:
        assert exc.source.endswith("missing-file")


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'lhlo_name = "a"\n\ndefault = \n')
    with pytest.raises(ConfigurationError, match="TOML syntax") as info:
        load_config(path)
    assert (info.value.source, info.value.line) == (str(path), 3)


def test_map_naming_undeclared_transport_names_map_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'transport_map = "transport"\n[transports.lmtp1]\n',
                 transport="# map\nfoo.com lmtp1:lmtp1host\nbar.com lmtp2:lmtp2host\n")
    with pytest.raises(ConfigurationError, match="'lmtp2', which is not declared") as info:
        load_config(path)
    assert info.value.source == str(tmp_path / "transport")
    assert info.value.line == 3


def test_bad_map_line_through_config(tmp_path: Path) -> None:
    path = write(tmp_path, 'transport_map = "transport"\n', transport="ok.example lmtp:\nbroken\n")
    with pytest.raises(ConfigurationError, match="value is missing") as info:
        load_config(path)
    assert (info.value.source, info.value.line) == (str(tmp_path / "transport"), 2)


def test_same_from_python_objects() -> None:
    agent = Agent(
        transports={"lmtp1": Transport(destination="unix:/path/name",
                                       pool=PoolSettings(max_connections=3)),
                    "lmtp2": {"destination": "lmtp2host", "recipient_limit": 5}},
        transport_map={"domain1.name": "lmtp1:", "domain2.name": "lmtp2:"},
        virtual_map={"mlist@example.org": "mlist@localhost"},
        default="lmtp:unix:/var/imap/socket/lmtp",
    )
    assert agent.route("a@domain1.name").destination == Destination("unix", path="/path/name")
    assert agent.route("a@domain2.name").destination == Destination("inet", "lmtp2host", 24)
    assert agent.config.transports["lmtp2"].recipient_limit == 5
    cfg = config_from_dict({"transports": {"lmtp1": {"destination": "unix:/x"}},
                            "default": "lmtp1:"})
    assert isinstance(cfg, AgentConfig) and cfg.default == Route("lmtp1")
    with pytest.raises(ConfigurationError) as info:
        Agent(transports={"lmtp1": {"pool": {"max_connections": -1}}})
    assert info.value.field == "transports.lmtp1.pool.max_connections"
    with pytest.raises(ConfigurationError, match="not declared"):
        Agent(transport_map={"x.example": "nope:"})
    with pytest.raises(ConfigurationError) as info:
        PoolSettings(pipeline_depth=0)
    assert info.value.field == "pipeline_depth"
    with pytest.raises(ConfigurationError) as info:
        Transport(recipient_limit=0)
    assert info.value.field == "recipient_limit"


def test_timeouts_table_mirrors_timeouts() -> None:
    assert set(_TimeoutsTable.__struct_fields__) == set(Timeouts.__struct_fields__)


def test_for_server_settings() -> None:
    agent = Agent.for_server("unix:/x", max_connections=7, recipient_limit=9, pipeline_depth=2)
    t = agent.config.transports["lmtp"]
    assert (t.pool.max_connections, t.pool.pipeline_depth, t.recipient_limit) == (7, 2, 9)
    with pytest.raises(TypeError, match="unknown setting"):
        Agent.for_server("unix:/x", max_conections=7)
