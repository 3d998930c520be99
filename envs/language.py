"""Instruction templates, the fixed vocabulary and tokenisation for the tabletop suite.

Every template is a word sequence with ``{c}`` (one colour) or ``{c1}``/``{c2}`` (two colours)
slots. Per task, the first templates are used in training variants; the ``HELD_OUT`` last ones
appear only in the ``paraphrase`` variant, so wording shifts are a genuine out-of-distribution
test.
"""

from __future__ import annotations

import functools

import numpy as np

INSTRUCTION_LEN = 16
COLOURS = ("red", "green", "blue", "yellow")
PAD = "<pad>"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "reach": (
        "reach the {c} block",
        "move to the {c} block",
        "go to the {c} cube",
        "touch the {c} block with the gripper",
        # held out
        "bring the gripper over the {c} cube",
        "approach the {c} object",
    ),
    "push": (
        "push the {c} block into the zone",
        "slide the {c} block to the target zone",
        "push the {c} cube onto the goal",
        # held out
        "nudge the {c} object into the target area",
        "shove the {c} cube to the goal zone",
    ),
    "pick_place": (
        "put the {c} block in the zone",
        "pick up the {c} block and place it in the zone",
        "place the {c} cube on the goal",
        "move the {c} block to the target zone",
        # held out
        "grab the {c} object and drop it on the goal area",
        "carry the {c} cube into the target area",
    ),
    "sort": (
        "sort the {c1} and {c2} blocks into their matching zones",
        "place the {c1} block and the {c2} block in their zones",
        "put the {c1} cube and the {c2} cube on the zones of the same colour",
        # held out
        "move the {c1} and {c2} objects to the areas with their colour",
        "each of the {c1} and {c2} cubes goes to its matching area",
    ),
}
HELD_OUT = 2  # the last two templates of every task

for _task, _ts in TEMPLATES.items():
    for _t in _ts:
        assert len(_t.split()) <= INSTRUCTION_LEN, (_task, _t)


def _vocab() -> tuple[str, ...]:
    words = set(COLOURS)
    for ts in TEMPLATES.values():
        for t in ts:
            words.update(w for w in t.split() if not w.startswith("{"))
    return (PAD, *sorted(words))


VOCAB: tuple[str, ...] = _vocab()
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str) -> np.ndarray:
    """Words -> int32 [INSTRUCTION_LEN], right-padded with 0."""
    words = text.split()
    unknown = [w for w in words if w not in WORD_ID]
    if unknown:
        raise ValueError(f"instruction: unknown words {unknown}; the vocabulary is envs.VOCAB")
    if len(words) > INSTRUCTION_LEN:
        raise ValueError(f"instruction: {len(words)} words, at most {INSTRUCTION_LEN} allowed")
    ids = np.zeros(INSTRUCTION_LEN, np.int32)
    ids[: len(words)] = [WORD_ID[w] for w in words]
    return ids


def decode_instruction(ids) -> str:
    """int ids [L] (padding 0 anywhere is skipped) -> the instruction text."""
    return " ".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1) if int(i) != 0)


def templates(task: str, held_out: bool) -> tuple[str, ...]:
    ts = TEMPLATES[task]
    return ts[-HELD_OUT:] if held_out else ts[:-HELD_OUT]


@functools.cache
def instruction_table(task: str, held_out: bool) -> np.ndarray:
    """All filled templates: int32 [T, C, C, L] indexed by (template, colour1, colour2).

    Single-colour tasks ignore the second colour index (rows repeat), so reset can gather
    with one code path for every task.
    """
    ts = templates(task, held_out)
    n = len(COLOURS)
    table = np.zeros((len(ts), n, n, INSTRUCTION_LEN), np.int32)
    for i, t in enumerate(ts):
        for a in range(n):
            for b in range(n):
                text = t.format(c=COLOURS[a], c1=COLOURS[a], c2=COLOURS[b])
                table[i, a, b] = tokenize(text)
    table.setflags(write=False)
    return table
