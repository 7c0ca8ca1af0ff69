"""Fine-tune a Hugging Face model folder with SFT, then DPO, and export it back: the whole loop in Python.

    python examples/hf_tiny_model.py runs/tiny-hf          # or any Llama/Mistral/Qwen2/Qwen3 folder on disk
    python examples/hf_finetune.py runs/tiny-hf runs/tiny-hf-dpo [--steps 30]
"""
import argparse

import minillm_func as mf

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

model, params, tok = mf.hf.load_pretrained(args.model)           # no network, no transformers
corpus = mf.demo_corpus(0, n_sft=200, n_dpo=200)

# SFT on chat messages: the template renders them, the loss covers the assistant turns only.
chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
         for r in corpus.sft]
sft = mf.create_trainer("sft", model, learning_rate=1e-3)
state = sft.fit(sft.init(params), mf.Batches(mf.ConversationDataset(chats, tok, 128), 16), args.steps,
                progress=False)

# DPO in TRL's conversational format: the reference is the SFT model, frozen in the state.
pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"]}
         for r in corpus.dpo]
dpo = mf.create_trainer("dpo", model, learning_rate=1e-4)
state = dpo.fit(dpo.init(state.params), mf.Batches(mf.PreferenceDataset(pairs, tok, 128), 8), args.steps,
                progress=False)

mf.hf.save_pretrained(args.out, model, state.params, tok)
ids = tok.apply_chat_template([{"role": "user", "content": corpus.sft_eval[0]["prompt"]}], add_generation_prompt=True)
reply = mf.generate(model, state.params, [ids], max_new_tokens=16, eos_id=tok.eos_ids, pad_id=tok.pad_id)[0]
print(f"exported {args.out}; reply to {corpus.sft_eval[0]['prompt']!r}: {tok.decode(reply)!r}")
