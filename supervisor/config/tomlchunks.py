"""A TOML document parsed a table at a time, the tables whose text did not
change since the last parse taken from a cache (issue 18: a reload of 1,000
programs that changes one spent 40-60 ms in ``tomllib`` on the 170 KB file).

The result is always exactly what ``tomllib.loads`` gives, or its error:
anything this module is not sure of goes to ``tomllib.loads`` on the whole
text. How that holds:

- The text is cut before every line that opens a table (``[a.b]``,
  ``[[a.b]]``). Such a line inside a multi-line string or array leaves the piece before it with an
  unclosed string or array, which ``tomllib`` refuses: then the whole text is
  parsed at once. So a piece that parses alone is parsed the same way as in
  the whole text (TOML has no other construct spanning lines).
- Each piece is parsed alone; its header's key path comes from its first line.
- The pieces' tables are put together by TOML's rules, strictly: a header may
  go through or declare a table that earlier headers made, and declare one
  only once; ``[[a]]`` adds a table to an array that such headers made, and
  a header under ``a`` goes into its last table. Nothing else is merged (a
  key met twice, a table made by dotted keys or inline, a root key or an
  array of them under a header). Anything else is left to ``tomllib`` on
  the whole text, which accepts it or names the error.

Stdlib only, like the rest of ``supervisor.config``.
"""

from __future__ import annotations

import re
import threading
import tomllib
from typing import Any

# A line that may open a table (``[a]``) or add one to an array (``[[a]]``).
_OPENS = re.compile(r"^[ \t]*\[", re.M)
# A header of bare keys (the common case): its key path without a parse.
_KEYS = r"[ \t]*([A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*)[ \t]*"
_BARE = re.compile(rf"[ \t]*\[{_KEYS}\]")
_BARE_ARRAY = re.compile(rf"[ \t]*\[\[{_KEYS}\]\]")

# A piece: its header's key path, its table's body, the body's ``height``,
# and whether its header is ``[[path]]`` (a table added to an array).
_Piece = tuple[tuple[str, ...], dict[str, Any], int, bool]

# What headers made, by id (``_merge``).
_IMPLICIT, _DECLARED, _ARRAY = 0, 1, 2

# The pieces of the last text parsed for each key (the caller's file): piece
# text -> its header path and body. Replaced whole by each parse, so it holds
# one text's pieces per key, and is never changed in place (a parse in
# another thread sees an old or a new one).
_CACHE: dict[str, dict[str, _Piece]] = {}
_CACHE_KEYS = 4
_CACHE_LOCK = threading.Lock()


def parse(text: str, key: str = "") -> tuple[dict[str, Any], int]:
    """``tomllib.loads(text)`` (the same document, or the same error) and
    the document's ``height``.

    ``key`` names the text's source (its path): the pieces of the last text
    parsed under that key are reused. The values in the document are shared
    with the cache: the caller must not change them.
    """
    starts = [m.start() for m in _OPENS.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    before = _CACHE.get(key, {})
    pieces: dict[str, _Piece] = {}
    order: list[_Piece] = []
    for i, start in enumerate(starts):
        chunk = text[start : starts[i + 1] if i + 1 < len(starts) else len(text)]
        if chunk in pieces:  # the same text twice: an error, or [[a]] twice
            return _whole(text)
        piece = before.get(chunk) or _parse_piece(chunk, root=i == 0)
        if piece is None:
            return _whole(text)
        pieces[chunk] = piece
        order.append(piece)
    merged = _merge(order)
    if merged is None:
        return _whole(text)
    with _CACHE_LOCK:
        _CACHE.pop(key, None)
        while len(_CACHE) >= _CACHE_KEYS:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = pieces
    return merged


def _whole(text: str) -> tuple[dict[str, Any], int]:
    document = tomllib.loads(text)
    return document, height(document)


def height(value: object) -> int:
    """How many tables and arrays deep ``value`` nests: 0 for a scalar or an
    empty table or array, else 1 + the deepest of its items. (Without
    recursion: a document may nest as deep as tomllib reads.)"""
    deepest = 0
    todo: list[tuple[object, int]] = [(value, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            items: Any = value.values()
        elif isinstance(value, list):
            items = value
        else:
            continue
        if items:
            deepest = max(deepest, depth)
            todo += ((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return deepest


def _parse_piece(chunk: str, root: bool) -> _Piece | None:
    """``chunk``'s header path and table body; None when it does not parse alone."""
    try:
        data = tomllib.loads(chunk)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    if root and not _OPENS.match(chunk):  # the text before the first header: root keys
        return (), data, height(data), False
    header = _header_path(chunk)
    if header is None:
        return None
    path, array = header
    node: Any = data
    for depth, part in enumerate(path):
        # Above the header's table there is nothing but the path itself.
        if not isinstance(node, dict) or (depth and len(node) != 1) or part not in node:
            return None
        node = node[part]
    if array:  # [[path]] alone: an array of that one table
        if not isinstance(node, list) or len(node) != 1:
            return None
        node = node[0]
    if len(data) != 1 or not isinstance(node, dict):
        return None
    return path, node, height(node), array


def _header_path(chunk: str) -> tuple[tuple[str, ...], bool] | None:
    """The key path of the header on ``chunk``'s first line, and whether it
    is ``[[path]]``."""
    line = chunk.split("\n", 1)[0]
    for pattern, array in ((_BARE, False), (_BARE_ARRAY, True)):
        if m := pattern.match(line):
            return tuple(part.strip(" \t") for part in m[1].split(".")), array
    try:  # quoted keys: let tomllib read the header alone
        data: Any = tomllib.loads(line)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    path = []
    while isinstance(data, dict) and len(data) == 1:
        ((part, data),) = data.items()
        path.append(part)
    if not path:
        return None
    if data == {}:
        return tuple(path), False
    return (tuple(path), True) if data == [{}] else None


def _merge(pieces: list[_Piece]) -> tuple[dict[str, Any], int] | None:
    """The document the pieces make, by TOML's table rules, and its height;
    None when unsure."""
    document: dict[str, Any] = {}
    deepest = 0
    # What headers made, by id: a table declared by its own header, one made
    # only on the way to a header below it (it may be declared once), an
    # array of tables.
    made: dict[int, int] = {id(document): _DECLARED}
    for path, body, body_height, array in pieces:
        if not path:  # the root keys, before any header
            document.update(body)
            deepest = max(deepest, body_height)
            continue
        node, depth = document, len(path) + array + body_height
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
                made[id(child)] = _IMPLICIT
            elif made.get(id(child)) == _ARRAY:  # a header under [[a]]: its last table
                child = child[-1]
                depth += 1
            elif id(child) not in made:  # a value, or a table made by keys
                return None
            node = child
        # The header's table sits len(path) below the root, one more for each
        # array on the way and for its own.
        deepest = max(deepest, depth)
        last = path[-1]
        existing = node.get(last)
        table = dict(body)
        if array:
            if existing is None:
                node[last] = existing = []
                made[id(existing)] = _ARRAY
            elif made.get(id(existing)) != _ARRAY:
                return None
            existing.append(table)
        elif existing is None:
            node[last] = table
        elif made.get(id(existing)) == _IMPLICIT and not any(k in existing for k in body):
            existing.update(body)
            made[id(existing)] = _DECLARED
            continue
        else:
            return None
        made[id(table)] = _DECLARED
    return document, deepest
