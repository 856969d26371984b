"""Tests of the fault proxy (lmtpfast._testing.proxy) itself, on both loops.

The fault matrix trusts the proxy to cut, stall, reset and corrupt exactly
where it is told; these tests pin that down over raw sockets (no lmtpfast
client involved), plus the spec grammar.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from lmtpfast import ConfigurationError
from lmtpfast._testing.proxy import FaultProxy, ProxyFault

TIMEOUT = 5.0


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="lmtpprx-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def echo_server(path: str, greeting: bytes = b"") -> AsyncIterator[list[bytes]]:
    """A unix server that sends ``greeting`` then echoes; yields what it got, per connection."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(b"")
        i = len(got) - 1
        if greeting:
            writer.write(greeting)
        try:
            while data := await reader.read(65536):
                got[i] += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        yield got
    finally:
        server.close()


async def open_client(dest: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert dest.startswith("unix:")
    return await asyncio.wait_for(asyncio.open_unix_connection(dest[5:]), TIMEOUT)


async def read_until_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), TIMEOUT)


def test_parse_specs() -> None:
    f = ProxyFault.parse("up@after:MIDDLE=cut")
    assert (f.direction, f.after, f.actions) == ("up", b"MIDDLE", (("cut", b""),))
    f = ProxyFault.parse(r"down@before:250 2.0.0 <bob#2=corrupt:X,send-down:421 x\r\n,cut")
    assert f.before == b"250 2.0.0 <bob" and f.occurrence == 2
    assert f.actions == (("corrupt", b"X"), ("send-down", b"421 x\r\n"), ("cut", b""))
    f = ProxyFault.parse(r"up@at:0=send-up:\x3d\x2c,stall", connection=0)
    assert f.at == 0 and f.actions[0] == ("send-up", b"=,") and f.connection == 0


@pytest.mark.parametrize("spec", [
    "up=cut", "sideways@at:1=cut", "up@at:x=cut", "up@middle:X=cut", "up@after:=cut",
    "up@after:X=explode", "up@after:X=corrupt", "up@after:X=cut:now",
])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigurationError):
        ProxyFault.parse(spec)


async def test_clean_forwarding(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up", b"hello\r\n") as got,
        FaultProxy(f"unix:{sockdir}/up", listen=f"unix:{sockdir}/p", record=True) as proxy,
    ):
        reader, writer = await open_client(proxy.destination)
        assert await reader.readexactly(7) == b"hello\r\n"
        payload = bytes(range(256)) * 1000
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
        writer.close()
        for _ in range(200):
            if proxy.stats.open == 0:
                break
            await asyncio.sleep(0.01)
        assert proxy.stats.open == 0 and proxy.stats.closed == [1]
        assert got == [payload]
        assert proxy.transcript(1, "up") == payload
        assert proxy.transcript(1, "down") == b"hello\r\n" + payload


async def test_cut_after_marker_split_across_reads(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up") as got,
        FaultProxy(f"unix:{sockdir}/up", fault="up@after:MARK=cut",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        reader, writer = await open_client(proxy.destination)
        writer.write(b"aaaMA")
        # Its echo proves the proxy read (and forwarded) the first half on its own.
        first = await asyncio.wait_for(reader.readexactly(5), TIMEOUT)
        writer.write(b"RKbbb")
        # The server gets everything up to and including the marker, then EOF.
        echoed = first + await read_until_eof(reader)
        assert got == [b"aaaMARK"]
        assert b"aaaMARK".startswith(echoed)  # whatever the echo got back before the cut
        assert proxy.stats.fired == 1


async def test_before_marker_with_occurrence(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up") as got,
        FaultProxy(f"unix:{sockdir}/up", fault="up@before:X#2=cut",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        reader, writer = await open_client(proxy.destination)
        writer.write(b"1X2X3X")
        await read_until_eof(reader)
        assert got == [b"1X2"]
        assert proxy.stats.fired_on == [1]


async def test_at_byte_count_corrupt_then_forward(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up", b"250 OK\r\n250 OK\r\n") as got,
        FaultProxy(f"unix:{sockdir}/up", fault="down@at:8=corrupt:X",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        reader, writer = await open_client(proxy.destination)
        assert await asyncio.wait_for(reader.readexactly(16), TIMEOUT) == (
            b"250 OK\r\nX50 OK\r\n")
        writer.write(b"ping")  # forwarding goes on after a corruption
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
        writer.close()
        assert got == [b"ping"]


async def test_fault_only_on_its_connection(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up", b"hi\r\n"),
        FaultProxy(f"unix:{sockdir}/up", fault="down@at:0=cut",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        r1, _ = await open_client(proxy.destination)
        assert await read_until_eof(r1) == b""
        r2, w2 = await open_client(proxy.destination)
        assert await asyncio.wait_for(r2.readexactly(4), TIMEOUT) == b"hi\r\n"
        w2.close()
        assert proxy.stats.fired_on == [1]


async def test_send_down_then_cut(sockdir: str) -> None:
    async with echo_server(f"{sockdir}/up"):
        spec = r"up@after:DATA\r\n=send-down:421 4.3.2 Bye\r\n,cut"
        async with FaultProxy(f"unix:{sockdir}/up", fault=spec,
                              listen=f"unix:{sockdir}/p") as proxy:
            reader, writer = await open_client(proxy.destination)
            writer.write(b"DATA\r\n")
            data = await read_until_eof(reader)
            assert b"421 4.3.2 Bye\r\n" in data
            assert proxy.stats.fired == 1


async def test_stall_keeps_client_open_until_it_hangs_up(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up") as got,
        FaultProxy(f"unix:{sockdir}/up", fault="up@after:STOP=stall",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        reader, writer = await open_client(proxy.destination)
        writer.write(b"go STOP more")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1 << 20), 0.3)
        assert got == [b"go STOP"]
        assert proxy.stats.open == 1
        writer.close()  # the client's hang-up ends both sides
        for _ in range(200):
            if proxy.stats.open == 0:
                break
            await asyncio.sleep(0.01)
        assert proxy.stats.open == 0


async def test_blackhole_blocks_the_writer(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up"),
        FaultProxy(f"unix:{sockdir}/up", fault="up@at:10=blackhole",
                   listen=f"unix:{sockdir}/p") as proxy,
    ):
        _, writer = await open_client(proxy.destination)
        writer.write(b"x" * (8 << 20))
        with pytest.raises(TimeoutError):  # nobody reads: the buffers fill up
            await asyncio.wait_for(writer.drain(), 0.5)
        writer.transport.abort()
        for _ in range(300):
            if proxy.stats.open == 0:
                break
            await asyncio.sleep(0.01)
        assert proxy.stats.open == 0  # the hang-up is noticed without reading


async def test_reset_tcp(sockdir: str) -> None:
    async with (
        echo_server(f"{sockdir}/up"),
        FaultProxy(f"unix:{sockdir}/up", fault="up@after:X=reset") as proxy,
    ):
        host, port = proxy.destination.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"aX")
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(100), TIMEOUT):
                pass
            raise ConnectionResetError("EOF instead of a reset")  # pragma: no cover


async def test_upstream_down(sockdir: str) -> None:
    async with FaultProxy(f"unix:{sockdir}/nobody", listen=f"unix:{sockdir}/p") as proxy:
        reader, _ = await open_client(proxy.destination)
        assert await read_until_eof(reader) == b""
        assert proxy.stats.upstream_failures == 1
