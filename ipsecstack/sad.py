"""Security Association Database (RFC 4301 §4.4.2).

Theory of operation
-------------------
Inbound SAs are found by (SPI, protocol) as RFC 4301 §4.1 allows for unicast traffic. SPIs are
chosen by the receiver, so they are unique per node in normal use; when two inbound SAs do share an
SPI and protocol (manual keying, several local addresses) the entry turns into a small map keyed by
destination address and the lookup takes the packet's destination into account ("longest match":
SPI + protocol + destination first, then SPI + protocol).

Outbound SAs are found through the policy's template: by SPI for manual keying, or by ``reqid`` for
IKE-managed SAs. Several outbound SAs may share a reqid while a rekey is in progress; the newest one
is used (make-before-break), and removing it falls back to the previous one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from ipsecstack.errors import ConfigError
from ipsecstack.sa import SecurityAssociation
from ipsecstack.spd import Template

_Key = tuple[int, int]
_K = TypeVar("_K")


class SAD:
    def __init__(self) -> None:
        self._in: dict[_Key, SecurityAssociation | dict[bytes | None, SecurityAssociation]] = {}
        self._out_spi: dict[_Key, list[SecurityAssociation]] = {}
        self._out_reqid: dict[int, list[SecurityAssociation]] = {}
        self._all: dict[int, SecurityAssociation] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[SecurityAssociation]:
        return iter(list(self._all.values()))

    def __contains__(self, sa: object) -> bool:
        return id(sa) in self._all and self._all[id(sa)] is sa

    def add(self, sa: SecurityAssociation) -> None:
        if sa.direction is None:
            raise ConfigError("direction", None, f"{sa!r}: set direction='in' or 'out' before installing it")
        if sa in self:
            return
        key = (sa.spi, sa.proto_num)
        if sa.direction == "in":
            dst = sa.outer_dst
            cur = self._in.get(key)
            if cur is None:
                self._in[key] = sa
            else:
                by_dst = cur if isinstance(cur, dict) else {cur.outer_dst: cur}
                if dst in by_dst:
                    raise ConfigError(
                        "spi", f"0x{sa.spi:08x}", "an inbound SA with this SPI, protocol and destination exists"
                    )
                by_dst[dst] = sa
                self._in[key] = by_dst
        else:
            self._out_spi.setdefault(key, []).append(sa)
            if sa.reqid is not None:
                self._out_reqid.setdefault(sa.reqid, []).append(sa)
        self._all[id(sa)] = sa

    def remove(self, sa: SecurityAssociation) -> None:
        if sa not in self:
            return
        del self._all[id(sa)]
        key = (sa.spi, sa.proto_num)
        if sa.direction == "in":
            cur = self._in.get(key)
            if isinstance(cur, dict):
                cur.pop(sa.outer_dst, None)
                if len(cur) == 1:
                    self._in[key] = next(iter(cur.values()))
                elif not cur:
                    del self._in[key]
            elif cur is sa:
                del self._in[key]
        else:
            _remove_from(self._out_spi, key, sa)
            if sa.reqid is not None:
                _remove_from(self._out_reqid, sa.reqid, sa)

    def lookup_inbound(self, spi: int, proto: int, dst: bytes) -> SecurityAssociation | None:
        cur = self._in.get((spi, proto))
        if cur is None or isinstance(cur, SecurityAssociation):
            return cur
        return cur.get(dst) or cur.get(None)

    def lookup_outbound(self, template: Template) -> SecurityAssociation | None:
        if template.spi is not None:
            lst = self._out_spi.get((template.spi, 50 if template.protocol == "esp" else 51))
        else:
            assert template.reqid is not None
            lst = self._out_reqid.get(template.reqid)
        if not lst:
            return None
        if template.spi is not None and template.tunnel_dst is not None and len(lst) > 1:
            for sa in reversed(lst):
                if sa.tunnel_dst == template.tunnel_dst:
                    return sa
        return lst[-1]


def _remove_from(index: dict[_K, list[SecurityAssociation]], key: _K, sa: SecurityAssociation) -> None:
    lst = index.get(key)
    if lst is None:
        return
    lst[:] = [x for x in lst if x is not sa]
    if not lst:
        del index[key]
