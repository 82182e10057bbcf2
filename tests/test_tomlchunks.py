"""supervisor.config.tomlchunks: a TOML text parsed a table at a time, the
unchanged tables from a cache, must give exactly what tomllib gives (the same
document, key order included, or the same error), and a reload's parse of a
1,000-program file that changed one table parses only that table."""

from __future__ import annotations

import random
import tomllib
from typing import Any

import pytest

from supervisor import config as configmod
from supervisor.config import tomlchunks


def _outcome(parse: Any, text: str) -> tuple[str, Any]:
    try:
        doc = parse(text)
    except tomllib.TOMLDecodeError as exc:
        return "error", str(exc)
    except RecursionError:
        return "error", "recursion"
    return "ok", _ordered(doc)


def _ordered(value: Any) -> Any:
    """``value`` with every table's key order made visible to ``==``."""
    if isinstance(value, dict):
        return [(k, _ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def _height(value: Any) -> int:
    """How deep tables and arrays nest (recursive: the reference)."""
    if isinstance(value, dict | list) and value:
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((_height(v) for v in items), default=0)
    return 0


def _same_as_tomllib(text: str, key: str) -> None:
    expected = _outcome(tomllib.loads, text)
    heights = []

    def parse(text: str) -> dict[str, Any]:
        doc, height = tomlchunks.parse(text, key)
        heights.append((height, _height(doc)))
        return doc

    cold = _outcome(parse, text)
    warm = _outcome(parse, text)  # every piece from the cache
    assert cold == expected, text
    assert warm == expected, text
    assert all(got == want for got, want in heights), (text, heights)


# Each is a document whose pieces, parsed alone, could be put together wrongly.
TRICKY = [
    "",
    "\n\n# only a comment\n",
    "a = 1\n[b]\nc = 2\n",
    "[a]\nx = 1\n[a]\ny = 2\n",  # a table declared twice
    "[a]\nx = 1\n[a]\nx = 1\n",  # ... with the same text
    "[a.b]\nx = 1\n[a]\ny = 2\n",  # implicit, then declared
    "[a.b]\nx = 1\n[a]\nb = 2\n",  # ... with a key that is the implicit table
    "[a.b]\nx = 1\n[a]\ny = 2\n[a]\nz = 3\n",
    "[a]\nb.c = 1\n[a.b]\nd = 2\n",  # a table made by dotted keys, declared by a header
    "[a]\nb.c = 1\n[a.b.e]\nd = 2\n",  # ... a sub-table under it (valid TOML)
    "[a]\nb = { c = 1 }\n[a.b.e]\nd = 2\n",  # an inline table is closed
    "a = 1\n[a]\nx = 1\n",  # a root value, then a header over it
    "a = [1]\n[a.b]\nx = 1\n",
    "a.b = 1\n[a.c]\nx = 1\n",  # a root dotted table, then a header under it
    '[a]\ns = """\n[b]\nx = 1\n"""\n',  # a header-looking line inside a string
    "[a]\ns = '''\n[b]\n'''\n[c]\nx = 1\n",
    "[a]\nx = [\n[1, 2],\n[3]\n]\n",  # array lines opening with "["
    "[a]\nx = [\n[1]\n]\n",
    "[[a]]\nx = 1\n[[a]]\nx = 2\n",  # arrays of tables
    "[a]\nx = 1\n[[a.b]]\ny = 2\n",
    "  [a]  # indented, with a comment\n  x = 1\n\t[a.b]\n\ty = 2\n",
    '["a.b"]\nx = 1\n[a]\ny = 2\n["a".b]\nz = 3\n',  # quoted keys
    "[ a . 'b' . \"c d\" ]\nx = 1\n",
    "[a]\r\nx = 1\r\n[b]\r\ny = 2\r\n",  # CRLF
    "[a]\nx = 1\n[b",  # broken header at the end
    "[a]\nx = \n[b]\ny = 1\n",  # a syntax error in one piece
    "[a]\nx = 1\nx = 2\n[b]\n",  # a key twice in one piece
    "[a] x = 1\n",
    "[a.b.c]\n[a.b]\n[a]\n[a.b.c.d]\n",
    "[a]\n[a.b]\n[a.b.c]\nx = 1\n[a.b]\n",
    "[1.2]\nx = 1\n[1]\ny = 2\n",
    "x = 1\n" + "[a]\n" * 2,
    '[a]\ns = """abc\\\n[b]\n"""\n',  # a line continuation in a string
    "[a]\nx = 1 # [b]\n[b]\n",
    "[" * 40 + "]" * 40,  # nested too deep for some parsers
    "[a]\nx = " + "[" * 20 + "1" + "]" * 20 + "\n[b]\ny = []\nz = {}\n",  # heights
    "[" + ".".join("abcdefghijklmnopq") + "]\n[a.b]\nx = [{}]\n",
    "x = [[], {}]\n[a]\n",
    # Arrays of tables.
    "[[a]]\nx = 1\n[a.b]\ny = 2\n[[a]]\nx = 3\n[a.b]\ny = 4\n",
    "[[a.b]]\n[a]\nc = 1\n",
    "[a]\nb = [{x = 1}]\n[[a.b]]\n",  # a static array is closed
    "[[a]]\n[a]\n",
    "[a.b]\n[[a]]\n",
    "[[a]]\n[[a.b]]\nx = 1\n[[a.b]]\nx = 2\n[[a]]\n[[a.b]]\n[a.b.c]\n",
    '["a"]\n[["a".b]]\nx = 1\n[["a".b]]\n',
    "[[ a . b ]]  # c\n[[a .b]]\n",
    "[[a]]\nx = 1\n[[a]]\nx = 1\n",  # the same table text twice, in an array: valid
    "[[a]]\nx = 1\n[[a]]\nx = 2\n[a.b]\ny = 1\n[[a.c]]\n",  # into the last table
    '[programs.api]\ncommand = ["/bin/true"]\n[programs.api.logs]\nbackups = 1\n'
    '[programs.web]\ncommand = ["/bin/true"]\n',
]


@pytest.mark.parametrize("text", TRICKY)
def test_a_tricky_document_parses_as_tomllib_parses_it(text: str) -> None:
    _same_as_tomllib(text, key=f"tricky-{hash(text)}")


def _random_piece(rng: random.Random) -> str:
    keys = ["a", "b", "c", '"a.b"', "'q'", "1"]
    depth = rng.randint(1, 3)
    path = ".".join(rng.choice(keys) for _ in range(depth))
    header = rng.choice([f"[{path}]", f"[{path}]", f"[[{path}]]", f"  [ {path} ]  # h"])
    lines = [header]
    for _ in range(rng.randint(0, 3)):
        k = rng.choice([*keys, "x", "y", "x.y", "b.x"])
        v = rng.choice([
            "1", '"s"', "[1, 2]", "{ z = 1 }", '"""\n[b]\nx = 1\n"""', "[\n[1],\n]",
            "'''\n[c.a]\n'''", "true", "1979-05-27", "# no value",
        ])  # fmt: skip
        lines.append(f"{k} = {v}")
    return "\n".join(lines) + rng.choice(["\n", "\n\n", "\r\n"])


def test_random_documents_parse_as_tomllib_parses_them() -> None:
    rng = random.Random(18)
    agreed = {"ok": 0, "error": 0}
    fast_arrays = 0  # documents with [[...]] put together from pieces, not parsed whole
    for n in range(3000):
        root = rng.choice(["", "x = 1\n", "a.b = 2\n", "# c\n"])
        pieces = [_random_piece(rng) for _ in range(rng.randint(1, 6))]
        text = root + "".join(pieces)
        key = f"random-{n % 3}"  # a warm cache of other documents too
        _same_as_tomllib(text, key)
        # A piece changed, the others from the cache.
        pieces[rng.randrange(len(pieces))] = _random_piece(rng)
        changed = root + "".join(pieces)
        _same_as_tomllib(changed, key)
        agreed[_outcome(tomllib.loads, changed)[0]] += 1
        kept = tomlchunks._CACHE.get(key, {})
        fast_arrays += "[[" in changed and any(
            piece[3] for chunk, piece in kept.items() if chunk in changed
        )
    # Both kinds were exercised (a generator that only made errors proves little),
    # and arrays of tables were merged from pieces, not only handed to tomllib.
    assert agreed["ok"] > 500 and agreed["error"] > 500, agreed
    assert fast_arrays > 100, fast_arrays


def _app_toml(n: int, changed: str = "") -> str:
    parts = ["[supervisor]", 'state_dir = ".gosup"', ""]
    for i in range(n):
        parts += [f"[programs.p{i:04d}]", 'command = ["/bin/sleep", "3600"]']
        if i == n // 2 and changed:
            parts.append(f'environment = {{ R = "{changed}" }}')
        parts += ["", f"[programs.p{i:04d}.logs]", 'max_size = "1GiB"', "backups = 1", ""]
        parts += [f"[[programs.p{i:04d}.config_files]]", f'path = "conf/p{i:04d}.yaml"', ""]
    return "\n".join(parts)


def test_a_reload_that_changes_one_table_parses_only_that_table(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.toml"
    path.write_text(_app_toml(1000, changed="1"))
    first = configmod.load(path)
    parsed: list[int] = []
    real = tomllib.loads

    def counting(text: str, **kw: Any) -> dict[str, Any]:
        parsed.append(len(text))
        return real(text, **kw)

    monkeypatch.setattr(tomlchunks.tomllib, "loads", counting)
    path.write_text(_app_toml(1000, changed="2"))
    second = configmod.load(path)
    assert parsed == [len('[programs.p0500]\ncommand = ["/bin/sleep", "3600"]\n'
                          'environment = { R = "2" }\n\n')]  # fmt: skip
    changed = [a.name for a, b in zip(first.programs, second.programs, strict=True) if a != b]
    assert changed == ["p0500"]
    assert dict(second.programs[500].environment) == {"R": "2"}
    assert second.programs[500].config_files[0].path == tmp_path / "conf/p0500.yaml"
    # The others are the very specs of the first load.
    pairs = zip(first.programs, second.programs, strict=True)
    assert all(a is b for a, b in pairs if a.name != "p0500")


def test_a_config_error_is_reported_as_before_with_a_warm_cache(tmp_path: Any) -> None:
    path = tmp_path / "app.toml"
    path.write_text(_app_toml(20))
    configmod.load(path)
    path.write_text(_app_toml(20).replace("[programs.p0007.logs]", "[programs.p0003.logs]"))
    with pytest.raises(configmod.ConfigError) as got:
        configmod.load(path)
    twice = "Cannot declare ('programs', 'p0003', 'logs') twice"
    assert got.value.errors == [f"{path}: line 77, column 21: {twice}"]
