"""HotPotQA (Yang et al. 2018) as a ReAct-style text game (Yao et al. 2023), on user-provided data.

`env.data_path` is either one JSON file in HotPotQA's distractor format (a list of {"_id",
"question", "answer", "context": [[title, [sentence, ...]], ...], "supporting_facts", ...}), whose
questions go to folds by a stable hash of `_id` (80 % train, 10 % dev, 10 % test), or a folder
holding `train.json`, `dev.json` and `test.json`. The only game is `distractor`.

Each question is its own small docstore: the paragraphs of ITS context, nothing else. Actions:

    search[entity]   the first sentences of the paragraph whose title best matches `entity`
                     (case, punctuation and small typos forgiven), or "Could not find [entity].
                     Similar: [...]" listing the closest titles
    lookup[keyword]  the next sentence containing `keyword` in the last paragraph found by search
    finish[answer]   ends the episode: reward = token F1 with the gold answer, success = exact match

`Observation.valid_actions` lists `search[title]` for every context title; `lookup[...]` and
`finish[...]` take free text and are accepted too, though not listed. Scoring follows the official
evaluation script (normalise: lowercase, drop punctuation and articles; yes/no answers must match).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Optional

from retro_dist.envs.base import EnvError, Observation, Task

GAME = "distractor"
SPLITS = ("train", "dev", "test")
FIRST_SENTENCES = 5  # what ReAct's Wikipedia search shows of a page
FOUND_RATIO = 0.8  # string similarity above which a search hits a title
_ACTION = re.compile(r"^\s*(search|lookup|finish)\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
INSTRUCTION = ("Answer the question: {question} Actions: search[entity] shows the paragraph about "
               "entity; lookup[keyword] shows the next sentence with keyword in that paragraph; "
               "finish[answer] submits the answer.")


# ---- scoring: the official HotPotQA evaluation (hotpot_evaluate_v1.py) ----

def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def answer_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # yes/no questions: any other answer scores zero, even if it shares a token
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    common = Counter(pred.split()) & Counter(ref.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred.split()), same / len(ref.split())
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


# ---- data ----

def fold_of(qid: str) -> str:
    """Stable fold of a question id (sha1, not Python's salted hash): 80/10/10."""
    bucket = int(hashlib.sha1(qid.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


@functools.lru_cache(maxsize=4)
def load_split(data_path: Optional[str], split: str) -> tuple[dict, ...]:
    """The questions of `split`, in file order (cached: every slot of a worker shares one copy)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (train, dev, test)")
    if not data_path:
        raise EnvError("hotpotqa needs env.data_path: a HotPotQA distractor JSON file or a folder "
                       "with train.json/dev.json/test.json")
    path = Path(data_path)
    if path.is_dir():
        return tuple(_read(path / f"{split}.json"))
    return tuple(q for q in _read(path) if fold_of(str(q["_id"])) == split)


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EnvError(f"hotpotqa data {path}: cannot read ({type(err).__name__}: {err})") from err
    if not isinstance(data, list) or any(not {"_id", "question", "answer", "context"} <= set(q) for q in data):
        raise EnvError(f"hotpotqa data {path}: expected a list of questions with _id, question, "
                       "answer and context (HotPotQA distractor format)")
    return data


# ---- the game ----

class HotpotQAEnv:
    """Search, look up and answer one question over its own context paragraphs."""

    def __init__(self, data_path: Optional[str]):
        self._data_path = data_path
        self._q: Optional[dict] = None
        self._docs: dict[str, list[str]] = {}  # title -> sentences
        self._page: Optional[str] = None  # title of the last paragraph found by search
        self._lookup: tuple[str, list[str], int] = ("", [], 0)  # keyword, hits, next hit
        self._done = False

    def reset(self, task: Task) -> tuple[str, Observation]:
        questions = load_split(self._data_path, task.split)
        if not 0 <= task.seed < len(questions):
            raise EnvError(f"hotpotqa reset {task.task_id}: no question {task.seed} in {task.split}")
        self._q = questions[task.seed]
        if not task.task_id.endswith("/" + str(self._q["_id"])):  # seeds index the file: it changed
            raise EnvError(f"hotpotqa reset {task.task_id}: question {task.seed} is now {self._q['_id']}")
        self._docs = {}
        for title, sentences in self._q["context"]:
            self._docs.setdefault(title, [s.strip() for s in sentences if s.strip()])
        self._page, self._lookup, self._done = None, ("", [], 0), False
        text = "Paragraphs: " + "; ".join(self._docs)
        return INSTRUCTION.format(question=self._q["question"]), self._obs(text)

    def step(self, action: str) -> Observation:
        if self._q is None:
            raise EnvError("hotpotqa step before reset")
        if self._done:
            return self._obs("Episode already finished.", done=True)
        m = _ACTION.match(action)
        if m is None:
            return self._obs(f"Invalid action: {action}. Use search[entity], lookup[keyword] or "
                             "finish[answer].")
        verb, arg = m.group(1).lower(), m.group(2).strip()
        if verb == "search":
            return self._obs(self._search(arg))
        if verb == "lookup":
            return self._obs(self._lookup_next(arg))
        return self._finish(arg)

    def _search(self, entity: str) -> str:
        ranked = sorted(self._docs, key=lambda t: -_similarity(entity, t))
        if ranked and _similarity(entity, ranked[0]) >= FOUND_RATIO:
            self._page, self._lookup = ranked[0], ("", [], 0)
            return " ".join(self._docs[ranked[0]][:FIRST_SENTENCES])
        return f"Could not find [{entity}]. Similar: [{', '.join(ranked[:5])}]."

    def _lookup_next(self, keyword: str) -> str:
        if self._page is None:
            return "No paragraph to look up in: search[entity] first."
        word, hits, nxt = self._lookup
        if keyword.lower() != word:  # a new keyword restarts the scan, as in ReAct
            hits = [s for s in self._docs[self._page] if keyword.lower() in s.lower()]
            word, nxt = keyword.lower(), 0
        if nxt >= len(hits):
            self._lookup = (word, hits, nxt)
            return "No more results."
        self._lookup = (word, hits, nxt + 1)
        return f"(Result {nxt + 1} / {len(hits)}) {hits[nxt]}"

    def _finish(self, answer: str) -> Observation:
        self._done = True
        f1, em = answer_f1(answer, self._q["answer"]), exact_match(answer, self._q["answer"])
        return self._obs(f"Episode finished. Answer F1 = {f1:.2f}.", reward=f1, score=f1,
                         done=True, success=em)

    def _obs(self, text: str, reward: float = 0.0, score: float = 0.0, done: bool = False,
             success: bool = False) -> Observation:
        return Observation(text=text, valid_actions=[f"search[{t}]" for t in self._docs],
                           reward=reward, score=score, done=done, success=success,
                           actions_complete=False)  # finish[answer] is free text

    def close(self) -> None:
        pass


def _similarity(entity: str, title: str) -> float:
    return difflib.SequenceMatcher(None, normalize_answer(entity), normalize_answer(title)).ratio()


class HotpotQAFamily:
    """HotPotQA questions of a fold, in file order; oracle plan = search the supporting titles, answer."""

    def __init__(self, cfg):
        self.cfg = cfg

    def tasks(self, game: str, split: str, count: int) -> list[Task]:
        if game != GAME:
            raise ValueError(f"unknown hotpotqa game '{game}' (only '{GAME}')")
        questions = load_split(self.cfg.data_path, split)[:count]
        return [Task(f"hotpotqa/{GAME}/{split}/{q['_id']}", f"hotpotqa/{GAME}", i, split)
                for i, q in enumerate(questions)]

    def make(self) -> HotpotQAEnv:
        return HotpotQAEnv(self.cfg.data_path)

    def oracle_plan(self, task: Task) -> Optional[list[str]]:
        q = load_split(self.cfg.data_path, task.split)[task.seed]
        titles = list(dict.fromkeys(title for title, _ in q.get("supporting_facts", [])))
        return [f"search[{t}]" for t in titles] + [f"finish[{q['answer']}]"]
