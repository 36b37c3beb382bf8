"""Batches: reflection rows -> padded micro-batches sized by a token budget.

A gradient step's rows are sorted by length and packed greedily into micro-batches of at most
`micro_batch_size` rows and `micro_batch_tokens` padded tokens (rows × longest row), so a few
prompts of thousands of tokens do not set the padding of every other row, and a forward pass's
activations stay bounded. The plan is a pure function of the lengths: every data-parallel rank
computes the same split and takes its own share (`micro_batches[rank::world_size]`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

ROW_COLUMNS = ("prompt_ids", "reflection_ids", "behaviour_logprobs", "reward", "policy_version")


def pad(rows: Sequence, width: int, value) -> torch.Tensor:
    """Right-pad lists to (len(rows), width); float value -> float32, int -> int64."""
    out = torch.full((len(rows), width), value, dtype=torch.float32 if isinstance(value, float) else torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=out.dtype)
    return out


@dataclass
class Rows:
    """One gradient step's reflection rows (what travels to the other data-parallel ranks)."""

    prompt_ids: list  # B lists of prompt token ids x_i
    reflection_ids: list  # B lists of reflection token ids y_i
    behaviour: Optional[list]  # B lists of μ log-probs per reflection token; None = on-policy
    advantages: np.ndarray  # (B,) A_i = r_i − b(x_i), IS-weighted for non-uniform samplers
    baseline: np.ndarray  # (B,) b(x_i), for metrics
    reward: np.ndarray  # (B,) r_i
    policy_version: np.ndarray  # (B,) version that wrote row i
    fit_value: bool = True  # train the value head (if any) on these rows' rewards (not in the SFT warm start)
    # B arrays of log π_ref(y_t) (the initial reflector: fixed, so computed once per row and cached
    # by the learner), None where not computed yet; the list itself None = no cache
    reference: Optional[list] = None

    @classmethod
    def from_table(cls, table, adv: np.ndarray, base: np.ndarray, on_policy: bool) -> "Rows":
        cols = table.select(list(ROW_COLUMNS)).to_pydict()
        return cls(cols["prompt_ids"], cols["reflection_ids"], None if on_policy else cols["behaviour_logprobs"],
                   np.asarray(adv, dtype=np.float64), np.asarray(base, dtype=np.float64),
                   np.asarray(cols["reward"], dtype=np.float64), np.asarray(cols["policy_version"]))

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.reflection_ids)]


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: Optional[int]) -> list[list[int]]:
    """Row indices per micro-batch: longest rows first, each micro-batch within both budgets.

    A row longer than `max_tokens` goes alone (it cannot be split: its log-prob needs the whole
    prompt). Stable sort, so equal inputs give the same plan on every rank.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    plan: list[list[int]] = []
    for i in order:
        cur = plan[-1] if plan else None
        # descending order: the micro-batch's first row is its longest
        if cur and len(cur) < max_rows and (max_tokens is None or (len(cur) + 1) * lengths[cur[0]] <= max_tokens):
            cur.append(i)
        else:
            plan.append([i])
    return plan


@dataclass
class MicroBatch:
    """Padded tensors of one forward pass. B rows, L = longest prompt + reflection, T = longest reflection."""

    input_ids: torch.Tensor  # (B, L) right-padded with pad_id
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    positions: torch.Tensor  # (B, T) index of the hidden state that predicts reflection token t
    targets: torch.Tensor  # (B, T) reflection token ids (0 on padding)
    mask: torch.Tensor  # (B, T) 1.0 on real reflection tokens
    behaviour: Optional[torch.Tensor]  # (B, T) μ log-probs; None = on-policy
    advantages: torch.Tensor  # (B,)
    prompt_end: Optional[torch.Tensor] = None  # (B,) index of each prompt's last token (the value head reads it)
    rewards: Optional[torch.Tensor] = None  # (B,) r_i, the value head's regression targets

    def to(self, device) -> "MicroBatch":
        move = (lambda t: None if t is None else t.to(device))
        return MicroBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(prompts: Sequence, reflections: Sequence, pad_id: int, behaviour: Optional[Sequence] = None,
            advantages: Optional[Sequence[float]] = None, rewards: Optional[Sequence[float]] = None) -> MicroBatch:
    seqs = [list(p) + list(r) for p, r in zip(prompts, reflections)]
    width = max(len(s) for s in seqs)
    t_max = max(max(len(r) for r in reflections), 1)
    # Reflection token t of row i sits at position P_i + t; the hidden state at P_i + t − 1 predicts it.
    positions = pad([[len(p) - 1 + t for t in range(len(r))] for p, r in zip(prompts, reflections)], t_max, 0)
    adv = torch.zeros(len(seqs)) if advantages is None else torch.as_tensor(np.asarray(advantages), dtype=torch.float32)
    return MicroBatch(
        input_ids=pad(seqs, width, pad_id), attention_mask=pad([[1] * len(s) for s in seqs], width, 0),
        positions=positions, targets=pad(reflections, t_max, 0),
        mask=pad([[1.0] * len(r) for r in reflections], t_max, 0.0),
        behaviour=None if behaviour is None else pad([list(b) for b in behaviour], t_max, 0.0),
        advantages=adv, prompt_end=torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long),
        rewards=None if rewards is None else torch.as_tensor(np.asarray(rewards), dtype=torch.float32))


def micro_batch(rows: Rows, idx: list[int], pad_id: int) -> MicroBatch:
    return collate([rows.prompt_ids[i] for i in idx], [rows.reflection_ids[i] for i in idx], pad_id,
                   None if rows.behaviour is None else [rows.behaviour[i] for i in idx],
                   rows.advantages[idx], rows.reward[idx])


class ReferenceCache:
    """Row (a hash of its prompt and reflection tokens) -> log π_ref per reflection token, least
    recently used dropped past `max_rows`.

    The reference (the reflector with its adapter disabled) never changes, and the same rows come
    back step after step (the fresh source's batches of one iteration, replay samples), so each
    row's reference forward is run once instead of once per step."""

    def __init__(self, max_rows: int = 1 << 16):
        self.max_rows = max_rows
        self._rows: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def lookup(self, keys: Sequence[int]) -> list:
        out = []
        for k in keys:
            got = self._rows.get(k)
            if got is not None:
                self._rows.move_to_end(k)
            out.append(got)
        return out

    def store(self, keys: Sequence[int], values: Sequence) -> None:
        for k, v in zip(keys, values):
            if v is not None and k not in self._rows:
                self._rows[k] = np.asarray(v, dtype=np.float32)
        while len(self._rows) > self.max_rows:
            self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)
