"""The message content encoder (line ends, dot-stuffing, NUL), both implementations.

Every test runs against the pure-Python reference and the compiled module.
The compiled one is skipped when it is not built, unless ``CI`` is set: then
a missing extension fails the run instead of silently testing half. With
``LMTPFAST_NO_EXTENSIONS=1`` (the pure-Python mode) it is skipped even in CI.
"""

from __future__ import annotations

import array
import itertools
import os
import re
from types import ModuleType
from typing import Any, NoReturn

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast import ContentError, LocalProtocolError
from lmtpfast.proto import content
from lmtpfast.proto.content import IMPLEMENTATIONS

_BUILD_HINT = "run `python setup.py build_ext --inplace`"
_PURE_MODE = os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1"
_MUST_HAVE_C = bool(os.environ.get("CI")) and not _PURE_MODE


def _skip_reason() -> str:
    if _PURE_MODE:
        return "LMTPFAST_NO_EXTENSIONS=1: pure-Python mode"
    return f"compiled lmtpfast.proto._ccontent not built ({_BUILD_HINT})"


class _MissingExtension:
    """Stands in for the unbuilt compiled module under CI: any use fails clearly."""

    def __getattr__(self, name: str) -> NoReturn:
        pytest.fail(f"lmtpfast.proto._ccontent is not built and CI is set: {_BUILD_HINT}")


def _impl_params() -> list[Any]:
    params = [pytest.param(IMPLEMENTATIONS["python"], id="python")]
    compiled = IMPLEMENTATIONS["c"]
    if compiled is not None:
        params.append(pytest.param(compiled, id="c"))
    elif _MUST_HAVE_C:
        params.append(pytest.param(_MissingExtension(), id="c"))
    else:
        params.append(pytest.param(None, id="c", marks=pytest.mark.skip(reason=_skip_reason())))
    return params


IMPLS = _impl_params()
each_impl = pytest.mark.parametrize("impl", IMPLS)


def _both() -> tuple[ModuleType, ModuleType]:
    compiled = IMPLEMENTATIONS["c"]
    if compiled is None:
        if _MUST_HAVE_C:
            pytest.fail(f"lmtpfast.proto._ccontent is not built and CI is set: {_BUILD_HINT}")
        pytest.skip(_skip_reason())
    return IMPLEMENTATIONS["python"], compiled  # type: ignore[return-value]


# --- independent oracles (deliberately not sharing code with either implementation) ---


def normalise(data: bytes) -> bytes:
    """Every line end (CRLF, bare CR, bare LF) as CRLF, and a final CRLF on non-empty content."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def expected(data: bytes, dot_stuff: bool = True) -> bytes:
    """The encoder's whole-message output, by regex."""
    out = normalise(data)
    return re.sub(rb"(?m)^\.", b"..", out) if dot_stuff else out


def decode_data(wire: bytes) -> bytes:
    """A strict RFC 5321 4.5.2 receiver: read CRLF lines up to the lone "." line, un-stuff.

    ``wire`` is everything the client sends after the 354 reply. The
    terminator must be the very end of it: anything after would have been
    read as the next command (that is the smuggling).
    """
    body: list[bytes] = []
    pos = 0
    while True:
        end = wire.find(b"\r\n", pos)
        assert end >= 0, f"DATA never terminated: {wire!r}"
        line = wire[pos:end]
        pos = end + 2
        if line == b".":
            assert pos == len(wire), f"data ended early at {pos}: {wire!r}"
            return b"".join(body)
        body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def assert_smuggle_free(encoded: bytes) -> None:
    """No line end a lenient server might honour other than the final CRLF.CRLF."""
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", encoded) is None, f"bare CR/LF in {encoded!r}"
    assert b"\r\n.\r\n" not in b"\r\n" + encoded, f"end-of-data line in {encoded!r}"
    assert not encoded.startswith(b".\r\n")
    if encoded:
        assert encoded.endswith(b"\r\n")


def encode_chunks(impl: ModuleType, chunks: list[bytes], dot_stuff: bool = True) -> bytes:
    enc = impl.ContentEncoder(dot_stuff=dot_stuff)
    out: bytes = b"".join(enc.encode(c) for c in chunks) + enc.finish()
    assert enc.bytes_in == sum(map(len, chunks))
    assert enc.bytes_out == len(out)
    return out


# --- fixed cases ---

CASES = [
    # (input, with dot-stuffing, without)
    (b"", b"", b""),
    (b"abc", b"abc\r\n", b"abc\r\n"),
    (b"a\nb", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\rb", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\n\rb", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\n\nb\r\rc", b"a\r\n\r\nb\r\n\r\nc\r\n", b"a\r\n\r\nb\r\n\r\nc\r\n"),
    (b"\n", b"\r\n", b"\r\n"),
    (b"\r", b"\r\n", b"\r\n"),
    (b"\r\n", b"\r\n", b"\r\n"),
    (b".", b"..\r\n", b".\r\n"),
    (b"..", b"...\r\n", b"..\r\n"),
    (b".a\n", b"..a\r\n", b".a\r\n"),
    (b".\n", b"..\r\n", b".\r\n"),
    (b".\r\n", b"..\r\n", b".\r\n"),
    (b"a.b\n.c.\n", b"a.b\r\n..c.\r\n", b"a.b\r\n.c.\r\n"),
    (b"\n.\n", b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\r.\r", b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\r.\n", b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"\n.\r", b"\r\n..\r\n", b"\r\n.\r\n"),
    (b"a\n.", b"a\r\n..\r\n", b"a\r\n.\r\n"),
    (b"a\r\n.", b"a\r\n..\r\n", b"a\r\n.\r\n"),
    (b".\n.\n.", b"..\r\n..\r\n..\r\n", b".\r\n.\r\n.\r\n"),
    (b"caf\xc3\xa9\n", b"caf\xc3\xa9\r\n", b"caf\xc3\xa9\r\n"),
    # Smuggling payloads (CVE-2023-51764 family): none may end DATA early.
    (
        b"Hi\r\n\n.\nMAIL FROM:<x@evil>\r\n",
        b"Hi\r\n\r\n..\r\nMAIL FROM:<x@evil>\r\n",
        b"Hi\r\n\r\n.\r\nMAIL FROM:<x@evil>\r\n",
    ),
    (b"Hi\r\n.\nRSET\r\n", b"Hi\r\n..\r\nRSET\r\n", b"Hi\r\n.\r\nRSET\r\n"),
    (b"Hi\n.\r\nRSET", b"Hi\r\n..\r\nRSET\r\n", b"Hi\r\n.\r\nRSET\r\n"),
    (b"Hi\r.\r\nRSET", b"Hi\r\n..\r\nRSET\r\n", b"Hi\r\n.\r\nRSET\r\n"),
    (b"Hi\r\n.\rRSET", b"Hi\r\n..\r\nRSET\r\n", b"Hi\r\n.\r\nRSET\r\n"),
]

TRICKY = [c[0] for c in CASES if c[0]] + [
    b"\r\n\r\n.\r\n.\r\r\n.\n\n.x\r",
    b"x" * 40 + b"\r" + b"." * 3 + b"\n" * 2 + b"y" * 33 + b"\r\n." + b"\x80" * 17,
    b".\r.\n.\r\n.\n\r.",
]


@each_impl
@pytest.mark.parametrize(("data", "stuffed", "plain"), CASES)
def test_fixed_cases(impl: ModuleType, data: bytes, stuffed: bytes, plain: bytes) -> None:
    assert impl.encode_content(data) == stuffed
    assert impl.encode_content(data, dot_stuff=True) == stuffed
    assert impl.encode_content(data, dot_stuff=False) == plain
    # The table itself agrees with the regex oracle.
    assert expected(data) == stuffed
    assert expected(data, dot_stuff=False) == plain


@each_impl
@pytest.mark.parametrize("data", TRICKY)
@pytest.mark.parametrize("dot_stuff", [True, False])
def test_every_split_point(impl: ModuleType, data: bytes, dot_stuff: bool) -> None:
    want = expected(data, dot_stuff)
    for i in range(len(data) + 1):
        assert encode_chunks(impl, [data[:i], data[i:]], dot_stuff) == want, i
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert encode_chunks(impl, [data[:i], data[i:j], data[j:]], dot_stuff) == want
    one_byte = [data[i : i + 1] for i in range(len(data))]
    assert encode_chunks(impl, one_byte, dot_stuff) == want
    with_empties = [c for b in one_byte for c in (b"", b)] + [b""]
    assert encode_chunks(impl, with_empties, dot_stuff) == want


@each_impl
def test_streaming_state_across_chunks(impl: ModuleType) -> None:
    enc = impl.ContentEncoder()
    assert enc.encode(b"line\r") == b"line\r\n"  # a CR is sent as CRLF at once...
    assert enc.encode(b"\n") == b""  # ...and the LF that completes it adds nothing
    assert enc.encode(b".dot\r") == b"..dot\r\n"  # a chunk after a line end starts a line
    assert enc.encode(b".") == b".."  # CR then "." (no LF): still a line start
    assert enc.encode(b"x") == b"x"
    assert enc.finish() == b"\r\n"
    assert enc.finish() == b""  # idempotent
    assert (enc.bytes_in, enc.bytes_out) == (13, 18)


@each_impl
def test_reinit_starts_over(impl: ModuleType) -> None:
    enc = impl.ContentEncoder()
    enc.encode(b"half a line\xff\r")
    enc.__init__(dot_stuff=False)
    assert (enc.bytes_in, enc.bytes_out, enc.saw_8bit, enc.dot_stuff) == (0, 0, False, False)
    assert enc.encode(b"\n.") + enc.finish() == b"\r\n.\r\n"  # no CR pending any more


@each_impl
def test_empty_and_finish(impl: ModuleType) -> None:
    enc = impl.ContentEncoder()
    assert enc.encode(b"") == b""
    assert enc.finish() == b""
    assert (enc.bytes_in, enc.bytes_out, enc.saw_8bit) == (0, 0, False)
    assert impl.encode_content(b"") == b""
    assert impl.encode_content("") == b""
    enc = impl.ContentEncoder()
    enc.encode(b"no newline")
    assert enc.finish() == b"\r\n"
    assert enc.bytes_out == len(b"no newline\r\n")


@each_impl
def test_dot_stuff_flag(impl: ModuleType) -> None:
    assert impl.ContentEncoder().dot_stuff is True
    enc = impl.ContentEncoder(dot_stuff=False)
    assert enc.dot_stuff is False
    assert enc.encode(b".\n.\r\n.") + enc.finish() == b".\r\n.\r\n.\r\n"
    with pytest.raises(TypeError):
        impl.ContentEncoder(False)  # keyword-only


@each_impl
@pytest.mark.parametrize(
    ("chunks", "offset"),
    [
        ([b"\0"], 0),
        ([b"abc\0def"], 3),
        ([b"abc\n\0"], 4),
        ([b"hello\n", b"xx\0"], 8),
        ([b"a\r", b"\0"], 2),
        ([b"a\r", b"\n\0"], 3),
        ([b"x" * 5000 + b"\0"], 5000),  # the compiled heap-buffer path
        ([b"y" * 300_000, b"z" * 17 + b"\0" + b"z"], 300_017),  # the no-GIL path before it
        ([b"\n" * 33 + b"\0" * 3], 33),
    ],
)
def test_nul_names_offset(impl: ModuleType, chunks: list[bytes], offset: int) -> None:
    enc = impl.ContentEncoder()
    for c in chunks[:-1]:
        enc.encode(c)
    before = (enc.bytes_in, enc.bytes_out, enc.saw_8bit)
    with pytest.raises(ContentError, match=rf"\bNUL\b.*\boffset {offset}\b") as info:
        enc.encode(chunks[-1])
    assert info.value.offset == offset  # type: ignore[attr-defined]
    assert isinstance(info.value, LocalProtocolError)
    assert isinstance(info.value, ValueError)
    # The refused chunk left no trace: the stream can go on.
    assert (enc.bytes_in, enc.bytes_out, enc.saw_8bit) == before
    with pytest.raises(ContentError):
        impl.encode_content(b"".join(chunks))


@each_impl
def test_refused_chunk_keeps_line_state(impl: ModuleType) -> None:
    enc = impl.ContentEncoder()
    assert enc.encode(b"a\r") == b"a\r\n"
    with pytest.raises(ContentError):
        enc.encode(b"\n.\xff\0")
    assert not enc.saw_8bit  # the 8-bit byte was in the refused chunk
    assert enc.encode(b"\n.b") == b"..b"  # still after a CR, still at a line start
    assert enc.finish() == b"\r\n"


@each_impl
def test_saw_8bit(impl: ModuleType) -> None:
    enc = impl.ContentEncoder()
    enc.encode(b"plain ascii\r\n" * 10)
    assert enc.saw_8bit is False
    enc.encode(b"caf\xc3\xa9\n")
    assert enc.saw_8bit is True
    enc.encode(b"ascii again")
    assert enc.saw_8bit is True  # sticky
    # Every position in and around a vector block, and just after a special byte.
    for size in (1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100):
        for pos in range(size):
            for prefix in (b"", b".", b"\n", b"ab\r"):
                data = bytearray(b"a" * size)
                data[pos] = 0x80 | pos
                enc = impl.ContentEncoder()
                enc.encode(prefix + bytes(data))
                assert enc.saw_8bit is True, (size, pos, prefix)
    enc = impl.ContentEncoder()
    enc.encode(bytes(range(1, 128)) * 3)
    assert enc.saw_8bit is False


@each_impl
def test_input_types(impl: ModuleType) -> None:
    data = b"one\n.two\rthree"
    want = expected(data)
    assert impl.encode_content(bytearray(data)) == want
    assert impl.encode_content(memoryview(data)) == want
    assert impl.encode_content(memoryview(b"XX" + data + b"YY")[2:-2]) == want
    assert impl.encode_content(data.decode()) == want
    assert impl.encode_content("é\n") == "é\r\n".encode()
    # Non-contiguous and non-byte-format buffers: their raw bytes, in C order.
    strided = memoryview(bytes(b for c in data for b in (c, 0x21)))[::2]
    assert impl.encode_content(strided) == want
    words = array.array("H", [0x0A41, 0x2E0D])  # b"A\n\r." little-endian
    assert impl.encode_content(words) == expected(words.tobytes())
    for out in (impl.encode_content(data), impl.ContentEncoder().encode(bytearray(data))):
        assert type(out) is bytes
    enc = impl.ContentEncoder()
    with pytest.raises(TypeError):
        enc.encode("text")
    with pytest.raises(TypeError):
        enc.encode(None)
    with pytest.raises(TypeError):
        impl.encode_content(12)


_UNIT = b"Line of text.\n.dotted\r\n\r.\rtail\xe2\x82\xac"


@each_impl
@pytest.mark.parametrize("size", [4095, 4096, 4097, 8193, 70_000, 300_000])
def test_sizes_around_buffer_paths(impl: ModuleType, size: int) -> None:
    # The compiled module encodes small chunks on the stack, larger ones via
    # a heap scratch block, and the largest without the GIL.
    data = (_UNIT * (size // len(_UNIT) + 1))[:size]
    want = expected(data)
    assert impl.encode_content(data) == want
    assert encode_chunks(impl, [data[: size // 3], data[size // 3 :]]) == want
    assert_smuggle_free(want)
    assert decode_data(want + b".\r\n") == normalise(data)


@each_impl
@pytest.mark.parametrize("size", [4095, 4096, 4097, 70_001, 300_000])
@pytest.mark.parametrize("unit", [b"\n.", b"\r", b".\n", b"\r.\r\n"])
def test_worst_case_expansion(impl: ModuleType, size: int, unit: bytes) -> None:
    # Output near its 2n + 2 bound at the edges of each compiled buffer path
    # (under ASan, this is what would catch an undersized buffer).
    data = (unit * (size // len(unit) + 1))[:size]
    out = impl.encode_content(data)
    assert out == expected(data)
    assert len(out) <= 2 * size + 2
    assert_smuggle_free(out)


@each_impl
def test_worst_case_expansion_exact_size_path(impl: ModuleType) -> None:
    pairs = 8 * 1024 * 1024 + 1  # 16 MiB + 2 input bytes, all doubled
    out = impl.encode_content(b"\n." * pairs)
    assert len(out) == 4 * pairs + 2  # the 2n + 2 bound, reached
    assert out == b"\r\n.." * pairs + b"\r\n"


@each_impl
@pytest.mark.parametrize("tail", [b"", b"x", b"\r", b"\n", b"\r\n", b"\n.", b"\r" + b"y" * 15])
def test_exact_size_path(impl: ModuleType, tail: bytes) -> None:
    # From 16 MiB the compiled module sizes the output exactly first (with a
    # closed-form count) and encodes straight into it: every way a chunk
    # can end, whole and as the second of two chunks, and a NUL near the end.
    k = 16 * 1024 * 1024 // len(_UNIT) + 1
    data = _UNIT * k + tail
    # _UNIT neither starts nor ends a line, so its encoding repeats: this is
    # expected(data) without running the regex over 16 MiB.
    assert not _UNIT.startswith((b".", b"\n")) and not _UNIT.endswith((b"\r", b"\n"))
    want = expected(_UNIT)[:-2] * (k - 1) + expected(_UNIT + tail)
    assert impl.encode_content(data) == want
    enc = impl.ContentEncoder()
    out = enc.encode(data[:5]) + enc.encode(memoryview(data)[5:])
    assert out + enc.finish() == want
    with pytest.raises(ContentError) as info:
        impl.encode_content(data + b"\0" + tail)
    assert info.value.offset == len(data)  # type: ignore[attr-defined]


def test_selected_implementation() -> None:
    compiled = IMPLEMENTATIONS["c"]
    assert content.IMPLEMENTATION in ("c", "python")
    if _PURE_MODE or compiled is None:
        assert content.IMPLEMENTATION == "python"
        assert content.ContentEncoder is IMPLEMENTATIONS["python"].ContentEncoder  # type: ignore[union-attr]
    else:
        assert content.IMPLEMENTATION == "c"
        assert content.ContentEncoder is compiled.ContentEncoder
        assert content.encode_content is compiled.encode_content


# --- property tests ---

# Bytes biased towards what matters: line-end pieces, dots, 8-bit, long runs
# (to cross the compiled scanner's 16-byte blocks), repeated to reach the
# larger-buffer paths now and then.
_PIECES = st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b".",
        b"..",
        b"a",
        b" ",
        b"\xff",
        b"\x0b",
        b"\x0e",
        b"x" * 15,
        b"y" * 16,
    ]
)
_TRICKY_BYTES = st.builds(
    lambda parts, k: b"".join(parts) * k,
    st.lists(_PIECES, max_size=40),
    st.sampled_from([1, 1, 1, 2, 7, 150]),
)
NO_NUL = st.one_of(st.binary(max_size=200), _TRICKY_BYTES).map(lambda b: b.replace(b"\0", b""))
WITH_NUL = st.one_of(st.binary(max_size=200), _TRICKY_BYTES, st.just(b"")).flatmap(
    lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\0" + b[i:])
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


_CUTS = st.lists(st.integers(0, 40_000), max_size=8)
_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(data=NO_NUL, cuts=_CUTS, dot_stuff=st.booleans())
def test_property_parity_c_equals_python(data: bytes, cuts: list[int], dot_stuff: bool) -> None:
    py, c = _both()
    chunks = _split(data, cuts)
    encoders = [py.ContentEncoder(dot_stuff=dot_stuff), c.ContentEncoder(dot_stuff=dot_stuff)]
    for chunk in chunks:
        outs = [e.encode(chunk) for e in encoders]
        assert outs[0] == outs[1], chunk
        states = [(e.bytes_in, e.bytes_out, e.saw_8bit) for e in encoders]
        assert states[0] == states[1]
    assert encoders[0].finish() == encoders[1].finish()
    assert encoders[0].bytes_out == encoders[1].bytes_out
    assert py.encode_content(data, dot_stuff=dot_stuff) == c.encode_content(
        data, dot_stuff=dot_stuff
    )


@_SETTINGS
@given(data=WITH_NUL, cuts=_CUTS)
def test_property_parity_on_nul(data: bytes, cuts: list[int]) -> None:
    py, c = _both()
    offsets = []
    for impl in (py, c):
        enc = impl.ContentEncoder()
        try:
            for chunk in _split(data, cuts):
                enc.encode(chunk)
        except ContentError as e:
            offsets.append((e.offset, str(e), enc.bytes_in, enc.bytes_out, enc.saw_8bit))  # type: ignore[attr-defined]
        else:
            pytest.fail("NUL accepted")
    assert offsets[0] == offsets[1]
    assert offsets[0][0] == data.index(b"\0")


@each_impl
@_SETTINGS
@given(data=NO_NUL, cuts=_CUTS)
def test_property_smuggling_oracle(impl: ModuleType, data: bytes, cuts: list[int]) -> None:
    encoded = encode_chunks(impl, _split(data, cuts))
    assert_smuggle_free(encoded)
    assert decode_data(encoded + b".\r\n") == normalise(data)
    assert encoded == expected(data)
    assert len(encoded) <= 2 * len(data) + 2


@each_impl
@_SETTINGS
@given(data=NO_NUL, cuts=_CUTS)
def test_property_bdat_normalises_without_stuffing(
    impl: ModuleType, data: bytes, cuts: list[int]
) -> None:
    encoded = encode_chunks(impl, _split(data, cuts), dot_stuff=False)
    assert encoded == normalise(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", encoded) is None
    assert len(encoded) <= 2 * len(data) + 2


@each_impl
@_SETTINGS
@given(data=NO_NUL, cuts=_CUTS)
def test_property_chunk_outputs_are_bounded(impl: ModuleType, data: bytes, cuts: list[int]) -> None:
    enc = impl.ContentEncoder()
    for chunk in _split(data, cuts):
        assert len(enc.encode(chunk)) <= 2 * len(chunk)
    assert len(enc.finish()) <= 2
    assert enc.saw_8bit == any(b >= 0x80 for b in data)
