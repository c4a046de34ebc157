"""Drive a real `lorax-server serve` subprocess over its unix socket, the way the router and external
tools do: Info, Health, ServiceDiscovery, Warmup, Prefill, Decode, FilterBatch, ClearCache, and bad
requests that must get an error status while the shard keeps serving. Health's failure is tested on
an in-process service whose model is broken on purpose."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from shard_process import in_process, run_shard

from lorax_server.pb import generate_pb2 as pb
from lorax_server.server import LoraxService

KV_BLOCKS = 64  # x 16 tokens = 1024 tokens of cache


@pytest.fixture(scope="module")
def shard(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    flags = ("--dtype", "float32", "--kv-cache-blocks", str(KV_BLOCKS))
    with run_shard(llama_dir, tmp_path_factory.mktemp("sock"), *flags) as running:
        yield running


def request(rid: int, ids: list[int], max_new: int = 4, **kw) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
        **kw,
    )


def test_info_health_discovery(shard) -> None:
    stub, _, sock = shard
    info = stub.Info(pb.InfoRequest())
    assert info.dtype == "float32" and info.device_type == "cpu" and info.vocab_size == 320
    assert info.architecture == "LlamaForCausalLM" and list(info.eos_token_ids) == [2]
    assert not info.requires_padding and info.block_size == 16
    stub.Health(pb.HealthRequest())
    assert list(stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls) == [f"unix://{sock}"]


def test_warmup_prefill_decode_filter_clear(shard) -> None:
    stub, _, _ = shard
    warm = stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    assert warm.max_supported_total_tokens == KV_BLOCKS * 16
    batch = pb.Batch(id=1, requests=[request(1, [1, 5, 6, 7], 3), request(2, [1, 9], 6, top_n_tokens=2)], size=2)
    pre = stub.Prefill(pb.PrefillRequest(batch=batch))
    assert [g.request_id for g in pre.generations] == [1, 2]
    assert len(pre.generations[1].top_tokens.ids) == 2
    assert pre.batch.id == 1 and list(pre.batch.request_ids) == [1, 2] and pre.batch.max_tokens == 4 + 3 + 2 + 6
    dec = stub.Decode(pb.DecodeRequest(batches=[pre.batch]))
    assert len(dec.generations) == 2
    assert 0 < dec.forward_ns <= dec.total_ns and 0 < pre.forward_ns <= pre.total_ns
    dec = stub.Decode(pb.DecodeRequest(batches=[dec.batch]))
    finished = {g.request_id: g.generated_text for g in dec.generations if g.HasField("generated_text")}
    assert finished[1].generated_tokens == 3 and finished[1].finish_reason == pb.FINISH_REASON_LENGTH
    assert list(dec.batch.request_ids) == [2]  # a finished request leaves the batch by itself
    second = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[request(3, [1, 4], 5)], size=1)))
    merged = stub.Decode(pb.DecodeRequest(batches=[dec.batch, second.batch]))
    assert list(merged.batch.request_ids) == [2, 3] and merged.batch.id == 1
    filtered = stub.FilterBatch(pb.FilterBatchRequest(batch_id=1, request_ids=[3]))
    assert list(filtered.batch.request_ids) == [3]
    stub.ClearCache(pb.ClearCacheRequest(id=1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Decode(pb.DecodeRequest(batches=[filtered.batch]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


Tokens = dict[int, list[tuple[int, float]]]


def _run_batch(stub, batch_id: int, requests: list[pb.Request], between=None, steps: int = 0) -> Tokens:  # noqa: ANN001
    """Prefill then decode to the end, `steps` steps a Decode; (token, logprob) of each request. `between`
    runs before each call."""
    out: Tokens = {r.id: [] for r in requests}
    if between is not None:
        between()
    step = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
    while True:
        for g in step.generations:
            out[g.request_id].append((g.token_id, g.token_logprob))
        if not step.HasField("batch"):
            return out
        if between is not None:
            between()
        step = stub.Decode(pb.DecodeRequest(batches=[step.batch], steps=steps))


def test_several_steps_a_decode_call_give_the_tokens_of_one_step_a_call(shard) -> None:
    """A Decode of N steps runs each step on what the one before left: the same tokens and logprobs,
    in order, as N calls, finished requests out of the batch at once, the call ending early when every
    request has finished. Requests of 1 to 9 new tokens, one with an EOS it may stop at, one with top
    tokens."""
    stub, proc, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    requests = [request(20 + i, [1, 7 + i, 30 + 2 * i], 1 + 2 * i) for i in range(5)]
    requests[1].stopping_parameters.ignore_eos_token = False
    requests[2].top_n_tokens = 3
    one = _run_batch(stub, 50, requests)
    assert _run_batch(stub, 51, requests, steps=1) == one
    for steps in (3, 100):
        assert _run_batch(stub, 52 + steps, requests, steps=steps) == one
    pre = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=60, requests=requests, size=len(requests))))
    dec = stub.Decode(pb.DecodeRequest(batches=[pre.batch], steps=4))
    per_request = {r.id: sum(g.request_id == r.id for g in dec.generations) for r in requests}
    assert per_request == {20: 0, 21: len(one[21]) - 1, 22: 4, 23: 4, 24: 4}  # 22 ends at its 5th token
    assert not any(g.skipped for g in dec.generations)
    assert list(dec.batch.request_ids) == [23, 24] and 0 < dec.forward_ns <= dec.total_ns
    last = stub.Decode(pb.DecodeRequest(batches=[dec.batch], steps=100))
    assert not last.HasField("batch") and len(last.generations) == (7 - 5) + (9 - 5)
    assert proc.poll() is None


def test_health_runs_between_steps_of_a_cached_batch_without_changing_it(shard) -> None:
    """Health is a real forward pass, serialised with the steps; a batch decoded with a Health call
    before every step gives exactly the tokens and logprobs it gives without them, whether Health
    finds a free KV block or every block is taken (4 x 256 tokens fill the 64 blocks)."""
    stub, proc, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    for n in (2, 4):
        requests = [request(10 + i, [1, *range(20 + i, 219 + i)], 56) for i in range(n)]
        plain = _run_batch(stub, 40, requests)
        checked = _run_batch(stub, 41, requests, between=lambda: stub.Health(pb.HealthRequest()))
        assert checked == plain
    assert proc.poll() is None


def test_bad_requests_get_error_statuses_and_the_shard_keeps_serving(shard) -> None:
    stub, proc, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    cases = [
        (
            pb.Batch(id=5, requests=[request(1, [], 4)], size=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty input",
        ),
        (
            pb.Batch(id=5, requests=[request(1, [1] * 1100, 4)], size=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "KV cache",
        ),
        (
            pb.Batch(id=5, requests=[request(1, [1, 999], 4)], size=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "vocabulary",
        ),
        (pb.Batch(id=5, requests=[], size=0), grpc.StatusCode.INVALID_ARGUMENT, "no requests"),
    ]
    for batch, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(pb.PrefillRequest(batch=batch))
        assert err.value.code() == code and message in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=12345)]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "12345" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.FilterBatch(pb.FilterBatchRequest(batch_id=12345, request_ids=[1]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadAdapter(pb.LoadAdapterRequest(adapter_index=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter_ids" in err.value.details()
    ok = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=6, requests=[request(1, [1, 2, 3], 1)], size=1)))
    assert ok.generations[0].generated_text.generated_tokens == 1
    stub.Health(pb.HealthRequest())
    assert proc.poll() is None


def test_compile_grammar_then_a_constrained_request(shard) -> None:
    stub, _, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    digits = pb.Grammar(type=pb.GRAMMAR_TYPE_REGEX, value="[0-9]{4}")
    stub.CompileGrammar(pb.CompileGrammarRequest(grammar=digits))
    for bad, reason in [
        (pb.Grammar(type=pb.GRAMMAR_TYPE_JSON, value='{"type": "strng"}'), "Unsupported type"),
        (pb.Grammar(type=pb.GRAMMAR_TYPE_JSON, value="{"), "not valid JSON"),
        (pb.Grammar(type=pb.GRAMMAR_TYPE_REGEX, value="(a"), "regex grammar cannot be compiled"),
        (pb.Grammar(type=pb.GRAMMAR_TYPE_NONE), "needs a grammar"),
        (pb.Grammar(type=9, value="x"), "unknown grammar type 9"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.CompileGrammar(pb.CompileGrammarRequest(grammar=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
    requests = [request(1, [1, 5, 6], 8, grammar=digits), request(2, [1, 5, 6], 8)]
    requests[0].stopping_parameters.ignore_eos_token = False
    texts = _run_texts(stub, 30, requests)
    assert len(texts[1]) == 4 and texts[1].isdigit()
    assert stub.Health(pb.HealthRequest()) is not None  # the shard keeps serving


def _run_texts(stub, batch_id: int, requests: list[pb.Request]) -> dict[int, str]:  # noqa: ANN001
    """Prefill then decode to the end; the generated text of each request."""
    out: dict[int, str] = {}
    step = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
    while True:
        for g in step.generations:
            if g.HasField("generated_text"):
                out[g.request_id] = g.generated_text.text
        if not step.HasField("batch"):
            return out
        step = stub.Decode(pb.DecodeRequest(batches=[step.batch]))


def test_sigterm_stops_the_shard_and_removes_its_socket(llama_dir: Path, tmp_path: Path) -> None:
    uds = str(tmp_path / "s")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorax_server.cli",
            "serve",
            str(llama_dir),
            "--uds-path",
            uds,
            "--kv-cache-blocks",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = Path(f"{uds}-0")
    deadline = time.time() + 120
    while not sock.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert sock.exists()
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not sock.exists()


def test_health_fails_with_unavailable_when_the_forward_pass_fails(llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from lorax_server.engine import CacheConfig, Engine
    from lorax_server.layers.attention import TorchAttention
    from lorax_server.models.loader import load_model

    model = load_model(llama_dir, TorchAttention(16), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(16, num_blocks=8))
    service = LoraxService(engine, [f"unix://{tmp_path / 'shard-0'}"], "LlamaForCausalLM")
    with in_process(service, tmp_path) as stub:
        stub.Health(pb.HealthRequest())
        forward = model.forward

        def broken(meta, cache):  # noqa: ANN001, ANN202
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        model.forward = broken
        with pytest.raises(grpc.RpcError) as err:
            stub.Health(pb.HealthRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "illegal memory access" in err.value.details()
        model.forward = forward
        stub.Health(pb.HealthRequest())  # healthy again once the forward pass works


def _adapter_params(path: Path) -> pb.AdapterParameters:
    return pb.AdapterParameters(adapter_ids=[str(path)])


def test_download_adapter_answers_the_adapters_own_chat_template(shard, llama_dir: Path, tmp_path: Path) -> None:
    """An adapter saved with its tokenizer and a chat template of its own (as transformers writes them)
    brings it; one whose files name no special tokens gets the base model's; of a merge, the first
    adapter's that has one."""
    import json

    from tiny_models import make_lora_adapter
    from transformers import AutoTokenizer

    stub, _, _ = shard
    plain = make_lora_adapter(llama_dir, tmp_path / "plain", 4, r=4, target_modules=["q_proj"])
    chatty = make_lora_adapter(llama_dir, tmp_path / "chatty", 5, r=4, target_modules=["q_proj"])
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{{ eos_token }}"
    tokenizer.save_pretrained(chatty)
    bare = make_lora_adapter(llama_dir, tmp_path / "bare", 6, r=4, target_modules=["q_proj"])
    (bare / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}B"}))

    def download(*adapters: Path, **merge) -> pb.DownloadAdapterResponse:  # noqa: ANN003
        params = pb.AdapterParameters(adapter_ids=[str(a) for a in adapters], **merge)
        return stub.DownloadAdapter(
            pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=pb.AdapterSource.LOCAL)
        )

    own = download(chatty).chat_template
    assert (own.template, own.bos_token, own.eos_token) == (
        tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token
    )  # fmt: skip
    base = AutoTokenizer.from_pretrained(llama_dir)
    filled = download(bare).chat_template
    assert (filled.template, filled.bos_token, filled.eos_token) == ("{{ bos_token }}B", base.bos_token, base.eos_token)
    merged = download(plain, chatty, bare, weights=[0.5, 0.3, 0.2], merge_strategy="linear")
    assert merged.chat_template.template == tokenizer.chat_template
    assert not download(plain).HasField("chat_template")


def test_load_adapter_alone_fetches_and_answers_what_a_download_would(shard, llama_dir: Path, tmp_path: Path) -> None:
    """The router's path for a new adapter while a slot is free: one LoadAdapter (`if_fits`) reads and
    installs it and reports its memory fraction and chat template; a missing one fails as a download."""
    from tiny_models import make_lora_adapter
    from transformers import AutoTokenizer

    stub, _, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    adapter = make_lora_adapter(llama_dir, tmp_path / "chatty", 7, r=4, target_modules=["q_proj", "o_proj"])
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer.save_pretrained(adapter)
    local = pb.AdapterSource.LOCAL

    def load(path: Path, index: int) -> pb.LoadAdapterResponse:
        params = _adapter_params(path)
        return stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=local, adapter_index=index, if_fits=True)
        )

    loaded = load(adapter, 3)
    assert loaded.loaded and loaded.chat_template.template == tokenizer.chat_template
    downloaded = stub.DownloadAdapter(
        pb.DownloadAdapterRequest(adapter_parameters=_adapter_params(adapter), adapter_source=local)
    )
    assert loaded.memory_fraction == pytest.approx(downloaded.memory_fraction) and loaded.memory_fraction > 0
    again = load(adapter, 3)  # already there: nothing to do, same answer
    assert again.loaded and again.memory_fraction == pytest.approx(loaded.memory_fraction)
    gens = stub.Prefill(
        pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(1, [1, 5, 6], 1, adapter_index=3)], size=1))
    )
    assert gens.generations[0].generated_text.generated_tokens == 1
    assert stub.OffloadAdapter(pb.OffloadAdapterRequest(adapter_index=3)).offloaded
    with pytest.raises(grpc.RpcError) as err:
        load(tmp_path / "missing", 4)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in err.value.details()


def test_adapters_over_grpc(shard, llama_dir: Path, tmp_path: Path) -> None:
    """Download, load, use and offload a LoRA adapter through the shard's RPCs; tokens equal peft's."""
    import torch
    from peft import PeftModel
    from tiny_models import make_lora_adapter
    from transformers import AutoModelForCausalLM

    stub, proc, _ = shard
    stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
    adapter = make_lora_adapter(llama_dir, tmp_path / "lora", 3, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    local = pb.AdapterSource.LOCAL
    info = stub.DownloadAdapter(
        pb.DownloadAdapterRequest(adapter_parameters=_adapter_params(adapter), adapter_source=local)
    )
    assert info.downloaded and 0 < info.memory_fraction < 1
    assert not info.HasField("chat_template")  # it ships none: the router uses the base model's
    assert stub.LoadAdapter(
        pb.LoadAdapterRequest(adapter_parameters=_adapter_params(adapter), adapter_source=local, adapter_index=1)
    ).loaded
    prompt = [1, 40, 41, 42, 43]
    batch = pb.Batch(id=30, requests=[request(1, prompt, 6, adapter_index=1), request(2, prompt, 6)], size=2)
    gens = stub.Prefill(pb.PrefillRequest(batch=batch))
    tokens = {g.request_id: [g.token_id] for g in gens.generations}
    cached = gens.batch
    while cached.ByteSize() and cached.size:
        dec = stub.Decode(pb.DecodeRequest(batches=[cached]))
        for g in dec.generations:
            tokens[g.request_id].append(g.token_id)
        if not dec.HasField("batch"):
            break
        cached = dec.batch
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        seq = torch.tensor([prompt])
        for _ in range(6):
            seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], dim=1)
        with ref.disable_adapter():
            base = torch.tensor([prompt])
            for _ in range(6):
                base = torch.cat([base, ref(base).logits[:, -1:].argmax(-1)], dim=1)
    assert tokens[1] == seq[0, len(prompt) :].tolist()
    assert tokens[2] == base[0, len(prompt) :].tolist()
    assert stub.OffloadAdapter(pb.OffloadAdapterRequest(adapter_index=1)).offloaded
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(
            pb.PrefillRequest(batch=pb.Batch(id=31, requests=[request(1, prompt, 2, adapter_index=1)], size=1))
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not loaded" in err.value.details()
    bad = [
        (str(tmp_path / "missing"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (str(llama_dir), grpc.StatusCode.INVALID_ARGUMENT, "adapter_config.json"),
    ]
    for path, code, message in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.DownloadAdapter(
                pb.DownloadAdapterRequest(
                    adapter_parameters=pb.AdapterParameters(adapter_ids=[path]), adapter_source=local
                )
            )
        assert err.value.code() == code and message in err.value.details(), err.value.details()
    stub.Health(pb.HealthRequest())
    assert proc.poll() is None


@pytest.fixture(scope="module")
def sentencepiece_shard(tmp_path_factory: pytest.TempPathFactory):
    """A shard serving a tiny Llama with Mistral's SentencePiece tokenizer, forced to generate
    chosen pieces (server/tests/sentencepiece_models.py)."""
    from sentencepiece_models import make_forced_llama

    model_dir = make_forced_llama(tmp_path_factory.mktemp("sentencepiece_llama"))
    flags = ("--dtype", "float32", "--kv-cache-blocks", str(KV_BLOCKS))
    with run_shard(model_dir, tmp_path_factory.mktemp("sock"), *flags) as (stub, _, _):
        stub.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=128, max_total_tokens=128))
        yield stub, model_dir


def _generate(stub, batch_id: int, ids: list[int], max_new: int, ignore_eos: bool = False):  # noqa: ANN001, ANN202
    """One request to the end: its (token text, is special) pairs and its GeneratedText."""
    req = pb.Request(
        id=1,
        input_ids=ids,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos),
    )
    step = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=[req], size=1)))
    tokens = []
    while True:
        gen = step.generations[0]
        tokens.append((gen.token_text, gen.token_is_special))
        if gen.HasField("generated_text"):
            return tokens, gen.generated_text
        step = stub.Decode(pb.DecodeRequest(batches=[step.batch]))


def test_sentencepiece_stream_adds_up_to_generated_text(sentencepiece_shard) -> None:
    """With a real SentencePiece tokenizer (leading and repeated spaces, accents, CJK, emoji,
    byte-fallback pieces, EOS): the streamed texts, special tokens left out, are generated_text."""
    from sentencepiece_models import CASES, CUT_SHORT, IGNORE_EOS_TEXT, prompt_ids

    stub, model_dir = sentencepiece_shard
    for batch_id, case in enumerate(CASES, start=50):
        tokens, final = _generate(stub, batch_id, prompt_ids(model_dir, case.prompt), 32)
        assert "".join(text for text, special in tokens if not special) == final.text == case.text, case.name
        assert tokens[-1] == ("</s>", True) and final.finish_reason == pb.FINISH_REASON_EOS_TOKEN
        assert final.generated_tokens == len(case.pieces) + 1
    spaces, emoji = CASES[0], CASES[3]
    streamed = [text for text, _ in _generate(stub, 60, prompt_ids(model_dir, spaces.prompt), 32)[0]]
    assert streamed == [" end", "  ", "</s>"]  # the first token keeps its space after the prompt
    for max_new, text in IGNORE_EOS_TEXT.items():
        tokens, final = _generate(stub, 61, prompt_ids(model_dir, spaces.prompt), max_new, ignore_eos=True)
        assert "".join(t for t, special in tokens if not special) == final.text == text
        assert [t for t, special in tokens if special] == ["</s>"] * ((max_new - 1) // 2)
    for max_new, text in CUT_SHORT.items():
        tokens, final = _generate(stub, 62, prompt_ids(model_dir, emoji.prompt), max_new)
        assert "".join(t for t, _ in tokens) == final.text == text
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
