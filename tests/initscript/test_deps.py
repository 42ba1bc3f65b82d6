from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.initscript.deps import (
    CycleError,
    MissingRequirementError,
    blocked_by,
    levels,
    start_order,
    stop_order,
    with_dependents,
    with_requirements,
)

REQS = {"a": (), "b": ("a",), "c": ("b",), "d": (), "e": ("a", "d")}


def test_requirements_come_first_and_ties_keep_name_order() -> None:
    assert start_order(REQS, REQS) == ["a", "b", "c", "d", "e"]
    assert stop_order(REQS, REQS) == ["e", "d", "c", "b", "a"]


def test_closures() -> None:
    assert with_requirements(["c"], REQS) == {"a", "b", "c"}
    assert with_dependents(["a"], REQS) == {"a", "b", "c", "e"}


def test_only_chosen_names_are_ordered() -> None:
    assert start_order(["c", "e"], REQS) == ["c", "e"]


def test_cycle_is_reported_as_a_path() -> None:
    with pytest.raises(CycleError) as caught:
        start_order(["x"], {"x": ("y",), "y": ("z",), "z": ("x",)})
    assert str(caught.value) == "dependency cycle: x -> y -> z -> x"


def test_self_requirement_is_a_cycle() -> None:
    with pytest.raises(CycleError, match="a -> a"):
        start_order(["a"], {"a": ("a",)})


def test_missing_requirement_names_both() -> None:
    with pytest.raises(MissingRequirementError, match="b requires ghost, which is not a script"):
        start_order(["b"], {"b": ("ghost",)})


def test_blocked_by_direct_then_indirect_failure() -> None:
    assert blocked_by("c", {"b"}, REQS) == "b"
    assert blocked_by("c", {"a"}, REQS) == "a"
    assert blocked_by("d", {"a"}, REQS) is None


def test_long_chain_does_not_recurse() -> None:
    chain = {f"s{i}": ((f"s{i - 1}",) if i else ()) for i in range(5000)}
    order = start_order(chain, chain)
    assert order.index("s0") == 0 and order[-1] == "s4999"


@given(
    st.dictionaries(
        st.sampled_from("abcdefgh"), st.lists(st.sampled_from("abcdefgh"), max_size=3), min_size=1
    )
)
def test_any_acyclic_result_respects_every_requirement(raw: dict[str, list[str]]) -> None:
    reqs = {name: tuple(r for r in raw.get(name, []) if r in raw) for name in raw}
    try:
        order = start_order(reqs, reqs)
    except CycleError as error:
        cycle = error.cycle
        assert cycle[0] == cycle[-1]
        assert all(cycle[i + 1] in reqs[cycle[i]] for i in range(len(cycle) - 1))
        return
    assert sorted(order) == sorted(reqs)
    for name, required in reqs.items():
        for req in required:
            assert order.index(req) < order.index(name)


def test_levels_group_what_may_start_together() -> None:
    requires = {"a": [], "b": [], "c": ["a"], "d": ["c", "b"], "e": []}
    order = start_order(requires, requires)
    assert levels(order, requires) == [["a", "b", "e"], ["c"], ["d"]]


def test_levels_follow_requirements_through_scripts_left_out() -> None:
    # x is not being started (already running), yet a needs b through it.
    requires = {"a": ["x"], "x": ["b"], "b": []}
    assert levels(["b", "a"], requires) == [["b"], ["a"]]
