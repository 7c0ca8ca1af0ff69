"""Write a tiny random Hugging Face model folder to try the --model commands on, with nothing downloaded.

    python examples/hf_tiny_model.py runs/tiny-hf
    minillm-func train sft --model runs/tiny-hf --data sft.jsonl --out runs/sft --steps 20
    minillm-func export --ckpt runs/sft --out runs/sft-hf     # AutoModelForCausalLM.from_pretrained loads it

The folder is what a Llama checkpoint looks like: config.json, model.safetensors, generation_config.json,
tokenizer.json + tokenizer_config.json (a BPE trained on the demo corpus) and chat_template.jinja.
"""
import argparse
from pathlib import Path

import minillm_func as mf

# A plain chat template: each turn is "role: content", an assistant turn ends with the EOS token.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default="runs/tiny-hf")
parser.add_argument("--dim", type=int, default=64)
args = parser.parse_args()

corpus = mf.demo_corpus(0, n_pretrain=300, n_sft=300)
texts = corpus.pretrain + [r["prompt"] + r["completion"] for r in corpus.sft]
out = Path(args.out)
mf.BPETokenizer.train(texts, vocab_size=512).save_pretrained(out)
(out / "chat_template.jinja").write_text(TEMPLATE)
tok = mf.HFTokenizer.from_folder(out)

cfg = mf.ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=2, n_heads=4, n_kv_heads=2,
                     max_seq_len=256, vocab_multiple=1)
model = mf.build_model(cfg)
mf.hf.save_pretrained(out, model, model.init(seed=0), tok)
print(f"wrote {out}: {sum(p.numel() for p in model.init(0).values()) / 1e6:.2f}M parameters, "
      f"vocabulary {tok.vocab_size}, chat template {tok.chat_template is not None}")
