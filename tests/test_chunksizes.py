"""
``hookah.web.chunksizes``: the sizes a chunked body declares, read from its
framing however its bytes are split, and nothing past its last chunk.
"""

from __future__ import annotations

from typing import List, Tuple

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from hookah.web.chunksizes import MAX_SIZE_LINE, ChunkSizes

chunk_data = st.binary(min_size=1, max_size=300)
extensions = st.sampled_from([b"", b";a=b", b";name", b';q="x y"'])
hex_forms = st.sampled_from(["{:x}", "{:X}", "{:04x}", "0{:X}"])
trailers = st.sampled_from([b"", b"X-Sum: 1\r\n", b"A: b\r\nC: d\r\n"])
# What may follow the body on the connection: the next pipelined request,
# whose lines must not be taken for chunk sizes.
afterwards = st.sampled_from([b"", b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"10\r\n" + b"y" * 16 + b"\r\n"])


def encode(chunks: List[Tuple[bytes, str, bytes]], trailer: bytes) -> Tuple[bytes, List[Tuple[int, int]]]:
    """A chunked body, and for each chunk (size line end offset, size)."""
    body = b""
    ends = []
    for data, form, extension in chunks:
        body += form.format(len(data)).encode() + extension + b"\r\n"
        ends.append((len(body), len(data)))
        body += data + b"\r\n"
    return body + b"0\r\n" + trailer + b"\r\n", ends


class ChunkSizesTests(TestCase):
    @given(
        chunks=st.lists(st.tuples(chunk_data, hex_forms, extensions), max_size=8),
        trailer=trailers,
        after=afterwards,
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    )
    def test_declared_sizes_are_read_however_the_bytes_are_split(
        self, chunks: List[Tuple[bytes, str, bytes]], trailer: bytes, after: bytes, cuts: List[int]
    ) -> None:
        body, ends = encode(chunks, trailer)
        stream = body + after
        points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        sizes = ChunkSizes()
        for start, stop in zip(points, points[1:]):
            declared = sizes.feed(stream[start:stop])
            # Every size line complete in what was fed, and no other.
            self.assertEqual(declared, sum(size for end, size in ends if end <= stop))
            self.assertEqual(sizes.following, stop < len(body) - len(trailer) - 2)
        self.assertEqual(sizes.declared, sum(len(data) for data, _, _ in chunks))
        self.assertFalse(sizes.following)

    def test_a_huge_size_is_read_from_its_line_alone(self) -> None:
        sizes = ChunkSizes()
        self.assertEqual(sizes.feed(b"fffffffffffffffffffff\r\nabc"), 0xFFFFFFFFFFFFFFFFFFFFF)
        self.assertTrue(sizes.following)

    def test_a_size_line_split_anywhere(self) -> None:
        sizes = ChunkSizes()
        self.assertEqual(sizes.feed(b"1"), 0)
        self.assertEqual(sizes.feed(b"0;x=y\r"), 0)
        self.assertEqual(sizes.feed(b"\n" + b"z" * 16), 16)
        self.assertEqual(sizes.feed(b"\r\n8\r\n"), 24)

    def test_what_is_not_a_size_line_ends_the_following(self) -> None:
        for line in (b"zz\r\n", b"-1\r\n", b"0x10\r\n", b" 10\r\n", b"+5\r\n", b"\r\n", b";ext\r\n"):
            sizes = ChunkSizes()
            self.assertEqual(sizes.feed(line + b"5\r\nabcde\r\n"), 0, line)
            self.assertFalse(sizes.following, line)

    def test_a_size_line_longer_than_twisted_allows_ends_the_following(self) -> None:
        sizes = ChunkSizes()
        sizes.feed(b"0" * MAX_SIZE_LINE)
        self.assertTrue(sizes.following)  # Twisted would still wait for its end
        sizes.feed(b"0" * 8)
        self.assertFalse(sizes.following)
        self.assertEqual(sizes.declared, 0)
