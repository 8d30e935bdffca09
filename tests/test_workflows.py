"""A sparsified model's whole life: what users do around the training loop (issue #18).

Each test is one row of what a new user tried: generate with a KV cache after the switch, a
length per batch, many models in one process, logging inside traced code, PEFT, a root module
that is itself the attention, and Dynamo running a model eagerly. Scenarios whose bug lives in
process-wide state (Dynamo's caches and recompile limits) run in a fresh interpreter.

Sizes are tiny (2 layers, d 64, block 16) and the inner compiler is "eager" so the suite stays
fast; the compiled (inductor) path across lengths is covered in test_partition.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import spion_fx

tf = pytest.importorskip("transformers")

SPION = dict(probe_interval=1, block_size=16, max_dense_steps=3, inner="eager")
VOCAB = 256


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                  intermediate_size=128, max_position_embeddings=512)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                n_positions=512, attn_pdrop=0.0, resid_pdrop=0.0,
                                                embd_pdrop=0.0))
    if arch == "llama":  # GQA + rotary
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if arch == "qwen2":  # GQA + qkv bias
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    raise ValueError(arch)


def _train_to_sparse(model, steps: int = 4, length: int = 64):
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, length), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = spion_fx.get_state(model)
    assert all(site.phase == "sparse" for site in state.attention_sites())
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def sparse_model(request):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, _train_to_sparse(_config(request.param))


def _sparse_calls(model) -> int:
    return sum(site.kernel_calls["sparse"] for site in spion_fx.get_state(model).attention_sites())


def _full_forward_logits(model, sequences, attention_mask, prompt_len):
    """Logits of one forward over the generated tokens, at the positions that generated them."""
    kwargs = {"attention_mask": attention_mask[:, :-1]}
    if attention_mask is not None:
        position_ids = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)[:, :-1]
    with torch.no_grad():
        logits = model(input_ids=sequences[:, :-1], **kwargs).logits
    return logits[:, prompt_len - 1:]


@pytest.mark.parametrize("mode", ["greedy", "sample", "left_padding"])
def test_incremental_decoding_equals_full_forward_after_the_switch(sparse_model, mode):
    """HF's own measure: every decoded position's logits equal one full forward's (≤ 1e-4)."""
    arch, model = sparse_model
    prompt_len, new = 40, 12
    prompt = torch.randint(1, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    if mode == "left_padding":
        mask[1, :7] = 0
    torch.manual_seed(2)
    before = _sparse_calls(model)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=mode == "sample",
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    layers = len(list(spion_fx.get_state(model).attention_sites()))
    assert _sparse_calls(model) - before == layers * new  # prefill and every decode step sparse
    full_mask = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - prompt_len, dtype=mask.dtype)], 1)
    reference = _full_forward_logits(model, out.sequences, full_mask, prompt_len)
    incremental = torch.stack(out.logits, 1)
    torch.testing.assert_close(incremental, reference, atol=1e-4, rtol=0)


def test_static_cache_decoding_is_sparse_and_consistent():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _train_to_sparse(_config("llama"))
    prompt = torch.randint(1, VOCAB, (1, 37))  # no pad token (0) inside the prompt
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    mask = torch.ones_like(out.sequences)
    reference = _full_forward_logits(model, out.sequences, mask, 37)
    torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=1e-4, rtol=0)


def test_decode_reads_only_the_kept_blocks():
    """After the switch a decode step attends to the key blocks its block row keeps: changing a
    key the pattern drops for the last row changes nothing, changing a kept one does."""
    from spion_fx.policy import AttentionPolicy
    from spion_fx.runtime.attention_site import AttentionSiteModule, AttentionSpec

    site = AttentionSiteModule(AttentionSpec("attn", is_causal=True), AttentionPolicy(method="spion", block_size=16))
    pattern = torch.eye(4, dtype=torch.bool)
    pattern[:, 0] = True  # sink column + diagonal
    site.set_pattern(pattern[None], 64, 64, step=1)
    site.eval()
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    out = site(q, k, v)
    dropped, kept = k.clone(), k.clone()
    dropped[..., 20:40, :] += 5.0  # blocks 1 and 2: not kept by row 3
    kept[..., 5, :] += 5.0  # block 0: kept
    torch.testing.assert_close(site(q, dropped, v), out)
    assert not torch.allclose(site(q, kept, v), out)
    assert site.kernel_calls["sparse"] == 3


def test_dense_phase_generates_exactly_like_the_plain_model():
    torch.manual_seed(0)
    plain = _config("gpt2").eval()
    sparse = _config("gpt2").eval()
    sparse.load_state_dict(plain.state_dict())
    spion_fx.sparsify(sparse, "spion-cf", **SPION)
    prompt = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        a = plain.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
        b = sparse.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, rtol=0)


def _run_fresh(code: str, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter (Dynamo's caches and limits are process-wide)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_length_per_batch_stays_sparse_without_recompiling_per_length():
    """14 lengths (HF collators pad each batch to its own): one dynamic graph serves them all,
    every step runs the sparse kernel, nothing falls back to eager; generation then works in the
    same process with a cache of every length."""
    out = _run_fresh("""
        import time, warnings, torch, spion_fx, transformers as tf
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=512))
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        spion_fx.sparsify(m, "spion-cf", optimizer=opt, probe_interval=1, block_size=16, max_dense_steps=3, inner="eager")
        st = spion_fx.get_state(m)
        def step(L):
            ids = torch.randint(0, 256, (2, L))
            m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
        for _ in range(4): step(64)
        graphs = len(st.compiler.records)
        calls = sum(s.kernel_calls["sparse"] for s in st.attention_sites())
        for L in range(96, 305, 16): step(L)
        new_calls = sum(s.kernel_calls["sparse"] for s in st.attention_sites()) - calls
        training_graphs = len(st.compiler.records) - graphs
        m.eval()
        t = time.perf_counter()
        with torch.no_grad():
            m.generate(torch.randint(0, 256, (1, 20)), max_new_tokens=24, do_sample=False, pad_token_id=0)
        print(training_graphs, new_calls, st.eager_forwards, time.perf_counter() - t)
    """)
    new_graphs, sparse_calls, eager, gen_seconds = out.split()
    assert int(new_graphs) <= 1  # one recompile makes the length dynamic; none per length after
    assert int(sparse_calls) == 14 * 2
    assert int(eager) == 0
    assert float(gen_seconds) < 60  # no recompile per token (it was 20 s for 24 tokens before)


def test_nn_transformer_encoder_keeps_its_sites_at_every_length():
    """PyTorch's own nn.TransformerEncoder (nn.MultiheadAttention, expanded by spion_fx) with a
    length per batch after the switch: the graph made dynamic at the second length keeps both
    sites, and every later length runs the sparse kernel with no graph per length."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = _run_fresh(f"""
        import sys, warnings, torch, spion_fx
        sys.path.insert(0, {str(examples)!r})
        from transformer_encoder_spion import EncoderLM
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        m = EncoderLM(512, 32, 2, 2).train()
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        spion_fx.sparsify(m, "spion-cf", optimizer=opt, probe_interval=1, block_size=16, max_dense_steps=3, inner="eager")
        st = spion_fx.get_state(m)
        def step(L):
            x = torch.randint(0, 256, (2, L))
            m(x, x).backward(); opt.step(); opt.zero_grad()
        for _ in range(4): step(64)
        graphs = len(st.compiler.records)
        calls = sum(s.kernel_calls["sparse"] for s in st.attention_sites())
        for L in (80, 100, 131, 200, 257): step(L)
        print(len(st.compiler.records) - graphs,
              sum(s.kernel_calls["sparse"] for s in st.attention_sites()) - calls, st.eager_forwards,
              all(len(r.attention_sites) == 2 for r in st.compiler.records),
              all(s.phase == "sparse" for s in st.attention_sites()))
    """)
    new_graphs, sparse_calls, eager, sites_everywhere, sparse = out.split()
    assert int(new_graphs) <= 1
    assert int(sparse_calls) == 5 * 2
    assert int(eager) == 0
    assert sites_everywhere == "True" and sparse == "True"


def test_the_fiftieth_model_in_one_process_gets_its_sites():
    """A notebook or a sweep: model after model, each with a graph break inside a shared class
    (Dynamo keeps one compiled entry per model for the shared frame)."""
    out = _run_fresh("""
        import torch, spion_fx
        from torch import nn
        class Block(nn.Module):
            def __init__(s):
                super().__init__(); s.qkv = nn.Linear(32, 96); s.o = nn.Linear(32, 32)
            def forward(s, x):
                q, k, v = s.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
                torch._dynamo.graph_break()
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                return s.o(a.transpose(1, 2).reshape(x.shape))
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.b = nn.ModuleList([Block(), Block()])
            def forward(s, x):
                for b in s.b: x = b(x)
                return x
        keep = []
        for i in range(50):
            m = M(); spion_fx.sparsify(m, "spion-cf", block_size=16, inner="eager"); keep.append(m)
            m(torch.randn(1, 32, 32))
            st = spion_fx.get_state(m)
            print(len(list(st.attention_sites())), st.eager_forwards)
    """)
    rows = [tuple(map(int, line.split())) for line in out.strip().splitlines()]
    assert rows == [(2, 0)] * 50


def test_logging_inside_a_context_manager_does_not_cost_the_sites():
    """Dynamo cannot resume after a graph break inside a `with` block and skips the frame; a
    logger call there (HF's warning_once under PEFT hooks or checkpointing) did exactly that."""
    import logging

    logger = logging.getLogger("spion_fx.tests.workflows")

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            with torch.enable_grad():
                logger.warning("a message from inside the model")
                q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x):
            return self.attn(x)

    model = spion_fx.sparsify(Model(), "spion-cf", block_size=16, inner="eager")
    model(torch.randn(1, 32, 32))
    state = spion_fx.get_state(model)
    assert [s.spec.name for s in state.attention_sites()] == ["attn"]
    assert state.eager_forwards == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_lora_model_gets_every_site_and_trains_its_adapters(arch):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = peft.get_peft_model(_config(arch), peft.LoraConfig(r=4, target_modules=targets,
                                                                fan_in_fan_out=arch == "gpt2"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_to_sparse(model, steps=5)
    state = spion_fx.get_state(model)
    sites = list(state.attention_sites())
    assert len(sites) == 2 and all(s.kernel_calls["sparse"] > 0 for s in sites)
    assert state.eager_forwards == 0
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(params[n], p) for n, p in adapters.items() if "lora_B" in n)


def test_an_attention_module_that_is_the_root_is_a_site():
    class MyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(a.transpose(1, 2).reshape(x.shape))

    model = MyAttention()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no unique module path" warning
        spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
        for _ in range(4):
            model(torch.randn(2, 64, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
    rows = {r["site"]: r for r in spion_fx.report(model, print_table=False)}
    assert rows["MyAttention"]["phase"] == "sparse"
    assert rows["MyAttention"]["kernel_calls"]["sparse"] == 1


def test_a_forward_dynamo_runs_eagerly_is_reported_not_hidden():
    model = _config("gpt2")
    spion_fx.sparsify(model, "spion-cf", **SPION)
    ids = torch.randint(0, VOCAB, (1, 32))
    model(input_ids=ids)
    with torch.compiler.set_stance("force_eager"), pytest.warns(UserWarning, match="ran without spion_fx's compiled graphs"):
        model(input_ids=ids)
    model(input_ids=ids)  # compiled again: no new warning, still counted once
    state = spion_fx.get_state(model)
    assert state.eager_forwards == 1
    rows = spion_fx.report(model, print_table=False)
    assert any(r["kind"] == "summary" and r.get("eager_forwards") == 1 for r in rows)
    assert all(r["kernel_calls"]["dense"] == 2 for r in rows if r["kind"] == "attention")
