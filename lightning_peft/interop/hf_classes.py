"""peft's `task_type` and the transformers Auto class that goes with it, derived from the model itself.

An export names the task its base was built for, so that `PeftModel.from_pretrained` wraps it
in the right class and `lightning-peft inspect` loads the base with the right Auto class
(a causal LM loaded as `AutoModel` lacks the `model.` prefix its adapters were trained on).
"""

from __future__ import annotations

from torch import nn

AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_MAPPING_NAMES = {
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


def peft_task_type(model: nn.Module) -> str | None:
    """peft's `task_type` for a transformers model (`CAUSAL_LM` for `LlamaForCausalLM`); `None` for a bare
    backbone (`LlamaModel`) or a model transformers' Auto classes do not know."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, mapping in _MAPPING_NAMES.items():
        if name in getattr(modeling_auto, mapping, {}).values():
            return task
    return None


def auto_class_name(task_type: str | None) -> str:
    """The transformers Auto class that builds a base for `task_type` (`AutoModel` without one)."""
    return AUTO_CLASSES.get(str(task_type), "AutoModel")
