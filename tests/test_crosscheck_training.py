"""tinyqwen's training gradients against torch autograd through transformers (marker `crosscheck`).

For every fixture: transformers' Qwen3 / Qwen3-MoE, loaded by make_fixtures.py's own loader, put in train mode
(dropout is 0 in these configs, so train mode changes nothing but the flag), is called with `labels=input_ids`
and `output_router_logits=True`; its `loss` is cross-entropy + router_aux_loss_coef × aux loss. `loss.backward()`
gives every parameter's gradient, which is compared with `tinyqwen.grad.loss_and_grads` on the same float32
weights and ids. To make the aux term matter in the comparison, the MoE fixtures are also run with the coefficient
raised to 0.1 (Qwen3's 0.001 leaves it at ~1e-3 of the gradient).

Tolerance, per parameter tensor: max |ours − torch| ≤ GRAD_RTOL · max |torch| + 1e-8, GRAD_RTOL = 1e-4.
Both sides are float32 with different summation orders through ~10 layers of chained matmuls; the measured worst
is 3.2e-6 of the tensor's largest gradient (dense-untied-bf16-sharded); a 1e-4 bound leaves room for CPU kinds (AVX-512 vs
AMX) while a wrong term (a missed residual, aux gradient dropped, routing weights not renormalised) moves a
gradient by 1e-2 or more of its size. Losses: |Δ| ≤ 1e-5 · loss.

Also here: a checkpoint written by tinyqwen.train loads in transformers and gives tinyqwen's logits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinyqwen  # noqa: E402
from tinyqwen import grad  # noqa: E402

pytestmark = pytest.mark.crosscheck

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GRAD_RTOL = 1e-4

_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
mf = sys.modules.get("make_fixtures") or importlib.util.module_from_spec(_spec)
if "make_fixtures" not in sys.modules:
    sys.modules["make_fixtures"] = mf
    _spec.loader.exec_module(mf)

NAMES = [f.name for f in mf.FIXTURES]


def torch_grads(model) -> dict[str, np.ndarray]:
    """transformers' parameter gradients under tinyqwen.grad.named_parameters' names (experts stacked)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2f, H] = cat(gate, up) along dim 1
            f = g.shape[1] // 2
            out[name.replace("gate_up_proj", "gate_proj")] = g[:, :f]
            out[name.replace("gate_up_proj", "up_proj")] = g[:, f:]
        else:
            out[name] = g
    return out


# the config's own coefficient everywhere; a raised one (0.1) on the MoE fixtures (dense models have no aux loss)
CASES = [(n, None) for n in NAMES] + [(n, 0.1) for n in NAMES if n.startswith("moe")]


@pytest.mark.parametrize("name,coef", CASES)
def test_gradients_equal_torch_autograd(name, coef):
    folder = FIXTURES / name
    ours = tinyqwen.load_model(folder)
    c = ours.config
    model = mf.load_with_transformers(folder).train()
    if coef is not None:
        model.router_aux_loss_coef = coef
    ids = np.random.default_rng(3).integers(0, c.vocab_size, size=(2, 16))
    t_ids = torch.from_numpy(ids)
    kwargs = {"output_router_logits": True} if c.is_moe else {}
    out = model(input_ids=t_ids, labels=t_ids, **kwargs)
    out.loss.backward()
    theirs = torch_grads(model)

    w = grad.copy_weights(ours.weights)
    r = grad.loss_and_grads(c, w, ids, aux_coef=coef if coef is not None else None)
    assert abs(r.loss - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    if c.is_moe:
        assert abs(r.aux - out.aux_loss.item()) <= 1e-5 * abs(out.aux_loss.item())
    mine = grad.named_parameters(r.grads)
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    worst = 0.0
    for key, g in mine.items():
        t = theirs[key]
        assert g.shape == t.shape, key
        err = float(np.abs(g - t).max())
        scale = float(np.abs(t).max())
        assert err <= GRAD_RTOL * scale + 1e-8, f"{key}: max |Δ| = {err:.2e}, max |grad| = {scale:.2e}"
        worst = max(worst, err / max(scale, 1e-30))
    print(f"{name} coef={coef}: worst gradient error {worst:.1e} of the tensor's largest gradient")


def test_trained_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    """A checkpoint written by tinyqwen.train (after real training steps, so no weight is still at its init)
    loads in transformers with no missing/unexpected keys and gives tinyqwen's logits; so does the stored long run's
    checkpoint when runs/ holds it (python training/reproduce.py)."""
    from tinyqwen import train
    from tinyqwen.verify import tolerance

    cfg = train.TrainConfig.from_dict({
        "out_dir": str(tmp_path / "run"), "docs": 600, "seq_len": 16, "batch_size": 4, "steps": 8,
        "eval_batches": 1, "progress": False,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_experts": 4, "moe_intermediate_size": 16,
                  "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300},
    })  # fmt: skip
    folders = [Path(train.train(cfg)["checkpoint"])]
    stored = Path(__file__).resolve().parent.parent / "runs" / "tiny-moe-aux0.001" / "checkpoint"
    if stored.is_dir():
        folders.append(stored)
    for folder in folders:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        assert not any(info.values()), info
        ours = tinyqwen.load_model(folder)
        ids = np.random.default_rng(5).integers(0, ours.config.vocab_size, size=(2, 24))
        with torch.no_grad():
            theirs = model(torch.from_numpy(ids)).logits.numpy()
        err = float(np.abs(ours(ids) - theirs).max())
        assert err <= tolerance(theirs), (folder, err)
        print(f"{folder}: logits max |Δ| = {err:.1e} against transformers")
