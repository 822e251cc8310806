"""The serving process's malloc and GIL settings (each case in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates 1 MiB, frees it, allocates it again, and prints how many more blocks glibc serves by
# mmap while the second one is held.
PROBE = """
import ctypes, sys
from embedplex.process_tuning import tune_process
if sys.argv[1] == "tuned":
    tune_process()
    print(sys.getswitchinterval())
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(1 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_blocks_stay_mmapped_after_one_is_freed() -> None:
    # By default glibc raises its threshold to a freed mmapped block's size: the second 1 MiB
    # comes from the heap. Tuned, it is mapped again (and returned to the OS when freed).
    assert probe("default") == ["0"]
    interval, mapped = probe("tuned")
    assert float(interval) == pytest.approx(0.0005)
    assert mapped == "1"
