"""Ordering scripts by their requirements (``NAME_REQ``, spec §2.3.3, §4.2.2).

Pure functions over a mapping ``name -> names it requires``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence


class DependencyError(Exception):
    """The requirements cannot be satisfied; str() says why in one line."""


class CycleError(DependencyError):
    """Scripts that require each other in a loop."""

    def __init__(self, cycle: Sequence[str]) -> None:
        super().__init__("dependency cycle: " + " -> ".join(cycle))
        self.cycle = tuple(cycle)


class MissingRequirementError(DependencyError):
    """A script requires a name that is not a script."""

    def __init__(self, script: str, requirement: str) -> None:
        super().__init__(f"{script} requires {requirement}, which is not a script")
        self.script = script
        self.requirement = requirement


def with_requirements(names: Iterable[str], requires: Mapping[str, Sequence[str]]) -> set[str]:
    """``names`` and everything they require, directly or not."""
    found: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        pending.extend(requires.get(name, ()))
    return found


def with_dependents(names: Iterable[str], requires: Mapping[str, Sequence[str]]) -> set[str]:
    """``names`` and every script that requires one of them, directly or not."""
    dependents: dict[str, list[str]] = {}
    for script, reqs in requires.items():
        for req in reqs:
            dependents.setdefault(req, []).append(script)
    return with_requirements(names, dependents)


def start_order(names: Iterable[str], requires: Mapping[str, Sequence[str]]) -> list[str]:
    """``names`` ordered so that every script comes after what it requires.

    Requirements outside ``names`` are not added (use :func:`with_requirements`
    for that) but they are walked, so indirect constraints and cycles count.
    Ties keep name order, so the result is stable. Raises :class:`CycleError`
    or :class:`MissingRequirementError` (for a requirement that is not a key
    of ``requires``).
    """
    chosen = set(names)
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: placed

    def requirements_of(name: str) -> Iterator[str]:
        for req in requires.get(name, ()):
            if req not in requires:
                raise MissingRequirementError(name, req)
        return iter(sorted(requires.get(name, ())))

    for root in sorted(chosen):
        if state.get(root) == 2:
            continue
        # Iterative depth-first walk, so long chains cannot hit the recursion limit.
        path = [root]
        iterators = [requirements_of(root)]
        state[root] = 1
        while path:
            child = next(iterators[-1], None)
            if child is None:
                done = path.pop()
                iterators.pop()
                state[done] = 2
                order.append(done)
            elif state.get(child) == 1:
                start = path.index(child)
                raise CycleError([*path[start:], child])
            elif state.get(child) is None:
                state[child] = 1
                path.append(child)
                iterators.append(requirements_of(child))
    return [name for name in order if name in chosen]


def stop_order(names: Iterable[str], requires: Mapping[str, Sequence[str]]) -> list[str]:
    """The reverse of :func:`start_order`: dependents stop before what they require."""
    return list(reversed(start_order(names, requires)))


def lenient_stop_order(
    names: Iterable[str], requires: Mapping[str, Sequence[str]]
) -> tuple[list[str], list[str]]:
    """A stop order that a broken configuration cannot prevent, and what was wrong.

    Stopping must work even when a ``NAME_REQ`` names a deleted script or the
    requirements loop: unknown requirements are ignored and each cycle is
    broken at its last edge, with one problem line for each.
    """
    problems: list[str] = []
    usable: dict[str, list[str]] = {}
    for name, reqs in requires.items():
        usable[name] = [r for r in reqs if r in requires]
        problems += [str(MissingRequirementError(name, r)) for r in reqs if r not in requires]
    chosen = list(names)
    while True:
        try:
            return stop_order(chosen, usable), problems
        except CycleError as error:
            problems.append(str(error))
            usable[error.cycle[-2]].remove(error.cycle[-1])


def blocked_by(
    script: str, failed: Iterable[str], requires: Mapping[str, Sequence[str]]
) -> str | None:
    """The failed script that ``script`` requires, directly or not, if any.

    A script whose requirement failed must not be started (spec §5.2.3).
    """
    failed_set = set(failed)
    direct = list(requires.get(script, ()))
    indirect = sorted(with_requirements(direct, requires) - set(direct))
    return next((req for req in [*direct, *indirect] if req in failed_set), None)


def levels(order: Sequence[str], requires: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Split a start order into levels that may start together, keeping ``order`` within each.

    A script's level is one more than the highest level of what it requires
    among ``order``, directly or through scripts outside it (0 when it requires
    none of them), so every level needs only earlier levels to be up.
    ``order`` must be a :func:`start_order` (so the graph has no cycle).
    """
    chosen = set(order)
    level: dict[str, int] = {}
    needs: dict[str, int] = {}  # the lowest level a dependent of this script may have

    def need(name: str) -> int:
        if name not in needs:
            needs[name] = 0  # placeholder; the graph is acyclic
            below = [need(r) for r in requires.get(name, ())]
            needs[name] = level[name] + 1 if name in chosen else max(below, default=0)
        return needs[name]

    for name in order:
        level[name] = max((need(r) for r in requires.get(name, ())), default=0)
    grouped: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name in order:
        grouped[level[name]].append(name)
    return grouped
