"""`retro-dist` command line: train, make-models, replay tools, config reference."""
from __future__ import annotations

import argparse
import sys


def _train(args) -> None:
    from retro_dist.config import load_config
    from retro_dist.launch.train import train

    cfg = load_config(args.config, args.set or [])
    run_dir = train(cfg, address=args.address)
    print(f"run finished: {run_dir}")


def _make_models(args) -> None:
    from retro_dist.agents.tiny_models import make_models

    print(f"tiny model ready: {make_models(args.output, force=args.force)}")


def _config_ref(args) -> None:
    from retro_dist.config import config_reference

    print(config_reference())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retro-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run the actor-learner loop")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=_train)
    p = sub.add_parser("make-models", help="build the tiny local Llama + tokenizer")
    p.add_argument("--output", default="models/tiny-lm")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=_make_models)
    p = sub.add_parser("config-reference", help="print every config key with its default and meaning")
    p.set_defaults(func=_config_ref)
    from retro_dist.replay.tools import add_subcommands

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from retro_dist.agents.backends import BackendError
    from retro_dist.config import ConfigError
    from retro_dist.launch.preflight import PreflightError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, PreflightError, BackendError, FileNotFoundError) as err:
        print(f"retro-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retro-dist: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
