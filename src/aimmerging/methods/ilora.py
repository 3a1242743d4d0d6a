"""I-LoRA: Interpolation-based LoRA (Ren et al. 2024, "Analyzing and Reducing Catastrophic
Forgetting in Parameter Efficient Tuning", arXiv 2402.18865), a dual-memory experience replay on
one LoRA adapter:

* the *fast* adapter (working memory) is the trained one (``view.params``), trained on current
  micro-batches mixed with replay-memory examples (``ilora_replay_ratio`` memory examples per
  current-task example, as ``replay`` mixes them);
* the *slow* adapter (long-term memory) interpolates towards it after every optimizer step:
  slow <- ilora_ema * slow + (1 - ilora_ema) * fast;
* a consistency loss keeps the fast adapter's representations of the replay examples near the
  slow adapter's: ``ilora_beta`` x the mean squared difference of the two models' hidden states
  (the output of every layer) over the replay examples' tokens;
* at the end of each task the slow adapter is the one evaluated and carried on to the next task
  (``task_end_adapter`` returns it), so each task's fast and slow adapters start equal.

Defaults: ``ilora_ema`` 0.99, ``ilora_beta`` 1.0, ``ilora_replay_ratio`` 1.0.

Choices where the paper is silent, or where the authors' code (github.com/which47/LLMCL,
``method/ILORA.py``) differs from it:

* ``ilora_ema`` 0.99, constant (no warm-up). NOT checked against the paper's text, which was not
  at hand when this was written: 0.99 is the value we were given for the paper's interpolation
  coefficient. The authors' code uses 0.25 with a mean-teacher warm-up (min(1 - 1/(step + 1),
  0.25)). A coefficient of 0.99 makes the slow adapter trail the fast one by about
  1 / (1 - ilora_ema) = 100 steps, so on streams with few steps per task it carries on an adapter
  that has taken only part of the task's update: lower it there (``--ilora-ema 0.9``, or 0.25 as
  in that code);
* ``ilora_replay_ratio`` 1.0: the authors' code draws a memory batch as large as the current one
  (``replay`` defaults to 0.25); the memory examples get the ordinary training loss in the same
  micro-batch (their code averages the two batches' losses, which a token-mean over the mixed
  micro-batch approximates);
* the consistency loss is the plain MSE between the fast and the slow hidden states, the slow ones
  without gradients. The authors' code regresses the fast states onto the element-wise maximum
  of the two (a quirk of the CLS-ER code it descends from); we do not;
* which hidden states: every layer's output (the model's ``hidden_states`` without the embedding
  layer's, which LoRA on attention projections cannot change; the authors' code includes it), at
  the tokens of the replay examples (attention mask 1), averaged over layers, tokens and hidden
  units. For an encoder-decoder model: the encoder's layers at the input tokens and the decoder's
  at the answer tokens, pooled the same way;
* under several processes each process compares the replay rows of its own share of the
  micro-batch (DDP averages the gradients);
* the slow model's forward runs with dropout off (eval mode), on the replay rows only (padded as
  the whole micro-batch, so positions line up: ``view.forward(..., rows=...)``), under
  ``view.timed("consistency")``; the fast model's states are those of the training forward
  itself (``training_hidden_states``: the loop asks the training forward for its hidden states,
  ``LossInputs.hidden``), so no extra forward with gradients is needed;
* the first task has no memory: it trains like ``seq`` with the EMA running, and its slow
  adapter is the one evaluated and carried on, as on every task;
* a step the engine skipped (non-finite loss or gradient) does not move the slow adapter;
* ``--select-best-every`` picks among fast adapters, but the slow adapter replaces it at the
  task end (the slow adapter is I-LoRA's model).

Resume: the slow adapter at a stage's end is the adapter saved and carried on, so a resumed stage
needs nothing more; ``state_dict()`` still holds it (``load_state_dict`` restores it into
``self.slow``), and every stage starts its slow adapter from the adapter it starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.formatting import IGNORE_INDEX
from ..models.lora import snapshot
from ..settings import Bounded, option
from . import register_method
from .base import Method


@dataclass
class ILoRASettings(Bounded):
    ilora_ema: float = option(0.99, "ilora: interpolation (EMA) coefficient of the slow adapter: slow <- ema * "
                              "slow + (1 - ema) * fast after every step", ge=0, lt=1)
    ilora_beta: float = option(1.0, "ilora: weight of the hidden-state consistency loss between the fast and the "
                               "slow adapter on replay examples", ge=0)
    ilora_replay_ratio: float = option(1.0, "ilora: memory examples added per current-task example in each "
                                       "micro-batch", ge=0)


def consistency_mse(fast: list[tuple[tuple, torch.Tensor]], slow: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers, masked tokens and hidden units of (fast - slow)^2 (slow: no gradients)."""
    total, count = 0.0, 0.0
    for (fast_states, mask), (slow_states, _) in zip(fast, slow):
        m = mask.unsqueeze(-1).float()
        for h_fast, h_slow in zip(fast_states, slow_states):
            total = total + (((h_fast.float() - h_slow.detach().float()) ** 2) * m).sum()
            count = count + m.sum() * h_fast.shape[-1]
    return total / count


@register_method
class ILoRA(Method):
    name = "ilora"
    own_forward_passes = True
    paper = "I-LoRA: Interpolation-based LoRA (Ren et al. 2024, arXiv 2402.18865)"
    summary = ("replay into a fast adapter; a slow EMA adapter (evaluated, carried on) anchors it through a "
               "hidden-state consistency loss on replay examples")
    Settings = ILoRASettings
    uses_memory = True

    def __init__(self, settings=None):
        super().__init__(settings)
        self.slow: Optional[list[torch.Tensor]] = None

    def before_task(self, view) -> None:
        self.slow = snapshot(view.params)  # fast and slow start equal: the adapter carried on
        self.training_hidden_states = bool(view.memory) and self.settings.ilora_beta > 0 \
            and self.settings.ilora_replay_ratio > 0

    def extra_examples(self, view, micro_batch):
        if not view.memory or self.settings.ilora_replay_ratio <= 0:
            return []
        k = math.ceil(self.settings.ilora_replay_ratio * len(micro_batch))
        return view.memory.sample(view.rng("mix"), k)

    def extra_loss(self, view, inputs) -> Optional[torch.Tensor]:
        if not self.training_hidden_states:
            return None
        rows = [i for i, e in enumerate(inputs.examples) if e.task not in view.stage.train_tasks
                and bool((inputs.labels[i] != IGNORE_INDEX).any())]
        if not rows:
            return None
        index = torch.tensor(rows, device=inputs.labels.device)
        fast = [(tuple(h.index_select(0, index.to(h.device)) for h in states), mask.index_select(0, index.to(mask.device)))
                for states, mask in inputs.hidden]
        with view.timed("consistency"):
            slow = view.forward(inputs.examples, rows=rows, adapter=self.slow, hidden_states=True).hidden
        term = self.settings.ilora_beta * consistency_mse(fast, slow)
        view.log("consistency", float(term.detach()))
        return term

    def after_step(self, view, record):
        if record.get("skipped"):
            return None
        self.update_slow(view.params)
        return None

    def update_slow(self, params) -> None:
        """slow <- ema * slow + (1 - ema) * fast."""
        ema = self.settings.ilora_ema
        with torch.no_grad():
            for s, p in zip(self.slow, params):
                s.mul_(ema).add_(p.detach(), alpha=1 - ema)

    def task_end_adapter(self, view):
        self.training_hidden_states = False
        return [s.clone() for s in self.slow]

    def state_dict(self) -> dict:
        return {"slow": [s.detach().cpu() for s in self.slow]} if self.slow is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "slow" in state:
            self.slow = list(state["slow"])
