"""AIMMerging inside the Hugging Face training stack (``transformers.Trainer``, TRL's ``SFTTrainer``).

* :class:`AIMMergingCallback` - the method as a ``TrainerCallback`` for one task: forgetting
  probe, merge controller, replay steps with the trainer's optimizer, fusion, trace records.
* :func:`train_stream` - a task stream with one fresh trainer per task on the same PEFT model,
  the reference replay memory, evaluation after every task, OP/BWT.
* :func:`tokenize_examples`, :class:`PadCollator`, :func:`label_of`, :func:`as_examples` - rows
  for a plain ``Trainer`` tokenised as aimmerging's runner tokenises them.

``pip install 'aimmerging[hf]'`` adds ``datasets`` and ``trl`` (neither is imported here).
"""

from .callback import AIMMergingCallback, controller_config
from .data import PadCollator, as_examples, label_of, tokenize_examples
from .stream import StreamResult, generation_score, train_stream

__all__ = ["AIMMergingCallback", "PadCollator", "StreamResult", "as_examples", "controller_config",
           "generation_score", "label_of", "tokenize_examples", "train_stream"]
