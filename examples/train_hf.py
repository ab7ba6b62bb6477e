"""Train a HuggingFace causal LM with DualPipeV (or another schedule) under ``torchrun``.

No download: by default a tiny Llama with random weights (``--family`` picks another
supported family); ``--model DIR`` loads a model saved with ``save_pretrained`` in a local
directory instead, each rank materialising only its own stages (meta-device build).

    torchrun --nproc-per-node 2 examples/train_hf.py
    torchrun --nproc-per-node 2 examples/train_hf.py --family mixtral --schedule 1f1b

The first step is checked against HuggingFace's own ``model(input_ids, labels=...)`` on
the rank that holds the labels (built models only). See docs/models.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers

from dualpipe.models import hf

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4,
                                                  num_experts_per_tok=2,
                                                  output_router_logits=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(CONFIGS), default="llama")
    parser.add_argument("--model", help="a local save_pretrained directory")
    parser.add_argument("--schedule", default="dualpipev")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)                       # the same weights and data on every rank
    model = None
    if args.model:
        lm = hf.load_causal_lm(args.model, args.schedule, device=device)
    else:
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[args.family]()).to(device)
        lm = hf.split_causal_lm(model, args.schedule)
    pipe = lm.pipeline()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    vocab = lm.config.vocab_size
    for step in range(args.steps):
        # a learnable toy task: rows count up from a random start (mod the vocabulary)
        start = torch.randint(0, vocab, (args.batch, 1), device=device)
        ids = (start + torch.arange(args.seq, device=device)) % vocab
        labels = ids.clone()
        labels[:, :2] = -100                    # score from the third token on
        if step == 0 and model is not None and lm.takes_labels:
            with torch.no_grad():
                want = float(model(input_ids=ids, labels=labels).loss)
        losses, _ = pipe.step(ids if lm.takes_inputs else None, num_chunks=args.chunks,
                              criterion=lm.criterion(labels, num_chunks=args.chunks)
                              if lm.takes_labels else None,
                              labels=(labels if lm.takes_labels else None,))
        opt.step()
        opt.zero_grad()
        if losses is not None:
            loss = float(losses.sum())
            if step == 0 and model is not None:
                print(f"step 0: pipeline loss {loss:.6f}, HF's own forward {want:.6f}")
            elif step % 10 == 9 or step == args.steps - 1:
                print(f"step {step}: loss {loss:.4f}")
    pipe.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
