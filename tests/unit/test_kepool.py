"""The runtime's pool of MODP key pairs made ahead of time in a worker process (runtime/kepool.py, kexworker.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike.groups import GROUPS, Group
from ipsecstack.runtime import kexworker, privs
from ipsecstack.runtime.kepool import KeyPairPool

MODP2048, MODP3072, X25519 = GROUPS[14], GROUPS[15], GROUPS[31]


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(1000):  # at most 10 s: a worker process starts in well under a second
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the pool did not get there in time")


def _run(coro: Any) -> list[dict[str, Any]]:
    """Run ``coro`` in a fresh loop; returns what reached the loop's exception handler."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        await coro

    asyncio.run(main())
    return errors


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_pairs_are_made_in_the_worker_process_in_rng_order_and_handed_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    here: list[int] = []  # exponentiations in this process: there must be none

    def spy(self: Group, x: int) -> Any:
        here.append(x)
        raise AssertionError("g^x computed in the daemon's process")

    monkeypatch.setattr(Group, "modp_public", spy)
    monkeypatch.setattr(Group, "modp_keypair", spy)
    pool = KeyPairPool([MODP2048, X25519], seeded_rng(5), depth=2)
    taken: list[Any] = []
    workers: list[int | None] = []

    async def scenario() -> None:
        assert pool.take(MODP2048) is None  # not started: the IKE SA makes its own pair
        assert pool.worker_pid is None
        pool.start(asyncio.get_running_loop())
        workers.append(pool.worker_pid)
        await _until(lambda: pool.ready(MODP2048) == 2)
        first, second = pool.take(MODP2048), pool.take(MODP2048)
        assert pool.take(MODP2048) is None  # both handed out; the refill has not come back yet
        await _until(lambda: pool.ready(MODP2048) == 2)
        third = pool.take(MODP2048)
        assert first is not None and second is not None and third is not None
        taken.extend((first, second, third))
        assert pool.take(X25519) is None and pool.ready(X25519) == 0  # cheap groups are not pooled
        assert pool.take(MODP3072) is None  # a MODP group not configured is served from then on
        await _until(lambda: pool.ready(MODP3072) == 2)
        assert pool.worker_pid == workers[0]  # one worker for every group
        pool.close()
        assert pool.take(MODP2048) is None and pool.ready(MODP2048) == 0 and pool.worker_pid is None

    assert _run(scenario()) == []
    assert here == []
    (pid,) = workers
    assert pid is not None and pid != os.getpid() and not Path(f"/proc/{pid}").exists()  # another process, gone
    monkeypatch.undo()
    # the exponents come from the pool's rng on the loop, in order: the same pairs as generate() in a row
    rng = seeded_rng(5)
    assert [pub for _, pub in taken] == [MODP2048.generate(rng)[1] for _ in range(3)]
    (a, pub_a), (b, pub_b) = taken[:2]
    assert MODP2048.shared(a, pub_b) == MODP2048.shared(b, pub_a)
    # made: 4 + 2 of MODP3072, and the refill after the third take unless close() came first
    assert pool.stats["missed"] == 3 and pool.stats["taken"] == 3 and pool.stats["made"] in (6, 7)
    assert pool.stats["worker_started"] == 1 and "worker_died" not in pool.stats


def test_no_worker_without_a_modp_group() -> None:
    pool = KeyPairPool([X25519, GROUPS[19]], seeded_rng(1))

    async def scenario() -> None:
        pool.launch()
        pool.start(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        assert pool.worker_pid is None and pool.take(X25519) is None
        pool.close()

    assert _run(scenario()) == []
    assert "worker_started" not in pool.stats


def test_close_with_work_in_flight_is_quiet_and_a_failure_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = KeyPairPool([MODP2048], seeded_rng(6), depth=3)
    pids: list[int | None] = []

    async def closing() -> None:
        pool.launch()  # as the agent does before a privilege drop: the worker starts before the loop is used
        pids.append(pool.worker_pid)
        pool.start(asyncio.get_running_loop())
        await asyncio.sleep(0)
        pool.close()  # three exponentiations queued or running
        await asyncio.sleep(0.2)
        assert pool.ready(MODP2048) == 0

    assert _run(closing()) == []
    assert pids[0] is not None and not Path(f"/proc/{pids[0]}").exists()  # killed and reaped

    # the worker refuses an exponent outside [2, p-2]: counted, and not retried before the next take
    monkeypatch.setattr(Group, "modp_exponent", lambda self, rng: 1)
    failing = KeyPairPool([MODP2048], seeded_rng(7), depth=1)

    async def failure() -> None:
        failing.start(asyncio.get_running_loop())
        await _until(lambda: failing.stats.get("failed") == 1)
        assert failing.take(MODP2048) is None  # the caller makes its own; the pool tries once more
        await _until(lambda: failing.stats.get("failed") == 2)
        failing.close()

    assert _run(failure()) == []
    assert "worker_died" not in failing.stats  # a refusal is an answer: the worker stays


def test_a_killed_worker_is_replaced_a_bounded_number_of_times() -> None:
    logged: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **kw: Any) -> None:
            logged.append((event, kw))

    pool = KeyPairPool([MODP2048], seeded_rng(8), depth=2, max_restarts=1, log=Log())
    pairs: list[Any] = []

    async def scenario() -> None:
        pool.start(asyncio.get_running_loop())
        await _until(lambda: pool.ready(MODP2048) == 2)
        first = pool.worker_pid
        assert first is not None
        pairs.append(pool.take(MODP2048))  # its refill goes to the worker that is about to die
        await asyncio.sleep(0)
        os.kill(first, signal.SIGKILL)
        await _until(lambda: pool.stats.get("worker_died") == 1)
        await _until(lambda: pool.ready(MODP2048) == 2)  # a new worker filled the pool again
        second = pool.worker_pid
        assert second is not None and second != first and not Path(f"/proc/{first}").exists()
        pairs.append(pool.take(MODP2048))
        await asyncio.sleep(0)
        os.kill(second, signal.SIGKILL)
        await _until(lambda: pool.stats.get("worker_died") == 2)
        await asyncio.sleep(0.1)
        assert pool.worker_pid is None  # no third worker: max_restarts = 1
        pairs.append(pool.take(MODP2048))  # the pairs made before are still handed out ...
        while pool.ready(MODP2048):
            pairs.append(pool.take(MODP2048))
        assert pool.take(MODP2048) is None  # ... then the IKE SAs make their own
        await asyncio.sleep(0.1)
        assert pool.worker_pid is None
        pool.close()

    assert _run(scenario()) == []
    assert pool.stats["worker_started"] == 2 and pool.stats["worker_died"] == 2
    assert [kw["restarts_left"] for event, kw in logged if event == "ike key-pair worker died"] == [1, 0]
    assert all(kw["exit_code"] == -signal.SIGKILL for _, kw in logged)
    assert len(pairs) >= 3 and all(p is not None for p in pairs)
    (a, pub_a), (b, pub_b) = pairs[0], pairs[-1]  # made by the first and by the second worker
    assert MODP2048.shared(a, pub_b) == MODP2048.shared(b, pub_a)


def test_worker_frames() -> None:
    p = MODP2048.prime
    x = 0x1234567
    assert kexworker.answer(14, x.to_bytes(256, "big")) == b"\x00" + pow(2, x, p).to_bytes(256, "big")
    for bad in (0, 1, p - 1, p, (1 << 2048) - 1):  # outside [2, p-2]
        assert kexworker.answer(14, bad.to_bytes(256, "big")) == b"\x01"
    r, w = os.pipe()
    r2, w2 = os.pipe()
    os.write(w, b"\x0e" + (3).to_bytes(256, "big") + b"\x13")  # one request, then a group that is not MODP
    os.close(w)
    kexworker.serve(r, w2)  # returns at the frame it cannot read
    os.close(w2)
    assert os.read(r2, 1000) == b"\x00" + (8).to_bytes(256, "big")
    for fd in (r, r2):
        os.close(fd)


@pytest.mark.root
def test_the_worker_runs_as_the_user_without_capabilities() -> None:
    """Started by root (before the daemon drops to ``[agent] user``), it becomes that user with no capability
    and no_new_privs before it computes anything; without a user it keeps root's ids but not its capabilities."""
    seen: dict[str, dict[str, str]] = {}
    nobody = privs.lookup("nobody")

    async def scenario(user: privs.Account | None, key: str) -> None:
        pool = KeyPairPool([MODP2048], seeded_rng(9), depth=1)
        pool.launch(user)
        pool.start(asyncio.get_running_loop())
        await _until(lambda: pool.ready(MODP2048) == 1)  # the first answer comes after the worker's confinement
        pid = pool.worker_pid
        assert pid is not None
        seen[key] = _status(pid)
        pool.close()

    assert _run(scenario(nobody, "nobody")) == [] and _run(scenario(None, "root")) == []
    for key, uid in (("nobody", nobody.uid), ("root", 0)):
        st = seen[key]
        assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(st[cap], 16) == 0, f"{key}: {cap} = {st[cap]}"
        assert st["NoNewPrivs"] == "1"
    assert seen["nobody"]["Gid"].split() == [str(nobody.gid)] * 4
    assert "0" not in seen["nobody"]["Groups"].split()
