"""The IKE endpoint keeps serving when a callback meets a bug: counted, logged, and the next datagram works.

Root: the endpoint binds UDP port 500 (on 127.0.0.1, nothing leaves the host).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from backends.memory import MemoryLink
from ipsecstack.config import build_datapath, parse
from ipsecstack.runtime.ike import IkeEndpoint
from ipsecstack.runtime.node import Node

CONFIG = """
[agent]
inner_backend = "memory"
outer_backend = "memory"

[connections.peer]
local_addrs = "127.0.0.1"
remote_addrs = "127.0.0.2"

[connections.peer.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]

[secrets.ike.peer]
secret = "a secret that is long enough"
"""


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))


@pytest.mark.root
def test_an_exception_in_a_callback_is_counted_logged_once_and_serving_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = parse(CONFIG)
    app, wire = MemoryLink(names=("app", "node")), MemoryLink(names=("eth", "peer"))
    node = Node(build_datapath(cfg, 0.0), app.b, wire.a, name="a")
    log = Log()
    ike = IkeEndpoint(node, cfg.connections, [], log=log)
    received: list[bytes] = []
    real = ike.manager.receive

    def buggy(data: bytes, *args: Any) -> None:
        received.append(data)
        if len(received) <= 2:
            raise RuntimeError("a bug in the core")
        real(data, *args)

    monkeypatch.setattr(ike.manager, "receive", buggy)

    async def run() -> None:
        ike.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                for n in range(3):  # two meet the bug, the third reaches the manager
                    s.sendto(b"\x00" * 28 + bytes([n]), ("127.0.0.1", 500))
                    for _ in range(100):  # bounded: 1 s
                        await asyncio.sleep(0.01)
                        if len(received) > n:
                            break
        finally:
            ike.close()

    asyncio.run(run())
    assert len(received) == 3
    assert ike.errors == {"receive": 2}
    errors = [line for line in log.lines if line[0] == "error"]
    assert len(errors) == 1 and errors[0][2]["where"] == "receive"  # rate-limited: one line for both
    assert ike.manager.stats  # the third datagram was handled (and counted as malformed)
