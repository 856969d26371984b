"""``lmtpfast check-config``: 0 for a good configuration, 78 with FILE[:LINE] for a bad one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtpfast.cli import main


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["check-config", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out


def test_a_good_configuration_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    (tmp_path / "transport").write_text("a.test lmtp:\n")
    cfg.write_text(f'default = "lmtp:unix:/run/dovecot/lmtp"\n'
                   f'transport_map = "texthash:{tmp_path / "transport"}"\n')
    status, out = check(capsys, str(cfg))
    assert status == 0 and out.startswith(f"{cfg}: ok (")


@pytest.mark.parametrize(("text", "where", "what"), [
    ("default = \"lmtp:unix:/x\"\n[transports.lmtp]\nbogus = 1\n", "lmtpfast.toml",
     "unknown key"),
    ("default = = 1\n", "lmtpfast.toml", ""),
    ("", "lmtpfast.toml", "routes nothing"),
])
def test_a_bad_configuration_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        text: str, where: str, what: str) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text(text)
    status, out = check(capsys, str(cfg))
    assert status == 78
    assert out.startswith(str(cfg)) and what in out


def test_maps_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmap = tmp_path / "transport"
    tmap.write_text("a.test lmtp:\nb.test\n")
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text(f'default = "lmtp:unix:/x"\ntransport_map = "texthash:{tmap}"\n')
    status, out = check(capsys, str(cfg))
    assert status == 78 and out.startswith(f"{tmap}:2: ")
    # A .cf with a parameter Postfix would silently ignore (a typo): a warning, exit 78.
    cf = tmp_path / "vmap.cf"
    cf.write_text("hosts = 127.0.0.1\ndbname = mail\nuser = u\npassword = secret\n"
                  "query = SELECT goto FROM alias WHERE address='%s'\nresult_formt = %s\n")
    cfg.write_text(f'default = "lmtp:unix:/x"\nvirtual_map = "pgsql:{cf}"\n')
    status, out = check(capsys, str(cfg), "--json")
    obj = json.loads(out)
    assert status == 78 and not obj["ok"]
    assert any("result_formt" in p["problem"] for p in obj["problems"])
    assert "secret" not in out
    status, out = check(capsys, str(tmp_path / "missing.toml"))
    assert status == 78 and "no such file" in out


def test_a_proxy_file_has_its_proxy_table_checked_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "proxy.toml"
    base = 'default = "dovecot:unix:/run/dovecot/lmtp"\n[transports.dovecot]\n'
    cfg.write_text(base + '[proxy]\nverify_recipients = ["dovecot"]\n')
    status, out = check(capsys, str(cfg))
    assert status == 0 and out.startswith(f"{cfg}: ok ("), out
    cfg.write_text(base + '[proxy]\nverify_recipients = ["dovecott"]\n')
    status, out = check(capsys, str(cfg))
    assert status == 78
    assert "verify_recipients names unknown transport(s) 'dovecott'" in out, out
    cfg.write_text(base + '[proxy]\nverify_recipient = true\n')
    status, out = check(capsys, str(cfg))
    assert status == 78 and "verify_recipient" in out and "unknown key" in out, out
