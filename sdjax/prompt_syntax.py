"""The WebUI's prompt editing, alternation and composable ``AND``, read as its ``prompt_parser``
reads them (our own parser; the WebUI's is a lark grammar):

- ``[a:b:when]`` is ``a`` up to step ``when``, then ``b``; ``[a::when]`` drops ``a`` after it,
  ``[:b:when]`` (or ``[b:when]``) adds ``b`` after it. ``when`` with a ``.`` is a fraction of
  the steps, without one a step number (``int`` of either, capped at the steps; an end below 1
  is dropped from the schedule). Groups nest, in either part and inside ``(x:1.2)``.
- ``[a|b|c]`` switches every step (step ``s`` takes option ``(s - 1) % n``); empty options are
  allowed (``[fe|]male``).
- Everything else (emphasis, ``BREAK``, escapes ``\\[``) is kept as text for the attention parser
  (:func:`sdjax.prompts.parse_attention`). Malformed groups are text; a prompt that the grammar
  cannot read at all (a ``|`` outside an alternation, a lone trailing backslash) is one plain
  schedule entry: never an error.
- ``a AND b :0.7`` (:func:`split_and`): sub-prompts with weights, for the composable guidance
  ``uncond + scale * sum_i w_i (cond_i - uncond)``. Negative prompts are not split.

:func:`prompt_schedules` returns exactly the WebUI's ``get_learned_conditioning_prompt_schedules``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

# The grammar's SIGNED_NUMBER (lark's common.lark) after an optional run of whitespace, then
# optional whitespace and the closing bracket of a scheduled group.
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
# A run of the grammar's ``plain`` text: anything but \ [ ] ( ) : |, or an escaped character
# (the escape's "." does not match a newline).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_STRAY = "[]():"  # the characters the top level may hold outside any group
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class Scheduled(NamedTuple):
    before: list | None
    after: list
    when: str  # the number's text ("." in it: a fraction)


class Alternate(NamedTuple):
    options: list


Node = str | Scheduled | Alternate | list


class _Parser:
    """Recursive descent with the grammar's choices: inside a group the reading is unique (its
    brackets must balance and its separators say its kind); at the top level a bracket that
    opens a group that parses is that group (the reading the WebUI's parser resolves to), and
    is otherwise a stray character kept as text."""

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.groups: dict[int, tuple[Node, int] | None] = {}

    def prompt(self, i: int) -> tuple[list[Node], int] | None:
        """A nested prompt from ``i`` up to the first ``: | ] )`` outside its groups (or the end):
        (its nodes, where it stopped), or None when a group in it does not parse."""
        s, nodes = self.s, []
        while i < self.n and s[i] not in ":|])":
            if s[i] in "[(":
                got = self.group(i)
                if got is None:
                    return None
                nodes.append(got[0])
                i = got[1]
                continue
            m = _PLAIN.match(s, i)
            if m is None:  # a backslash before a newline or at the end
                return None
            nodes.append(m.group(0))
            i = m.end()
        return nodes, i

    def group(self, i: int) -> tuple[Node, int] | None:
        if i not in self.groups:
            self.groups[i] = self._group(i)
        return self.groups[i]

    def _group(self, i: int) -> tuple[Node, int] | None:
        s, n = self.s, self.n
        first = self.prompt(i + 1)
        if first is None:
            return None
        p1, k = first
        if s[i] == "(":  # emphasis: (p) or (p:p), kept as text
            if k < n and s[k] == ")":
                return ["(", *p1, ")"], k + 1
            if k < n and s[k] == ":":
                second = self.prompt(k + 1)
                if second is not None and second[1] < n and s[second[1]] == ")":
                    return ["(", *p1, ":", *second[0], ")"], second[1] + 1
            return None
        if k >= n:
            return None
        if s[k] == "]":
            return ["[", *p1, "]"], k + 1
        if s[k] == "|":
            options = [p1]
            while k < n and s[k] == "|":
                got = self.prompt(k + 1)
                if got is None:
                    return None
                options.append(got[0])
                k = got[1]
            if k < n and s[k] == "]":
                return Alternate(options), k + 1
            return None
        if s[k] != ":":
            return None
        when = _WHEN.match(s, k + 1)
        if when is not None:  # [after:when]
            return Scheduled(None, p1, when.group(1)), when.end()
        second = self.prompt(k + 1)
        if second is None:
            return None
        p2, m = second
        if m < n and s[m] == ":":
            when = _WHEN.match(s, m + 1)
            if when is not None:
                return Scheduled(p1, p2, when.group(1)), when.end()
        return None

    def top(self) -> list[Node] | None:
        """The whole prompt at the top level, or None if it cannot be read. A bracket that
        opens a group that parses is that group, else a stray character. No backtracking is
        needed: a group ends where a stray reading of its characters would also be at the top
        level again, and its separators only make that reading worse."""
        s, nodes, i = self.s, [], 0
        while i < self.n:
            c = s[i]
            got = self.group(i) if c in "[(" else None
            if got is not None:
                nodes.append(got[0])
                i = got[1]
            elif c in _STRAY:
                nodes.append(c)
                i += 1
            else:
                m = _PLAIN.match(s, i)
                if m is None:  # "|" outside an alternation, or a bad backslash
                    return None
                nodes.append(m.group(0))
                i = m.end()
        return nodes


def parse(text: str) -> list[Node] | None:
    """The prompt's tree (text, :class:`Scheduled` and :class:`Alternate` nodes), or None where
    the WebUI's grammar cannot read it (then it is one plain prompt)."""
    try:
        return _Parser(text).top()
    except RecursionError:  # brackets nested deeper than Python recurses: text
        return None


def _end(when: str, steps: int, offset: tuple[float, float]) -> int:
    """The last step of a scheduled group's first part: the WebUI's ``min(steps, int(v))``."""
    v = float(when)
    v = (v - offset[1]) * steps if "." in when else v - offset[0]
    if math.isnan(v):
        return 0
    return steps if v >= steps else int(max(v, -1))


def _walk(nodes: Sequence[Node], steps: int, offset, ends: set[int]) -> None:
    for node in nodes:
        if isinstance(node, Scheduled):
            end = _end(node.when, steps, offset)
            if end >= 1:
                ends.add(end)
            _walk(node.before or (), steps, offset, ends)
            _walk(node.after, steps, offset, ends)
        elif isinstance(node, Alternate):
            ends.update(range(1, steps + 1))
            for option in node.options:
                _walk(option, steps, offset, ends)
        elif isinstance(node, list):
            _walk(node, steps, offset, ends)


def _text(nodes: Sequence[Node], step: int, steps: int, offset) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            part = node.before if step <= _end(node.when, steps, offset) else node.after
            out.append(_text(part or (), step, steps, offset))
        elif isinstance(node, Alternate):
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps, offset))
        else:
            out.append(_text(node, step, steps, offset))
    return "".join(out)


def prompt_schedules(prompts: Sequence[str], steps: int,
                     hires_steps: int | None = None) -> list[list[list]]:
    """The WebUI's ``get_learned_conditioning_prompt_schedules``: for each prompt, its schedule
    ``[[end_step, text], ...]`` in order of end step, the last ending at ``steps``. A sampler
    evaluation ``j`` (counted from 0) uses the first entry whose end is >= ``j``.

    ``hires_steps``: the schedule of a hires fix's second pass of that many steps after a first
    pass of ``steps`` (the WebUI's rule: step numbers less ``steps``, fractions less 1.0).

    >>> prompt_schedules(["a [b:c:2] [d|e]"], 4)
    [[[1, 'a b d'], [2, 'a b e'], [3, 'a c d'], [4, 'a c e']]]
    """
    offset = (0, 0.0) if hires_steps is None else (steps, 1.0)
    total = steps if hires_steps is None else hires_steps
    cache: dict[str, list[list]] = {}
    for prompt in prompts:
        if prompt in cache:
            continue
        tree = parse(prompt)
        if tree is None:
            cache[prompt] = [[total, prompt]]
            continue
        ends = {total}
        _walk(tree, total, offset, ends)
        cache[prompt] = [[end, _text(tree, end, total, offset)] for end in sorted(ends)]
    return [[list(entry) for entry in cache[p]] for p in prompts]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The WebUI's ``get_multicond_prompt_list`` for one prompt: its ``AND``-separated
    sub-prompts, each with the weight written after it as ``:w`` (default 1; the text keeps
    its leading space and loses its trailing one)."""
    parts = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.search(sub)
        text, weight = m.groups() if m is not None else (sub, None)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts
