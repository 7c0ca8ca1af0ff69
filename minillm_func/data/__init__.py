"""Everything between a file on disk and a batch dict of tensors."""
from .datasets import (ROLES, ConversationDataset, LanguageModelingDataset, PreferenceDataset, chat_prompt,
                       render_messages, validate_record)
from .demo import DemoCorpus, demo_corpus
from .formats import detect_kind, load_dataset, read_records, records_from_hf
from .loader import Batches, collate
from .tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer", "Batches", "ByteTokenizer", "ConversationDataset", "DemoCorpus", "LanguageModelingDataset",
    "PreferenceDataset", "ROLES", "chat_prompt", "collate", "demo_corpus", "detect_kind", "load_dataset",
    "load_tokenizer", "read_records", "records_from_hf", "render_messages", "validate_record",
]
