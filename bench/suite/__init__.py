"""The benchmark suite behind ``python3 bench/run.py`` and ``ipsecstack bench --scenario ...``.

One module per scenario (``micro``, ``backend``, ``tunnel``, ``flood``, ``handshake``, ``compare``), the
three traffic paths they run over (``paths``: plain veth, ipsecstack on both ends, strongSwan on both ends),
the measuring tools they share (``common``: iperf3, ping, /proc sampling, the result rows) and the output
(``report``: terminal table, JSON, PNG plots). Benchmarks measure; nothing here asserts a timing.
"""
