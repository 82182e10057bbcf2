"""The parent-death helper: a 267-byte static program that sets the
parent-death signal and execs the real one (x86-64 Linux).

Every child gosup starts gets ``PR_SET_PDEATHSIG`` = SIGKILL, so that if
gosup dies, even by SIGKILL, the kernel kills it too. Nothing in
``subprocess.Popen`` sets it between fork and exec without a ``preexec_fn``
(a full fork and Python in the child: 12 ms a start), so the child first
execs a helper that sets it and execs the program. util-linux's ``setpriv
--pdeathsig KILL --`` is one; being dynamically linked, its exec costs
about 1 ms of the restart (Popen -> a Go program's start stamp, p50 of 40
from a 40 MiB process: no helper 1.45 ms, setpriv 2.41, this helper 1.48;
issue 18, "restart latency p50 <= 2x the floor").

This one is nothing but system calls, so it costs no more than the exec:

- ``argc < 2``: exit 0 (the self-check below: the helper runs, and exec'd
  itself);
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
- ``execve(argv[1], &argv[1], envp)``: the path is the program's resolved
  absolute path, argv and the environment pass through untouched;
- if that failed: a line on stderr, and exit 127 when the program is not
  there, 126 when it cannot be executed (as a shell and setpriv do).

It lives in a sealed memfd of gosup's (no file on disk, nothing to tamper
with or clean up) and is exec'd as ``/proc/<gosup>/fd/<n>``: the child has
gosup's user until the exec, so it may open gosup's descriptors. A child
that switches user (Popen's ``user=``) or keeps capabilities goes through
setpriv as before. Where any of this is not available (another
architecture, ``vm.memfd_noexec = 2``, no /proc), ``path()`` is None and
setpriv is used.

The machine code, as assembled (GNU as, Intel syntax)::

    00  48 8b 3c 24           mov    rdi, [rsp]          ; argc
    04  48 83 ff 02           cmp    rdi, 2
    08  7c 5e                 jl     68                  ; no program: exit 0
    0a  b8 9d 00 00 00        mov    eax, 157            ; prctl
    0f  bf 01 00 00 00        mov    edi, 1              ;   PR_SET_PDEATHSIG
    14  be 09 00 00 00        mov    esi, 9              ;   SIGKILL
    19  31 d2                 xor    edx, edx
    1b  45 31 d2              xor    r10d, r10d
    1e  45 31 c0              xor    r8d, r8d
    21  0f 05                 syscall
    23  48 8b 0c 24           mov    rcx, [rsp]          ; argc
    27  48 8d 54 cc 10        lea    rdx, [rsp+rcx*8+16] ; envp = &argv[argc + 1]
    2c  48 8d 74 24 10        lea    rsi, [rsp+16]       ; &argv[1]
    31  48 8b 3e              mov    rdi, [rsi]          ; argv[1]
    34  b8 3b 00 00 00        mov    eax, 59             ; execve
    39  0f 05                 syscall
    3b  49 89 c4              mov    r12, rax            ; it failed: -errno
    3e  b8 01 00 00 00        mov    eax, 1              ; write(2, msg, 34)
    43  bf 02 00 00 00        mov    edi, 2
    48  48 8d 35 22 00 00 00  lea    rsi, [rip+0x22]     ; msg (at 71)
    4f  ba 22 00 00 00        mov    edx, 34
    54  0f 05                 syscall
    56  bf 7f 00 00 00        mov    edi, 127            ; ENOENT: exit 127
    5b  41 83 fc fe           cmp    r12d, -2
    5f  74 09                 je     6a
    61  bf 7e 00 00 00        mov    edi, 126            ; any other: exit 126
    66  eb 02                 jmp    6a
    68  31 ff                 xor    edi, edi            ; exit 0
    6a  b8 e7 00 00 00        mov    eax, 231            ; exit_group
    6f  0f 05                 syscall
    71  "gosup: cannot execute the program\n"

Stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import struct
import subprocess
import sys
import threading

CODE = (
    bytes.fromhex(
        "488b3c244883ff027c5eb89d000000bf01000000be0900000031d24531d24531c00f05"
        "488b0c24488d54cc10488d742410488b3eb83b0000000f054989c4b801000000bf0200"
        "0000488d3522000000ba220000000f05bf7f0000004183fcfe7409bf7e000000eb0231"
        "ffb8e70000000f05"
    )
    + b"gosup: cannot execute the program\n"
)
BASE = 0x400000  # where the one segment is mapped
_EHDR, _PHDR = 64, 56  # sizes of the ELF header and of the program header


def elf() -> bytes:
    """The helper: an ELF64 header, one loadable read+execute segment (the
    whole file), then ``CODE``, which is the entry point."""
    size = _EHDR + _PHDR + len(CODE)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, v1, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # e_type: ET_EXEC
        0x3E,  # e_machine: x86-64
        1,  # e_version
        BASE + _EHDR + _PHDR,  # e_entry: CODE
        _EHDR,  # e_phoff
        0,  # e_shoff: no sections
        0,  # e_flags
        _EHDR,
        _PHDR,
        1,  # e_phnum
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx
    )
    segment = struct.pack(
        "<IIQQQQQQ",
        1,  # p_type: PT_LOAD
        5,  # p_flags: read + execute
        0,  # p_offset
        BASE,  # p_vaddr
        BASE,  # p_paddr
        size,  # p_filesz
        size,  # p_memsz
        0x1000,  # p_align
    )
    return header + segment + CODE


_MFD_CLOEXEC, _MFD_ALLOW_SEALING, _MFD_EXEC = 0x1, 0x2, 0x10
# F_ADD_SEALS: F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
_F_ADD_SEALS, _SEALS = 1033, 0x1 | 0x2 | 0x4 | 0x8


_made = threading.Lock()


def path() -> str | None:
    """``/proc/<gosup>/fd/<n>``, the helper to exec; None where it cannot be
    used (then setpriv is). Made and checked once per process (one exec)."""
    with _made:  # (two threads' first starts must not make two)
        return _path()


@functools.cache
def _path() -> str | None:
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return None
    fd = _memfd()
    if fd is None:
        return None
    helper = f"/proc/{os.getpid()}/fd/{fd}"
    try:
        # It runs, and exec'd itself: exec of this descriptor works here.
        done = subprocess.run([helper, helper], timeout=10, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        os.close(fd)
        return None
    return helper


def _memfd() -> int | None:
    """A sealed, executable memfd holding the helper (close-on-exec: gosup's
    children never inherit it; they exec it through gosup's /proc entry)."""
    flags = _MFD_CLOEXEC | _MFD_ALLOW_SEALING
    try:
        try:
            fd = os.memfd_create("gosup-exec-helper", flags | _MFD_EXEC)
        except OSError:  # a kernel before 6.3 knows no MFD_EXEC (exec is its default)
            fd = os.memfd_create("gosup-exec-helper", flags)
    except (AttributeError, OSError):
        return None
    try:
        data = elf()
        if os.write(fd, data) != len(data):
            raise OSError("short write")
        os.fchmod(fd, 0o500)
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)  # nobody can change it now, gosup neither
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        return None
    return fd
