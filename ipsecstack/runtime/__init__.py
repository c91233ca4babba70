"""The asyncio runtime: the only package code that owns tasks, timers and sockets (DESIGN.md §1, §4)."""
