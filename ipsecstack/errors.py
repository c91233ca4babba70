"""Errors and drop reasons shared by the whole core.

A packet the datapath refuses is never an exception escaping to the caller of a batch call: it is a
``(reason, packet)`` entry in the batch result and a counter. The single-packet API (``protect`` /
``unprotect``) raises :class:`Dropped` carrying the same reason, so scripts can tell why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

T = TypeVar("T")


class Reason:
    """Drop reasons. Stable strings: they are metric labels and log fields."""

    # parsing
    TRUNCATED: Final = "truncated"
    MALFORMED: Final = "malformed"
    BAD_IP_VERSION: Final = "bad_ip_version"
    FRAGMENT: Final = "fragment"
    # SA lookup / state
    UNKNOWN_SPI: Final = "unknown_spi"
    SA_EXPIRED: Final = "sa_expired"
    SEQ_EXHAUSTED: Final = "seq_exhausted"
    ENCAP_MISMATCH: Final = "encap_mismatch"
    # anti-replay (RFC 4303 §3.4.3, RFC 4302 §3.4.3)
    REPLAY: Final = "replay"
    TOO_OLD: Final = "too_old"
    # integrity / decryption
    BAD_ICV: Final = "bad_icv"
    BAD_PADDING: Final = "bad_padding"
    BAD_LENGTH: Final = "bad_length"
    BAD_NEXT_HEADER: Final = "bad_next_header"
    # RFC 4303 §2.6: dummy packets are discarded silently (counted, never logged)
    DUMMY: Final = "dummy"
    # RFC 3948 §2.2: NAT-keepalive, discarded silently
    NAT_KEEPALIVE: Final = "nat_keepalive"
    # policy (RFC 4301 §5)
    POLICY_DISCARD: Final = "policy_discard"
    POLICY_MISMATCH: Final = "policy_mismatch"
    POLICY_REQUIRES_PROTECTION: Final = "policy_requires_protection"
    NO_POLICY: Final = "no_policy"
    NO_SA: Final = "no_sa"
    ECN_DROP: Final = "ecn_drop"
    # RFC 4301 §8: protected, it would exceed the path MTU and may not be fragmented (ICMP sent to the sender)
    PMTU_EXCEEDED: Final = "pmtu_exceeded"
    # decrypted, but this node has no inner plane for it (ESP in UDP on the NFQUEUE node's IKE socket)
    NO_INNER_PLANE: Final = "no_inner_plane"
    # the native engine's crypto library reported an error it should never report (ipsecstack/native)
    CRYPTO_ERROR: Final = "crypto_error"
    # congestion: CoDel (RFC 8289) dropped it, it waited in the ESP receive queue too long (native engine)
    QUEUE_DELAY: Final = "queue_delay"


#: Reasons that are normal protocol behaviour (or congestion), counted but never logged as anomalies.
SILENT_REASONS: Final = frozenset({Reason.DUMMY, Reason.NAT_KEEPALIVE, Reason.QUEUE_DELAY})


class Dropped(Exception):
    """A packet was rejected; ``reason`` is one of :class:`Reason`'s strings."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ConfigError(ValueError):
    """Bad configuration. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        super().__init__(f"{field} = {value!r}: {fix}")
        self.field = field
        self.value = value
        self.fix = fix

    @property
    def errors(self) -> list[ConfigError]:
        """Every error this one stands for: itself, or each of a :class:`ConfigErrors`."""
        return [self]


class ConfigErrors(ConfigError):
    """Several configuration errors found at once, in file order; one per line in the message.

    Still a :class:`ConfigError`: ``field``, ``value`` and ``fix`` are the first error's.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        flat = [one for e in errors for one in e.errors]
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        ValueError.__init__(self, "\n".join(str(e) for e in flat))
        self.field, self.value, self.fix = flat[0].field, flat[0].value, flat[0].fix
        self._errors = flat

    @property
    def errors(self) -> list[ConfigError]:
        return list(self._errors)

    @staticmethod
    def of(errors: Sequence[ConfigError]) -> ConfigError:
        """The one error, or all of them as a :class:`ConfigErrors`."""
        flat = [one for e in errors for one in e.errors]
        return flat[0] if len(flat) == 1 else ConfigErrors(flat)


class ErrorCollector:
    """The configuration errors found so far: each check runs through :meth:`run`, which keeps going after
    one, so a file's errors are all reported at once (:meth:`raise_any`)."""

    def __init__(self) -> None:
        self.found: list[ConfigError] = []

    def run(self, check: Callable[..., T], *args: Any) -> T | None:
        try:
            return check(*args)
        except ConfigError as e:
            self.found.extend(e.errors)
            return None

    def raise_any(self) -> None:
        if self.found:
            raise ConfigErrors.of(self.found)


class ConfigWarning(UserWarning):
    """A configuration that works but is unwise (a short pre-shared key): ``check`` shows it, ``run`` logs it.

    Raised with :func:`warnings.warn` where it is found; :func:`ipsecstack.config.parse` collects them.
    """

    def __init__(self, field: str, value: object, fix: str) -> None:
        super().__init__(f"{field} = {value!r}: {fix}")
        self.field = field
        self.value = value
        self.fix = fix
