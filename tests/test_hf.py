"""fused_xent.hf: transformers causal LMs patched vs unpatched, on tiny random models (CPU).

Every model is built from transformers' own config classes (one layer, hidden 32, vocab 97: a
prime, so no row length is a multiple of anything), randomly initialised from a fixed seed; nothing
is downloaded. The output embedding is re-drawn with std 0.5 so the logits spread to about N(0, 3)
and a softcap of 2, a logit_scale of 0.5 or a logits_scaling of 4 changes the loss by far more
than the tolerance (``test_options_matter`` holds that): a patch that dropped one would fail.

The oracle is the same model unpatched, in float32 (the issue's contract): loss to 1e-5
relative, every parameter's gradient to 1e-4 relative, norm-wise. The FSDP2 test spawns two
processes (gloo, as tests/test_distributed.py does) running this file as a script.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import fused_xent  # noqa: E402
import fused_xent.hf as hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
VOCAB = 97
BATCH, SEQ = 3, 11
# make_batch's cases
CASES = ("plain", "padded", "shift_labels", "num_items", "shift_num_items", "ignore_index")
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# family: (config class, model class, config options). Gemma 2 and Cohere tie their embeddings
# by default; qwen2_tied is the tied model with a family that does not.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "final_logit_softcapping": 2.0},  # a float: the config checks types
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        # the router loss is added to the loss (output_router_logits), with a weight large
        # enough that dropping it fails the loss comparison
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "output_router_logits": True,
            "router_aux_loss_coef": 0.1,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # Falcon-H1 multiplies its logits by lm_head_multiplier (read as TRL's fused head reads it)
    "falcon_h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {
            "lm_head_multiplier": 0.37,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 8,
        },
    ),  # fmt: skip
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", autouse=True)
def _quiet(transformers_quiet_one_thread):
    """conftest's: transformers' warnings off, one intra-op thread."""


def checkout_env(**extra) -> dict:
    """The environment for a child Python that imports this checkout's fused_xent, as the test
    process does (whatever copy is installed)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def make_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_name, model_name, options = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **options, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # logits ~ N(0, 3): see the module docstring
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=gen) * 0.5)
    return model


def make_batch(case: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    batch = {"input_ids": ids}
    if case == "padded":
        # right padding of 0, 3 and 6 positions, plus an ignored prompt in the second row
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        for row, pad in enumerate((0, 3, 6)):
            if pad:
                mask[row, -pad:] = 0
                ids[row, -pad:] = 0
        labels = torch.where(mask.bool(), ids, -100)
        labels[1, :4] = -100
        batch["attention_mask"] = mask
    batch["labels"] = labels
    if case in ("shift_labels", "shift_num_items"):
        # not labels shifted: a different target, so a patch that shifted `labels` fails
        shift = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        shift[0, 2:5] = -100
        shift[:, -1] = -100
        batch["shift_labels"] = shift
    if case == "num_items":
        batch["num_items_in_batch"] = torch.tensor(23)  # as Trainer passes it: a tensor
    if case == "shift_num_items":
        batch["num_items_in_batch"] = 41  # an int, as a custom loop may pass it
    if case == "ignore_index":  # a real class as ignore_index: its labels leave the loss
        batch["ignore_index"] = int(labels[0, 4])
    return batch


def grads(model) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert (got is None) == (want is None), name
        if want is not None:
            assert rel_err(got, want) <= GRAD_RTOL, (name, rel_err(got, want))


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, grads(model)


def test_imports_without_transformers():
    """`import fused_xent` / `fused_xent.hf` import no transformers; the attribute loads hf."""
    code = (
        "import sys, fused_xent; assert 'fused_xent.hf' not in sys.modules; "
        "import fused_xent.hf; assert fused_xent.hf.patch; "
        "assert 'transformers' not in sys.modules, 'imported transformers'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=checkout_env())
    assert importlib.import_module("fused_xent").hf is hf


# --- ForCausalLMLoss against transformers' own --------------------------------------------


LOSS_KEYWORDS = ("shift_labels", "num_items_in_batch", "ignore_index")


def causal_oracle(logits, labels, shift_labels=None, num_items_in_batch=None, ignore_index=-100):
    """The causal LM loss in float64 with plain torch: shift, ignore, mean or sum / items."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    rows = logits.double().reshape(-1, logits.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    target = shift_labels.reshape(-1)
    loss = F.cross_entropy(rows, target, ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_loss_function_matches_transformers(case, dtype):
    """Against the float64 oracle (loss 1e-5, gradient 1e-5 / 8e-3 for bf16 logits), and equal
    to transformers' own ForCausalLMLoss (which copies the logits to float32 first)."""
    batch = make_batch(case)
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64) * 3).to(dtype)
    kwargs = {k: batch[k] for k in LOSS_KEYWORDS if k in batch}
    x64 = logits.double().requires_grad_()
    want = causal_oracle(x64, batch["labels"], **kwargs)
    want.backward()
    x = logits.clone().requires_grad_()
    ours = hf.ForCausalLMLoss(x, batch["labels"], VOCAB, output_attentions=False, **kwargs)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert abs(ours.item() - want.item()) <= LOSS_RTOL * abs(want.item())
    ours.backward()
    assert rel_err(x.grad.double(), x64.grad) <= (1e-5 if dtype == torch.float32 else 8e-3)
    theirs = transformers_loss()(logits, batch["labels"], VOCAB, **kwargs)
    assert abs(ours.item() - theirs.item()) <= LOSS_RTOL * abs(theirs.item())


def transformers_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def test_loss_function_ignore_index_and_devices():
    """A custom ignore_index pads the shift too; num_items_in_batch of any dtype divides."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 7, 7, 1]])  # 7: ignored (not a class)
    theirs = transformers_loss()(logits, labels, 7, ignore_index=7)
    ours = hf.ForCausalLMLoss(logits, labels, 7, ignore_index=7)
    torch.testing.assert_close(ours, theirs, rtol=LOSS_RTOL, atol=0)
    for num in (torch.tensor(3.0), torch.tensor(3, dtype=torch.int32), 3):
        ours = hf.ForCausalLMLoss(logits, labels, 7, num_items_in_batch=num, ignore_index=7)
        theirs = transformers_loss()(logits, labels, 7, num_items_in_batch=num, ignore_index=7)
        torch.testing.assert_close(ours, theirs, rtol=LOSS_RTOL, atol=0)


def test_num_items_folded_into_the_forward():
    """With num_items_in_batch the division is a weight on every position inside the loss, not a
    division after it: the loss is cross_entropy's own output, so loss.backward()'s gradient of 1
    reaches it and the kernels skip the backward's pass over the logits (the gradient is the
    forward's). A count of 0 given as a number is divided after, by torch's rules."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 7, generator=gen).requires_grad_()
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, -100, 2, 1]])
    for num in (torch.tensor(3), torch.tensor(3.0, dtype=torch.float64), 3, 2.5):
        ours = hf.ForCausalLMLoss(logits, labels, 7, num_items_in_batch=num)
        assert type(ours.grad_fn).__name__ == "CrossEntropyFunctionBackward", num
        theirs = transformers_loss()(logits, labels, 7, num_items_in_batch=num)
        torch.testing.assert_close(ours, theirs.float(), rtol=LOSS_RTOL, atol=0)
    for num in (0, torch.tensor([3.0])):  # (a count of 0, a (1,) count: divided after)
        ours = hf.ForCausalLMLoss(logits, labels, 7, num_items_in_batch=num)
        assert type(ours.grad_fn).__name__ == "DivBackward0"
        torch.testing.assert_close(ours, transformers_loss()(logits, labels, 7,
                                                             num_items_in_batch=num))  # fmt: skip


def test_loss_function_errors():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        hf.ForCausalLMLoss(logits, labels, 8)
    with pytest.raises(TypeError, match="labels"):
        hf.ForCausalLMLoss(logits, labels.tolist(), 7)
    with pytest.raises(TypeError, match="logits"):
        hf.ForCausalLMLoss(labels, labels, 7)
    with pytest.raises(TypeError, match="ignore_index"):
        hf.ForCausalLMLoss(logits, labels, 7, ignore_index=1.5)


# --- patched vs unpatched, every family ----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_matches_unpatched(family, case):
    model = make_model(family)
    batch = make_batch(case)
    want, want_grads = loss_and_grads(model, batch)
    assert want.logits is not None
    hf.patch(model)
    got, got_grads = loss_and_grads(model, batch)
    assert got.logits is None  # never materialised
    assert type(got) is type(want)
    assert abs(got.loss.item() - want.loss.item()) <= LOSS_RTOL * abs(want.loss.item())
    assert_grads_close(got_grads, want_grads)
    if family == "mixtral":  # the router loss, returned beside the loss as the model does
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
    if family in ("qwen2_tied", "gemma2", "cohere"):
        head = model.get_output_embeddings().weight
        assert head is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "mixtral"])
def test_options_matter(family):
    """The softcap / scale / router loss these tiny models carry change the loss by more than
    1e-3, so the comparisons above would catch a patch that dropped them."""
    model = make_model(family)
    batch = make_batch("plain")
    want = model(**batch).loss
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    (hidden,) = seen  # what enters the head: after the final norm, as the patch reads it
    target = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    bare = fused_xent.linear_cross_entropy(hidden.reshape(-1, 32), head.weight, target)
    assert abs(bare.item() - want.item()) > 1e-3 * abs(want.item())


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_outputs_beside_the_loss(family):
    """return_dict=False, hidden states and attentions, the cache: as unpatched, minus logits."""
    model = make_model(family, attn_implementation="eager")
    batch = make_batch("padded")
    asks = dict(output_hidden_states=True, output_attentions=True, use_cache=True)
    want = model(**batch, **asks)
    hf.patch(model)
    got = model(**batch, **asks)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(got.keys()) == set(want.keys()) - {"logits"}  # the cache among them
    want_tuple = model.__class__.forward(model, **batch, return_dict=False)
    got_tuple = model(**batch, return_dict=False)
    assert isinstance(got_tuple, tuple)
    assert len(got_tuple) == len(want_tuple) - 1  # logits left out, as to_tuple() drops None
    torch.testing.assert_close(got_tuple[0], want_tuple[0], rtol=LOSS_RTOL, atol=0)


def test_gradient_checkpointing():
    """Trainer's gradient_checkpointing=True recomputes the layers in the backward; the head is
    outside them, so nothing changes."""
    model = make_model("qwen3")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.train()
    batch = make_batch("padded")
    want, want_grads = loss_and_grads(model, batch)
    hf.patch(model)
    got, got_grads = loss_and_grads(model, batch)
    assert abs(got.loss.item() - want.loss.item()) <= LOSS_RTOL * abs(want.loss.item())
    assert_grads_close(got_grads, want_grads)


def test_without_labels_or_grad_is_the_original():
    """No labels, or no_grad (evaluation): the original forward, logits and all; the loss then
    comes from ForCausalLMLoss on the logits."""
    model = make_model("gemma2")
    batch = make_batch("padded")
    with torch.no_grad():
        want = model(**batch)
    want_free = model(**{**batch, "labels": None})
    hf.patch(model)
    with torch.no_grad():
        got = model(**batch)
    got_free = model(**{**batch, "labels": None})
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(got_free.logits, want_free.logits, rtol=0, atol=0)
    assert got_free.loss is None


def test_labels_positional():
    model = make_model("llama")
    batch = make_batch("plain")
    want = model(batch["input_ids"], None, None, None, None, batch["labels"]).loss
    hf.patch(model)
    got = model(batch["input_ids"], None, None, None, None, batch["labels"])
    assert got.logits is None
    assert abs(got.loss.item() - want.item()) <= LOSS_RTOL * abs(want.item())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_same_tokens(family):
    # The router loss is for training; transformers 4.57's Mixtral fails to generate with it on.
    options = {"output_router_logits": False} if family == "mixtral" else {}
    model = make_model(family, **options).eval()
    prompt = make_batch("plain")["input_ids"][:2, :5]
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    want = model.generate(prompt, **kwargs)
    hf.patch(model)
    got = model.generate(prompt, **kwargs)
    assert torch.equal(got, want)
    assert got.shape[1] == 11


# --- Trainer with gradient accumulation ----------------------------------------------------


class _TinyDataset(torch.utils.data.Dataset):
    """16 rows of 12 tokens; the first (5 i) % 11 labels of row i ignored, so micro-batches hold
    different numbers of items and only num_items_in_batch makes the accumulation exact."""

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.rows = []
        for i in range(16):
            ids = torch.randint(3, VOCAB, (12,), generator=gen)
            labels = ids.clone()
            labels[: (5 * i) % 11] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(tmp_path, patched: bool):
    model = make_model("llama")
    if patched:
        hf.patch(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "plain")),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TinyDataset())
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_gradient_accumulation(tmp_path, monkeypatch):
    seen = []
    divide = hf._divide
    monkeypatch.setattr(hf, "_divide", lambda loss, num: seen.append(num) or divide(loss, num))
    want_losses, want_weights = _train(tmp_path, patched=False)
    assert not seen  # transformers' own loss ran
    got_losses, got_weights = _train(tmp_path, patched=True)
    assert len(seen) == 6 and all(isinstance(n, torch.Tensor) for n in seen)  # 3 steps x 2
    assert len(got_losses) == len(want_losses) == 3
    for got, want in zip(got_losses, want_losses, strict=True):
        assert abs(got - want) <= LOSS_RTOL * abs(want)
    for name, want in want_weights.items():
        assert rel_err(got_weights[name], want) <= GRAD_RTOL, name


# --- what patch refuses, undoes and keeps --------------------------------------------------


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.patch(nn.Linear(2, 2))
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        hf.patch(bert)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=4)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        hf.patch(t5)
    for model in (bert, t5):
        assert hf._ATTR not in model.__dict__ and "forward" not in model.__dict__

    custom = make_model("llama")
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(ValueError, match="loss_function"):
        hf.patch(custom)

    class Scaled(nn.Linear):  # a head whose forward is not nn.Linear's
        def forward(self, x):
            return super().forward(x) * 2

    odd_head = make_model("llama")
    odd_head.lm_head = Scaled(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match="get_output_embeddings"):
        hf.patch(odd_head)
    hf.patch(odd_head, linear=False)  # the loss function alone is fine

    no_decoder = make_model("llama")
    del no_decoder.model
    with pytest.raises(ValueError, match="decoder"):
        hf.patch(no_decoder)


def test_forward_outside_the_layout_raises_at_the_first_call():
    """Forwards patch cannot see through fail on their first training call, never silently."""
    llama = transformers.LlamaForCausalLM

    class FunctionalHead(llama):  # uses the head's weight without calling the module
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            logits = F.linear(hidden, self.lm_head.weight)
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class OwnLoss(llama):  # computes its loss without self.loss_function
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = super().forward(input_ids=input_ids, **kwargs).logits
            loss = logits.logsumexp(-1).mean()  # a loss of its own, whatever it is
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    class Multiplier(llama):  # an output multiplier its config does not name
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden) * 0.5
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    batch = make_batch("plain")
    for cls, match in (
        (FunctionalHead, "without calling its output embedding"),
        (OwnLoss, "did not call self.loss_function"),
        (Multiplier, "transforms its logits"),
    ):
        torch.manual_seed(0)
        model = hf.patch(cls(transformers.LlamaConfig(**COMMON)))
        with pytest.raises((RuntimeError, ValueError), match=match):
            model(**batch)
        assert model._fused_xent_hf.request is None  # the next call starts clean


def test_config_option_the_model_does_not_apply():
    """A config naming a scale the forward does not apply is caught by the probe (the
    scale would otherwise be applied to the loss and not to the logits)."""
    model = make_model("llama")
    model.config.logits_scaling = 2.0  # Llama's forward ignores it
    hf.patch(model)
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        model(**make_batch("plain"))


def test_unpatch_restores_and_patch_is_idempotent():
    model = make_model("mixtral")
    head = model.get_output_embeddings()
    original_loss = model.loss_function
    batch = make_batch("padded")
    want = model(**batch)
    assert hf.patch(model) is model
    forward = model.forward
    hf.patch(model)
    assert model.forward is forward  # nothing stacked
    assert model(**batch).logits is None
    hf.patch(model, linear=False)  # the other mode re-patches
    assert "forward" not in model.__dict__ and "forward" not in head.__dict__
    assert model.loss_function is hf.ForCausalLMLoss
    assert model(**batch).logits is not None
    hf.patch(model)
    assert hf.unpatch(model) is model
    assert "forward" not in model.__dict__ and "forward" not in head.__dict__
    assert hf._ATTR not in model.__dict__ and hf._ATTR not in head.__dict__
    assert "_loss_function" not in model.__dict__
    assert model.loss_function is original_loss
    got = model(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    hf.unpatch(model)  # unpatching twice is harmless
    with pytest.raises(TypeError, match="linear"):
        hf.patch(model, linear=1)


def test_patch_keeps_a_custom_instance_forward():
    """An instance-level forward set before the patch (as accelerate sets one) is called by the
    patch and put back by unpatch."""
    model = make_model("qwen2")
    calls = []
    plain = model.forward

    @functools.wraps(plain)
    def wrapped(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    model.forward = wrapped
    hf.patch(model)
    batch = make_batch("plain")
    assert model(**batch).logits is None and calls == [1]
    hf.unpatch(model)
    assert model.forward is wrapped


def test_deepcopy_is_patched_on_its_own():
    model = hf.patch(make_model("qwen2"))
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    twin_head = twin.get_output_embeddings()
    assert twin_head.forward.__self__ is twin_head
    out = twin(**make_batch("plain"))
    assert out.logits is None
    out.loss.backward()
    assert twin_head.weight.grad is not None
    assert model.get_output_embeddings().weight.grad is None


def test_signature_is_the_original():
    import inspect

    model = make_model("llama")
    want = inspect.signature(model.forward)
    hf.patch(model)
    assert inspect.signature(model.forward) == want
    assert "Patched by fused_xent.hf" in model.forward.__doc__


def test_torch_compile():
    """The patched training call compiles as one graph (aot_eager: Dynamo and AOTAutograd
    without Inductor's C++ build, which takes ~15 s on two cores), and gives the eager result.
    A config the model does not follow gives a NaN loss there (no host check inside a graph)."""
    model = make_model("gemma2")
    batch = make_batch("padded")
    want, want_grads = loss_and_grads(model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(hf.patch(model), backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        model.zero_grad(set_to_none=True)
        got = compiled(**batch)
        got.loss.backward()
        got_grads = grads(model)
        assert got.logits is None
        assert abs(got.loss.item() - want.loss.item()) <= LOSS_RTOL * abs(want.loss.item())
        assert_grads_close(got_grads, want_grads)
    model.config.logits_scaling = 2.0  # not applied by Gemma 2: the probe disagrees
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.isnan(compiled(**batch).loss)
    torch._dynamo.reset()


# --- FSDP2 ---------------------------------------------------------------------------------

FSDP_WORLD = 2
FSDP_DEADLINE_S = 240  # a bound: the world of 2 takes ~10 s on two idle cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_fully_shard(tmp_path):
    """fully_shard on the layers, the head and the root (patched before and after sharding), on
    gloo: each rank's loss equals the unsharded model's on its batch, and each gradient (the
    reduce-scattered shard, gathered) equals the ranks' mean of the unsharded gradients. A
    DTensor head outside FSDP (tensor parallel) is refused."""
    port = _free_port()
    env = checkout_env(OMP_NUM_THREADS="1")
    logs = [tmp_path / f"log{rank}.txt" for rank in range(FSDP_WORLD)]
    procs = []
    for rank, log in enumerate(logs):
        cmd = [sys.executable, __file__, "fsdp", *map(str, (rank, FSDP_WORLD, port, tmp_path))]
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
    deadline = time.monotonic() + FSDP_DEADLINE_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail("the FSDP2 world did not finish in time:\n" + _logs(logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs), _logs(logs)
    for rank in range(FSDP_WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["orders"] == ["patch_first", "shard_first"]
        for order in report["orders"]:
            result = report[order]
            assert result["head_was_dtensor"] and result["logits_none"], order
            assert result["loss_err"] <= LOSS_RTOL, (order, result["loss_err"])
            worst = max(result["grad_errs"].values())
            assert len(result["grad_errs"]) == report["n_params"] and worst <= GRAD_RTOL, (
                order,
                result["grad_errs"],
            )
        assert "DTensor" in report["tensor_parallel_error"]


def _logs(logs) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


def _fsdp_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    """One rank of test_fsdp2_fully_shard (run as `python tests/test_hf.py fsdp ...`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = [make_batch("padded", seed=10 + r) for r in range(world)]
    reference = make_model("llama")
    ref_losses, ref_grads = [], []
    for batch in batches:
        out, grad = loss_and_grads(reference, batch)
        ref_losses.append(out.loss.item())
        ref_grads.append({name: g.clone() for name, g in grad.items()})
    mean_grads = {name: sum(g[name] for g in ref_grads) / world for name in ref_grads[0]}
    report = {"orders": ["patch_first", "shard_first"], "n_params": len(mean_grads)}
    for order in report["orders"]:
        model = make_model("llama")
        if order == "patch_first":
            hf.patch(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
        if order == "shard_first":
            hf.patch(model)
        head_was_dtensor = hf._is_dtensor(model.lm_head.weight)
        out = model(**batches[rank])
        out.loss.backward()
        want = ref_losses[rank]
        report[order] = {
            "head_was_dtensor": head_was_dtensor,
            "logits_none": out.logits is None,
            "loss_err": abs(out.loss.item() - want) / abs(want),
            "grad_errs": {
                name: rel_err(p.grad.full_tensor(), mean_grads[name])
                for name, p in model.named_parameters()
            },
        }
    # Tensor parallelism's DTensor head (not gathered by a forward hook) must not be read.
    model = hf.patch(make_model("llama"))
    mesh = init_device_mesh("cpu", (world,))
    weight = model.lm_head.weight
    model.lm_head.weight = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]))
    try:
        model(**batches[0])
        report["tensor_parallel_error"] = "none raised"
    except TypeError as exc:
        report["tensor_parallel_error"] = str(exc)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


# --- the example ---------------------------------------------------------------------------

EXAMPLE = ROOT / "examples" / "hf_finetune.py"


def test_example_runs(capsys):
    """The example's two Trainer runs, small (4 steps, vocab 512, in this process): the same
    curve, and a summary printed."""
    spec = importlib.util.spec_from_file_location("hf_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = module.main(["--steps", "4", "--vocab", "512", "--same-process", "--quiet"])
    assert runs["ok"]
    want, got = runs["unpatched"]["losses"], runs["patched"]["losses"]
    assert len(want) == len(got) == 4
    assert got[-1] < got[0]  # it trains
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert "curves agree" in capsys.readouterr().out


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp"]:
    _fsdp_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
