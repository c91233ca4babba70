"""Network emulation for tests: hold every packet of an NFQUEUE for a fixed time, then accept it (in order).

``python -m tests.netns.ikedelay QUEUE DELAY LIFETIME`` runs inside a namespace whose iptables rules send
the packets to delay to queue QUEUE (tc netem is not available on every test machine). It prints
``ready`` once bound, and exits after LIFETIME seconds at the latest (every loop here is bounded),
accepting whatever it still holds.
"""

from __future__ import annotations

import select
import sys
import time
from collections import deque
from typing import Any

from netfilterqueue import NetfilterQueue


def main(queue: int, delay: float, lifetime: float) -> None:
    held: deque[tuple[float, Any]] = deque()  # (when to accept, packet): a constant delay keeps the order
    q = NetfilterQueue()
    q.bind(queue, lambda pkt: held.append((time.monotonic() + delay, pkt)))
    fd = q.get_fd()
    print("ready", flush=True)
    end = time.monotonic() + lifetime
    try:
        while time.monotonic() < end:
            wait = min(0.5, max(0.0, held[0][0] - time.monotonic())) if held else 0.5
            if select.select([fd], [], [], wait)[0]:
                q.run(block=False)
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
    finally:
        while held:
            held.popleft()[1].accept()
        q.unbind()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
