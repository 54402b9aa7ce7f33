"""A seeded arithmetic task with exact answers and disjoint train / held-out pools.

Every problem is assigned to one pool by a hash of its text, so a problem can never be in both,
whatever the seed or the number of rounds.
"""

from __future__ import annotations

import hashlib
import itertools
import random

from alignpipe.data import TaskData
from alignpipe.records import Prompt

HELDOUT_SHARE = 0.5  # share of each operation's problem space reserved for held-out evaluation


def _operands(op: str, digits: tuple[int, int], mul_range: tuple[int, int]) -> range:
    if op == "*":
        return range(mul_range[0], mul_range[1] + 1)
    return range(10 ** (digits[0] - 1) if digits[0] > 1 else 0, 10 ** digits[1])


def _in_heldout(text: str) -> bool:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < HELDOUT_SHARE


def _problem(operands: tuple[int, ...], op: str, instruction: str) -> Prompt:
    expr = f" {op} ".join(str(x) for x in operands)
    answer = eval(expr)  # noqa: S307 - digits and + - * only, built here
    text = f"What is {expr}? {instruction}".strip()
    return Prompt(id=f"arith:{expr.replace(' ', '')}", prompt=text, task="math", reference=str(answer),
                  meta={"op": op, "expression": expr})


# operand spaces up to this size are enumerated; larger ones (4-digit pairs: 81 million) are sampled, since a run
# draws at most tens of thousands of problems and enumerating took minutes and gigabytes
MAX_ENUMERATED = 100_000


def _combos(values: range, operands: int, seed: str) -> list[tuple[int, ...]]:
    if len(values) ** operands <= MAX_ENUMERATED:
        return list(itertools.product(values, repeat=operands))
    rng = random.Random(seed)  # a str seed is hashed deterministically (sha512), unlike hash()
    drawn = dict.fromkeys(tuple(rng.choice(values) for _ in range(operands)) for _ in range(MAX_ENUMERATED))
    return list(drawn)


def pools(task) -> dict[str, tuple[list[tuple[int, ...]], list[tuple[int, ...]]]]:  # noqa: ANN001
    """Per operation: (train operand tuples, held-out operand tuples); the split is a hash of the problem's
    text, so a sampled space keeps the two pools disjoint too."""
    out = {}
    for op in task.ops:
        values = _operands(op, tuple(task.digits), tuple(task.mul_range))
        train, held = [], []
        for combo in _combos(values, task.operands, f"{task.seed}:{op}"):
            expr = f" {op} ".join(str(x) for x in combo)
            (held if _in_heldout(expr) else train).append(combo)
        out[op] = (train, held)
    return out


def _draw(rng: random.Random, task, pool_index: int, n: int) -> list[Prompt]:  # noqa: ANN001
    """n problems, operation uniform; distinct within an operation until its pool runs out."""
    by_op = {op: list(p[pool_index]) for op, p in pools(task).items()}
    for combos in by_op.values():
        rng.shuffle(combos)
    cursor = dict.fromkeys(by_op, 0)
    prompts = []
    for _ in range(n):
        op = rng.choice(task.ops)
        combos = by_op[op]
        combo = combos[cursor[op] % len(combos)]
        cursor[op] += 1
        prompts.append(_problem(combo, op, task.instruction))
    return prompts


def load(task, heldout_n: int, train_n: int = 20000) -> TaskData:  # noqa: ANN001
    """`train_n` training draws and `heldout_n` held-out problems, operation uniform in both.

    Small operation spaces (2..12 times 2..12 has 121 problems) repeat within a split, so that both
    splits follow the same mix of operations; rows get distinct ids (`#i`) all the same.
    """
    heldout = _draw(random.Random(task.seed + 1), task, 1, heldout_n)
    train = _draw(random.Random(task.seed), task, 0, train_n)
    for split in (heldout, train):
        for i, p in enumerate(split):
            p.id = f"{p.id}#{i}"
    return TaskData(train=train, heldout=heldout)
