"""The value syntaxes of the configuration files: swanctl durations, sizes and traffic selectors.

Shared by ``config.py`` (``[agent]``, ``[manual.*]``) and ``connections.py`` (``[connections.*]``) so that
neither imports the other for them. Pure functions: text in, a value or a :class:`ConfigError` naming
the key path and the fix out.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ipsecstack.errors import ConfigError
from ipsecstack.spd import Selector

_TS_RE = re.compile(r"^(?P<net>[^\[\]]+?)(?:\[(?P<proto>[\w]+)?(?:/(?P<port>[\w\-]+))?\])?$")


def parse_duration(value: Any, path: str) -> float:
    """swanctl durations: ``30s``, ``10m``, ``1h``, ``2d`` or a number of seconds."""
    seconds = math.inf
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        seconds = float(value) if value < 1e15 else math.inf  # (an int too large for a float is no duration)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", value)
        if m:
            seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds < 1e15:  # about 30 million years; refuses NaN and infinity too
        return seconds
    raise ConfigError(path, value, "give seconds or a duration like 30s, 10m, 1h, 2d")


def parse_size(value: Any, path: str) -> int:
    """Byte/packet counts with optional ``k``/``M``/``G`` suffix (powers of 1024, as swanctl)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", value)
        if m:
            return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    raise ConfigError(path, value, "give a count like 1000, 500k, 2M or 1G")


def parse_ts(text: Any, path: str) -> Selector:
    """A traffic selector in swanctl syntax: ``10.0.0.0/8``, ``192.0.2.1[tcp/80]``, ``::/0[udp]``."""
    if not isinstance(text, str):
        raise ConfigError(path, text, "give a CIDR string, optionally with [proto/port], e.g. 10.1.0.0/16[tcp/443]")
    m = _TS_RE.match(text.strip())
    if m is None:
        raise ConfigError(path, text, "give a CIDR string, optionally with [proto/port], e.g. 10.1.0.0/16[tcp/443]")
    net = m.group("net").strip()
    if net == "dynamic":
        raise ConfigError(path, text, "'dynamic' needs IKE; manual connections take explicit subnets")
    port: int | tuple[int, int] | None = None
    if m.group("port"):
        p = m.group("port")
        try:
            port = (int(p.split("-")[0]), int(p.split("-")[1])) if "-" in p else int(p)
        except ValueError:
            raise ConfigError(path, text, "ports are numbers or ranges like 1024-65535") from None
    try:
        return Selector(None, net, m.group("proto"), None, port)
    except ConfigError as e:
        raise ConfigError(path, text, e.fix) from None
