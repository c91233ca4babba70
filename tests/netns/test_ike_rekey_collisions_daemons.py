"""Two daemons in namespaces rekey their IKE SA at the same moment (RFC 7296 §2.8.2), round after round, under ping.

Both have ``rekey_time = "6s"`` and ``rand_time = 0`` (strongSwan's meaning: nothing random subtracted), so
both schedule each rekey for the same instant, give or take the milliseconds between the two ends taking
over the IKE SA. Which request reaches the other end first would then be left to scheduling noise; the
network decides it instead, in two ways (neither touches ESP, nor the daemons):

- "delay": IKE (UDP 500, and the non-ESP-marker datagrams on 4500) to and from A is held 0.2 s each way
  (tests/netns/ikedelay.py, NFQUEUE): the two requests are in flight together, each end answers the
  other's while its own is out, three IKE SAs exist at each end and the nonces pick the survivor;
- "drop": the same IKE is dropped for 0.3 s on each side of the rekey time: both requests are lost, and
  the first retransmission to arrive is answered by an end whose own request is out (it notices); the
  other end finishes first and refuses the late request with TEMPORARY_FAILURE (§2.8.2's special case).
  The two retransmissions may also cross again on the wire: then the round plays out as a "delay" round.

After each round both daemons hold one IKE SA, the same one, with the child SA; the ping loses at most
one echo over all rounds.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import nsutil
from tests.netns.test_ike_actions import _cli, _configs, _wait_children
from tests.netns.test_ike_tunnel import _start
from tests.netns.test_tunnel import Daemon

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MODES = ["delay", "delay", "drop", "drop"]  # one IKE SA rekey (collision) each
DELAY = 0.2  # seconds each IKE datagram to or from A is held in "delay" rounds
BLOCK = 0.3  # seconds of dropped IKE on each side of the rekey time in "drop" rounds (retransmission after 1 s)
QUEUE = 17  # the NFQUEUE of ikedelay in A's namespace
# both ends alike: rekey exactly 6 s after taking over; over_time well past the retransmissions
CONN = 'rekey_time = "6s"\nrand_time = 0\nover_time = "20s"'
NON_ESP_MARKER = "0>>22&0x3C@8=0"  # the first 4 bytes of the UDP payload are zero: IKE on 4500 (RFC 3948 §2.2)
COLLISION = "ike sa rekey collision resolved"


def _sas(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    r = _cli("list-sas", "--json", "--socket", f"{tmp_path / name}.sock")
    assert r.returncode == 0, r.stderr
    return [e for e in json.loads(r.stdout) if "children" in e]


def _settled(tmp_path: Path, not_spi: str | None, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait (bounded) for one established IKE SA on each side, the same one (SPIs), other than ``not_spi``, with its
    child SA; returns the two listings."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sa_a, sa_b = _sas(tmp_path, "a"), _sas(tmp_path, "b")
        if len(sa_a) == len(sa_b) == 1:
            a, b = sa_a[0], sa_b[0]
            same = (a["spi_i"], a["spi_r"]) == (b["spi_i"], b["spi_r"]) and a["spi_i"] != not_spi
            if same and a["state"] == b["state"] == "established" and len(a["children"]) == len(b["children"]) == 1:
                return a, b
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for one shared IKE SA {what}")


def _ike_rules(target: list[str]) -> list[tuple[str, list[str]]]:
    """iptables rules (chain, rule) sending IKE to and from the namespace to ``target``."""
    match = [["-p", "udp", "--dport", "500"], ["-p", "udp", "--dport", "4500", "-m", "u32", "--u32", NON_ESP_MARKER]]
    return [(chain, [*m, "-j", *target]) for chain in ("INPUT", "OUTPUT") for m in match]


@contextlib.contextmanager
def _rules(ns: nsutil.Netns, rules: list[tuple[str, list[str]]]) -> Iterator[None]:
    added = []
    try:
        for chain, rule in rules:
            ns.run("iptables", "-I", chain, *rule)
            added.append((chain, rule))
        yield
    finally:
        for chain, rule in added:
            ns.run("iptables", "-D", chain, *rule, check=False)


@contextlib.contextmanager
def _delayer(ns: nsutil.Netns) -> Iterator[list[tuple[str, list[str]]]]:
    """Start ikedelay.py in the namespace (it holds what reaches its queue DELAY seconds); yields the rules that
    send IKE to and from the namespace through it (see ``_rules``). Always stopped."""
    proc = ns.popen(sys.executable, "-m", "tests.netns.ikedelay", str(QUEUE), str(DELAY), "170")
    try:
        ready = select.select([proc.stdout], [], [], 20)[0]
        assert ready and proc.stdout is not None and proc.stdout.readline() == b"ready\n", proc.poll()
        yield _ike_rules(["NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _round(tmp_path: Path, pair: nsutil.Pair, mode: str, sas: tuple[dict[str, Any], dict[str, Any]], da: Daemon,
           db: Daemon) -> tuple[tuple[dict[str, Any], dict[str, Any]], bool]:  # fmt: skip
    """Let the rekeys of the IKE SA both ends share (``sas``, as listed) collide (``mode``); wait for one IKE SA
    shared again, a new one, and for the collision to be logged as resolved. Returns the new listings and whether
    the requests crossed (each end answered the other's while its own was out: both noticed, and each made a
    redundant IKE SA it then closed)."""
    at_a, at_b = sas[0]["rekey_at"], sas[1]["rekey_at"]
    assert at_a is not None and at_b is not None and abs(at_a - at_b) < 0.1, (at_a, at_b)  # no jitter
    when = max(at_a, at_b)  # on the daemons' monotonic clock, which is ours too
    assert when - BLOCK > time.monotonic(), (when, time.monotonic())
    before = (da.output().count(COLLISION), db.output().count(COLLISION))
    time.sleep(when - BLOCK - time.monotonic())
    if mode == "drop":
        with _rules(pair.a, _ike_rules(["DROP"])):
            time.sleep(max(0.0, when + BLOCK - time.monotonic()))
    after = _settled(tmp_path, sas[0]["spi_i"], f"after a {mode} round\n{da.output()}\n{db.output()}")
    now = (da.output().count(COLLISION), db.output().count(COLLISION))
    if mode == "delay":  # both ends answered the other's request while their own was out: both noticed
        assert now[0] == before[0] + 1 and now[1] == before[1] + 1, (before, now, da.output(), db.output())
    else:  # the end that answered while its own request was out noticed; with the requests dropped for a
        # while, the retransmissions can cross again, so the other end may notice as well
        assert sum(before) + 1 <= sum(now) <= sum(before) + 2, (before, now, da.output(), db.output())
    return after, sum(now) - sum(before) == 2


def test_simultaneous_ike_rekeys_settle_on_one_shared_sa_under_ping(tmp_path: Path) -> None:
    with nsutil.netns_pair("rc") as pair, _delayer(pair.a) as delayed:
        a, b = (
            c.replace("retransmit_timeout = 0.5", "retransmit_timeout = 1.0")  # > twice DELAY
            for c in _configs(pair, tmp_path, a_conn=CONN, b_conn=CONN)
        )
        da, db = _start(pair, tmp_path, a, b)
        try:
            _wait_children((da, 1), (db, 1))
            for n in ("a", "b"):
                nsutil.wait_for(lambda n=n: Path(f"{tmp_path / n}.sock").exists(), timeout=10,  # type: ignore[misc]
                                what=f"control socket {n}")  # fmt: skip
            # ~27 s of pings at 10/s: the rounds below come every ~6.5 s from the IKE SA's start
            ping = pair.a.popen("ping", "-n", "-c", "270", "-i", "0.1", "-W", "2", "-I", "10.1.0.1", "10.2.0.1")
            sas = _settled(tmp_path, None, f"at the start\n{da.output()}\n{db.output()}")
            first = sas[0]
            crossed = 0  # rounds in which both ends noticed (every "delay" round, a "drop" round at times)
            with _rules(pair.a, delayed):  # only now: the IKE SA came up without the delay, at once at both ends
                for mode in MODES[:2]:
                    sas, both = _round(tmp_path, pair, mode, sas, da, db)
                    crossed += both
            for mode in MODES[2:]:
                sas, both = _round(tmp_path, pair, mode, sas, da, db)
                crossed += both
            log_a, log_b = da.output(), db.output()
            logs = log_a + log_b
            out, _ = ping.communicate(timeout=60)
            text = out.decode(errors="replace")
            m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
            assert m is not None, text
            sent, recv = int(m.group(1)), int(m.group(2))
            assert sent - recv <= 1, f"lost {sent - recv} of {sent} pings in {len(MODES)} IKE rekey collisions:\n{logs}"
            # every round: one rekey per end (one IkeRekeyed each), the old IKE SA closed at both ends; the rounds
            # whose requests crossed also made a redundant IKE SA (closed at both ends), the others did not
            n = len(MODES)
            assert crossed >= MODES.count("delay"), (crossed, logs)
            for what, want in (("ike sa rekeyed", n), ("old ike sa closed after rekey", n),
                               ("redundant ike sa closed", crossed)):  # fmt: skip
                assert [x.count(what) for x in (log_a, log_b)] == [want, want], f"{what}\n{logs}"
            assert logs.count(COLLISION) == n + crossed, logs
            assert first["spi_i"] not in json.dumps(_sas(tmp_path, "a") + _sas(tmp_path, "b"))
            # the child SA was never touched, and nothing went down
            assert log_a.count("child sa installed") == log_b.count("child sa installed") == 1, logs
            for bad in ("ike sa down", "child sa removed", "trap armed", "connection restarted", "failed"):
                assert bad not in logs, logs
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
