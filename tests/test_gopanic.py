"""gopanic.parse() against Go crash output.

The samples are real go1.27 output (paths shortened, long dumps cut), plus
the older formats still seen in the field.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from supervisor.core import gopanic
from supervisor.core.gopanic import Crash

GOROOT = "/usr/local/go/src"

INDEX = """\
panic: runtime error: index out of range [5] with length 3

goroutine 1 [running]:
main.(*Server).handle(...)
\t/src/api/server.go:18
main.main()
\t/src/api/main.go:26 +0x3bf
"""

NIL_DEREF = """\
panic: runtime error: invalid memory address or nil pointer dereference
[signal SIGSEGV: segmentation violation code=0x1 addr=0x0 pc=0x49de6a]

goroutine 1 [running]:
main.main()
\t/src/api/main.go:29 +0xaa
"""

ERROR_VALUE = """\
2026/11/26 23:48:47 listening on :8080
panic: dial tcp 127.0.0.1:5432: connect: connection refused

goroutine 1 [running]:
main.mustConnect(...)
\t/src/api/db.go:31
main.main()
\t/src/api/main.go:14 +0x1c5
"""

STRUCT_VALUE = """\
panic: main.MyErr{Code:1, Msg:"bad config"} [recovered]
\tpanic: main.MyErr{Code:1, Msg:"bad config"}

goroutine 7 [running]:
panic({0x562b50?, 0x4a8af8?})
\t/usr/local/go/src/runtime/panic.go:770 +0x132
main.(*Server).ServeHTTP(0xc000012018, {0x5f1e20, 0xc0000b4000}, 0xc0000ae000)
\t/src/api/server.go:57 +0x1d
net/http.serverHandler.ServeHTTP({0xc0000a4000?}, {0x5f1e20?, 0xc0000b4000?}, 0x6?)
\t/usr/local/go/src/net/http/server.go:3142 +0x8e
created by net/http.(*Server).Serve in goroutine 1
\t/usr/local/go/src/net/http/server.go:3286 +0x4b4
"""

NESTED = f"""\
panic: first
\tpanic: second

goroutine 1 [running]:
main.main.func1()
\t/src/api/main.go:33 +0x25
panic({{0x562b50?, 0x4a8af8?}})
\t{GOROOT}/runtime/panic.go:859 +0x125
main.main()
\t/src/api/main.go:34 +0x2fb
"""

REPANICKED = f"""\
panic: boom [recovered, repanicked]

goroutine 1 [running]:
main.main.func2()
\t/src/api/main.go:36 +0x18
panic({{0x562b50?, 0x4a8b08?}})
\t{GOROOT}/runtime/panic.go:859 +0x125
main.main()
\t/src/api/main.go:37 +0x325
"""

MAP_WRITES = f"""\
fatal error: concurrent map writes

goroutine 8 [running]:
internal/runtime/maps.fatal({{0x4a2009?, 0x0?}})
\t{GOROOT}/runtime/panic.go:1195 +0x18
main.main.func3()
\t/src/api/cache.go:45 +0x5d
created by main.main in goroutine 1
\t/src/api/cache.go:45 +0x332
"""

DEADLOCK = """\
fatal error: all goroutines are asleep - deadlock!

goroutine 1 [chan receive]:
main.main()
\t/src/api/main.go:2 +0x25
"""

STACK_OVERFLOW = f"""\
runtime: goroutine stack exceeds 1000000000-byte limit
runtime: sp=0xedafec60390 stack=[0xedafec60000, 0xedb1ec60000]
fatal error: stack overflow

runtime stack:
runtime.throw({{0x4a0875?, 0x200000001?}})
\t{GOROOT}/runtime/panic.go:1243 +0x48 fp=0x7fe29c05cd20 sp=0x7fe29c05ccf0 pc=0x47ad48
runtime.newstack()
\t{GOROOT}/runtime/stack.go:1207 +0x5dd fp=0x7fe29c05ce50 sp=0x7fe29c05cd20 pc=0x45fe9d
runtime.morestack()
\t{GOROOT}/runtime/asm_amd64.s:650 +0x7b fp=0x7fe29c05ce58 sp=0x7fe29c05ce50 pc=0x47ebbb

goroutine 1 gp=0xedadeb221e0 m=4 mp=0xedadeb5f808 [running]:
main.recur(0x2aaaa31?)
\t/src/api/main.go:20 +0x2b fp=0xedafec603a0 sp=0xedafec60398 pc=0x49ddab
main.recur(...)
\t/src/api/main.go:20
main.recur(0x0?)
\t/src/api/main.go:20 +0x17 fp=0xedafec603b8 sp=0xedafec603a0 pc=0x49dd97
...additional frames elided...
"""

OUT_OF_MEMORY = f"""\
runtime: out of memory: cannot allocate 1073741824-byte block (1077608448 in use)
fatal error: runtime: out of memory

runtime stack:
runtime.throw({{0x4b8c3a?, 0x2000?}})
\t{GOROOT}/runtime/panic.go:1047 +0x5d fp=0x7ffc4a7c3e38 sp=0x7ffc4a7c3e08 pc=0x433f3d
runtime.sysMapOS(0xc000400000, 0x40000000?)
\t{GOROOT}/runtime/mem_linux.go:187 +0x11b fp=0x7ffc4a7c3e80 sp=0x7ffc4a7c3e38 pc=0x416a1b

goroutine 1 [running]:
runtime.systemstack_switch()
\t{GOROOT}/runtime/asm_amd64.s:459 fp=0xc000074d18 sp=0xc000074d10 pc=0x45f3e0
runtime.(*mheap).alloc(0x40000000?, 0x20000?, 0x0?)
\t{GOROOT}/runtime/mheap.go:968 +0x65 fp=0xc000074d60 sp=0xc000074d18 pc=0x426445
runtime.makeslice(0x451ced?, 0xc000030030?, 0xc00004de48?)
\t{GOROOT}/runtime/slice.go:117 +0x49 fp=0xc000074de0 sp=0xc000074db8 pc=0x47c3e9
main.main()
\t/src/api/main.go:55 +0x42d fp=0xc000074eb8 sp=0xc000074de0 pc=0x49e1ed
"""

CGO_SEGV = f"""\
SIGSEGV: segmentation violation
PC=0x49e480 m=0 sigcode=1 addr=0x0
signal arrived during cgo execution

goroutine 1 gp=0x1202a92f21e0 m=0 mp=0x57e5c0 [syscall]:
runtime.cgocall(0x49e480, 0x1202a933dde0)
\t{GOROOT}/runtime/cgocall.go:167 +0x4b fp=0x1202a933ddb8 sp=0x1202a933dd80 pc=0x4793ab
main._Cfunc_crash()
\t_cgo_gotypes.go:46 +0x3a fp=0x1202a933dde0 sp=0x1202a933ddb8 pc=0x49dd5a
main.main()
\t/src/api/main.go:57 +0x7e fp=0x1202a933deb8 sp=0x1202a933dde0 pc=0x49de3e
runtime.main()
\t{GOROOT}/runtime/proc.go:302 +0x427 fp=0x1202a933dfe0 sp=0x1202a933deb8 pc=0x4493a7

goroutine 2 gp=0x1202a92f2d20 m=nil [force gc (idle)]:
runtime.gopark(0x0?, 0x0?, 0x0?, 0x0?, 0x0?)
\t{GOROOT}/runtime/proc.go:474 +0xca fp=0x1202a932afa8 sp=0x1202a932af88 pc=0x47ae2a
"""

SIGBUS = f"""\
SIGBUS: bus error
PC=0x4608a1 m=3 sigcode=2 addr=0x7f3a2c000000

goroutine 0 gp=0xc000006c40 m=3 mp=0xc000100008 [idle]:
runtime.memmove()
\t{GOROOT}/runtime/memmove_amd64.s:193 +0x161 fp=0x7f3a3e7fbd58 sp=0x7f3a3e7fbd50 pc=0x4608a1
"""

SIGABRT = f"""\
SIGABRT: abort
PC=0x7f8e4d2a99fc m=0 sigcode=18446744073709551610
signal arrived during cgo execution

goroutine 1 gp=0xc000002380 m=0 mp=0x5a5520 [syscall]:
runtime.cgocall(0x4a1b60, 0xc00006af18)
\t{GOROOT}/runtime/cgocall.go:167 +0x4b fp=0xc00006aef0 sp=0xc00006aeb8 pc=0x4793ab
main._Cfunc_abort()
\t_cgo_gotypes.go:40 +0x3a fp=0xc00006af18 sp=0xc00006aef0 pc=0x49dd5a
"""

SIGQUIT_DUMP = f"""\
SIGQUIT: quit
PC=0x4820a1 m=0 sigcode=0

goroutine 0 gp=0x57d800 m=0 mp=0x57e5c0 [idle]:
runtime.futex(0x57e718, 0x80, 0x0, 0x0, 0x0, 0x0)
\t{GOROOT}/runtime/sys_linux_amd64.s:575 +0x21 fp=0x7ffd1b63fd78 sp=0x7ffd1b63fd70 pc=0x4820a1

goroutine 1 gp=0x1310600661e0 m=nil [select (no cases)]:
runtime.gopark(0x1310600b1df0?, 0x452545?, 0x90?, 0x41?, 0x1310600b1df0?)
\t{GOROOT}/runtime/proc.go:474 +0xca fp=0x1310600b1db0 sp=0x1310600b1d90 pc=0x47ae2a
main.main()
\t/src/api/main.go:59 +0x3fb fp=0x1310600b1eb8 sp=0x1310600b1de0 pc=0x49e1bb
"""


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        pytest.param(
            INDEX,
            Crash(
                "panic",
                "runtime error: index out of range [5] with length 3",
                "main.(*Server).handle at /src/api/server.go:18",
            ),
            id="index-out-of-range",
        ),
        pytest.param(
            NIL_DEREF,
            Crash(
                "panic",
                "runtime error: invalid memory address or nil pointer dereference",
                "main.main at /src/api/main.go:29",
            ),
            id="nil-dereference",
        ),
        pytest.param(
            ERROR_VALUE,
            Crash(
                "panic",
                "dial tcp 127.0.0.1:5432: connect: connection refused",
                "main.mustConnect at /src/api/db.go:31",
            ),
            id="error-value",
        ),
        pytest.param(
            STRUCT_VALUE,
            Crash(
                "panic",
                'main.MyErr{Code:1, Msg:"bad config"}',
                "main.(*Server).ServeHTTP at /src/api/server.go:57",
            ),
            id="struct-value-recovered",
        ),
        pytest.param(
            NESTED,
            Crash("panic", "first", "main.main.func1 at /src/api/main.go:33"),
            id="nested-panic",
        ),
        pytest.param(
            REPANICKED,
            Crash("panic", "boom", "main.main.func2 at /src/api/main.go:36"),
            id="repanicked",
        ),
        pytest.param(
            MAP_WRITES,
            Crash(
                "fatal_error", "concurrent map writes", "main.main.func3 at /src/api/cache.go:45"
            ),
            id="concurrent-map-writes",
        ),
        pytest.param(
            DEADLOCK,
            Crash(
                "fatal_error",
                "all goroutines are asleep - deadlock!",
                "main.main at /src/api/main.go:2",
            ),
            id="deadlock",
        ),
        pytest.param(
            STACK_OVERFLOW,
            Crash("fatal_error", "stack overflow", "main.recur at /src/api/main.go:20"),
            id="stack-overflow",
        ),
        pytest.param(
            OUT_OF_MEMORY,
            Crash("fatal_error", "runtime: out of memory", "main.main at /src/api/main.go:55"),
            id="out-of-memory",
        ),
        pytest.param(
            CGO_SEGV,
            Crash(
                "signal",
                "SIGSEGV: segmentation violation",
                "main._Cfunc_crash at _cgo_gotypes.go:46",
            ),
            id="sigsegv-in-cgo",
        ),
        pytest.param(
            SIGBUS,
            Crash(
                "signal",
                "SIGBUS: bus error",
                f"runtime.memmove at {GOROOT}/runtime/memmove_amd64.s:193",
            ),
            id="sigbus-runtime-only-frames",
        ),
        pytest.param(
            SIGABRT,
            Crash("signal", "SIGABRT: abort", "main._Cfunc_abort at _cgo_gotypes.go:40"),
            id="sigabrt",
        ),
    ],
)
def test_parse_go_crashes(stderr: str, expected: Crash) -> None:
    assert gopanic.parse(stderr) == expected


def test_go_run_trailer_and_crlf_are_ignored() -> None:
    text = (DEADLOCK + "exit status 2\n").replace("\n", "\r\n")
    crash = gopanic.parse(text)
    assert crash == Crash(
        "fatal_error", "all goroutines are asleep - deadlock!", "main.main at /src/api/main.go:2"
    )


def test_last_crash_wins() -> None:
    # A panic that was printed and survived (a test helper, a child process)
    # followed by the fatal error that really ended the program.
    assert gopanic.parse(INDEX + "\nsome log line\n" + MAP_WRITES) == Crash(
        "fatal_error", "concurrent map writes", "main.main.func3 at /src/api/cache.go:45"
    )
    last = gopanic.parse(MAP_WRITES + NIL_DEREF)
    assert last is not None
    assert last.kind == "panic"


def test_panic_while_printing_without_tab_keeps_original_message() -> None:
    # Two line-start panic headers with no traceback between them are one
    # crash; the first is the original.
    text = "panic: original\npanic: from a deferred call\n\n" + DEADLOCK.split("\n", 2)[2]
    crash = gopanic.parse(text)
    assert crash is not None
    assert crash.message == "original"


def test_tail_starting_mid_traceback_and_without_traceback() -> None:
    # The start of the output fell outside the 64 KiB tail: no header, no crash.
    assert gopanic.parse(STACK_OVERFLOW[STACK_OVERFLOW.index("runtime stack:") :]) is None
    # GOTRACEBACK=none prints the header alone.
    assert gopanic.parse("panic: boom\n") == Crash("panic", "boom", None)


def test_header_fragment_at_start_of_tail() -> None:
    tail = "ing request id=42\n" + NIL_DEREF
    crash = gopanic.parse(tail)
    assert crash is not None
    assert crash.message.startswith("runtime error: invalid memory address")


@pytest.mark.parametrize(
    "stderr",
    [
        pytest.param("", id="empty"),
        pytest.param(
            "2026/11/26 23:48:47 listening on :8080\n2026/11/26 23:48:50 shutting down\n",
            id="clean-exit",
        ),
        pytest.param(
            "2026/11/26 23:48:47 recovered from panic: runtime error: boom\n"
            'level=error msg="handler panic: nil map"\n'
            "  fatal error: not at line start\n",
            id="panic-mid-line",
        ),
        pytest.param(SIGQUIT_DUMP, id="sigquit-dump"),
        pytest.param(NIL_DEREF + "\n" + SIGQUIT_DUMP, id="sigquit-after-panic"),
        pytest.param(
            "SIGTERM: shutting down gracefully\nbye\n",
            id="signal-name-logged-by-the-program",
        ),
    ],
)
def test_not_a_crash(stderr: str) -> None:
    assert gopanic.parse(stderr) is None


def test_oom_crash_and_to_dict() -> None:
    crash = gopanic.oom_crash()
    assert crash.to_dict() == {
        "kind": "oom",
        "message": "killed by the kernel OOM killer",
        "frame": None,
    }
    parsed = gopanic.parse(INDEX)
    assert parsed is not None
    assert parsed.to_dict()["frame"] == "main.(*Server).handle at /src/api/server.go:18"


def test_large_tail_is_fast_enough() -> None:
    noise = "2026/11/26 23:48:47 GET /healthz 200 12µs\n" * 1500  # ~64 KiB
    assert gopanic.parse(noise[-60_000:] + MAP_WRITES) is not None


# Crafted tails (64 KiB, what the capture keeps) against every pattern that
# looks at whole lines: each once cost a backtracking regex seconds of CPU.
_HOSTILE_TAILS = [
    "panic: x\n" + "goroutine 1 " + "[ " * 32_000,  # _GOROUTINE: 2.4 s before
    "panic: a\ngoroutine 1 " + "[ " * 32_000 + "\npanic: b\n",  # the same-block check
    "fatal error: x\ngoroutine 1 " + "[x " * 21_000,
    "panic: x\ngoroutine 1 [running]:\n" + "(" * 65_000 + "\n\t/x.go:1\n",
    "panic: x\ngoroutine 1 [running]:\nmain.f()\n\t" + "a:1a" * 16_000 + "\n",
    "panic: x\n" * 7_000,
    "fatal error: x\n" + ("SIGSEGV: " + "x" * 100 + "\nPC=0x1 \n") * 500,
]


def test_hostile_tails_are_parsed_in_bounded_cpu_time() -> None:
    # Run in a child with a CPU-time limit (not a wall-clock assertion: a loaded
    # machine slows the wall clock, not the CPU seconds a parse needs). Every
    # tail takes milliseconds now; the quadratic patterns needed seconds each.
    code = (
        "import resource, sys, json\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (4, 4))\n"
        "from supervisor.core import gopanic\n"
        "tails = json.load(sys.stdin)\n"
        "for tail in tails:\n"
        "    gopanic.parse(tail[-65536:])\n"
        "print('parsed', len(tails))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(_HOSTILE_TAILS),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, f"over the CPU limit ({done.returncode}): {done.stderr[-500:]}"
    assert done.stdout.strip() == f"parsed {len(_HOSTILE_TAILS)}"


def test_linear_goroutine_header_matches_the_runtime_forms() -> None:
    for line in (
        "goroutine 1 [running]:",
        "goroutine 18 [chan receive, 2 minutes]:",
        "goroutine 1 gp=0xc000002380 m=0 mp=0x5a5520 [running]:",
        "goroutine 7 x [y] [select]:",
    ):
        assert gopanic.is_goroutine_header(line), line
    for line in (
        "goroutine 1 [running]",
        "goroutine x [running]:",
        "goroutine 1 [run]ning]:",
        "goroutine 1 x[running]:",
        "goroutine 1[running]:",
        "main.f()",
    ):
        assert not gopanic.is_goroutine_header(line), line
