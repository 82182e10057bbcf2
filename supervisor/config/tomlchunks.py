"""A TOML document parsed a table at a time, the tables whose text did not
change since the last parse taken from a cache (issue 18: a reload of 1,000
programs that changes one spent 40-60 ms in ``tomllib`` on the 170 KB file).

The result is always exactly what ``tomllib.loads`` gives, or its error:
anything this module is not sure of goes to ``tomllib.loads`` on the whole
text. How that holds:

- The text is cut before every line that opens a table (``[a.b]``). Such a
  line inside a multi-line string or array leaves the piece before it with an
  unclosed string or array, which ``tomllib`` refuses: then the whole text is
  parsed at once. So a piece that parses alone is parsed the same way as in
  the whole text (TOML has no other construct spanning lines).
- Each piece is parsed alone; its header's key path comes from its first line.
- The pieces' tables are put together by TOML's rules, strictly: a header may
  go through or declare a table that earlier headers made, and declare one
  only once; nothing else is merged (a key met twice, a table made by dotted
  keys or inline, a root key, ``[[arrays]]``). Anything else is left to
  ``tomllib`` on the whole text, which accepts it or names the error.

Stdlib only, like the rest of ``supervisor.config``.
"""

from __future__ import annotations

import re
import threading
import tomllib
from typing import Any

# A line that may open a table: optional indentation, then one "[" (a "[["
# line, an array of tables, sends the whole text to tomllib).
_OPENS = re.compile(r"^[ \t]*\[", re.M)
_ARRAY_OF_TABLES = re.compile(r"^[ \t]*\[\[", re.M)
# A header of bare keys (the common case): its key path without a parse.
_BARE = re.compile(r"[ \t]*\[[ \t]*([A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*)[ \t]*\]")

# A piece: its header's key path, its table's body, and how deep the
# document nests at least because of it (``height``).
_Piece = tuple[tuple[str, ...], dict[str, Any], int]

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
    if _ARRAY_OF_TABLES.search(text):
        return _whole(text)
    starts = [m.start() for m in _OPENS.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    before = _CACHE.get(key, {})
    pieces: dict[str, _Piece] = {}
    order: list[_Piece] = []
    for i, start in enumerate(starts):
        chunk = text[start : starts[i + 1] if i + 1 < len(starts) else len(text)]
        piece = before.get(chunk) or pieces.get(chunk)
        if piece is None:
            piece = _parse_piece(chunk, root=i == 0)
            if piece is None:
                return _whole(text)
            pieces[chunk] = piece
        elif chunk in pieces:  # the same table text twice: a redefinition
            return _whole(text)
        else:
            pieces[chunk] = piece
        order.append(piece)
    document = _merge(order)
    if document is None:
        return _whole(text)
    with _CACHE_LOCK:
        _CACHE.pop(key, None)
        while len(_CACHE) >= _CACHE_KEYS:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = pieces
    return document, max((piece[2] for piece in order), default=0)


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
        return (), data, height(data)
    path = _header_path(chunk)
    if path is None:
        return None
    node: Any = data
    for depth, part in enumerate(path):
        # Above the header's table there is nothing but the path itself.
        if not isinstance(node, dict) or (depth and len(node) != 1) or part not in node:
            return None
        node = node[part]
    if len(data) != 1 or not isinstance(node, dict):
        return None
    return path, node, len(path) + height(node)  # its table sits len(path) below the root


def _header_path(chunk: str) -> tuple[str, ...] | None:
    """The key path of the header on ``chunk``'s first line."""
    line = chunk.split("\n", 1)[0]
    if m := _BARE.match(line):
        return tuple(part.strip(" \t") for part in m[1].split("."))
    try:  # quoted keys: let tomllib read the header alone
        data: Any = tomllib.loads(line)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    path = []
    while isinstance(data, dict) and len(data) == 1:
        ((part, data),) = data.items()
        path.append(part)
    return tuple(path) if data == {} and path else None


def _merge(pieces: list[_Piece]) -> dict[str, Any] | None:
    """The document the pieces make, by TOML's table rules; None when unsure."""
    document: dict[str, Any] = {}
    # Tables headers made, by id: True once declared by its own header,
    # False while only a header below it made it (it may be declared once).
    made: dict[int, bool] = {id(document): True}
    for path, body, _ in pieces:
        if not path:  # the root keys, before any header
            document.update(body)
            continue
        node = document
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
                made[id(child)] = False
            elif id(child) not in made:  # a value, or a table made by keys
                return None
            node = child
        table = node.get(path[-1])
        if table is None:
            table = node[path[-1]] = dict(body)
            made[id(table)] = True
        elif made.get(id(table)) is False and not any(k in table for k in body):
            table.update(body)
            made[id(table)] = True
        else:
            return None
    return document
