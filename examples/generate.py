"""Build the toy model and the engine, generate, and check against the model run without a cache.

    python examples/generate.py            # CPU: tiny preset, Triton interpreter; GPU: bf16, CUDA graphs
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

from miniattn import Engine, EngineConfig, SamplingParams, ToyLlama
from miniattn.model import get_preset

cuda = torch.cuda.is_available()
model = ToyLlama(get_preset("tiny"), dtype=torch.bfloat16 if cuda else torch.float16,
                 device="cuda" if cuda else "cpu", seed=0)
engine = Engine(model, EngineConfig(kv_layout="HND", block_size=16, max_num_seqs=4, max_seq_len=128,
                                    cuda_graph=cuda))

prompts = [[1, 2, 3], [10, 20, 30, 40, 50], list(range(100, 117))]
outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12))

for prompt, out in zip(prompts, outputs):
    dense = model.greedy_dense(prompt, 12)  # no cache: a full forward per token
    print(f"prompt {prompt[:5]}{'...' if len(prompt) > 5 else ''} -> {out.output_token_ids}"
          f"  ({'same as' if dense == out.output_token_ids else 'differs from'} the no-cache model)")

sampled = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=1))
print("sampled:", sampled[0].output_token_ids)
