"""LwF: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), as used for language
models: from the second task on, the adapter the previous task ended with is a frozen *teacher*,
and every training micro-batch adds

    lwf_alpha * KL( softmax(z_teacher / T) || softmax(z_student / T) )

averaged over the answer positions of the micro-batch (the positions whose label is not -100;
the full vocabulary at each). z are the logits of the current task's inputs, teacher-forced on
the gold answer as the student is, so the teacher sees exactly the student's forward.

Defaults: ``lwf_alpha`` 1.0 and ``lwf_temperature`` 2.0, the paper's lambda_o = 1 and T = 2.

Choices where the paper is silent (it distils a CNN's old-task heads):

* the teacher is the whole previous adapter (the LoRA tensors at ``before_task``), not old heads:
  a language model has one head, so LwF distils its next-token distributions at the answer
  positions; prompt positions carry no loss in this harness and are not distilled either;
* no T^2 factor (Hinton et al. scale the soft loss by T^2; Li & Hoiem do not): ``lwf_alpha``
  is the weight of the KL as written above;
* the teacher runs with dropout off (eval mode), as the paper records the old network's
  responses once before training; the student trains with the run's LoRA dropout. The teacher
  pass draws no random numbers, so it does not shift the student's dropout masks;
* the teacher's logits are computed on the fly for every micro-batch (the paper precomputes
  them once per example: same values, since the teacher is frozen, without storing a
  vocabulary-sized tensor per training token);
* under several processes each process distils its share of the micro-batch (its mean over its
  own answer positions; DDP averages the gradients).

How the teacher pass works. The loop hands ``extra_loss`` the student's logits, not its inputs
(the view has no tokenizer), so :class:`ForwardRecorder` keeps the arguments of the model's
latest forward call (a forward pre-hook on ``view.model``): that is the student's forward of this
micro-batch, and the teacher pass calls the model again with the same arguments while the LoRA
tensors hold the teacher's values. The values are swapped through ``p.data`` under
``torch.no_grad()`` (autograd's version counters, which guard the student's saved tensors, do not
see it) and restored bit for bit before the loop runs the student's backward. The teacher passes
are timed under ``distillation`` (inside the loop's ``inner`` time). ``ForwardRecorder``,
:class:`RecordedCall`, :func:`adapter_values`, :func:`eval_mode` and :func:`answer_logits` are
also used by ``ewc`` (Fisher passes) and ``ilora`` (the slow adapter's pass).

Nothing has to survive a resume: the teacher is the adapter a stage starts from, which a resumed
run loads from the previous stage's folder.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX
from ..models.lora import snapshot
from ..settings import option
from . import register_method
from .base import Method


# -- running the training forward again --------------------------------------------------------------
@dataclass
class RecordedCall:
    """The arguments of one forward call of the model, and the autocast state it ran under."""

    args: tuple
    kwargs: dict
    device_type: str
    autocast: Optional[torch.dtype]  # the autocast dtype, None when autocast was off

    @property
    def batch_size(self) -> int:
        ids = self.kwargs.get("input_ids", self.args[0] if self.args else None)
        return int(ids.shape[0])

    def rows(self, index: Sequence[int]) -> "RecordedCall":
        """The same call on the rows ``index`` of the batch (every tensor whose first dimension is
        the batch is indexed; other arguments, e.g. ``logits_to_keep``, are kept)."""
        n = self.batch_size
        idx = torch.as_tensor(list(index), dtype=torch.long)

        def pick(v: Any) -> Any:
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
                return v.index_select(0, idx.to(v.device))
            return v

        return RecordedCall(tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()},
                            self.device_type, self.autocast)


class ForwardRecorder:
    """Records the latest forward call of ``model`` (a forward pre-hook), so that a method can run
    the training forward of the current micro-batch again: with other adapter values (a teacher),
    on some rows only, or with gradients of its own. With ``hidden_states=True`` every recorded
    call also asks for the hidden states (``output_hidden_states=True`` is added to it) and its
    output is kept in ``output``. Calls made through :meth:`run` are not recorded. ``remove()``
    takes the hooks off the model."""

    def __init__(self, model, hidden_states: bool = False):
        self.model = model
        self.hidden_states = hidden_states
        self.last: Optional[RecordedCall] = None
        self.output: Any = None
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._running = False
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True)]
        if hidden_states:
            self._handles.append(model.register_forward_hook(self._after, with_kwargs=True))

    def _before(self, module, args, kwargs):
        if self._running:
            return None
        if self.hidden_states:
            kwargs = {**kwargs, "output_hidden_states": True}
        ids = kwargs.get("input_ids", args[0] if args else None)
        device_type = ids.device.type if torch.is_tensor(ids) else "cpu"
        on = torch.is_autocast_enabled(device_type)
        self.last = RecordedCall(tuple(args), dict(kwargs), device_type,
                                 torch.get_autocast_dtype(device_type) if on else None)
        self.output = None
        return (args, kwargs) if self.hidden_states else None

    def _after(self, module, args, kwargs, output):
        if not self._running:
            self.output = output

    def latest(self, batch_size: int) -> RecordedCall:
        """The recorded call of the micro-batch ``extra_loss`` is looking at (checked by its size)."""
        call = self.last
        if call is None or call.batch_size != batch_size:
            got = "none" if call is None else f"a batch of {call.batch_size}"
            raise RuntimeError(f"the model's latest forward call ({got}) is not this micro-batch of {batch_size}: "
                               "the training forward did not go through view.model")
        return call

    def run(self, call: RecordedCall, **overrides):
        """``model(*call.args, **call.kwargs, **overrides)`` under the call's autocast state, not recorded."""
        self._running = True
        try:
            ctx = (torch.autocast(call.device_type, dtype=call.autocast) if call.autocast is not None
                   else contextlib.nullcontext())
            with ctx:
                return self.model(*call.args, **{**call.kwargs, **overrides})
        finally:
            self._running = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.last = self.output = None


@contextlib.contextmanager
def adapter_values(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]):
    """Give ``params`` the ``values`` for the block, then put the previous values back bit for bit.
    Written through ``p.data`` under no_grad: the version counters autograd checks for the tensors a
    pending backward saved are not bumped, and that backward sees the restored values."""
    with torch.no_grad():
        saved = [p.data.clone() for p in params]
        for p, v in zip(params, values):
            p.data.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the block; the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def answer_logits(output, positions: int, seq2seq: bool) -> torch.Tensor:
    """The logits of the answer positions, as the engine slices them for ``LossInputs.logits``:
    the decoder's logits for a seq2seq model; for a causal model the ``positions`` positions before
    the last one (left-padded batches: position t predicts token t + 1)."""
    logits = output.logits
    return logits if seq2seq else logits[:, -(positions + 1):-1]


# -- the method -----------------------------------------------------------------------------------------
def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the positions where ``mask`` holds of KL(softmax(teacher / T) || softmax(student / T))."""
    log_s = F.log_softmax(student[mask].float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


@dataclass
class LwFSettings:
    lwf_alpha: float = option(1.0, "lwf: weight of the distillation term (KL from the previous task's adapter)")
    lwf_temperature: float = option(2.0, "lwf: softmax temperature T of the distillation")

    def __post_init__(self) -> None:
        if not self.lwf_alpha >= 0:
            raise ValueError("lwf_alpha: must be >= 0")
        if not self.lwf_temperature > 0:
            raise ValueError("lwf_temperature: must be > 0")


@register_method
class LwF(Method):
    name = "lwf"
    paper = "LwF: Learning without Forgetting (Li & Hoiem, TPAMI 2017)"
    summary = ("from task 2 on, distils the previous task's adapter's answer-token distributions on the "
               "current inputs (KL at --lwf-temperature, weight --lwf-alpha)")
    Settings = LwFSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.teacher: Optional[list[torch.Tensor]] = None
        self.recorder: Optional[ForwardRecorder] = None
        self._terms: list[float] = []

    def before_task(self, view) -> None:
        self._close()
        self.teacher = None
        if view.stage.index > 0 and self.settings.lwf_alpha > 0:
            self.teacher = snapshot(view.params)
            self.recorder = ForwardRecorder(view.model)

    def teacher_logits(self, view, inputs) -> torch.Tensor:
        """The teacher's logits of the micro-batch's answer positions (no gradients)."""
        call = self.recorder.latest(inputs.logits.shape[0])
        with torch.no_grad(), eval_mode(view.model), adapter_values(view.params, self.teacher):
            out = self.recorder.run(call)
            return answer_logits(out, inputs.logits.shape[1], self.recorder.seq2seq).detach()

    def extra_loss(self, view, inputs) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        mask = inputs.labels != IGNORE_INDEX
        if not bool(mask.any()):  # a masked stand-in share (several processes): nothing to distil
            return None
        with view.timed("distillation"):
            teacher = self.teacher_logits(view, inputs)
        term = self.settings.lwf_alpha * distillation_kl(inputs.logits, teacher, mask, self.settings.lwf_temperature)
        self._terms.append(float(term.detach()))
        return term

    def after_step(self, view, record):
        if self._terms:
            record["distillation"] = sum(self._terms) / len(self._terms)
            self._terms = []
        return None

    def task_end_adapter(self, view):
        self._close()
        return None

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
