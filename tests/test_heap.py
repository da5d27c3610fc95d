"""The hourly hand-back of the C heap's free pages: done where the C library can, never an error."""

from __future__ import annotations

import gc
import platform

import pytest

from firmware_py import heap


def glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_free_pages_in_the_middle_of_the_heap_go_back_to_the_system():
    """Many small chunks freed below one kept at the top: glibc keeps their pages until trimmed."""
    if not glibc():
        assert heap.release_free_pages() is False  # musl, macOS: nothing to do, and nothing raised
        return
    heap.release_free_pages()
    chunks = [bytearray(4000) for _ in range(10_000)]  # ~40 MB below the top of the heap
    keep = bytearray(4000)  # pins the top: a plain free() cannot shrink the heap past it
    before = rss_kib()
    del chunks
    assert heap.release_free_pages() is True
    assert before - rss_kib() > 20_000, "the freed pages stayed resident"
    del keep


def test_collection_is_paused_inside_and_resumes_as_it_was_even_after_an_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), heap.collection_paused():
        assert not gc.isenabled()
        raise RuntimeError("an import failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.collection_paused():
            pass
        assert not gc.isenabled()  # paused before: left paused
    finally:
        gc.enable()
