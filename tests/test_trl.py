"""TRL's trainers and PEFT adapters on fused_xent (issue #21), with the real libraries.

TRL's trainers give the model a fused LM head of their own (``add_fused_lm_head``) and call it
with ``fused_lm_head=True``; ``fused_xent.hf.patch`` makes those calls fused_xent's, whether the
model is patched before the trainer is built or ``trainer.model`` after. Each trainer runs two
steps on a tiny Llama on the CPU, once on TRL's own head and once per order on fused_xent's (a
spy counts the calls that reached fused_xent), with SGD so that equal gradients give equal
parameters: the losses, the metrics TRL logs and the parameters must agree. The per-token fields
(log-probs, entropy, log sum p^2, mean logit, top-1) are checked against float64 beside TRL's own
function; PEFT models, LoRA heads (one head over the concatenation) and modules_to_save heads
against the unpatched PEFT model, in both orders.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils as trl_utils  # noqa: E402
from helpers import CUDA, rel_err  # noqa: E402

import fused_xent.autograd  # noqa: E402
import fused_xent.hf as hf  # noqa: E402
from fused_xent import _trl  # noqa: E402

pytestmark = pytest.mark.skipif(CUDA, reason="CPU trainers (the GPU check runs the kernels)")

VOCAB = 100  # 96 words, <pad>, <eos> and two unused ids


@pytest.fixture(scope="module", autouse=True)
def _quiet(transformers_quiet_one_thread):
    """conftest's: transformers' warnings off, one intra-op thread."""


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(96)} | {"<pad>": 96, "<eos>": 97}
    tok = Tokenizer(WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=96, eos_token_id=97,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused calls fused_xent served."""
    calls = []
    served = _trl.per_token

    def per_token(*args, **kwargs):
        calls.append(args[7])  # the outputs asked for
        return served(*args, **kwargs)

    monkeypatch.setattr(_trl, "per_token", per_token)
    return calls


COMMON_ARGS = dict(max_steps=2, logging_steps=1, report_to=[], learning_rate=0.05, optim="sgd",
                   use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
# (bf16 autocast is on by default where the CPU supports it: the GRPO run sets it off)


def _train(make_trainer, order: str):
    """(log history, parameters) of two steps; ``order``: "trl" (TRL's own head), "before" (the
    model patched before the trainer is built) or "after" (``trainer.model`` patched)."""
    model = tiny_llama()
    if order == "before":
        hf.patch(model)
    trainer = make_trainer(model)
    if order == "after":
        hf.patch(trainer.model)
    torch.manual_seed(0)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


def _compare(make_trainer, order, spy, keys, rtol=1e-5):
    want_logs, want_params = _train(make_trainer, "trl")
    assert not spy
    got_logs, got_params = _train(make_trainer, order)
    assert spy, "no call reached fused_xent"
    assert len(got_logs) == len(want_logs) == 2
    for got, want in zip(got_logs, want_logs, strict=True):
        for key in keys:
            assert key in want, key
            assert abs(got[key] - want[key]) <= rtol * max(1.0, abs(want[key])), (key, got, want)
    for name, want in want_params.items():
        assert rel_err(got_params[name], want) <= rtol, name


def _sft(bf16: bool):
    def make(model):
        data = datasets.Dataset.from_dict(
            {"input_ids": [[1 + (i * 7 + j * 3) % 90 for j in range(10 + i % 5)] for i in range(8)]}
        )
        args = trl.SFTConfig(output_dir="unused", per_device_train_batch_size=4, bf16=bf16,
                             **COMMON_ARGS)  # fmt: skip
        return trl.SFTTrainer(model=model, args=args, train_dataset=data,
                              processing_class=tokenizer())  # fmt: skip

    return make


@pytest.mark.parametrize("order,bf16", [("before", False), ("after", False), ("before", True)])
def test_sft_trainer(order, bf16, spy):
    """SFT asks for the log-probs, the entropy and top-1 (its token accuracy). Under bf16
    autocast both heads make the logits in bfloat16 (as F.linear) and round their gradients
    differently: 1e-3 there."""
    keys = ("loss", "entropy", "mean_token_accuracy", "grad_norm")
    _compare(_sft(bf16), order, spy, keys, rtol=1e-3 if bf16 else 1e-5)
    assert all(set(outputs) == {"log_probs", "entropy", "is_top1"} for outputs in spy)


def _reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def _grpo(model):
    prompts = [" ".join(f"w{(i * 5 + j) % 90 + 1}" for j in range(4)) for i in range(4)]
    args = trl.GRPOConfig(output_dir="unused", per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=5, temperature=0.7, bf16=False,
                          **COMMON_ARGS)  # fmt: skip
    data = datasets.Dataset.from_dict({"prompt": prompts})
    return trl.GRPOTrainer(model=model, args=args, reward_funcs=_reward, train_dataset=data,
                           processing_class=tokenizer())  # fmt: skip


@pytest.mark.parametrize("order", ["before", "after"])
def test_grpo_trainer(order, spy):
    """GRPO: sampled completions, the log-probs and entropy at its temperature."""
    _compare(_grpo, order, spy, ("loss", "entropy", "reward", "grad_norm"))


# --- the per-token fields ------------------------------------------------------------------


def _float64_fields(hidden, weight, bias, targets, temperature, softcap, scale):
    z = (hidden.double() @ weight.double().T + bias.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
    return logp, entropy, log_sum_sq, z.mean(-1), z.argmax(-1) == targets


ALL_FIELDS = ("log_probs", "log_sum_sq_probs", "mean_logits", "entropy", "is_top1")
SFT_FIELDS = ("log_probs", "entropy", "is_top1")  # top-1 from the log-probs' own sweep


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("fields,slab", [(ALL_FIELDS, 16), (SFT_FIELDS, 16), (SFT_FIELDS, None)])
def test_per_token_fields_against_float64(monkeypatch, softcap, fields, slab):
    """The fields TRL's head returns, and the gradients of the log-probs and the entropy, over
    several vocabulary slabs (a short last one) or one, against float64 and beside TRL's own
    function; SFT's fields take top-1 from the log-probs' sweep (the kernels' argmax)."""
    if slab is not None:
        monkeypatch.setattr(fused_xent.autograd, "pick_vocab_slab", lambda *a: slab)
    gen = torch.Generator().manual_seed(3)
    n, d, v = 9, 12, 37
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen).mul_(0.7).requires_grad_()
    bias = torch.randn(v, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[2] = torch.argmax((hidden @ weight.T + bias)[2]).item()  # one top-1 at least
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    args = (targets, 0.7, softcap, 0.5, fields)
    got = _trl.per_token(hidden, weight, bias, *args)
    peer = trl_utils._ChunkedLogProbFunction
    peer = getattr(peer, "original", peer).apply(hidden, weight, bias, targets, 0.7, 16, softcap,
                                                 0.5, args[-1])  # fmt: skip
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = _float64_fields(*leaves, targets, 0.7, softcap, 0.5)
    for name, g, p, w in zip(("logp", "entropy", "sq", "mean", "top1"), got, peer, want,
                             strict=True):  # fmt: skip
        if g is None:
            assert name in ("sq", "mean") and fields == SFT_FIELDS
            continue
        if name == "top1":
            assert torch.equal(g, w) and torch.equal(p, w) and bool(w.any())
            continue
        assert rel_err(g, w) <= 1e-5, name
        assert rel_err(p, w) <= 1e-4, name  # TRL's own, for scale
    (got[0] * a + got[1] * b).sum().backward()
    (want[0] * a.double() + want[1] * b.double()).sum().backward()
    for name, t, ref in zip(("hidden", "weight", "bias"), (hidden, weight, bias), leaves,
                            strict=True):  # fmt: skip
        assert rel_err(t.grad, ref.grad) <= 1e-5, name


# --- PEFT ------------------------------------------------------------------------------------


def _peft_step(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_peft_models_and_heads(order, head, monkeypatch):
    """patch(peft_model), or patch then get_peft_model: a LoRA head and a modules_to_save head
    fused (linear_cross_entropy called, no logits returned), the loss and every trainable
    gradient (the head's adapter's included) as the unpatched PEFT model's."""
    peft = pytest.importorskip("peft")
    options = {
        "lora": dict(target_modules=["q_proj", "lm_head"]),
        "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options[head])
    batch = {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"]
    want_loss, want = _peft_step(peft.get_peft_model(tiny_llama(), config), batch)
    calls = []
    fused = hf.linear_cross_entropy
    monkeypatch.setattr(
        hf, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    model = tiny_llama()
    if order == "before":
        hf.patch(model)
    wrapped = peft.get_peft_model(model, config)
    if order == "after":
        assert hf.patch(wrapped) is wrapped
    got_loss, got = _peft_step(wrapped, batch)
    assert calls == [1]
    assert abs(got_loss - want_loss) <= 1e-6
    assert got.keys() == want.keys() and any("lm_head" in n for n in got)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-5, name
    assert hf.unpatch(wrapped) is wrapped and hf._ATTR not in model.__dict__


def test_trl_head_with_a_lora_head(spy):
    """TRL's fused head on a PEFT model whose head has a LoRA adapter: fused_xent's log-probs are
    the model's own (the adapter included); TRL's own head reads the base weight alone."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["q_proj", "lm_head"])  # fmt: skip
    model = peft.get_peft_model(hf.patch(tiny_llama()), config)
    trl_utils.add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    got = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert spy
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()  # the adapter's logits
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert rel_err(got, want) <= 1e-5
    hf.unpatch(model)  # TRL's own head again: without the adapter
    theirs = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert rel_err(theirs, want) > 1e-3


# --- never a silent no-op --------------------------------------------------------------------


def test_a_trl_head_fused_xent_cannot_serve_raises(monkeypatch):
    model = hf.patch(tiny_llama())
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, 96, (1, 6))
    dispatch = trl_utils._ChunkedLogProbFunction
    assert isinstance(dispatch, _trl._Dispatch)
    # A TRL whose fused head no longer goes through the function fused_xent replaces:
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", dispatch.original)
    monkeypatch.setattr(_trl, "_install", lambda utils: None)
    with pytest.raises(RuntimeError, match="TRL"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)


def test_hooks_installed_when_trl_is_imported_later():
    """patch() does not import TRL; importing it later installs the hooks, so a trainer built
    afterwards is served."""
    code = (
        "import sys, transformers, fused_xent.hf as hf\n"
        "m = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, "
        "hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "num_key_value_heads=1))\n"
        "hf.patch(m)\n"
        "assert 'trl' not in sys.modules\n"
        "import trl.trainer.utils as u\n"
        "from fused_xent import _trl\n"
        "assert isinstance(u._ChunkedLogProbFunction, _trl._Dispatch)\n"
        "import trl.trainer.sft_trainer as s\n"
        "assert s.add_fused_lm_head._fused_xent_wraps is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- distillation: TRL's DistillationTrainer and GKD -----------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer_divergence(beta, monkeypatch):
    """TRL's DistillationTrainer loss (``_chunked_divergence_loss``: per-token divergence and
    the student's entropy from both heads) with a patched student is fused_xent's
    ``linear_distillation_loss``, with a logit scale and a temperature, as TRL's own."""
    import trl.trainer.distillation_trainer as dt

    student, teacher = hf.patch(tiny_llama(0)), tiny_llama(1)
    assert isinstance(dt.ChunkedDivergenceFunction, _trl._DivergenceDispatch)
    served = []
    serve = hf._serve_divergence
    monkeypatch.setattr(hf, "_serve_divergence", lambda *a, **k: served.append(1) or serve(*a, **k))
    gen = torch.Generator().manual_seed(4)
    h_s = torch.randn(2, 6, 32, generator=gen)
    h_t = torch.randn(2, 6, 32, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0

    def run():
        hs = h_s.clone().requires_grad_()
        student.zero_grad()
        loss, entropy, n_valid = dt._chunked_divergence_loss(
            hs, h_t, student.lm_head.weight, teacher.lm_head.weight, mask, beta,
            temperature=2.0, student_logit_scale=0.5, teacher_logit_scale=1.5,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), entropy, n_valid, hs.grad, student.lm_head.weight.grad.clone()

    got = run()
    assert served == [1]
    hf.unpatch(student)
    want = run()
    assert served == [1]  # TRL's own now
    assert int(got[2]) == int(want[2]) == 10
    for name, g, w in zip(("loss", "entropy", "d_hidden", "d_weight"), got[:2] + got[3:],
                          want[:2] + want[3:], strict=True):  # fmt: skip
        assert rel_err(g, w) <= 1e-5, name
    hf.patch(student)
    with pytest.raises(ValueError, match="softcap"):
        dt._chunked_divergence_loss(h_s, h_t, student.lm_head.weight, teacher.lm_head.weight,
                                    mask, beta, student_final_logit_softcapping=30.0)  # fmt: skip


def test_gkd_loss_drop_in():
    """fused_xent.hf.generalized_jsd_loss is TRL's GKD loss in value and gradient, every
    reduction TRL has (its "batchmean" without labels divides by the batch size)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 5, 11, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, :2] = -100
    for beta in (0.0, 0.5, 1.0):
        for reduction in ("batchmean", "sum", "mean"):
            for lab, items in ((None, None), (labels, None), (labels, 7)):
                args = (s, t, lab, beta, 2.0, reduction, items)
                got = hf.generalized_jsd_loss(*args)
                want = gkd.GKDTrainer.generalized_jsd_loss(*args)
                assert rel_err(got, want) <= 1e-6, (beta, reduction, lab is None, items)
                g1, g2 = (torch.autograd.grad(x, s)[0] for x in (got, want))
                assert rel_err(g1, g2) <= 1e-5
    with pytest.raises(ValueError, match="distillation_loss"):
        hf.generalized_jsd_loss(s, t, reduction="none")


@pytest.mark.parametrize("order", ["before", "after"])
def test_distillation_trainer(order, monkeypatch):
    """TRL's DistillationTrainer (on-policy off: the dataset's completions) for two steps with a
    patched student, in both orders, against TRL's own loss."""
    served = []
    serve = hf._serve_divergence
    monkeypatch.setattr(hf, "_serve_divergence", lambda *a, **k: served.append(1) or serve(*a, **k))
    prompts = [" ".join(f"w{(i * 5 + j) % 90 + 1}" for j in range(4)) for i in range(8)]
    completions = [" ".join(f"w{(i * 3 + j) % 90 + 1}" for j in range(5)) for i in range(8)]
    data = datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})

    def make(student):
        args = trl.DistillationConfig(output_dir="unused", per_device_train_batch_size=4,
                                      bf16=False, beta=0.5, max_completion_length=5,
                                      **COMMON_ARGS)  # fmt: skip
        teacher, tok = tiny_llama(1), tokenizer()
        return trl.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=data, processing_class=tok)  # fmt: skip

    want_logs, want_params = _train(make, "trl")
    assert not served
    got_logs, got_params = _train(make, order)
    assert served
    for got, want in zip(got_logs, want_logs, strict=True):
        for key in ("loss", "grad_norm", "entropy"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (key, got, want)
    for name, want in want_params.items():
        assert rel_err(got_params[name], want) <= 1e-5, name


@pytest.mark.parametrize("slab", [16, None])
def test_top1_ties_go_to_the_first_class(monkeypatch, slab):
    """A target that ties with an earlier class for the maximum is not top-1 (TRL's rule: the
    first argmax), within a slab and across slabs, on both of fused_xent's routes to it."""
    if slab is not None:
        monkeypatch.setattr(fused_xent.autograd, "pick_vocab_slab", lambda *a: slab)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 8, generator=gen)
    weight = torch.randn(37, 8, generator=gen) * 0.1
    weight[20] = weight[5] = hidden[0] * 3  # class 5 and 20 tie for row 0's maximum
    weight[9] = hidden[1] * 3  # row 1's maximum alone
    targets = torch.tensor([20, 9, 5, 0])
    for fields in (ALL_FIELDS, SFT_FIELDS):
        top1 = _trl.per_token(hidden, weight, None, targets, 1.0, None, 1.0, fields)[4]
        assert top1[:2].tolist() == [False, True], fields
