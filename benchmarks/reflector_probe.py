"""Can the reflector's model learn to read a game's answer off its own prompt? A supervised probe.

In mapreader the task names the coin's room ("the coin that is located in the salon") and the start
room's exits name the rooms behind them ("To the North you see the salon"), so the first move of a
good reflection is a lookup in the prompt. The probe fine-tunes the reflector's LoRA (the config's
model, rank, alpha and target modules: the learner's own `PolicyModel`) on that move for train-fold
maps, by cross-entropy, and reads its greedy first move on held-out test maps. Baselines, side by
side: a random exit, the base model, and a trained adapter (`--adapter`, e.g. a run's final
checkpoint). Each prompt is the run's reflector prompt for a failed first trial of random moves.

Two questions about the limit, when SFT does not generalise: is it the data (`--extra-sizes 5,7,9`:
train maps of other sizes as well, `--train-tasks` of each, for more distinct maps than the fold's
1,000) or the model's size (`--fresh-model 4x256`: a randomly initialised Llama of 4 layers, 256 wide,
with the reflector's tokenizer, every weight trained)?

    python -m benchmarks.reflector_probe --config configs/retro-mix-wide.yaml \
        --adapter runs/campaigns/retro-mix-wide/seed-0/checkpoints/000055 --json PATH
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json
from retro_dist.agents.prompts import reflection_prompt
from retro_dist.config import load_config
from retro_dist.envs.twx import TwxFamily
from retro_dist.learner import checkpoints
from retro_dist.learner.batches import collate
from retro_dist.learner.policy import PolicyModel

_NUM_LOCATIONS = re.compile(r"(mapreader:[^;]*numLocations=)\d+")

GAME = "mapreader"
_ROOM = re.compile(r"located in the ([a-z ]+),")
_EXIT = re.compile(r"To the (North|South|East|West) you see the ([a-z ]+?)\.")
_MOVE = re.compile(r"move (north|south|east|west)")

Example = tuple[list[int], str, int]  # (prompt ids, the move toward the task's room, exits of the start room)


def examples(family: TwxFamily, split: str, count: int, moves: int, tokenizer, rng: random.Random) -> list[Example]:
    """One failed first trial per map: `moves` random moves from the start, as the reflector sees it."""
    env, out = family.make(), []
    try:
        for task in family.tasks(GAME, split, count):
            instruction, obs = env.reset(task)
            exits = {room: way.lower() for way, room in _EXIT.findall(obs.text)}
            first, steps = obs.text, []
            for _ in range(moves):
                action = rng.choice([a for a in obs.valid_actions or [] if a.startswith("move ")])
                obs = env.step(action)
                steps.append((action, obs.text))
            prompt = reflection_prompt(task.env_name, instruction, [], first, steps, 0.0)
            out.append((tokenizer(prompt).input_ids, exits[_ROOM.search(instruction).group(1)], len(exits)))
    finally:
        env.close()
    return out


@torch.no_grad()
def accuracy(policy: PolicyModel, data: list[Example], batch: int = 50) -> float:
    """Share of prompts whose greedy reflection's first move is the one toward the task's room."""
    tok, model, hits = policy.tokenizer, policy.model, 0
    model.eval()
    for lo in range(0, len(data), batch):
        rows = data[lo:lo + batch]
        width = max(len(ids) for ids, _, _ in rows)  # left-padded for generation
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p, _, _ in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _, _ in rows])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        for (_, want, _), gen in zip(rows, out[:, width:]):
            move = _MOVE.search(tok.decode(gen))
            hits += bool(move and move.group(1) == want)
    return hits / len(data)


def with_num_locations(game_params: str, n: int) -> str:
    """`env.game_params` with mapreader's map size set to `n` rooms."""
    if not _NUM_LOCATIONS.search(game_params):
        raise ValueError(f"--extra-sizes needs numLocations in mapreader's env.game_params, got {game_params!r}")
    return _NUM_LOCATIONS.sub(rf"\g<1>{n}", game_params)


def fresh_model(tokenizer_from: str, shape: str, out: Path, seed: int = 0) -> str:
    """A randomly initialised Llama of shape "LAYERSxWIDTH" (head_dim 64, MLP 2x wide) with the
    tokenizer of `tokenizer_from`, written as a checkpoint folder the learner's loader reads."""
    from retro_dist.agents.backends import load_tokenizer
    from retro_dist.agents.tiny_models import build_model

    parts = shape.lower().split("x")
    layers, width = (int(x) for x in parts) if len(parts) == 2 and all(x.isdigit() for x in parts) else (0, 0)
    if layers < 1 or width < 64 or width % 64:
        raise ValueError(f"--fresh-model wants LAYERSxWIDTH with WIDTH a multiple of 64, e.g. 4x256; got {shape!r}")
    tok = load_tokenizer(tokenizer_from)
    build_model(tok, seed, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=width // 64, num_key_value_heads=width // 64).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def trainable(policy: PolicyModel, full: bool) -> list[torch.Tensor]:
    """The LoRA parameters, or with `full` every weight of the model (the base unfrozen)."""
    if not full:
        return policy.params
    params = list(policy.model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def sft_epoch(policy: PolicyModel, opt: torch.optim.Optimizer, data: list[Example], batch: int,
              rng: random.Random) -> float:
    """One pass of cross-entropy on " move <the right way>" after each prompt; the last batch's loss."""
    policy.model.train()
    order = rng.sample(data, len(data))
    loss = torch.zeros(())
    for lo in range(0, len(order), batch):
        rows = order[lo:lo + batch]
        targets = [policy.tokenizer(f" move {want}", add_special_tokens=False).input_ids for _, want, _ in rows]
        mb = collate([p for p, _, _ in rows], targets, policy.tokenizer.pad_token_id).to(policy.device)
        loss = -(policy.logprobs(mb) * mb.mask).sum() / mb.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/retro-mix-wide.yaml", help="env.game_params and the reflector")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--adapter", help="a checkpoint folder to score beside the base")
    ap.add_argument("--train-tasks", type=int, default=1000)
    ap.add_argument("--test-tasks", type=int, default=200)
    ap.add_argument("--moves", type=int, default=6, help="random moves in each failed first trial")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: learner.lr")
    ap.add_argument("--full-finetune", action="store_true",
                    help="train every weight of the model, not only the LoRA (is the rank the limit?)")
    ap.add_argument("--extra-sizes", default="", metavar="N,N,...",
                    help="also train on --train-tasks maps of each of these mapreader sizes (numLocations)")
    ap.add_argument("--fresh-model", metavar="LAYERSxWIDTH",
                    help="a randomly initialised Llama of this shape instead of the reflector's model (needs --full-finetune)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if f"twx/{GAME}" not in cfg.env.games:
        sys.exit(f"reflector_probe: {args.config} has no twx/{GAME} in env.games")
    if args.fresh_model and not args.full_finetune:
        sys.exit("reflector_probe: --fresh-model trains a random model, which needs --full-finetune")
    torch.manual_seed(args.seed)  # the LoRA's initial weights (fresh_model seeds its own)
    try:
        sizes = [int(n) for n in args.extra_sizes.split(",") if n.strip()]
        extra = [dataclasses.replace(cfg.env, game_params=with_num_locations(cfg.env.game_params, n)) for n in sizes]
        with tempfile.TemporaryDirectory() as scratch:
            if args.fresh_model:
                model = fresh_model(cfg.reflector.model, args.fresh_model, Path(scratch), args.seed)
                cfg.reflector = dataclasses.replace(cfg.reflector, model=model)
            policy = PolicyModel(cfg.reflector, cfg.learner, torch.device("cpu"))
    except ValueError as err:
        sys.exit(f"reflector_probe: {err}")
    rng = random.Random(args.seed)
    family = TwxFamily(cfg.env)
    train = examples(family, "train", args.train_tasks, args.moves, policy.tokenizer, rng)
    for env_cfg in extra:
        train += examples(TwxFamily(env_cfg), "train", args.train_tasks, args.moves, policy.tokenizer, rng)
    test = examples(family, "test", args.test_tasks, args.moves, policy.tokenizer, rng)
    rows = [("a random exit", sum(1 / n for _, _, n in test) / len(test))]
    with policy.model.disable_adapter():
        rows.append(("base model", accuracy(policy, test)))
    if args.adapter:
        saved = policy.lora_state()
        checkpoints.load_adapter(Path(args.adapter), policy)
        rows.append((f"adapter {args.adapter}", accuracy(policy, test)))
        policy.load_lora_state(saved, "the fresh LoRA")
    opt = torch.optim.AdamW(trainable(policy, args.full_finetune), lr=args.lr or cfg.learner.lr)
    curve, t0 = [], time.time()
    for epoch in range(1, args.epochs + 1):
        loss = sft_epoch(policy, opt, train, args.batch, rng)
        curve.append({"examples": epoch * len(train), "loss": loss, "held_out_accuracy": accuracy(policy, test)})
    how = "full fine-tuning" if args.full_finetune else "LoRA SFT"
    rows.append((f"{how}, {curve[-1]['examples']} examples", curve[-1]["held_out_accuracy"]))
    print(f"{GAME}: greedy first move toward the task's room, {len(test)} held-out test maps "
          f"({len(train)} train maps, SFT {time.time() - t0:.0f} s)")
    print(f"{'reflector':<60} accuracy")
    for name, acc in rows:
        print(f"{name:<60} {acc:.3f}")
    write_json(args.json, {"config": args.config, "game": f"twx/{GAME}", "train_maps": len(train),
                           "test_maps": len(test), "accuracy": dict(rows), "sft_curve": curve,
                           "lr": args.lr or cfg.learner.lr, "lora_rank": cfg.reflector.lora_rank,
                           "full_finetune": args.full_finetune, "extra_sizes": sizes,
                           "fresh_model": args.fresh_model, "parameters": sum(p.numel() for p in policy.model.parameters())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
