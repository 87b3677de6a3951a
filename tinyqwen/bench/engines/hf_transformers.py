"""The Hugging Face transformers engine (option "fp32" or "bf16"), in a Python that has torch and transformers."""

from __future__ import annotations

import importlib


def load(path: str, threads: int, option: str, max_len: int):
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[option]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    class Engine:
        version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once

        def prefill(self, ids):
            self.past = None
            return self.forward(torch.tensor([ids]), logits_to_keep=1)  # last position only, as tinyqwen's

        def step(self, token):
            return self.forward(torch.tensor([[token]]))

        def forward(self, ids, **kwargs):
            with torch.inference_mode():
                out = model(ids, past_key_values=self.past, use_cache=True, **kwargs)
            self.past = out.past_key_values
            return int(out.logits[0, -1].argmax())

    return Engine()
