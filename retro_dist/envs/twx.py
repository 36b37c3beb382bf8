"""TextWorldExpress games (Jansen & Côté 2022): fast, offline, deterministic per (game, fold, seed)."""
from __future__ import annotations

import subprocess
from typing import Optional

from retro_dist.envs.base import EnvError, Observation, Task

# Every simulator is its own JVM. With the JVM's defaults one grows from ~83 MB RSS fresh to
# 210-320 MB after a few thousand resets (G1's regions and remembered sets, C2's arenas, a heap
# sized from the machine's memory); a worker keeps several. These flags held coin, cookingworld
# (11 locations), twc, mapreader, sorting and arithmetic at 45-49 MB with no loss in steps/s
# (measured here, OpenJDK 17): the serial collector on a small growable heap, and C1 only
# with one compiler thread. The games' live state is a few MB; -Xmx leaves room for big params.
JVM_OPTIONS = ("-Xms8m", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-XX:CICompilerCount=1")


def _add_jvm_options(module) -> None:
    """textworld_express starts its JVM with fixed `javaopts`; wrap the `launch_gateway` it calls
    (once per process) so ours are appended. Without that hook (another version) it runs on defaults."""
    launch = getattr(module, "launch_gateway", None)
    if launch is None or getattr(launch, "retro_dist_options", None) is not None:
        return

    def launch_with_options(*args, javaopts=(), **kwargs):
        return launch(*args, javaopts=[*javaopts, *JVM_OPTIONS], **kwargs)

    launch_with_options.retro_dist_options = JVM_OPTIONS
    module.launch_gateway = launch_with_options


def params_for(game_params: str, game: str) -> str:
    """The TextWorldExpress parameter string for `game` from `env.game_params`: a plain string applies
    to every game; `coin: numLocations=4,includeDoors=0; sorting:` gives each game its own (a game
    not named gets the game's defaults). Games differ in the properties they accept."""
    per_game = parse_game_params(game_params)
    return game_params if per_game is None else per_game.get(game, "")


def parse_game_params(game_params: str) -> Optional[dict[str, str]]:
    """{game: params} for the per-game form, None for a plain string."""
    if ":" not in game_params:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in game_params.split(";"))):
        game, sep, params = part.partition(":")
        if not sep or not game.strip():
            raise ValueError(f"env.game_params: {part!r} is not `game: key=value,...`")
        out[game.strip()] = params.strip().replace(" ", "")
    return out


class TwxEnv:
    """One TextWorldExpress simulator (one JVM), reset to any game/seed of the configured params."""

    def __init__(self, game_params: str, step_limit: int):
        from textworld_express import TextWorldExpressEnv  # starts a JVM: import where used
        from textworld_express import textworld_express as twx_module

        _add_jvm_options(twx_module)
        # The simulator's own limit is a backstop; the episode loop enforces `step_limit`.
        self._env = TextWorldExpressEnv(envStepLimit=step_limit + 1)
        self._params = game_params
        self._game = None

    def reset(self, task: Task) -> tuple[str, Observation]:
        game = task.env_name.split("/", 1)[1]
        try:
            if game != self._game:
                self._env.load(game, params_for(self._params, game))
                self._game = game
            obs, infos = self._env.reset(seed=task.seed, gameFold=task.split, generateGoldPath=False)
        except Exception as err:  # py4j surfaces Java exceptions as generic errors
            raise EnvError(f"twx reset {task.task_id}: {err}") from err
        return infos["taskDescription"], self._observation(obs, infos, 0.0, False)

    def step(self, action: str) -> Observation:
        try:
            obs, reward, done, infos = self._env.step(action)
        except Exception as err:
            raise EnvError(f"twx step {action!r}: {err}") from err
        return self._observation(obs, infos, float(reward), bool(done))

    @staticmethod
    def _observation(obs: str, infos: dict, reward: float, done: bool) -> Observation:
        return Observation(
            text=obs.strip(),
            valid_actions=sorted(infos.get("validActions", [])),
            reward=reward,
            score=max(0.0, min(1.0, float(infos.get("score", 0.0)))),
            done=done,
            success=bool(infos.get("tasksuccess", False)),
        )

    def seeds(self, game: str, split: str) -> list[int]:
        self._env.load(game, params_for(self._params, game))
        self._game = game
        getter = {"train": self._env.getValidSeedsTrain, "dev": self._env.getValidSeedsDev,
                  "test": self._env.getValidSeedsTest}[split]
        return sorted(int(s) for s in getter())

    def gold_path(self, task: Task) -> list[str]:
        game = task.env_name.split("/", 1)[1]
        self._env.load(game, params_for(self._params, game))
        self._game = game
        self._env.reset(seed=task.seed, gameFold=task.split, generateGoldPath=True)
        return [a for a in self._env.getGoldActionSequence() if a not in ("look around", "task")]

    def close(self) -> None:
        gateway = self._env._gateway
        proc = gateway.java_process
        if proc.poll() is None:
            self._env.close()  # asks the JVM to exit
            try:
                proc.wait(timeout=5)  # and reap it
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._disconnect()

    def kill(self) -> None:
        """Stop the JVM at once, without asking it (a hung or stopped JVM never answers): a call
        stuck waiting on it then fails instead of blocking forever."""
        proc = self._env._gateway.java_process
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends a SIGSTOPped process too
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # not reaped yet; it is dead or dying all the same
                pass
        self._disconnect()

    def _disconnect(self) -> None:
        # A JVM that crashed cannot be told goodbye: mark py4j's client disconnected, or each of its
        # object finalizers and textworld_express's __del__ (which closes again) tries to reach it and
        # logs a traceback from inside some later garbage collection.
        gateway = self._env._gateway
        gateway._gateway_client.is_connected = False
        gateway.shutdown_callback_server()
        self._env.close = lambda: None  # closed: __del__ has nothing left to do


class TwxFamily:
    """TextWorldExpress tasks: seeds of a fold, in ascending order; oracle plans by search."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._probe: TwxEnv | None = None  # one simulator for listing seeds and planning

    def _env(self) -> TwxEnv:
        if self._probe is None:
            self._probe = TwxEnv(self.cfg.game_params, step_limit=max(self.cfg.step_limit, 40))
        return self._probe

    def tasks(self, game: str, split: str, count: int) -> list[Task]:
        seeds = self._env().seeds(game, split)[:count]
        return [Task(f"twx/{game}/{split}/{s}", f"twx/{game}", s, split) for s in seeds]

    def make(self) -> TwxEnv:
        return TwxEnv(self.cfg.game_params, self.cfg.step_limit)

    def oracle_plan(self, task: Task, prefix: tuple[str, ...] | list[str] = (),
                    max_depth: int = 5) -> Optional[list[str]]:
        """Shortest plan from the state after `prefix`, by breadth-first search over moves (the
        game's gold path can wander through rooms off the shortest route). `coin`: walk until
        `take coin` is valid. `mapreader`: walk to the coin, take it, and walk back the same way to
        put it in the box. `peckingorder`: the gold path's takes, in order (reading the instructions
        book before each take is for who does not know the order yet).
        Other games use the gold path (from the start only)."""
        env = self._env()
        prefix = list(prefix)
        if task.env_name == "twx/coin":
            # From a mid-walk state coin's search never first undoes the walk's last move (as when
            # the recipe's actor, README "Results", was built: its pretraining walks depend on it).
            return self._walk_to(env, task, prefix, "take coin", max_depth, undo_last=False)
        if task.env_name == "twx/mapreader":
            if "take coin" not in prefix:
                out = self._walk_to(env, task, prefix, "take coin", max_depth)
                if out is None or not prefix:
                    # from the start, back the way it came: as short as any way back (the box is in
                    # the start room), and a plan's second half is then read off its first
                    return out and self.plan_for_route(task, out[:-1])
                back = self._walk_to(env, task, prefix + out, MAPREADER_GOAL, 2 * max_depth)
                return None if back is None else out + back
            return self._walk_to(env, task, prefix, MAPREADER_GOAL, max_depth)
        if prefix:
            return None
        gold = env.gold_path(task)
        return order_of(gold) if task.env_name in ORDER_GAMES else gold

    def gold_path(self, task: Task) -> list[str]:
        """The game's own solution (`look around` left out): peckingorder reads the book before each take."""
        return self._env().gold_path(task)

    @staticmethod
    def plan_for_route(task: Task, route: list[str]) -> list[str]:
        """The plan that walks `route` and then does what the game asks there: how a plan for any
        route through the map reads (actor pretraining writes such plans as advice)."""
        if task.env_name == "twx/mapreader":
            return route + ["take coin"] + [reverse_move(m) for m in reversed(route)] + [MAPREADER_GOAL]
        return route + ["take coin"]

    @staticmethod
    def _walk_to(env: TwxEnv, task: Task, start: list[str], goal: str, max_depth: int,
                 undo_last: bool = True) -> Optional[list[str]]:
        """Fewest moves from the state after `start` until `goal` is a valid action, then `goal`.
        A search never steps straight back within itself; `undo_last=False` also keeps its first
        move from undoing the last move of `start`."""
        frontier: list[list[str]] = [start]
        for _ in range(max_depth + 1):
            nxt = []
            for prefix in frontier:
                _, obs = env.reset(task)
                for a in prefix:
                    obs = env.step(a)
                if goal in (obs.valid_actions or []):
                    return prefix[len(start):] + [goal]
                own_move = len(prefix) > len(start)  # the last move is this search's, not `start`'s
                back = reverse_move(prefix[-1]) if prefix and (own_move or not undo_last) else None
                nxt += [prefix + [m] for m in obs.valid_actions or [] if m.startswith("move ") and m != back]
            frontier = nxt
        return None


MAPREADER_GOAL = "put coin in box"
# games whose plans are a route through the map and then the goal (`plan_for_route`)
ROUTE_GAMES = ("twx/coin", "twx/mapreader")
# games whose plan is an order read one step at a time (peckingorder: the instructions book names the
# next item to take; a wrong take ends the game), so a failed trial has read the order's first items
ORDER_GAMES = ("twx/peckingorder",)
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def reverse_move(move: str) -> str:
    """`move north` -> `move south`: the step that undoes a move (searches skip it)."""
    return "move " + _OPPOSITE.get(move.split()[-1], "")


def order_of(plan: list[str]) -> list[str]:
    """The takes of a plan, in order: the order itself, without the reading between them."""
    return [a for a in plan if a.startswith("take ")]
