"""The IKEv2 payloads as records (RFC 7296 §3.3-§3.16): what ``message`` encodes and decodes.

Plain dataclasses with no behaviour beyond naming their payload type (``TYPE``); the codec, with its
bounds checks, is :mod:`ipsecstack.ike.message`, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipsecstack.ike.const import Payload


@dataclass
class Transform:
    type: int
    id: int
    key_length: int | None = None


@dataclass
class Proposal:
    num: int
    protocol: int
    spi: bytes
    transforms: list[Transform]


@dataclass
class SA:
    proposals: list[Proposal]
    TYPE = Payload.SA


@dataclass
class KE:
    group: int
    data: bytes
    TYPE = Payload.KE


@dataclass
class Identification:
    id_type: int
    data: bytes
    initiator: bool = True

    @property
    def TYPE(self) -> Payload:
        return Payload.IDi if self.initiator else Payload.IDr


@dataclass
class Auth:
    method: int
    data: bytes
    TYPE = Payload.AUTH


@dataclass
class Nonce:
    data: bytes
    TYPE = Payload.NONCE


@dataclass
class Notify:
    notify_type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""
    TYPE = Payload.NOTIFY


@dataclass
class Delete:
    protocol: int
    spis: list[bytes]
    TYPE = Payload.DELETE


@dataclass
class Vendor:
    data: bytes
    TYPE = Payload.VENDOR


@dataclass
class TrafficSelector:
    ts_type: int
    ip_proto: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes


@dataclass
class TS:
    selectors: list[TrafficSelector]
    initiator: bool = True

    @property
    def TYPE(self) -> Payload:
        return Payload.TSi if self.initiator else Payload.TSr


@dataclass
class CP:
    cfg_type: int
    attributes: list[tuple[int, bytes]]
    TYPE = Payload.CP


@dataclass
class Certificate:
    encoding: int
    data: bytes
    request: bool = False

    @property
    def TYPE(self) -> Payload:
        return Payload.CERTREQ if self.request else Payload.CERT


@dataclass
class Encrypted:
    """The SK payload: ``first`` is the type of the first inner payload, ``body`` IV || ct || ICV."""

    first: int
    body: bytes
    TYPE = Payload.SK


@dataclass
class Unknown:
    payload_type: int
    data: bytes
    critical: bool

    @property
    def TYPE(self) -> int:
        return self.payload_type


AnyPayload = (
    SA | KE | Identification | Auth | Nonce | Notify | Delete | Vendor | TS | CP | Certificate | Encrypted | Unknown
)
