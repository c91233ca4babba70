"""The IKE core stays in modules one can read whole (issue #11: none over ~400 lines).

A module that outgrows this has more than one job: split it along one (as ``ike/payloads.py`` from
``ike/message.py`` and ``ike/reauth.py`` from ``ike/manager.py`` were), do not raise the limit.
"""

from __future__ import annotations

from pathlib import Path

IKE = Path(__file__).resolve().parents[2] / "ipsecstack" / "ike"
LIMIT = 400


def test_no_ike_module_is_over_the_limit() -> None:
    sizes = {str(p.relative_to(IKE)): len(p.read_text().splitlines()) for p in sorted(IKE.rglob("*.py"))}
    assert "session.py" in sizes and "tasks/ike_auth.py" in sizes
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"ipsecstack/ike modules over {LIMIT} lines: {over}"
