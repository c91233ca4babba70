"""The IKE SA's lifecycle table (ike/state.py): complete, closed under CLOSE, and what docs/ike.md draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipsecstack.ike.state import TRANSITIONS, IkeState, IllegalTransition, Step, advance, mermaid

DOC = Path(__file__).resolve().parents[2] / "docs" / "ike.md"


@pytest.mark.parametrize("state", list(IkeState))
@pytest.mark.parametrize("step", list(Step))
def test_every_pair_is_a_move_or_a_refusal(state: IkeState, step: Step) -> None:
    if (state, step) in TRANSITIONS:
        assert advance(state, step) is TRANSITIONS[(state, step)]
    else:
        with pytest.raises(IllegalTransition, match=state.value):
            advance(state, step)


def test_every_state_is_reachable_and_every_one_can_end() -> None:
    seen, todo = {IkeState.NEW}, [IkeState.NEW]
    while todo:
        s = todo.pop()
        for (src, _step), dst in TRANSITIONS.items():
            if src is s and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(IkeState)
    assert all(TRANSITIONS.get((s, Step.CLOSE)) is IkeState.CLOSED for s in IkeState if s is not IkeState.CLOSED)
    assert not [k for k in TRANSITIONS if k[0] is IkeState.CLOSED]  # nothing leaves CLOSED


def test_the_states_are_the_strings_logs_and_listings_show() -> None:
    assert [s.value for s in IkeState] == ["new", "init_sent", "init_done", "auth_sent", "established", "deleting",
                                            "closed"]  # fmt: skip
    assert IkeState.ESTABLISHED == "established" and f"{IkeState.INIT_DONE}" == "init_done"


def test_the_docs_draw_the_table() -> None:
    text = DOC.read_text()
    assert "```mermaid\n" + mermaid() + "```" in text, (
        "regenerate: python -c 'from ipsecstack.ike.state import mermaid; print(mermaid())'"
    )
