"""Packet I/O backends (TUN, NFQUEUE, raw sockets, UDP, in-memory pipes).

Each backend implements the runtime's batched I/O protocols for the inner (plaintext) and/or outer
(protected) plane; the core never imports a backend. See ``DESIGN.md`` §3.
"""
