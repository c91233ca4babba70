"""Property: whatever TOML document reaches ``config.parse``, only a ConfigError may come out.

Two sources of documents: random ones (nested tables of every TOML value type, keys drawn mostly from
the configuration's own vocabulary so that they reach the meaning checks), and the shipped examples
with random mutations (a key deleted, a value replaced by another type or by random data, a key
added). Documents are written as TOML by the small writer below (tomllib only reads) and read by
``parse`` with the examples' secret files served from memory: no file outside them is opened.
"""

from __future__ import annotations

import datetime
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecstack import config_schema
from ipsecstack.config import Config, parse
from ipsecstack.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
FILES = {p.name: p.read_bytes() for p in EXAMPLES.iterdir() if p.suffix in (".psk", ".key")}
DOCS = [tomllib.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.toml"))]


# keys drawn from the configuration's own vocabulary reach the meaning checks behind the schema
WORDS = sorted({name for model in config_schema._Table.__subclasses__() for name in model.model_fields})
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- a small TOML writer: inline tables and arrays only, which TOML 1.0 allows everywhere ----------------


def _string(s: str) -> str:
    # JSON escapes are TOML basic-string escapes; TOML also wants DEL escaped
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    assert isinstance(v, dict), v
    return "{" + ", ".join(f"{_string(k)} = {_value(x)}" for k, x in v.items()) + "}"


def dumps(doc: dict[str, Any]) -> str:
    return "".join(f"{_string(k)} = {_value(v)}\n" for k, v in doc.items())


# -- strategies -------------------------------------------------------------------------------------------

keys = st.sampled_from(WORDS) | st.sampled_from(["gw", "net", "site-b", "rw", "ike", "private"]) | st.text(max_size=8)
scalars = (
    st.text(max_size=24)
    | st.sampled_from(["10.1.0.0/16", "192.0.2.1", "::/0", "%any", "aes128gcm16", "psk", "1h", "0x10", "tunnel",
                       "transport", "start", "nobody", "a.example", "C=CH, CN=x", "10.0.0.0/8[tcp/80-90]"])
    | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
    | st.sampled_from([0, 1, 255, 256, 500, 4500, 65535, 65536, 1 << 32])
    | st.floats()
    | st.booleans()
    | st.dates()
    | st.datetimes()
    | st.times()
)  # fmt: skip
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=24
)


def _read(name: str) -> bytes:
    if name not in FILES:
        raise FileNotFoundError(2, "No such file or directory", name)
    return FILES[name]


def _parse(doc: dict[str, Any]) -> Config | None:
    text = dumps(doc)
    assert dumps(tomllib.loads(text)) == text  # the writer's own check: parse reads what was drawn
    try:
        return parse(text, read_file=lambda p: _read(p).decode(), read_bytes=_read, env={"E": "ab" * 20})
    except ConfigError:
        return None  # the only exception allowed


@given(st.dictionaries(st.sampled_from(["agent", "manual", "connections", "secrets", "pools"]) | keys, values,
                       max_size=5))  # fmt: skip
@FUZZ
def test_random_documents(doc: dict[str, Any]) -> None:
    _parse(doc)


def _locations(node: Any, loc: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [loc]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _locations(v, (*loc, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _locations(v, (*loc, i))
    return out


RETYPE = ("str", "list", "table", "int", "bool")
HOW = ("delete", "add", "retype", "replace", "same type")
texts = st.text(max_size=30) | st.sampled_from(["", " ", "0", "-1", "1e999", "::", "a-b", "x[y]", "0x", "%any"])
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def _mutate(doc: Any, loc: tuple[Any, ...], how: str, new: Any, key: str, text: str, number: int) -> None:
    """At ``loc``: delete; add ``key`` = ``new`` (in a table); retype (``key`` picks how); replace by ``new``;
    or replace by a value of the same type (``text``, ``number``), which the schema lets through to the meaning
    checks."""
    parent = doc
    for el in loc[:-1]:
        parent = parent[el]
    here = parent[loc[-1]] if loc else doc
    if how == "add" and isinstance(here, dict):
        here[key] = new
    elif not loc:
        return
    elif how == "delete":
        del parent[loc[-1]]
    elif how == "retype":
        form = RETYPE[len(key) % len(RETYPE)]
        parent[loc[-1]] = {"str": str(here), "list": [here], "table": {key: here}, "int": 1, "bool": True}[form]
    elif how == "replace":
        parent[loc[-1]] = new
    elif isinstance(here, str):
        parent[loc[-1]] = text
    elif isinstance(here, int) and not isinstance(here, bool):
        parent[loc[-1]] = number


@given(
    st.sampled_from(range(len(DOCS))),
    st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(HOW), values, keys, texts, ints), min_size=1,
             max_size=3),
)  # fmt: skip
@FUZZ
def test_mutated_examples(which: int, mutations: list[tuple[int, str, Any, str, str, int]]) -> None:
    doc = json.loads(json.dumps(DOCS[which]))  # a deep copy (the examples hold no dates)
    for pick, *change in mutations:
        locs = _locations(doc)
        _mutate(doc, locs[pick % len(locs)], *change)
    _parse(doc)


def test_examples_parse_unmutated() -> None:
    """The mutations start from valid files: each example parses with the files served from memory."""
    assert len(DOCS) == 5 and all(_parse(doc) is not None for doc in DOCS)
