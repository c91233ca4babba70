"""Prometheus metrics, off unless ``[agent] metrics = "host:port"`` is set.

Theory of operation: nothing is counted twice and nothing is added to the packet path. A custom
collector reads the live counters the datapath, the SAs and the IKE manager already keep, at scrape
time: per connection up/down (configured connections that are down show 0), per SA packets, bytes
and drops by reason, datapath drops by reason, the native forwarder's packets and punts, IKE SAs by
state, half-open SAs, cookies, retransmissions and failures by kind. The HTTP server is
prometheus-client's own (a thread).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class IpsecCollector(Collector):
    def __init__(self, node: Any, ike: Any) -> None:
        self.node = node
        self.ike = ike

    def collect(self) -> Iterator[Any]:
        dp = self.node.datapath
        up = GaugeMetricFamily("ipsecstack_connection_up", "1 if the connection has an established SA",
                               labels=["connection"])  # fmt: skip
        ike_sas = GaugeMetricFamily("ipsecstack_ike_sas", "IKE SAs by state", labels=["state"])
        ike_events = CounterMetricFamily("ipsecstack_ike_events", "IKE events and failures by kind", labels=["kind"])
        if self.ike is not None:
            mgr = self.ike.manager
            sas = list(mgr.sas.values())
            for name in list(mgr.peers):
                up.add_metric([name], 1.0 if any(s.established and s.cfg.name == name for s in sas) else 0.0)
            states: dict[str, int] = {}
            totals: dict[str, int] = dict(mgr.stats)
            for s in sas:
                states[s.state] = states.get(s.state, 0) + 1
                for k, v in list(s.stats.items()):
                    totals[k] = totals.get(k, 0) + v
            for state in ("init_sent", "init_done", "auth_sent", "established", "deleting"):
                ike_sas.add_metric([state], float(states.get(state, 0)))
            for k, v in sorted(totals.items()):
                ike_events.add_metric([k], float(v))
        yield up
        yield ike_sas
        yield ike_events
        drops = CounterMetricFamily("ipsecstack_datapath_drops", "Packets dropped by the datapath", labels=["reason"])
        dp.refresh()
        for reason, n in sorted(dp.drop_totals().items()):
            drops.add_metric([reason], float(n))
        yield drops
        labels = ["connection", "spi", "direction"]
        pk = CounterMetricFamily("ipsecstack_sa_packets", "Packets through an SA", labels=labels)
        by = CounterMetricFamily("ipsecstack_sa_bytes", "Bytes through an SA", labels=labels)
        sd = CounterMetricFamily("ipsecstack_sa_drops", "Packets an SA refused, by reason", labels=[*labels, "reason"])
        for sa in list(dp.sad):
            lab = [sa.name or "", f"0x{sa.spi:08x}", sa.direction or ""]
            pk.add_metric(lab, float(sa.packets))
            by.add_metric(lab, float(sa.bytes))
            for reason, n in sorted(dict(sa.drops).items()):
                sd.add_metric([*lab, reason], float(n))
        yield pk
        yield by
        yield sd
        fwd = self.node.forwarder.stats() if getattr(self.node, "forwarder", None) is not None else None
        if fwd is not None:
            carried = CounterMetricFamily("ipsecstack_forwarder_packets", "Packets the native engine's threads carried "
                                          "alone", labels=["direction"])  # fmt: skip
            carried.add_metric(["out"], float(fwd.get("out_packets", 0)))
            carried.add_metric(["in"], float(fwd.get("in_packets", 0)))
            yield carried
            punts = CounterMetricFamily("ipsecstack_forwarder_punts", "Packets the native engine's threads handed "
                                        "to Python", labels=["kind"])  # fmt: skip
            for kind, n in sorted((fwd.get("punts") or {}).items()):
                punts.add_metric([kind], float(n))
            punts.add_metric(["dropped"], float(fwd.get("punt_dropped", 0)))
            yield punts


def registry_for(node: Any, ike: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(IpsecCollector(node, ike))
    return reg


def serve(listen: str, node: Any, ike: Any) -> Any:
    """Start the HTTP endpoint on ``host:port``; returns the server (call ``shutdown()`` to stop)."""
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(
        int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry_for(node, ike)
    )
    return server
