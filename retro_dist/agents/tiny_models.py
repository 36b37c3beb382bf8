"""`retro-dist make-models`: build the tiny local Llama and its tokenizer, saved like any checkpoint.

No model hub is reachable on the project's machines. This writes a real HF checkpoint folder
(config, safetensors weights, tokenizer) that vLLM, transformers and peft load through their
ordinary loading code; users point the same config keys at hub names instead.
"""
from __future__ import annotations

import random
from pathlib import Path

from retro_dist.agents import prompts

# vLLM's CPU attention kernels reject head_dim 16; 64 works (seen on this project's CPU machines).
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=2048, tie_word_embeddings=False)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def game_corpus(games: list[str], game_params: str, seeds_per_game: int = 20, steps: int = 8) -> list[str]:
    """Text from real TextWorldExpress games played with random valid actions, plus prompt stems."""
    from retro_dist.envs.base import Task
    from retro_dist.envs.twx import TwxEnv

    rng = random.Random(0)
    env = TwxEnv(game_params, step_limit=steps)
    lines = []
    try:
        for game in games:
            for seed in env.seeds(game, "train")[:seeds_per_game]:
                instruction, obs = env.reset(Task(f"twx/{game}/train/{seed}", f"twx/{game}", seed, "train"))
                history = []
                for _ in range(steps):
                    action = rng.choice(obs.valid_actions or ["look around"])
                    obs = env.step(action)
                    history.append((action, obs.text))
                    lines.extend(obs.valid_actions or [])
                    if obs.done:
                        break
                memory = [prompts.reflection_from_text(f"go {d} first") for d in ("north", "south")]
                lines.append(prompts.actor_prompt(f"twx/{game}", instruction, memory, obs.text, history))
                lines.append(prompts.reflection_prompt(f"twx/{game}", instruction, memory, obs.text, history, 0.0))
    finally:
        env.close()
    return lines


def build_tokenizer(corpus: list[str], vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level: any string encodes, so generated reflections round-trip through ids.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_model(tokenizer, seed: int = 0, **shape):
    """A randomly initialised Llama for `tokenizer`: TINY_LLAMA, with any of its keys overridden by `shape`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32", **{**TINY_LLAMA, **shape})
    return LlamaForCausalLM(config)


def make_models(out_dir: str = "models/tiny-lm", games: tuple[str, ...] = ("coin", "mapreader", "sorting"),
                game_params: str = "", force: bool = False) -> Path:
    """Write the tiny checkpoint to `out_dir` (skipped when it is already there, unless `force`)."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and not force:
        return out
    tokenizer = build_tokenizer(game_corpus(list(games), game_params))
    model = build_model(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
