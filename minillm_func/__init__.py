"""minillm_func: functional, JAX-style training of small language models on PyTorch.

Pure losses and steps over explicit state pytrees; see the README for a tour.
"""
from . import (accumulate, amp, checkpoint, data, ensemble, hf, hooks, labels, lora, memory, objectives, optim, rl,
               schedules, stages, step, trainers, tree)
from .data import (BPETokenizer, Batches, ByteTokenizer, ConversationDataset, HFTokenizer,
                   LanguageModelingDataset, PreferenceDataset, PromptDataset, UnpairedPreferenceDataset, collate,
                   demo_corpus, load_dataset)
from .losses import (IGNORE_INDEX, dpo_loss, grpo_loss, kto_loss, orpo_loss, pretrain_loss, sequence_logps,
                     sft_masked_loss)
from .generate import generate, generate_text
from .memory import DynamicBatchSizer, MemoryConfig, MemoryMonitor
from .model import Model, ModelConfig, build_model
from .step import TrainState, make_train_step
from .trainers import Trainer, create_trainer

__version__ = "0.1.0"

__all__ = [
    "BPETokenizer", "Batches", "ByteTokenizer", "ConversationDataset", "HFTokenizer", "LanguageModelingDataset",
    "PreferenceDataset", "collate", "data", "demo_corpus", "load_dataset",
    "DynamicBatchSizer", "MemoryConfig", "MemoryMonitor", "checkpoint", "generate", "generate_text", "TrainState", "Trainer", "create_trainer", "make_train_step", "step", "trainers",
    "IGNORE_INDEX", "Model", "ModelConfig", "accumulate", "amp", "hf", "hooks", "labels", "lora", "objectives", "stages", "build_model", "dpo_loss", "optim",
    "pretrain_loss", "schedules", "sequence_logps", "sft_masked_loss", "tree", "grpo_loss", "kto_loss", "orpo_loss",
    "rl", "PromptDataset", "UnpairedPreferenceDataset",
]
