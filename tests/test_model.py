import numpy as np
import pytest
import torch

from fedllm.data import tokenize
from fedllm.evaluate import evaluate
from fedllm.model import ModelError, load_model, load_trained, save_adapter
from fedllm.protocol import state_bytes


@pytest.fixture(scope="module")
def minilm():
    return load_model(None, task="seq-cls", label_names=("0", "1"), seed=0)


def test_default_model_is_minilm_with_mean_pooling_and_small_adapter(minilm):
    # sentence-transformers checkpoint whose pipeline ends in Normalize (modules.json)
    assert minilm.pooling == "mean-norm"
    state = minilm.adapter_state()
    names = list(state)
    assert any("lora_A" in n and "query" in n for n in names)
    assert any("lora_B" in n and "value" in n for n in names)
    assert any(n.endswith("head.weight") for n in names)
    assert not any("embeddings" in n for n in names)  # frozen base never travels
    assert state_bytes(state) <= 0.01 * minilm.full_model_bytes
    trainable = {n for n, p in minilm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "head" in n for n in trainable)


def test_adapter_roundtrip_and_mismatch(minilm):
    state = minilm.adapter_state()
    changed = {k: v + 0.5 for k, v in state.items()}
    minilm.load_adapter_state(changed)
    again = minilm.adapter_state()
    assert all(np.allclose(again[k], changed[k]) for k in state)
    minilm.load_adapter_state(state)
    with pytest.raises(ModelError, match="adapter mismatch"):
        minilm.load_adapter_state({k: v for k, v in list(state.items())[1:]})
    k0 = next(iter(state))
    with pytest.raises(ModelError, match="shape"):
        minilm.load_adapter_state({**state, k0: np.zeros((1, 1), np.float32)})


def test_saved_adapter_reloads_with_peft_and_predicts_the_same(minilm, tmp_path):
    state = minilm.adapter_state()
    rng = np.random.default_rng(0)
    minilm.load_adapter_state({k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
                               for k, v in state.items()})
    save_adapter(minilm, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    back = load_trained(tmp_path / "ad")
    ds = tokenize(minilm.tokenizer, ["a fine film", "awful, boring"], np.array([1, 0]),
                  max_length=32)
    assert evaluate(back, ds) == pytest.approx(evaluate(minilm, ds))
    minilm.load_adapter_state(state)


def test_bad_model_dirs(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope"), task="seq-cls", label_names=("a", "b"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path), task="seq-cls", label_names=("a", "b"))


def test_causal_lm_loads_with_lora(tiny_causal_lm):
    lm = load_model(str(tiny_causal_lm), task="causal-lm", seed=0)
    names = list(lm.adapter_state())
    assert any("q_proj.lora_A" in n for n in names) and lm.task == "causal-lm"
    ids = torch.tensor([[101, 2000, 2001, 102]])
    out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape[-1] == lm.model.get_base_model().config.vocab_size


def test_mean_norm_pooling_feeds_the_head_unit_vectors_and_dropout_is_off(minilm):
    seen = []
    head = minilm.model.base_model.model.head
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    ds = tokenize(minilm.tokenizer, ["a fine film", "dull , and far too long"], np.array([1, 0]),
                  max_length=32)
    from fedllm.data import Collator

    batch = Collator(int(minilm.tokenizer.pad_token_id))([ds[0], ds[1]])
    try:
        minilm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    assert torch.allclose(seen[0].norm(dim=-1), torch.ones(2), atol=1e-5)
    # fedllm's default: no dropout inside the frozen base; None keeps the checkpoint's 0.1.
    drops = [m.p for m in minilm.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.0 for p in drops)
    kept = load_model(None, task="seq-cls", label_names=("0", "1"), base_dropout=None)
    assert {m.p for m in kept.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_feature_centre_changes_the_head_coordinates_not_the_function(minilm, tmp_path):
    """set_feature_center: same logits, same (uncentred) wire state, saved adapter too; only the
    coordinates the head trains in change (its weight gradient becomes (p - y)(x - c))."""
    state = minilm.adapter_state()
    rng = np.random.default_rng(1)
    perturbed = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in state.items()}
    minilm.load_adapter_state(perturbed)
    ds = tokenize(minilm.tokenizer, ["a fine film", "awful, boring", "it is a movie"],
                  np.array([1, 0, 1]), max_length=32)
    batch = {"input_ids": torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(x) for x in ds.input_ids], batch_first=True)}
    batch["attention_mask"] = (batch["input_ids"] != 0).long()
    clf = minilm.model.get_base_model()

    def logits_and_head_grad():
        minilm.model.zero_grad()
        logits = minilm.model(**batch)
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1])).backward()
        grad = next(p.grad for n, p in minilm.model.named_parameters()
                    if p.requires_grad and n.endswith("head.modules_to_save.default.weight"))
        return logits.detach(), grad.clone()

    plain_logits, plain_grad = logits_and_head_grad()
    with torch.no_grad():
        x = clf.pooled(batch["input_ids"], batch["attention_mask"])
    center = x.mean(0).numpy()
    try:
        minilm.set_feature_center(center)
        assert np.allclose(clf.feature_center.numpy(), center)
        centred_logits, centred_grad = logits_and_head_grad()
        assert torch.allclose(centred_logits, plain_logits, atol=1e-5)
        wire = minilm.adapter_state()
        assert all(np.allclose(wire[k], perturbed[k], atol=1e-5) for k in perturbed)
        # Centred coordinates: the batch-mean part of the features no longer reaches W.
        p = torch.softmax(plain_logits, -1) - torch.nn.functional.one_hot(
            torch.tensor([1, 0, 1]), 2)
        assert torch.allclose(centred_grad, p.T @ (x - x.mean(0)) / 3, atol=1e-5)
        assert not torch.allclose(centred_grad, plain_grad, atol=1e-3)
        # Loading a (wire) state keeps the centre: same function as uncentred.
        minilm.load_adapter_state(perturbed)
        assert torch.allclose(minilm.model(**batch).detach(), plain_logits, atol=1e-5)
        save_adapter(minilm, tmp_path / "ad")
        assert np.allclose(clf.feature_center.numpy(), center)  # restored after saving
        back = load_trained(tmp_path / "ad")
        assert evaluate(back, ds) == pytest.approx(evaluate(minilm, ds))
        with pytest.raises(ModelError, match="finite"):
            minilm.set_feature_center(np.full(center.shape, np.nan, np.float32))
    finally:
        minilm.set_feature_center(None)
        minilm.load_adapter_state(state)
    assert not clf.feature_center.any()


def test_with_head_replaces_only_the_head_and_checks_it(minilm):
    """fedllm.model.with_head: the class-means head goes into the wire state by name and shape;
    nothing else changes; a wrong shape or a non-finite value is refused."""
    from fedllm.model import with_head

    state = minilm.adapter_state()
    (wkey,) = [k for k in state if k.endswith("head.weight")]
    (bkey,) = [k for k in state if k.endswith("head.bias")]
    w = np.full((2, 384), 0.5, np.float32)
    b = np.array([1.0, -1.0], np.float32)
    new = with_head(state, weight=w, bias=b)
    assert np.array_equal(new[wkey], w) and np.array_equal(new[bkey], b)
    assert all(np.array_equal(new[k], state[k]) for k in state if k not in (wkey, bkey))
    assert not np.array_equal(state[wkey], w)  # a copy: the input is untouched
    minilm.load_adapter_state(new)
    assert np.array_equal(minilm.adapter_state()[wkey], w)
    with pytest.raises(ModelError, match="expected shape"):
        with_head(state, weight=w[:1], bias=b)
    with pytest.raises(ModelError, match="non-finite"):
        with_head(state, weight=w, bias=np.array([np.nan, 0.0], np.float32))
    minilm.load_adapter_state(state)


def test_bf16_base_keeps_the_adapter_fp32_and_the_function_close(minilm, tmp_path):
    """model.base_dtype = "bf16": the frozen base is stored in bf16 (half its bytes), LoRA (also
    a frozen FFA-LoRA A) and the head stay fp32, logits come out fp32 and close to the fp32
    model's; a saved adapter reloads on the base dtype it was trained on."""
    lm = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0, base_dtype="bf16")
    ffa = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0, base_dtype="bf16",
                     lora_freeze_a=True)
    from fedllm.model import is_base_parameter

    for m in (lm, ffa):
        assert m.base_dtype == "bf16"
        for n, p in m.model.named_parameters():
            if not is_base_parameter(n):
                assert p.dtype == torch.float32, n
            elif p.is_floating_point():
                assert p.dtype == torch.bfloat16 and not p.requires_grad, n
        assert all(v.dtype == np.float32 for v in m.adapter_state().values())
    assert any("lora_A" in n and not p.requires_grad and p.dtype == torch.float32
               for n, p in ffa.model.named_parameters())  # frozen A: adapter, still fp32

    from bench.throughput import base_param_bytes

    assert base_param_bytes(lm) * 2 == base_param_bytes(minilm)
    assert lm.adapter_state().keys() == minilm.adapter_state().keys()
    assert all(np.array_equal(v, minilm.adapter_state()[k])  # same seeded start
               for k, v in lm.adapter_state().items())

    texts = ["a fine film", "awful, boring and far too long", "it is what it is"]
    ds = tokenize(minilm.tokenizer, texts, np.array([1, 0, 1]), max_length=32)
    ids = torch.as_tensor(ds.input_ids[1])[None]  # the longest text alone, no padding
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        l16 = lm.model(**batch)
        # The sentence vectors the head reads (unit norm): bf16 rounding moves them a little.
        v32 = minilm.model.base_model.model.pooled(**batch)
        v16 = lm.model.base_model.model.pooled(**batch)
    assert l16.dtype == v16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(v16, v32).item()
    assert 0.999 < cos < 1 - 1e-7  # close, and not the fp32 computation

    rng = np.random.default_rng(1)
    lm.load_adapter_state({k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
                           for k, v in lm.adapter_state().items()})
    save_adapter(lm, tmp_path / "ad16")
    back = load_trained(tmp_path / "ad16")
    assert back.base_dtype == "bf16"
    assert evaluate(back, ds) == pytest.approx(evaluate(lm, ds))


def test_attention_kernel_follows_batch_length_on_cpu_and_is_exact(minilm):
    # Short CPU batches run "eager" attention (SDPA's CPU kernel is ~4x slower there), long
    # ones the checkpoint's sdpa; the model's function and gradients are the same either way.
    sdpa_only = load_model(None, task="seq-cls", label_names=("0", "1"), seed=0,
                           cpu_eager_attention_max_tokens=0)
    seen: list[str] = []

    def record(module, args, out):
        seen.append(module.config._attn_implementation)

    hooks = [m.model.base_model.model.encoder.register_forward_hook(record)
             for m in (minilm, sdpa_only)]
    short = ["a fine , warm film", "not good at all"]
    long = [" ".join(["a surprisingly moving and well acted story"] * 30), "too long"]
    try:
        for texts, expected in ((short, ["eager", "sdpa"]), (long, ["sdpa", "sdpa"])):
            enc = minilm.tokenizer(texts, padding=True, truncation=True, max_length=256,
                                   return_tensors="pt")
            assert (enc["input_ids"].shape[1] <= 128) == (texts is short)
            seen.clear()
            logits, grads = [], []
            for m in (minilm, sdpa_only):
                m.model.zero_grad()
                out = m.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                out.sum().backward()
                logits.append(out.detach())
                grads.append(torch.cat([p.grad.flatten() for n, p in m.model.named_parameters()
                                        if "lora_B" in n]))
            assert seen == expected
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    finally:
        for h in hooks:
            h.remove()
        minilm.model.zero_grad()


def test_causal_lm_generation_switching_kernels_mid_way_equals_sdpa(tiny_causal_lm):
    # A prompt longer than the eager limit prefills with sdpa; every decoding step (one new
    # token against the cache) then runs eager. Losses on a padded batch and the greedy
    # continuation must equal sdpa throughout.
    from fedllm.evaluate import generate
    from fedllm.train import example_losses

    mixed = load_model(str(tiny_causal_lm), task="causal-lm", seed=0,
                       cpu_eager_attention_max_tokens=8)
    sdpa_only = load_model(str(tiny_causal_lm), task="causal-lm", seed=0,
                           cpu_eager_attention_max_tokens=0)
    seen: list[str] = []
    hook = mixed.model.get_base_model().register_forward_hook(
        lambda m, a, o: seen.append(m.config._attn_implementation))
    try:
        prompt = "the film is a warm , funny and moving story about two old friends who"
        assert mixed.tokenizer(prompt, return_tensors="pt")["input_ids"].shape[1] > 8
        assert generate(mixed, [prompt], max_new_tokens=6) == \
            generate(sdpa_only, [prompt], max_new_tokens=6)
        assert seen[0] == "sdpa" and set(seen[1:]) == {"eager"}
        enc = mixed.tokenizer(["a short one", "a rather longer sentence than the other one"],
                              padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for short in (True, False):  # eager below the limit, sdpa above it
            b = {k: v[:, :6] for k, v in batch.items()} if short else batch
            torch.testing.assert_close(example_losses(mixed.model, b, "causal-lm"),
                                       example_losses(sdpa_only.model, b, "causal-lm"),
                                       rtol=1e-5, atol=1e-5)
    finally:
        hook.remove()
