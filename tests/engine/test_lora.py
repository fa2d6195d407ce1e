"""LoRA adapters in the engine: greedy output with an adapter equals transformers with the adapter merged into the
weights (float32), alone and mixed in one batch with another adapter and the base model; the prefix cache keeps
adapters apart; `max_loras` holds back further adapters; malformed adapters are refused and disturb nothing."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from loom_kernels.fused_cpu.decode_stack import decode_stack_available
from server.engine import EngineCore, EngineSettings, InvalidRequestError, SamplingParams
from server.engine.offline import generate
from server.engine.scheduler import Scheduler
from server.model import ModelSettings, load_model
from server.model.lora import LoraAdapter, LoraBatch
from server.model.weights.quant import QuantLinear
from tests.support.lora import hf_merged, write_adapter
from tests.support.models import hf_greedy, hf_model, load_fp32, make_seq, random_prompts

NEW = 10


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory):
    base, root = tiny_checkpoints["llama"], tmp_path_factory.mktemp("lora")
    return {"a": write_adapter(base, root / "a", r=4, alpha=8.0, seed=1),
            # rsLoRA, higher rank, and only some parts of the fused projections (q and v of qkv, up of gate_up)
            "b": write_adapter(base, root / "b", r=8, alpha=4.0, seed=2, use_rslora=True,
                               targets=["q_proj", "v_proj", "up_proj", "down_proj"])}


@pytest.fixture(scope="module")
def core(tiny_checkpoints, adapters):
    core = EngineCore(load_fp32(tiny_checkpoints["llama"]),
                      EngineSettings(kv_cache_memory=0.05, enable_lora=True, max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        core.loras.load(name, str(path))
    return core


@pytest.fixture(scope="module")
def references(tiny_checkpoints, adapters):
    """Greedy continuations of PROMPTS by transformers: base, and each adapter merged."""
    base = tiny_checkpoints["llama"]
    models = {None: hf_model(base), **{name: hf_merged(base, path) for name, path in adapters.items()}}
    return {name: [hf_greedy(m, p, NEW) for p in PROMPTS] for name, m in models.items()}


PROMPTS = random_prompts(3, 5, 40, seed=7)


def greedy(core, prompts, loras):
    params = [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                             lora=core.loras.get(name) if name else None) for name in loras]
    out = [r[0].token_ids for r in generate(core, prompts, params)]
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks, "KV blocks leaked"
    return out


@pytest.mark.parametrize("name", ["a", "b"])
def test_adapter_alone_matches_merged_transformers(core, references, name):
    assert references[name] != references[None]  # the adapter changes the output, so equality below means something
    assert greedy(core, PROMPTS, [name] * len(PROMPTS)) == references[name]


def test_adapters_and_base_in_one_batch(core, references):
    """Every prompt under every choice, all in one continuous batch: rows of both adapters and the base model share
    each step."""
    names = [None, "a", "b"]
    prompts = [p for p in PROMPTS for _ in names]
    loras = [n for _ in PROMPTS for n in names]
    got = greedy(core, prompts, loras)
    assert got == [references[n][i] for i in range(len(PROMPTS)) for n in names]


def test_prefix_cache_never_shares_blocks_across_adapters(core):
    prompt = random_prompts(1, 70, 70, seed=3)[0]
    greedy(core, [prompt], ["a"])
    bm, a = core.block_manager, core.loras.get("a")
    assert len(bm.match_prefix(make_seq(prompt, lora=a))) == 69 // bm.block_size  # its own blocks are reused
    assert bm.match_prefix(make_seq(prompt)) == []  # the base model's K/V of these tokens differ
    assert bm.match_prefix(make_seq(prompt, lora=core.loras.get("b"))) == []


def test_max_loras_holds_back_further_adapters(core):
    bm = core.block_manager
    fakes = [LoraAdapter(f"x{i}", "", 1000 + i, 4, {}) for i in range(3)]
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=4096, max_loras=2)
    seqs = [make_seq([5] * 8, seq_id=i, lora=fakes[i % 3]) for i in range(6)] + [make_seq([6] * 8, seq_id=9)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    admitted = {s.seq.seq_id for s in out.prefills}
    assert admitted == {0, 1, 3, 4, 9}  # adapters x0 and x1 and the base; x2's requests wait
    assert [s.seq_id for s in sched.waiting] == [2, 5]
    for s in list(sched.running):
        if s.params.lora is fakes[0]:
            sched.finish(s, "stop")
    # x0 left: x2's requests are admitted beside the running ones (still prefilling: nothing was computed here)
    assert {s.seq.seq_id for s in sched.schedule().prefills} == {1, 4, 9, 2, 5}
    assert not sched.waiting
    for s in list(sched.running):
        sched.finish(s, "stop")
    assert bm.num_free_blocks == bm.num_blocks


def test_unload_lets_running_requests_finish(core, references, adapters):
    adapter = core.loras.get("a")
    core.add_request("r", PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=adapter))
    tokens = []
    core.step()
    assert core.loras.unload("a") is adapter and core.loras.get("a") is None
    while core.has_unfinished():
        tokens += [t for o in core.step().outputs for t in o.token_ids]
    assert core.loras.unload("a") is None
    core.loras.load("a", str(adapters["a"]))  # back, as a new adapter
    assert core.loras.get("a").id != adapter.id
    assert greedy(core, PROMPTS[:1], ["a"]) == references["a"][:1]


def broken(tmp_path, source, change):
    path = tmp_path / "broken"
    shutil.copytree(source, path)
    change(path)
    return path


def set_config(**fields):
    def change(path):
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return change


@pytest.mark.parametrize("change,message", [
    (set_config(r=None), "positive integer `r`"),
    (lambda p: (p / "adapter_config.json").write_text("{not json"), "cannot read"),
    (set_config(r=16), "rank 16 is over this server's --max-lora-rank 8"),
    (set_config(use_dora=True), "use_dora"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"garbage"), "cannot read"),
])
def test_malformed_adapter_is_refused(core, adapters, references, tmp_path, change, message):
    path = broken(tmp_path, adapters["a"], change)
    before = {a.name: a.id for a in core.loras.adapters()}
    with pytest.raises(InvalidRequestError, match=message) as err:
        core.loras.load("new", str(path))
    assert err.value.param == "lora_path"
    assert {a.name: a.id for a in core.loras.adapters()} == before
    assert greedy(core, PROMPTS[:1], ["b"]) == references["b"][:1]  # what is served is undisturbed


def test_adapter_of_another_shape_is_refused(core, tiny_checkpoints, tmp_path):
    other = write_adapter(tiny_checkpoints["mistral"], tmp_path / "mistral")  # 8 heads of 16: q is 128 wide, not 64
    with pytest.raises(InvalidRequestError, match=r"do not fit the model's projection"):
        core.loras.load("m", str(other))
    with pytest.raises(InvalidRequestError, match="is not a directory"):
        core.loras.load("m", str(tmp_path / "nowhere"))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        core.loras.load("b", str(other))
    assert core.loras.get("m") is None


def test_adapters_over_quantized_weights(tiny_checkpoints, adapters, tmp_path):
    """A q8 base: each adapter projection adds its exact delta beside the quantized linear (never merged into its
    codes), and in a mixed batch every row answers as it does alone."""
    lm = load_model(ModelSettings(model=str(tiny_checkpoints["llama"]), dtype="float32", quantization="q8",
                                  cache_dir=tmp_path), progress=False)
    core = EngineCore(lm, EngineSettings(kv_cache_memory=0.05, enable_lora=True, max_loras=2, max_lora_rank=8))
    a = core.loras.load("a", str(adapters["a"]))
    proj = core.runner.lora.modules["model.layers.0.mlp.down_proj"]
    assert isinstance(proj.base, QuantLinear)
    x = torch.randn(3, proj.in_features)
    wa, wb = a.weights["model.layers.0.mlp.down_proj"]
    slot = core.runner.lora.slot_of([a])[a.id]
    with core.runner.lora.bound(LoraBatch.build([(slot, 1, 2)], torch.device("cpu"))):
        got = proj(x)
    expected = proj.base(x)
    expected[1:] += (x[1:] @ wa.t()) @ wb.t()
    torch.testing.assert_close(got, expected)
    alone = {name: greedy(core, PROMPTS[:2], [name] * 2) for name in (None, "a")}
    assert alone["a"] != alone[None]
    mixed = greedy(core, PROMPTS[:2] * 2, [None, None, "a", "a"])
    assert mixed == alone[None] + alone["a"]
    stacks = lm.model.decode_stacks  # the mixed decode steps ran on the C++ stack, the LoRA deltas inside it
    if decode_stack_available():
        assert stacks is not None and 4 in stacks.by_size
