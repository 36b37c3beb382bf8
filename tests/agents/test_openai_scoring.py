"""`score_valid` through an OpenAI-compatible endpoint: the action's tokens are found by characters
in the echoed prompt (the server's tokenizer is not ours), and an endpoint that returns no prompt
log-probs fails in one line. (Against a real vLLM server: tests/integration/test_openai_backend.py.)"""
import asyncio

import pytest

from benchmarks.fake_openai_server import serve_in_thread
from retro_dist.agents.async_policies import AsyncActorPolicy
from retro_dist.agents.backends import BackendError
from retro_dist.agents.openai_backend import AsyncOpenAIClient, OpenAIBackend, action_logprobs, scoring_body
from retro_dist.agents.policies import ActorPolicy
from retro_dist.config import ActorConfig, load_config

PROMPT = "You are in the kitchen.\n>"


def _choice(tokens, lps, index=0):
    return {"index": index, "logprobs": {"tokens": tokens, "token_logprobs": lps}}


def test_action_tokens_are_found_by_characters_after_a_bos_token():
    body, suffixes = scoring_body("m", PROMPT, ["move north", "take coin"])
    assert body["prompt"] == [PROMPT + " move north\n", PROMPT + " take coin\n"]
    assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 0
    head = ["<s>", "You are in the kitchen", ".\n", ">"]
    resp = {"choices": [
        # listed out of order: matched by index
        _choice(head + [" take", " coin", "\n"], [None, -1.0, -2.0, -3.0, -0.5, -0.25, -0.125], index=1),
        _choice(head + [" move", " north", "\n"], [None, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0], index=0)]}
    assert action_logprobs(resp, PROMPT, suffixes, "u") == [[-4.0, -5.0, -6.0], [-0.5, -0.25, -0.125]]


def test_a_token_across_the_prompt_action_boundary_counts_as_the_action_s():
    _, suffixes = scoring_body("m", PROMPT, ["look"])
    resp = {"choices": [_choice(["You are in the kitchen", ".\n", "> look", "\n"], [None, -1.0, -2.0, -3.0])]}
    assert action_logprobs(resp, PROMPT, suffixes, "u") == [[-2.0, -3.0]]


def test_non_ascii_prompt_text_decoded_token_by_token_still_finds_the_action():
    prompt = "You see a caf\u00e9.\n>"
    _, suffixes = scoring_body("m", prompt, ["look"])
    # vLLM decodes prompt tokens one by one: a character split over two byte-level tokens shows as U+FFFD
    resp = {"choices": [_choice(["<s>", "You see a caf", "\ufffd", "\ufffd", ".\n>", " look", "\n"],
                                [None, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])]}
    assert action_logprobs(resp, prompt, suffixes, "u") == [[-5.0, -6.0]]


def test_echoed_tokens_that_do_not_spell_the_prompt_fail_in_one_line():
    _, suffixes = scoring_body("m", PROMPT, ["look"])
    resp = {"choices": [_choice(["something", " else"], [None, -1.0])]}
    with pytest.raises(BackendError, match="do not spell the prompt"):
        action_logprobs(resp, PROMPT, suffixes, "u")


def test_config_accepts_score_valid_over_http():
    cfg = load_config("configs/test.yaml", ["actor.backend=openai", "actor.base_url=http://127.0.0.1:1/v1",
                                            "actor.action_selection=score_valid"])
    assert cfg.actor.action_selection == "score_valid"


def test_an_endpoint_without_prompt_logprobs_fails_the_step_in_one_line():
    with serve_in_thread(latency_s=0.0, model="fake") as server:  # answers text, never log-probs
        cfg = ActorConfig(backend="openai", model="fake", base_url=server.base_url, action_selection="score_valid",
                          max_retries=0)
        backend = OpenAIBackend(cfg)
        out = ActorPolicy(cfg, backend).act([PROMPT, PROMPT], seed=0, valid_actions=[["look", "take coin"], None])
        assert isinstance(out[0], BackendError) and "returned no prompt log-probs" in str(out[0])
        assert "\n" not in str(out[0])
        assert isinstance(out[1], str)  # no valid actions listed: generated, unaffected
        backend.close()

        async def run_async():
            policy = AsyncActorPolicy(cfg, AsyncOpenAIClient(cfg))
            try:
                return await policy.act(PROMPT, seed=0, valid_actions=["look", "take coin"])
            finally:
                await policy.close()

        with pytest.raises(BackendError, match="returned no prompt log-probs"):
            asyncio.run(run_async())
