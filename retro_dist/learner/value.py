"""The learned baseline (`learner.baseline: value`): a small value head V(x) on the reflector.

V reads the reflector's last hidden state at the prompt's last token, i.e. the state just before
the reflection is generated, so it depends on x only and subtracting it leaves the policy
gradient unbiased. It is a 2-layer MLP (hidden → 128 → 1, tanh) whose output layer starts at
zero (V = 0 at first, like no baseline), trained by regression on the rewards, Σ_i (V(x_i) − r_i)²,
in the same AdamW step as the policy (its own parameter group, `learner.value_lr`). The advantage
uses V detached, computed before the step: A = r − V(x).

The head reads the hidden state *detached*: the value loss trains the head only. Letting it flow
into the shared LoRA (PPO's shared-body form, L = L_pg + c·L_V) moved the adapter by full Adam
steps on batches whose advantages were all 0, i.e. it changed the policy with no reward signal,
and on the tiny model its loss oscillated (1.0 → 6.1 in four steps at lr 1e-2); a loss weight c
would also be nearly void for the head's own parameters under Adam, which is why the head has a
learning rate instead.

Saved beside the adapter as `value_head.safetensors` (its AdamW moments are in the checkpoint's
optimizer tensors with the LoRA ones); its shape goes in the checkpoint's JSON state.
"""
from __future__ import annotations

import numpy as np
import torch

TENSORS = "value_head.safetensors"
WIDTH = 128  # hidden units: enough for a reward that depends nonlinearly on the prompt, ~17k parameters at H = 128


class ValueHead(torch.nn.Module):
    def __init__(self, hidden_size: int, width: int = WIDTH):
        super().__init__()
        self.hidden_size, self.width = hidden_size, width
        self.inner = torch.nn.Linear(hidden_size, width)
        self.out = torch.nn.Linear(width, 1)
        torch.nn.init.zeros_(self.out.weight)  # V = 0 until it has seen rewards
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states -> (B,) predicted rewards, fp32 whatever the forward's precision."""
        return self.out(torch.tanh(self.inner(state.float()))).squeeze(-1)

    def shape(self) -> dict:
        return {"hidden_size": self.hidden_size, "width": self.width}

    def tensors(self) -> dict:
        """Name -> CPU copy of each parameter (what the checkpoint's safetensors file holds)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict, shape: dict, where: str) -> None:
        if shape != self.shape():
            raise RuntimeError(f"{where}: value head shape {shape} differs from this learner's {self.shape()}")
        missing = set(self.state_dict()) - set(tensors)
        if missing:
            raise RuntimeError(f"{where}: value head lacks {sorted(missing)}")
        self.load_state_dict({k: tensors[k] for k in self.state_dict()})


@torch.no_grad()
def predict(policy, head: ValueHead, prompts: list, max_rows: int) -> np.ndarray:
    """V(x_i) for each prompt (float64), from the current adapter and head: the baseline b(x)."""
    if not prompts:
        return np.zeros(0)
    return head(policy.prompt_states(prompts, max_rows)).double().cpu().numpy()
