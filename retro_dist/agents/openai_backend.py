"""The frozen actor behind an OpenAI-compatible `/v1/completions` endpoint (e.g. `vllm serve`):
the sync client (`OpenAIBackend`, lockstep loop) and the async one (`AsyncOpenAIClient`, continuous batching).

An endpoint goes down and comes back (a restarted server, a rolling deploy, an overloaded proxy), so
every request is retried with exponential backoff (`RetryPolicy`, shared by both clients) after a
refused or reset connection, a timeout, HTTP 5xx, 408 or 429. A client error (any other 4xx: a wrong
model name, a prompt the server rejects) fails at once with the server's message in one line. A
request that fails for good fails only itself: the sync client sends one request per prompt and
returns each prompt's text or its `BackendError`.

Action scoring (`actor.action_selection: score_valid`) needs no local tokenizer: the candidates of one
step ("prompt + ' action\\n'" each) go in one request to the completions API with `echo: true,
logprobs: 0, max_tokens: 0`, which returns the log-prob of every prompt token under the server's own
tokenizer; the tokens that cover the action's characters are its score (`action_logprobs`). vLLM's
server supports this; an endpoint that returns no prompt log-probs fails with a one-line error.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from retro_dist.agents.backends import BackendError, Seeds, load_tokenizer, per_request
from retro_dist.config import ActorConfig


class TransientError(Exception):
    """One attempt failed in a way a later attempt may not (the server is down, busy or restarting)."""


def retryable_status(status: int) -> bool:
    """5xx (server error, restarting), 408 (request timeout), 429 (rate limited) are worth retrying."""
    return status >= 500 or status in (408, 429)


def server_message(raw: Union[bytes, str], limit: int = 300) -> str:
    """The error message of an OpenAI-style error body ({"error": {"message": ...}} or {"message": ...}), one line."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else body
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except ValueError:
        pass
    return " ".join(text.split())[:limit]


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: retry n (0-based) waits d = min(max_s, base_s · 2^n), drawn
    uniformly from [d/2, d] so many clients of one restarted server do not retry in step."""

    max_retries: int
    base_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_config(cls, cfg: ActorConfig) -> "RetryPolicy":
        return cls(cfg.max_retries, cfg.retry_backoff_s, cfg.retry_backoff_max_s)

    def delay(self, retry: int) -> float:
        d = min(self.max_s, self.base_s * 2.0 ** retry)
        return d * (0.5 + 0.5 * self.rng.random())

    def gave_up(self, url: str, err: Exception) -> BackendError:
        return BackendError(f"actor endpoint {url} failed after {self.max_retries} retries: {err}")


def _attempt(req: urllib.request.Request, timeout: float) -> dict:
    """One HTTP attempt: the JSON body, or TransientError (retry) / BackendError (do not)."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:  # before URLError: it is one
        msg = f"HTTP {err.code}: {server_message(err.read() or b'')}"
        if retryable_status(err.code):
            raise TransientError(msg) from None
        raise BackendError(f"actor endpoint {req.full_url}: {msg}") from None
    except urllib.error.URLError as err:  # refused, reset, unreachable, timed out while connecting
        raise TransientError(f"{type(err.reason).__name__}: {err.reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:  # reset or cut mid-response
        raise TransientError(f"{type(err).__name__}: {err}") from None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise BackendError(f"actor endpoint {req.full_url}: response is not JSON: {err}") from None


def scoring_body(model: str, prompt: str, actions: Sequence[str]) -> tuple[dict, list[str]]:
    """One completions request scoring every candidate of one step: the prompt log-probs of each
    "prompt + ' action\\n'" (echoed, nothing generated). Returns the body and the candidate suffixes."""
    suffixes = [f" {a}\n" for a in actions]
    body = dict(model=model, prompt=[str(prompt) + sfx for sfx in suffixes], max_tokens=0, echo=True,
                logprobs=0, temperature=0.0)
    return body, suffixes


def action_logprobs(response: dict, prompt: str, suffixes: Sequence[str], url: str) -> list[list[float]]:
    """Per candidate, the log-probs of the server's tokens that cover its suffix (" action\\n").

    Found by characters, not token ids (the server's tokenizer is not ours): the echoed tokens'
    strings concatenate to the text sent, perhaps after a BOS token's; a token that straddles the
    prompt/action boundary counts as the action's (it is conditioned on the prompt before it)."""
    try:
        choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(suffixes):
            raise ValueError(f"{len(choices)} choices for {len(suffixes)} prompts")
        out = []
        for choice, sfx in zip(choices, suffixes):
            lp = choice.get("logprobs") or {}
            tokens, token_lps = lp.get("tokens"), lp.get("token_logprobs")
            if not tokens or not token_lps or all(x is None for x in token_lps):
                raise BackendError(f"actor endpoint {url} returned no prompt log-probs (echo + logprobs); "
                                   f"actor.action_selection 'score_valid' needs a server that does (e.g. vLLM)")
            out.append(_suffix_logprobs(tokens, token_lps, str(prompt) + sfx, len(sfx), url))
        return out
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(f"actor endpoint {url}: malformed scoring response: {type(err).__name__}: {err}") from None


def _suffix_logprobs(tokens: Sequence[str], token_lps: Sequence[Optional[float]], text: str, n_suffix: int,
                     url: str) -> list[float]:
    joined = "".join(tokens)
    start = joined.find(text)
    end = start + len(text)
    if start < 0 and joined.endswith(text[-n_suffix:]):
        # Tokens decoded one by one do not spell characters split across byte-level tokens (non-ASCII
        # prompt text shows as U+FFFD): then the echo (nothing generated after it) ends with the action.
        end = len(joined)
    elif start < 0:
        raise BackendError(f"actor endpoint {url}: the echoed tokens do not spell the prompt sent, "
                           f"so the action's tokens cannot be found")
    begin, pos, lps = end - n_suffix, 0, []
    for tok, lp in zip(tokens, token_lps):
        if pos < end and pos + len(tok) > begin:
            if lp is None:  # only the first token of a sequence has none; an action is never first
                raise BackendError(f"actor endpoint {url}: no log-prob for an action token")
            lps.append(float(lp))
        pos += len(tok)
    return lps


class OpenAIBackend:
    """Sync client: a batch of prompts becomes one request per prompt, sent concurrently (threads)."""

    def __init__(self, cfg: ActorConfig, tokenizer_name: Optional[str] = None, max_connections: int = 64):
        self.base_url = cfg.base_url.rstrip("/")
        self.model = cfg.model
        self.timeout = cfg.request_timeout_s
        self.api_key = os.environ.get(cfg.api_key_env, "EMPTY")
        self.tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name else None
        self.retry = RetryPolicy.from_config(cfg)
        self.retries = 0  # attempts repeated after a transient failure, all requests together
        self.failed = 0  # requests that failed for good (client error, or out of retries)
        self._count = threading.Lock()
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="openai-actor")

    def _post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.base_url}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        for retry in range(self.retry.max_retries + 1):
            try:
                return _attempt(req, self.timeout)
            except TransientError as err:
                if retry == self.retry.max_retries:
                    self._counted("failed")
                    raise self.retry.gave_up(req.full_url, err) from None
            except BackendError:
                self._counted("failed")
                raise
            self._counted("retries")
            time.sleep(self.retry.delay(retry))
        raise AssertionError("unreachable")

    def _counted(self, name: str) -> None:
        with self._count:
            setattr(self, name, getattr(self, name) + 1)

    def _complete(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> Union[str, BackendError]:
        body = dict(model=self.model, prompt=str(prompt), max_tokens=max_new_tokens, temperature=temperature,
                    stop=["\n"], seed=seed)
        try:
            return self._post("/completions", body)["choices"][0]["text"]
        except BackendError as err:
            return err
        except (KeyError, IndexError, TypeError) as err:
            return BackendError(f"actor endpoint {self.base_url}: malformed completion: {type(err).__name__}: {err}")

    def _score_one(self, prompt: str, actions: Sequence[str]) -> Union[list[list[float]], BackendError]:
        body, suffixes = scoring_body(self.model, prompt, actions)
        try:
            out = self._post("/completions", body)  # counts its own failures
        except BackendError as err:
            return err
        try:
            return action_logprobs(out, prompt, suffixes, self.base_url)
        except BackendError as err:
            self._counted("failed")
            return err

    def score_actions(self, prompts: Sequence[str], actions: Sequence[Sequence[str]]
                      ) -> list[Union[list[list[float]], BackendError]]:
        """Per prompt, per candidate action, the log-probs of the tokens of " action\\n" (one request
        per prompt holding all its candidates, prompts sent concurrently); a prompt whose request
        failed for good gets its BackendError."""
        if len(prompts) == 1:
            return [self._score_one(prompts[0], actions[0])]
        return list(self._pool.map(self._score_one, prompts, actions))

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                      seed: Seeds = 0) -> list[Union[str, BackendError]]:
        """One completion per prompt (seeds as `per_request`); a prompt whose request failed for
        good gets its BackendError in its slot, and the others are unaffected."""
        seeds = per_request(seed, len(prompts))
        if len(prompts) == 1:
            return [self._complete(prompts[0], max_new_tokens, temperature, seeds[0])]
        return list(self._pool.map(lambda p, s: self._complete(p, max_new_tokens, temperature, s), prompts, seeds))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class AsyncOpenAIClient:
    """A frozen actor behind an OpenAI-compatible `/v1/completions` endpoint, one request per step.

    Each request is retried as the sync client's are (`RetryPolicy`: connection
    errors, timeouts, 5xx, 408, 429; exponential backoff with jitter, at most `actor.max_retries`
    times); other 4xx fail at once. `retries` and `failed` count them.

    aiohttp, not httpx: httpcore's pool rescans every connection for every queued request, which
    cost milliseconds of CPU per request at a few hundred in flight (encode/httpx#3215). In
    benchmarks/rollout.py at 256 in flight the client alone reached 0.26 of the ideal rate with
    httpx and 0.97 with aiohttp (the whole runner: 0.25 -> 0.88)."""

    def __init__(self, cfg: ActorConfig, max_connections: int = 64):
        self.model = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        self.tokenizer = None  # text in, text out: the server tokenizes
        self._headers = {"Authorization": f"Bearer {os.environ.get(cfg.api_key_env, 'EMPTY')}"}
        self._limit, self._timeout = max_connections, cfg.request_timeout_s
        self._session = None  # created on first use, inside the event loop that uses it
        self.retry = RetryPolicy.from_config(cfg)
        self.retries = 0  # attempts repeated after a transient failure
        self.failed = 0  # requests that failed for good

    async def _attempt(self, url: str, body: dict) -> dict:
        """One attempt: the JSON body, or TransientError (retry) / BackendError (do not)."""
        import aiohttp

        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status >= 400:
                    msg = f"HTTP {resp.status}: {server_message(await resp.read())}"
                    if retryable_status(resp.status):
                        raise TransientError(msg)
                    raise BackendError(f"actor endpoint {url}: {msg}")
                return await resp.json()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as err:
            raise TransientError(f"{type(err).__name__}: {err}") from None
        except (aiohttp.ClientError, ValueError) as err:  # e.g. a body that is not JSON
            raise BackendError(f"actor endpoint {url} failed: {type(err).__name__}: {err}") from None

    async def _request(self, body: dict) -> dict:
        """POST body to /completions with retries (`RetryPolicy`); the JSON answer or BackendError."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._limit),
                                                  timeout=aiohttp.ClientTimeout(total=self._timeout),
                                                  headers=self._headers)
        url = f"{self.base_url}/completions"
        for retry in range(self.retry.max_retries + 1):
            try:
                return await self._attempt(url, body)
            except TransientError as err:
                if retry == self.retry.max_retries:
                    self.failed += 1
                    raise self.retry.gave_up(url, err) from None
                self.retries += 1
                await asyncio.sleep(self.retry.delay(retry))
            except BackendError:
                self.failed += 1
                raise
        raise AssertionError("unreachable")

    async def generate_text(self, prompt: str, max_new_tokens: int, temperature: float, seed: int = 0) -> str:
        out = await self._request(dict(model=self.model, prompt=str(prompt), max_tokens=max_new_tokens,
                                       temperature=temperature, stop=["\n"], seed=seed))
        try:
            return out["choices"][0]["text"]
        except (KeyError, IndexError, TypeError) as err:
            self.failed += 1
            raise BackendError(f"actor endpoint {self.base_url}: malformed completion: "
                               f"{type(err).__name__}: {err}") from None

    async def score_actions(self, prompt: str, actions: Sequence[str]) -> list[list[float]]:
        """Per candidate action, the log-probs of the tokens of " action\\n" (one request for all)."""
        body, suffixes = scoring_body(self.model, prompt, actions)
        out = await self._request(body)
        try:
            return action_logprobs(out, prompt, suffixes, self.base_url)
        except BackendError:
            self.failed += 1
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def check_endpoint(base_url: str, timeout_s: float = 5.0, api_key: Optional[str] = None) -> list[str]:
    """GET {base_url}/models (with the API key, as the run's requests send it); returns the served
    model ids or raises BackendError in one line."""
    url = f"{base_url.rstrip('/')}/models"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return [m["id"] for m in json.loads(resp.read()).get("data", [])]
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise BackendError(f"actor endpoint {url} is unreachable: {reason}") from None
