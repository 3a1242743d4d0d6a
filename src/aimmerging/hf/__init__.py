"""aimmerging's methods inside the Hugging Face training stack (``transformers.Trainer``, TRL's ``SFTTrainer``).

* :class:`ContinualCallback` - any registered method (a user's own included) as a
  ``TrainerCallback`` for one task, through the Trainer host (:mod:`aimmerging.hf.host`: the
  trainer's rows, collator, model and optimizer); :class:`AIMMergingCallback` is it with
  ``method="aimmerging"``.
* :func:`train_stream` - a task stream with one fresh trainer per task on the same PEFT model,
  any method, the reference replay memory, evaluation after every task, OP/BWT.
* :func:`tokenize_examples`, :class:`PadCollator`, :func:`label_of`, :func:`as_examples` - rows
  for a plain ``Trainer`` tokenised as aimmerging's runner tokenises them.

``pip install 'aimmerging[hf]'`` adds ``datasets`` and ``trl`` (neither is imported here).
"""

from .callback import AIMMergingCallback, ContinualCallback
from .data import PadCollator, as_examples, label_of, tokenize_examples
from .host import Row
from .stream import StreamResult, generation_score, train_stream

__all__ = ["AIMMergingCallback", "ContinualCallback", "PadCollator", "Row", "StreamResult", "as_examples",
           "generation_score", "label_of", "tokenize_examples", "train_stream"]
