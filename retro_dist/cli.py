"""`retro-dist` command line: train, make-models, replay tools, config reference."""
from __future__ import annotations

import argparse
import sys


def _train(args) -> None:
    from retro_dist.config import load_config
    from retro_dist.launch.train import train

    cfg = load_config(args.config, (args.set or []) + (["run.resume=true"] if args.resume else []))
    run_dir = train(cfg, address=args.address)
    print(f"run finished: {run_dir}")


def _make_models(args) -> None:
    from retro_dist.agents.tiny_models import make_models

    print(f"tiny model ready: {make_models(args.output, force=args.force)}")


def _pretrain_actor(args) -> None:
    from retro_dist.agents.pretrain import pretrain_actor
    from retro_dist.config import load_config

    cfg = load_config(args.config, args.set or [])
    output = args.output or cfg.actor.model
    minutes = 6.0 if args.steps is None and args.minutes is None else args.minutes
    result = pretrain_actor(cfg.env, args.base, output, args.tasks, minutes, force=args.force,
                            seed=cfg.run.seed, steps=args.steps)
    print(f"actor checkpoint {'already present' if result is None else 'written'}: {output}"
          + ("" if result is None else f" ({result['steps']} steps, action loss {result['final_action_loss']:.3f})"))
    if result is not None and args.steps is not None and result["stopped_by"] == "minutes":
        print(f"retro-dist: warning: --minutes {args.minutes} ran out after {result['steps']} of {args.steps} steps; "
              f"this actor is not the reproducible one", file=sys.stderr)


def _eval(args) -> None:
    from retro_dist.config import load_config
    from retro_dist.launch.evaluate import markdown, run_eval

    cfg = load_config(args.config, args.set or [])
    report = run_eval(cfg, args.checkpoint, args.tasks, args.trials, args.split, args.output,
                      arms=args.arms.split(","), address=args.address,
                      reflection_temperature=args.reflection_temperature)
    print(markdown(report))
    print(f"written: {args.output}/eval.md, eval.json, eval.png")


def _select(args) -> None:
    from retro_dist.config import load_config
    from retro_dist.launch.evaluate import select_checkpoint

    cfg = load_config(args.config, args.set or [])
    out = select_checkpoint(cfg, args.run_dir, args.every, args.tasks, args.trials, args.split, args.address)
    print(out["best"])


def _campaign(args) -> None:
    from retro_dist.launch.campaign import run_campaign

    run_campaign(args.spec, only=args.only, address=args.address, jobs_address=args.jobs_address,
                 parallel=args.parallel)


def _config_ref(args) -> None:
    from retro_dist.config_reference import config_reference

    print(config_reference())


def _run_args(p: argparse.ArgumentParser, config_help: str = "YAML config (see configs/)",
              address: bool = True) -> None:
    """The arguments every config-driven command shares: the config, overrides, the cluster to join."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    if address:
        p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retro-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run the actor-learner loop")
    _run_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its newest checkpoint (run.resume=true)")
    p.set_defaults(func=_train)
    p = sub.add_parser("make-models", help="build the tiny local Llama + tokenizer")
    p.add_argument("--output", default="models/tiny-lm")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=_make_models)
    p = sub.add_parser("pretrain-actor", help="behaviour-clone the tiny actor on oracle plans, with and without advice")
    _run_args(p, "YAML config; its env section picks the games", address=False)
    p.add_argument("--base", default="models/tiny-lm", help="checkpoint to start from")
    p.add_argument("--output", default=None, help="where to save (default: the config's actor.model)")
    p.add_argument("--tasks", type=int, default=3000, help="train tasks per game")
    p.add_argument("--steps", type=int, default=None,
                   help="gradient steps (reproducible: same seed and steps give the same weights)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget; with --steps an upper bound (default without --steps: 6)")
    p.add_argument("--force", action="store_true", help="retrain even if the output exists")
    p.set_defaults(func=_pretrain_actor)
    p = sub.add_parser("eval", help="cumulative success by trial on held-out tasks, four arms")
    _run_args(p)
    p.add_argument("--checkpoint", default=None, help="peft adapter folder of the trained reflector")
    p.add_argument("--tasks", type=int, default=200, help="held-out tasks (N)")
    p.add_argument("--trials", type=int, default=3, help="trials per task (K)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--output", required=True, help="folder for eval.md, eval.json, eval.png")
    p.add_argument("--arms", default="none,initial,trained,oracle", help="comma-separated subset of the arms")
    p.add_argument("--reflection-temperature", type=float, default=None,
                   help="decode reflections at this temperature in both reflector arms (0 = greedy)")
    p.set_defaults(func=_eval)
    p = sub.add_parser("select-checkpoint", help="pick a run's best checkpoint on the dev split (prints its path)")
    _run_args(p)
    p.add_argument("--run-dir", required=True, help="run folder holding checkpoints/")
    p.add_argument("--every", type=int, default=10, help="evaluate every N-th version (and the last)")
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--split", default="dev", choices=["train", "dev"])
    p.set_defaults(func=_select)
    p = sub.add_parser("campaign", help="train and evaluate a list of runs (seeds × games × configs), then one "
                                        "table and plot; resumable")
    p.add_argument("--spec", required=True, help="campaign YAML (see configs/campaigns/)")
    p.add_argument("--only", default=None, help="run just this run of the campaign (what each Ray job does)")
    p.add_argument("--address", default=None, help="Ray cluster each run joins (default: a local one per run)")
    p.add_argument("--jobs-address", default=None,
                   help="Ray dashboard URL (http://HEAD:8265): submit each run as its own Ray job")
    p.add_argument("--parallel", type=int, default=2, help="Ray jobs at a time with --jobs-address")
    p.set_defaults(func=_campaign)

    p = sub.add_parser("config-reference", help="print every config key with its default and meaning")
    p.set_defaults(func=_config_ref)
    from retro_dist.replay.tools import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from retro_dist.agents.backends import BackendError
    from retro_dist.config import ConfigError
    from retro_dist.launch.preflight import PreflightError
    from retro_dist.launch.supervisor import WorkerLost

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, PreflightError, BackendError, WorkerLost, FileNotFoundError, ValueError) as err:
        print(f"retro-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retro-dist: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
