"""The GPU-speed paths, each checked on the CPU: compiled blocks (one warm-up, no recompilation
afterwards, a fallback to eager when the compiler fails), bf16 compute weights against
autocast, fsdp/ddp of one process as single, the half-table rotary against fair-esm's formula,
and the `data.max_tokens = "auto"` chooser against `esmdist plan`."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from esmdist.config import load_config
from esmdist.model import ESM
from esmdist.parallel.distributed import DistInfo
from tests.conftest import REPO, make_shards
from tests.distributed import run_ranks

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_records):
    return make_shards(tmp_path_factory.mktemp("compile"), demo_records[:600], 100)


def job(*extra: str, size: str = "debug"):
    return load_config(None, [f"--model.size={size}", "--parallel.backend=single",
                              "--data.max_tokens=2048", "--train.tokens_per_step=4096",
                              "--data.crop_length=512", "--train.compile=false", *extra])  # fmt: skip


def real_micro_batches(count: int, tokens: int = 2048):
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from train_bench import real_batches

    return real_batches(tokens, count)


def train_steps(engine, batches, per_step: int) -> list[float]:
    from esmdist.train import masked_lm_loss

    losses = []
    for start in range(0, len(batches), per_step):
        for index, batch in enumerate(batches[start : start + per_step]):
            loss = masked_lm_loss(engine, batch, torch.device("cpu"))
            losses.append(loss.item())
            engine.backward(loss / 500, last=index == per_step - 1)
        engine.step()
    return losses


def test_bf16_compute_weights_train_exactly_as_autocast():
    """The bf16 copies of the matmul weights and the gradients moved into the fp32 masters are
    autocast's arithmetic: the same losses and parameters, bit for bit, over steps of two
    micro-batches; a load refreshes the copies."""
    from esmdist.parallel.precision import ComputeCopy
    from esmdist.train import engine_for

    batches = real_micro_batches(4)
    runs = {}
    for flag in ("true", "false"):
        engine = engine_for(
            job("--train.dtype=bf16", f"--parallel.low_precision_weights={flag}"), CPU
        )
        runs[flag] = engine, train_steps(engine, batches, 2)
    (copy, copy_losses), (autocast, autocast_losses) = runs["true"], runs["false"]
    assert isinstance(copy.wrapped.after_update.__self__, ComputeCopy)
    assert copy.compute_module is not copy.module and autocast.compute_module is autocast.module
    assert copy_losses == autocast_losses
    ours, theirs = copy.full_state_dict(), autocast.full_state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert copy.compute_module.layers[0].fc1.weight.dtype == torch.bfloat16
    assert copy.compute_module.embed_tokens.weight is copy.module.embed_tokens.weight

    fresh = engine_for(job("--train.dtype=bf16", "--train.seed=7"), CPU)
    fresh.load_checkpoint_state(copy.checkpoint_state())
    assert torch.equal(fresh.compute_module.layers[1].self_attn.q_proj.weight,
                       copy.module.layers[1].self_attn.q_proj.weight.to(torch.bfloat16))  # fmt: skip


def run_data_parallel_bf16(rank: int, backend: str, flag: str, out: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from esmdist.parallel.distributed import init_distributed
    from esmdist.train import engine_for, masked_lm_loss

    info = init_distributed("gloo")
    engine = engine_for(job(f"--parallel.backend={backend}", "--train.dtype=bf16",
                            f"--parallel.low_precision_weights={flag}", "--optim.lr=2e-3",
                            "--optim.warmup_steps=0"), info)  # fmt: skip
    start = engine.full_state_dict()
    batches = real_micro_batches(12)[rank::2]  # each rank its own micro-batches
    losses = train_steps(engine, batches[:4], 2)
    held = []  # what the block computes with after each micro-batch's backward
    for index, batch in enumerate(batches[4:]):
        engine.backward(masked_lm_loss(engine, batch, info.device) / 500, last=index == 1)
        weight = engine.module.layers[0].fc1.weight
        held.append((isinstance(weight, DTensor), weight.dtype))
    engine.step()
    # A forward without backward (validation) leaves the weights gathered; any change of the
    # masters (a step, a load) drops them, so that the next forward casts the new values.
    with torch.no_grad():
        masked_lm_loss(engine, batches[0], info.device)
    held.append((isinstance(engine.module.layers[0].fc1.weight, DTensor),))
    engine.wrapped.after_update()
    held.append((isinstance(engine.module.layers[0].fc1.weight, DTensor),))
    state = engine.full_state_dict()
    dcp.save(engine.checkpoint_state(), checkpoint_id=out)
    weight = engine.module.layers[0].fc1.weight
    mesh = tuple(weight.device_mesh.shape) if isinstance(weight, DTensor) else None
    # Resumed by the other data-parallel kind: DDP under autocast.
    other = engine_for(job("--parallel.backend=ddp", "--train.dtype=bf16", "--train.seed=7",
                           "--parallel.low_precision_weights=false"), info)  # fmt: skip
    loaded = other.checkpoint_state()
    dcp.load(loaded, checkpoint_id=out)
    other.load_checkpoint_state(loaded)
    resumed = other.full_state_dict()
    return losses, state, type(engine.model).__name__, mesh, held, resumed, start


def test_ddp_in_bf16_casts_its_weights_once_per_step(tmp_path):
    """DDP with bf16 weights is FSDP2 on a (2 × 1) mesh: the ranks agree bit for bit and
    train as autocast does within bf16 rounding; the bf16 weights gathered in a step's first
    micro-batch are kept through the next (no cast per micro-batch) and dropped after the
    step's last; its checkpoint resumes under plain DDP."""
    runs = {}
    for backend, flag in (("ddp", "true"), ("ddp", "false")):
        out = tmp_path / f"{backend}-{flag}"
        runs[backend, flag] = run_ranks(run_data_parallel_bf16, 2, tmp_path, backend, flag,
                                        str(out))  # fmt: skip
    first, second = runs["ddp", "true"]
    autocast = runs["ddp", "false"][0]
    assert first[2] == "FSDPESM" and first[3] == (2, 1) and autocast[2] == "DistributedDataParallel"
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    # Gathered in bf16 by the first micro-batch, still held after its backward (last=False
    # keeps it), and sharded again — fp32 DTensor — after the step's last backward.
    assert first[4] == [(False, torch.bfloat16), (True, torch.float32), (False,), (True,)]
    assert autocast[4] == [(False, torch.float32)] * 2 + [(False,)] * 2

    # AdamW's first updates are ±lr wherever gradients are small, so single weights may differ
    # by 2·lr; the whole update may not: 0.045 of its norm (2026-12-05), 0.54 when a step
    # leaves out one of its two micro-batches.
    keys, start = sorted(first[6]), first[6]
    ours = torch.cat([(first[1][k].float() - start[k].float()).flatten() for k in keys])
    theirs = torch.cat([(autocast[1][k].float() - start[k].float()).flatten() for k in keys])
    assert ((ours - theirs).norm() / ours.norm()).item() < 0.15
    assert max(abs(a - b) / b for a, b in zip(first[0], autocast[0], strict=True)) < 1e-3
    assert all(torch.equal(first[5][k], first[1][k]) for k in first[1])


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_sharding_backends_of_one_process_train_as_single(backend):
    from esmdist.train import engine_for

    engine = engine_for(job(f"--parallel.backend={backend}", "--train.dtype=bf16"), CPU)
    assert type(engine.module) is ESM and type(engine.model) is ESM  # no DDP/FSDP wrap
    assert engine.model is engine.compute_module is not engine.module  # the bf16 compute copy


def test_the_half_table_rotary_is_fair_esms_formula():
    """(x₁c − x₂s, x₂c + x₁s) on half tables against x·cos + rotate_half(x)·sin on the
    doubled ones (fair-esm's RotaryEmbedding), bit for bit in fp32 and bf16."""
    from esmdist.model.attention import apply_rotary, rotary_cos_sin

    positions = torch.arange(300)[None]
    cos, sin = rotary_cos_sin(positions, 64)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 300, 4, 64).to(dtype)
        x1, x2 = x.float().chunk(2, -1)
        rotate_half = torch.cat([-x2, x1], -1)
        reference = (x.float() * full_cos + rotate_half * full_sin).to(dtype)
        assert torch.equal(apply_rotary(x, cos, sin), reference)


def run_compiled(rank: int, shards: str, out: str):
    from esmdist.train import train

    config = load_config(REPO / "configs/debug-cpu.toml", [
        f"--data.path={shards}", "--data.num_workers=0", "--data.max_tokens=2048",
        "--data.crop_length=512", "--train.tokens_per_step=2048", "--train.max_steps=8",
        "--train.log_every=2", "--train.valid_every=4", f"--train.output_dir={out}",
        "--parallel.backend=single", "--train.compile=true", "--checkpoint.every=0",
        "--optim.warmup_steps=2"])  # fmt: skip
    last, engine = train(config)
    return last


def test_a_compiled_run_compiles_in_its_warm_up_and_never_again(shards, tmp_path, capfd):
    """Packed micro-batches change length every step, validation runs without gradients: the
    warm-up compiles every graph they need, and no step or validation recompiles (the logged
    count stays 0); the compiled code lands in the run's own cache directory."""
    out = tmp_path / "run"
    (last,) = run_ranks(run_compiled, 1, tmp_path, str(shards), str(out))
    printed = capfd.readouterr().out
    assert "compiled the blocks in" in printed and "step 1 done" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 4 and all(r["recompiles"] == 0 for r in trained), trained
    assert "startup_s" in trained[0] and "startup_s" not in trained[1]
    assert any("valid_perplexity" in r for r in records) and last["loss"] < 3.5
    assert any((out / "compile_cache").rglob("*.py")), "no compiled code in train.compile_cache"


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    from esmdist.parallel import compile as compiled
    from esmdist.train import engine_for

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this node")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    engine = engine_for(job("--train.compile=true"), CPU)
    assert compiled.is_compiled(engine.compute_module)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = compiled.warm_up(engine, torch.device("cpu"), inference=True)
    finally:
        torch._dynamo.reset()
    said = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert len(said) == 1 and "no C++ compiler on this node" in said[0], said
    assert found.failure and not compiled.is_compiled(engine.compute_module)
    assert all(p.grad is None for p in engine.module.parameters())
    assert train_steps(engine, real_micro_batches(2), 2)[0] > 0  # and it trains, eagerly


@pytest.mark.parametrize("value, wanted", [("true", "true"), ("True", "true"), (True, "true"),
                                           (False, "false"), ("auto", "auto")])  # fmt: skip
def test_the_compile_switch(value, wanted, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f"[train]\ncompile = {json.dumps(value)}\n")
    assert load_config(config).train.compile == wanted
    auto = load_config(None).train
    assert auto.compiles("cuda", "fsdp") and not auto.compiles("cpu", "single")
    assert not auto.compiles("cuda", "deepspeed")
    with pytest.raises(ValueError, match="train.compile: 'sometimes' is not one of"):
        load_config(None, ["--train.compile=sometimes"])
    with pytest.raises(ValueError, match="under deepspeed"):
        load_config(None, ["--train.compile=true", "--parallel.backend=deepspeed"])


GB = 1e9


def test_auto_micro_batch_is_the_largest_that_plan_says_fits():
    from esmdist.plan import MIN_EFFICIENT_MICRO_BATCH, Setup, plan, resolve_micro_batch

    def chosen(size: str, memory: float, *extra: str, world: int = 1):
        config = load_config(REPO / f"configs/{size}.toml", ["--data.max_tokens=auto", *extra])
        return resolve_micro_batch(config, world, memory)

    config, said = chosen("esm2_650M", 141 * GB)
    tokens, train = config.data.max_tokens, config.train
    per_gpu = train.tokens_per_step
    assert per_gpu % tokens == 0 and not train.activation_checkpointing
    assert "no recomputation" in said and f"{tokens:,} tokens" in said
    setup = Setup(config.model.build(), 1, 141 * GB, "single", tokens_per_step=per_gpu)
    assert plan(replace(setup, tokens_per_gpu=tokens)).fits
    bigger = [m for m in range(tokens + 1, 262145) if per_gpu % m == 0]
    assert all(not plan(replace(setup, tokens_per_gpu=m)).fits for m in bigger)
    assert config.accumulation(1) == per_gpu // tokens

    # 3B on one 80 GB GPU: no 16k micro-batch fits without recomputation, so it is turned on.
    config, said = chosen("esm2_3B", 80 * GB, "--train.activation_checkpointing=false")
    assert config.train.activation_checkpointing and "recomputing every" in said
    assert config.data.max_tokens >= MIN_EFFICIENT_MICRO_BATCH
    # Asked for, recomputation stays as asked.
    config, _ = chosen("esm2_650M", 141 * GB, "--train.activation_checkpointing=true")
    assert config.train.activation_checkpointing and config.train.recompute_every == 1
    with pytest.raises(ValueError, match="even recomputing every block"):
        chosen("esm2_15B", 80 * GB)
    # On a CPU: at most 16,384, a divisor of the step's share of each rank.
    config, _ = chosen("esm2_8M", None, "--train.tokens_per_step=24576", world=2)
    assert config.data.max_tokens == 12288 and config.accumulation(2) == 1


def test_auto_is_refused_where_no_micro_batch_can_divide_the_step():
    config = load_config(None, ["--data.max_tokens=auto", "--train.tokens_per_step=1000",
                                "--data.path=x"])  # fmt: skip
    with pytest.raises(ValueError, match="at least data.crop_length"):
        config.check(1)
    with pytest.raises(ValueError, match="data.max_tokens: expected int or auto, got 'lots'"):
        load_config(None, ["--data.max_tokens=lots"])


def test_the_varlen_path_compiles_in_the_warm_up_for_every_later_length(monkeypatch):
    """On a GPU the blocks' graph holds the varlen flash kernel, which takes the batch's
    longest sequence as an int: here an opaque custom op of the same signature stands in for
    it (CI has no GPU). After the warm-up's two batches no batch compiles a graph, whatever
    its total, its count of sequences or its longest."""
    import itertools

    import torch.nn.functional as F

    from esmdist.model import attention
    from esmdist.model.config import MODEL_SIZES
    from esmdist.parallel.compile import WARM_UP_LENGTHS, compile_blocks, graphs_compiled

    @torch.library.custom_op("esmdist_test::varlen", mutates_args=())
    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
               cu_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:  # fmt: skip
        bounds = cu_q.tolist()
        return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                          for a, b in zip(bounds, bounds[1:])])  # fmt: skip

    @varlen.register_fake
    def _(q, k, v, cu_q, cu_k, max_q, max_k):
        return torch.empty_like(q)

    def backward(ctx, grad):
        return grad, grad, grad, None, None, None, None

    varlen.register_autograd(backward)
    monkeypatch.setattr(attention, "varlen_attn", varlen)
    monkeypatch.setattr(attention.PackedSpans, "usable", staticmethod(lambda device: True))
    torch.manual_seed(0)
    model = ESM(MODEL_SIZES["debug"])
    model.init_weights()
    compile_blocks(model)

    def step(lengths) -> None:
        tokens = torch.randint(4, 24, (sum(lengths),))
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # varlen's dtypes
            logits = model(tokens, cu_seqlens, lengths=list(lengths)).logits
        logits.float().sum().backward()

    try:
        for lengths in WARM_UP_LENGTHS:
            step(lengths)
        warm = graphs_compiled()
        for lengths in ([100], [33, 44, 55, 66], [70, 12], [512, 3, 3], [64, 3, 3, 3, 3]):
            step(lengths)
            assert graphs_compiled() == warm, lengths
    finally:
        torch._dynamo.reset()
