"""Everything between a file on disk and a batch dict of tensors."""
from .chat import render_chat, tokenize_chat
from .datasets import (ROLES, ConversationDataset, LanguageModelingDataset, PreferenceDataset, PromptDataset,
                       UnpairedPreferenceDataset, chat_prompt, render_messages, start_ids, validate_record)
from .demo_tasks import DemoCorpus, demo_corpus
from .formats import detect_kind, load_dataset, read_records, records_from_hf
from .loader import Batches, collate
from .packing import PackedDataset, best_fit_decreasing
from .shards import TokenShards, is_token_folder, prepare, read_index
from .tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer, named_tokenizer, parse_tokenizer_spec

__all__ = [
    "Batches", "best_fit_decreasing", "BPETokenizer", "ByteTokenizer", "chat_prompt", "collate",
    "ConversationDataset", "demo_corpus", "DemoCorpus", "detect_kind", "HFTokenizer", "is_token_folder",
    "LanguageModelingDataset", "load_dataset", "load_tokenizer", "named_tokenizer", "PackedDataset", "parse_tokenizer_spec",
    "PreferenceDataset", "prepare", "PromptDataset", "read_index", "read_records", "records_from_hf", "render_chat",
    "render_messages", "ROLES", "start_ids", "tokenize_chat", "TokenShards", "UnpairedPreferenceDataset",
    "validate_record",
]
