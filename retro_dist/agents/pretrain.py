"""`retro-dist pretrain-actor`: make the tiny frozen actor able to act, and to act on advice.

No pretrained LLM is reachable here, so the actor is trained by behaviour cloning on oracle plans
(shortest action sequences computed from the game, `EnvFamily.oracle_plan`). Two kinds of
examples, in the exact prompt format the rollouts use, for every game in `env.games` (one actor for
a mix; each prompt names its game):
- no advice: empty memory, the oracle plan's actions: the actor learns a prior over where to look;
- advice (games whose plans are routes: `coin`, `mapreader`): a plan for a route through the map
  (the oracle's, or a random one, so mostly wrong; `TwxFamily.plan_for_route`) is the newest
  reflection in memory, and the actor follows its moves literally, stops following as soon as the
  goal's action is valid (take the coin), and continues with the oracle plan from there. Because the
  advice is uncorrelated with the answer, only reading it tells the actor where to go: it learns
  to follow advice, not to memorise the 1,000 training maps (which it did when advice was always right).
- advice (games whose plans are an order: `peckingorder`, `ORDER_GAMES`): a list of takes (the
  order, whole or the part a failed trial read, with or without its reading; or a shuffle; or
  another task's items), followed literally until it runs out, names an item that is not there, or a
  wrong take ends the game; then the game's own solution from there (read the book, take, ...).
Loss: next-token cross-entropy on the whole text, with prompt tokens down-weighted, so the model
also learns the language of the games and of plans (the reflector starts from this checkpoint).
The reflector never trains on these plans: it only starts from the same pretrained LM.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from retro_dist.agents import prompts
from retro_dist.config import EnvConfig
from retro_dist.envs.registry import family, split_game
from retro_dist.envs.twx import ORDER_GAMES, ROUTE_GAMES, order_of, reverse_move


def plan_reflection(plan: list[str]) -> str:
    """A plan as a reflection in memory, in the exact form the reflector's text takes there."""
    return prompts.reflection_from_text(", ".join(plan) + ".")


@dataclass
class Example:
    prompt: str
    action: str


def _walk(env, task, memory: list[str], prefix: list[str], plan: list[str]) -> list[Example]:
    """Replay `prefix` (no examples), then one example per action of `plan`."""
    instruction, obs = env.reset(task)
    first, steps = obs.text, []
    for a in prefix:
        obs = env.step(a)
        steps.append((a, obs.text))
    out = []
    for a in plan:
        out.append(Example(prompts.actor_prompt(task.env_name, instruction, memory, first, steps), a))
        obs = env.step(a)
        steps.append((a, obs.text))
    return out


def _routes(env, task, depth: int) -> list[list[str]]:
    """Every move sequence up to `depth` moves from the start, without stepping straight back."""
    out, frontier = [], [[]]
    for _ in range(depth):
        nxt = []
        for prefix in frontier:
            _, obs = env.reset(task)
            for a in prefix:
                obs = env.step(a)
            back = reverse_move(prefix[-1]) if prefix else None
            nxt += [prefix + [m] for m in obs.valid_actions or [] if m.startswith("move ") and m != back]
        out += nxt
        frontier = nxt
    return out


class _Trial:
    """One trial recorded as it is played: `emit(action)` keeps the actor's prompt before the action
    as an example, then steps the game."""

    def __init__(self, env, task, memory: list[str]):
        self.env, self.task, self.memory = env, task, memory
        self.instruction, self.obs = env.reset(task)
        self.first, self.steps, self.examples = self.obs.text, [], []

    def emit(self, action: str) -> None:
        prompt = prompts.actor_prompt(self.task.env_name, self.instruction, self.memory, self.first, self.steps)
        self.examples.append(Example(prompt, action))
        self.obs = self.env.step(action)
        self.steps.append((action, self.obs.text))

    def actions(self) -> list[str]:
        return [a for a, _ in self.steps]


def _follow(env, fam, task, memory: list[str], route: list[str]) -> list[Example]:
    """Follow the newest plan literally; finish as soon as the goal is one action away; once the
    plan is used up, continue with the oracle plan from there. Teaches reading the plan, not the map."""
    trial = _Trial(env, task, memory)
    for move in route:
        rest = fam.oracle_plan(task, prefix=trial.actions())
        if rest and not rest[0].startswith("move "):
            break  # the goal is in reach (the coin here): take it, whatever the plan says next
        if move not in (trial.obs.valid_actions or []):
            break
        trial.emit(move)
    for action in fam.oracle_plan(task, prefix=trial.actions()) or []:
        trial.emit(action)
    return trial.examples


def route_of(plan: list[str]) -> list[str]:
    """The moves a plan starts with (up to its first other action): where it goes."""
    moves = []
    for a in plan:
        if not a.startswith("move "):
            break
        moves.append(a)
    return moves


def build_examples(cfg: EnvConfig, n_tasks: int, seed: int = 0, routes_per_task: int = 4) -> list[Example]:
    """Examples for every game in `cfg.games`, `n_tasks` train tasks each, so one actor serves a mix."""
    rng = random.Random(seed)
    examples: list[Example] = []
    # walks (a route, then the oracle plan) may be longer than a run's step limit: never cut them
    cfg = dataclasses.replace(cfg, step_limit=max(cfg.step_limit, 50))
    for spec in cfg.games:
        fam_name, game = split_game(spec)
        fam = family(fam_name, cfg)
        env = fam.make()
        foreign: list[list[str]] = [[]]  # order games: an earlier task's order, as advice here
        for task in fam.tasks(game, "train", n_tasks):
            if task.env_name in ORDER_GAMES:
                gold = fam.gold_path(task)
                examples += _order_examples(env, task, gold, rng, foreign[-1])
                foreign.append(order_of(gold))
            else:
                examples += _task_examples(env, fam, task, rng, routes_per_task)
        env.close()
    rng.shuffle(examples)
    return examples


def _task_examples(env, fam, task, rng: random.Random, routes_per_task: int) -> list[Example]:
    """No advice: the oracle plan. Advice (games whose plans are routes, `plan_for_route`): a plan
    for the oracle's route or a random one, followed literally; older plans, half the time, in front."""
    plan = fam.oracle_plan(task)
    if not plan:
        return []
    out = _walk(env, task, [], [], plan)  # no advice: a prior over where to look
    if task.env_name not in ROUTE_GAMES:  # twx games: TwxFamily.plan_for_route
        return out
    routes = _routes(env, task, depth=2)
    chosen = [route_of(plan)] + rng.sample(routes, min(routes_per_task - 1, len(routes)))
    for route in chosen:
        older = [plan_reflection(fam.plan_for_route(task, r)) for r in rng.sample(routes, min(1, len(routes)))]
        memory = (older if rng.random() < 0.5 else []) + [plan_reflection(fam.plan_for_route(task, route))]
        out += _follow(env, fam, task, memory, route)
    return out


def _order_examples(env, task, gold: list[str], rng: random.Random, foreign: list[str]) -> list[Example]:
    """No advice: the game's own solution. Advice: four lists of takes (`ORDER_GAMES`), the newest
    plan in memory; older plans (a shuffle), half the time, in front."""
    order = order_of(gold)
    if not order:
        return []
    out = _walk(env, task, [], [], gold)
    k = rng.randint(1, len(order) - 1)
    advice = [order[: rng.randint(1, len(order))],  # the order, or the part a failed trial read
              gold[: 2 * k],  # that part copied with its reading
              rng.sample(order, len(order)),  # a shuffle: right only by chance
              foreign]  # another task's items: mostly not in this room
    for plan in advice:
        older = [plan_reflection(rng.sample(order, len(order)))] if rng.random() < 0.5 else []
        memory = older + ([plan_reflection(plan)] if plan else [])
        out += _follow_order(env, task, memory, plan, gold)
    return out


def _follow_order(env, task, memory: list[str], plan: list[str], gold: list[str]) -> list[Example]:
    """Follow the newest plan literally until it runs out, names an action that is not valid here, or
    the game ends (a wrong take ends it); then the game's solution from the takes made so far."""
    trial = _Trial(env, task, memory)
    for action in plan:
        if action not in (trial.obs.valid_actions or []):
            break
        trial.emit(action)
        if trial.obs.done:
            return trial.examples
    for action in gold[2 * len(order_of(trial.actions())):]:  # the solution reads, then takes
        trial.emit(action)
    return trial.examples


def train_actor(examples: list[Example], base: str, output: str, minutes: Optional[float],
                steps: Optional[int] = None, batch_size: int = 32, lr: float = 2e-3, prompt_weight: float = 0.1,
                max_tokens: int = 768, seed: int = 0, log_every: int = 100) -> dict:
    """Behaviour cloning for `steps` gradient steps and/or at most `minutes` of wall time (the first
    reached stops it); saves an HF checkpoint and `pretrain.json` to `output`.

    Bounded by steps alone it is reproducible: the same examples, seed and steps give bit-identical
    weights on the same machine (CPU; batches come from a seeded RNG, no dropout). A wall-clock
    bound depends on the machine's load: two runs of the recipe got 1,648 and 2,061 steps from 10 minutes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_budget(minutes, steps)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = []
    for ex in examples:
        p = tok(ex.prompt).input_ids
        a = tok(f" {ex.action}\n", add_special_tokens=False).input_ids
        if len(p) + len(a) <= max_tokens:
            rows.append((p, a))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    deadline = None if minutes is None else time.time() + 60 * minutes
    step, history = 0, []
    model.train()
    while (steps is None or step < steps) and (deadline is None or time.time() < deadline):
        batch = rng.sample(rows, min(batch_size, len(rows)))
        loss, action_loss = _bc_loss(model, tok, batch, prompt_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append(action_loss)
        if step % log_every == 0:
            recent = sum(history[-log_every:]) / log_every
            print(f"  step {step}: action loss {recent:.3f}", flush=True)
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tok.save_pretrained(output)
    result = {"steps": step, "examples": len(rows), "seed": seed, "base": base, "batch_size": batch_size, "lr": lr,
              "stopped_by": "steps" if steps is not None and step >= steps else "minutes",
              "final_action_loss": sum(history[-50:]) / max(1, len(history[-50:]))}
    (Path(output) / "pretrain.json").write_text(json.dumps(result, indent=1))
    return result


def _check_budget(minutes: Optional[float], steps: Optional[int]) -> None:
    if steps is None and minutes is None:
        raise ValueError("pretrain-actor needs --steps or --minutes")
    if steps is not None and steps < 1:
        raise ValueError(f"pretrain-actor: --steps must be >= 1, got {steps}")
    if minutes is not None and minutes < 0:
        raise ValueError(f"pretrain-actor: --minutes must be >= 0, got {minutes}")


def _bc_loss(model, tok, batch, prompt_weight: float):
    import torch

    seqs = [p + a for p, a in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    weight = torch.zeros(len(seqs), width - 1)
    is_action = torch.zeros(len(seqs), width - 1)
    for i, (p, a) in enumerate(batch):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        weight[i, : len(p) - 1] = prompt_weight  # predicting prompt tokens 1..P-1
        weight[i, len(p) - 1 : len(p) + len(a) - 1] = 1.0  # predicting the action tokens
        is_action[i, len(p) - 1 : len(p) + len(a) - 1] = 1.0
    attn = (ids != tok.pad_token_id).long()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(len(seqs), -1)
    loss = (nll * weight).sum() / weight.sum()
    action_loss = float((nll.detach() * is_action).sum() / is_action.sum())
    return loss, action_loss


def pretrain_actor(cfg: EnvConfig, base: str, output: str, n_tasks: int, minutes: Optional[float],
                   force: bool = False, seed: int = 0, steps: Optional[int] = None) -> Optional[dict]:
    """Build examples and train; skipped (returns None) when `output` already holds a checkpoint."""
    _check_budget(minutes, steps)
    if (Path(output) / "config.json").is_file() and not force:
        return None
    t0 = time.time()
    examples = build_examples(cfg, n_tasks, seed)
    print(f"pretrain-actor: {len(examples)} examples from {n_tasks} train tasks per game "
          f"({time.time() - t0:.0f}s)", flush=True)
    return train_actor(examples, base, output, minutes, steps=steps, seed=seed)
