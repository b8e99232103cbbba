"""trainer.loss=chunked equals the model's own loss, gradients included, and
holds a fraction of the memory at a large vocabulary."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, compose, step_losses

IGNORE = -100


def packed_batch(vocab: int, seed: int = 0):
    """Two packed rows: samples of 5, 9 and 6 tokens, position ids restarting,
    labels with prompts masked; the second row padded at its tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 20), generator=g)
    pos = torch.tensor([list(range(5)) + list(range(9)) + list(range(6)),
                        list(range(12)) + list(range(8))])
    labels = ids.clone()
    labels[0, :3] = IGNORE
    labels[0, 5:9] = IGNORE
    labels[1, :4] = IGNORE
    labels[1, 12:] = IGNORE  # padding laid out as one more sample
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def loss_and_grads(model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6), name


def lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))


@pytest.mark.parametrize("peft", ["full", "lora", "lora_on_lm_head", "lora_saving_lm_head"])
@pytest.mark.parametrize("chunk", [7, 1024])  # a chunk size that cuts rows, and one chunk for all
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_dir, peft, chunk):
    from transformers import AutoModelForCausalLM

    from fttrain.loss import use_chunked_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if peft == "lora":
        base = lora(base)
    elif peft == "lora_on_lm_head":
        from peft import LoraConfig, get_peft_model

        base = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    elif peft == "lora_saving_lm_head":
        base = lora(base, modules_to_save=["lm_head"])
    chunked = copy.deepcopy(base)
    use_chunked_loss(chunked, chunk)
    batch = packed_batch(base.config.vocab_size)
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    # The Trainer's way (a sum over the step's trained tokens) and the plain mean.
    assert_same(loss_and_grads(base, batch, n), loss_and_grads(chunked, batch, n))
    assert_same(loss_and_grads(base, batch), loss_and_grads(chunked, batch))
    # Without labels (generation) the model's own forward runs: logits come back.
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"]}
        assert torch.equal(chunked(**inputs).logits, base(**inputs).logits)


def test_chunked_loss_keeps_gemmas_logit_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fttrain.loss import use_chunked_loss

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.3,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    chunked = copy.deepcopy(model)
    use_chunked_loss(chunked, 6)
    batch = {k: v for k, v in packed_batch(300).items() if k != "position_ids"}
    assert_same(loss_and_grads(model, batch), loss_and_grads(chunked, batch))


def test_a_family_whose_forward_does_more_to_the_logits_is_refused_by_the_probe():
    # Granite divides its logits by config.logits_scaling in its own forward:
    # the chunked loss would silently drop that, so the probe refuses it.
    from transformers import GraniteConfig, GraniteForCausalLM

    from fttrain.loss import LossSetupError, use_chunked_loss

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             logits_scaling=8.0))
    with pytest.raises(LossSetupError, match="differ on a test sequence"):
        use_chunked_loss(model, 64)
    assert model.forward.__func__ is GraniteForCausalLM.forward  # the model keeps its own forward


def test_chunked_loss_is_refused_where_it_would_drop_a_loss_term(tiny_dir):
    from transformers import AutoModelForCausalLM

    from fttrain.loss import LossSetupError, use_chunked_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.output_router_logits = True  # as a mixture-of-experts model adding its router loss
    with pytest.raises(LossSetupError, match="router"):
        use_chunked_loss(model, 64)


def test_chunked_loss_is_refused_for_tasks_with_their_own_loss():
    from conftest import config_error

    assert "trainer.loss=chunked: task=dpo computes its own loss" in config_error(
        ["+exp=tiny_dpo", "trainer.loss=chunked"])


@pytest.mark.slow
def test_a_chunked_run_logs_the_same_losses(tmp_path):
    from fttrain.run import run

    losses = {}
    for loss in ("default", "chunked"):
        cfg = compose(["+exp=tiny_sft", f"output_root={tmp_path}", f"name={loss}", "trainer.max_steps=6",
                       f"trainer.loss={loss}", "trainer.loss_chunk_tokens=50", "task.generation_eval.num_samples=0"])
        run(cfg, tmp_path / loss)
        losses[loss] = step_losses(tmp_path / loss)
    assert [s for s, _ in losses["chunked"]] == [s for s, _ in losses["default"]] == list(range(1, 7))
    assert [x for _, x in losses["chunked"]] == pytest.approx([x for _, x in losses["default"]], rel=1e-4)


PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, {repo!r})
    from fttrain.loss import use_chunked_loss
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    if sys.argv[1] == "chunked":
        use_chunked_loss(model, 512)
    ids = torch.randint(0, 128256, (4, 1024))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(input_ids=ids, labels=ids).loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"peak_kib": after - before}}))
""")


@pytest.mark.slow
def test_chunked_loss_holds_a_fraction_of_the_memory_at_a_128k_vocabulary():
    # 4 x 1024 positions x 128,256 logits x 4 bytes = 2 GiB of fp32 logits for the default.
    peak = {}
    for loss in ("default", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK.format(repo=str(REPO)), loss], capture_output=True,
                             text=True, timeout=600, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        peak[loss] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]
    assert peak["chunked"] <= 0.5 * peak["default"], peak


@pytest.mark.slow
def test_a_compiled_run_logs_the_same_losses_and_its_first_step_apart(tmp_path):
    # aot_eager traces the model with dynamo and AOTAutograd without generating
    # kernels: the compiled graph's numerics, without a C++ toolchain.
    from fttrain.run import run

    from torch._dynamo.utils import counters

    losses, metrics, graphs = {}, {}, {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true", "trainer.compile_backend=aot_eager"])):
        before = counters["stats"]["unique_graphs"]
        cfg = compose(["+exp=tiny_sft", f"output_root={tmp_path}", f"name={name}", "trainer.max_steps=4",
                       "task.generation_eval.num_samples=0", *extra])
        metrics[name] = run(cfg, tmp_path / name)
        losses[name] = [x for _, x in step_losses(tmp_path / name)]
        graphs[name] = counters["stats"]["unique_graphs"] - before
    assert graphs["eager"] == 0 and graphs["compiled"] > 0  # dynamo did trace the model
    assert len(losses["eager"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert 0 < metrics["compiled"]["first_step_seconds"] <= metrics["compiled"]["train_step_seconds"]


# ------------------------------------------------- Liger-Kernel and cut-cross-entropy (CUDA only: the wiring on CPU)
@pytest.fixture
def stand_in_liger(monkeypatch):
    """Liger's _apply_liger_kernel_to_instance and family table, in their places: the kernels need
    CUDA; this tests what fttrain hands Liger. Records each call; refuses rope for 'glm4', as
    Liger 0.8.5's glm4 function does."""
    import types

    calls = []

    def apply(model, **kwargs):
        if model.config.model_type == "glm4" and kwargs.get("rope"):
            raise NotImplementedError("liger_rotary_pos_emb is not available for Glm4 models.")
        calls.append((model, kwargs))

    package, transformers_, table = (types.ModuleType(n) for n in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"))
    transformers_._apply_liger_kernel_to_instance = apply
    table.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None, "glm4": None}
    for module in (package, transformers_, table):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_liger_gets_the_causal_lm_inside_peft_and_only_the_kernels_asked_for(tiny_dir, stand_in_liger):
    from transformers import AutoModelForCausalLM

    from fttrain.loss import LossSetupError, liger_kernel_config, use_liger

    assert liger_kernel_config(compose(["+exp=tiny_sft"]).trainer) is None
    assert liger_kernel_config(compose(["+exp=tiny_sft", "trainer.loss=cce"]).trainer) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = lora(base)
    use_liger(model, compose(["+exp=tiny_sft", "trainer.loss=liger"]).trainer)
    patched, kwargs = stand_in_liger[-1]
    assert patched is base  # the causal LM itself, not the PEFT wrapper
    assert kwargs == {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "rope": False,
                      "swiglu": False, "geglu": False, "layer_norm": False, "relu_squared": False}
    use_liger(model, compose(["+exp=tiny_sft", "trainer.liger_kernels=true"]).trainer)
    assert stand_in_liger[-1][1] == {"fused_linear_cross_entropy": False, "cross_entropy": False, "rms_norm": True,
                                     "rope": True, "swiglu": True, "geglu": True, "layer_norm": True,
                                     "relu_squared": True}
    base.config.model_type = "glm4"  # a kernel Liger refuses for this family stops the run before training
    with pytest.raises(LossSetupError, match="trainer.liger_kernels=true: Liger-Kernel refuses this model: "
                                             "liger_rotary_pos_emb is not available"):
        use_liger(model, compose(["+exp=tiny_sft", "trainer.liger_kernels=true"]).trainer)


@pytest.mark.parametrize("loss, extra", [("liger", "liger"), ("cce", "cce")])
def test_gpu_kernels_are_refused_where_they_cannot_run_naming_the_knob(monkeypatch, loss, extra):
    from conftest import config_error
    from fttrain.config import checks

    package = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[loss]
    monkeypatch.setattr(checks, "importable", lambda module: module not in ("liger_kernel", "cut_cross_entropy"))
    assert f"trainer.loss={loss}: {package} is not installed (pip install 'fttrain[{extra}]'" in \
        config_error(["+exp=tiny_sft", f"trainer.loss={loss}"])
    monkeypatch.setattr(checks, "importable", lambda module: True)
    assert "ZeRO-3" in config_error(["+exp=tiny_full", f"trainer.loss={loss}", "dist=zero3"])
    assert "adapter on lm_head" in config_error(["+exp=tiny_sft", f"trainer.loss={loss}",
                                                 "peft.target_modules=[q_proj,lm_head]"])
    assert f"trainer.loss={loss}: task=dpo computes its own loss" in config_error(
        ["+exp=tiny_dpo", f"trainer.loss={loss}"])
    assert "trainer.liger_kernels=true: task=dpo" in config_error(["+exp=tiny_dpo", "trainer.liger_kernels=true"])
    from fttrain.config.checks import ConfigCheckError, check_config

    saving_head = compose(["+exp=tiny_sft", f"trainer.loss={loss}", "peft.modules_to_save=[lm_head]"])
    if loss == "cce":  # cce multiplies by a plain weight; Liger reads the wrapper's trained copy
        with pytest.raises(ConfigCheckError, match="modules_to_save"):
            check_config(saving_head)
    else:
        check_config(saving_head)
    check_config(compose(["+exp=tiny_sft", f"trainer.loss={loss}", "trainer.liger_kernels=true"]))  # installed: fine


def test_gpu_kernels_need_a_gpu_cce_a_half_precision_and_liger_a_family_it_patches(stand_in_liger):
    from fttrain.loss import gpu_kernel_runtime_problem, liger_family_problem

    trainer = compose(["+exp=tiny_sft", "trainer.loss=liger", "trainer.liger_kernels=true"]).trainer
    message = gpu_kernel_runtime_problem(trainer, on_gpu=False)
    assert "trainer.loss=liger and trainer.liger_kernels=true: their Triton kernels run on a CUDA GPU" in message
    cce = compose(["+exp=tiny_sft", "trainer.loss=cce"]).trainer
    assert "trainer.loss=cce" in gpu_kernel_runtime_problem(cce, on_gpu=False)
    assert gpu_kernel_runtime_problem(compose(["+exp=tiny_sft", "trainer.loss=chunked"]).trainer, on_gpu=False) is None
    assert "backward takes bf16 or fp16 hidden states and this run is fp32" in \
        gpu_kernel_runtime_problem(cce, on_gpu=True, precision="fp32")
    assert gpu_kernel_runtime_problem(cce, on_gpu=True, precision="fp16") is None
    assert gpu_kernel_runtime_problem(trainer, on_gpu=True, precision="fp32") is None
    assert liger_family_problem(trainer, "llama") is None
    message = liger_family_problem(trainer, "bert")
    assert "no kernels for 'bert' models (it patches glm4, llama, qwen2)" in message
    assert liger_family_problem(cce, "bert") is None  # cce is not per family


def test_liger_is_refused_in_a_sweep_whose_trials_share_the_process(monkeypatch):
    import types

    from hydra.types import RunMode

    import fttrain.__main__ as main

    def hydra(mode, launcher):
        return types.SimpleNamespace(get=lambda: types.SimpleNamespace(
            mode=mode, launcher=types.SimpleNamespace(_target_=launcher)))

    liger = compose(["+exp=tiny_sft", "trainer.liger_kernels=true"])
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    monkeypatch.setattr(main, "HydraConfig", hydra(RunMode.MULTIRUN, basic))
    assert "trainer.liger_kernels=true: Liger-Kernel patches transformers' modules for the whole process" in \
        main.liger_in_shared_process(liger)
    assert main.liger_in_shared_process(compose(["+exp=tiny_sft"])) == ""
    monkeypatch.setattr(main, "HydraConfig", hydra(RunMode.RUN, basic))
    assert main.liger_in_shared_process(liger) == ""
    monkeypatch.setattr(main, "HydraConfig", hydra(RunMode.MULTIRUN, "hydra_plugins.hydra_submitit_launcher."
                                                                     "submitit_launcher.SlurmLauncher"))
    assert main.liger_in_shared_process(liger) == ""  # a process per trial


@pytest.fixture
def plain_torch_cce(monkeypatch):
    """cut_cross_entropy.linear_cross_entropy as its reference defines it (e @ c.T, softcap,
    cross-entropy), in plain torch: the kernel needs CUDA; this tests what fttrain feeds it."""
    import types

    import torch.nn.functional as F

    calls = []

    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", **kw):
        calls.append((tuple(e.shape), tuple(c.shape), reduction, e.dtype, c.dtype))
        logits = (e @ c.T).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    module = types.ModuleType("cut_cross_entropy")
    module.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", module)
    return calls


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_cce_loss_is_fed_what_gives_the_models_loss_and_gradients(tiny_dir, plain_torch_cce, peft):
    from transformers import AutoModelForCausalLM

    from fttrain.loss import use_cce_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if peft == "lora":
        base = lora(base)
    cce = copy.deepcopy(base)
    use_cce_loss(cce)
    batch = packed_batch(base.config.vocab_size)
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    assert_same(loss_and_grads(base, batch, n), loss_and_grads(cce, batch, n))  # packed rows, the Trainer's sum
    assert_same(loss_and_grads(base, batch), loss_and_grads(cce, batch))  # the plain mean
    hidden = base.config.hidden_size
    assert plain_torch_cce[-1] == ((2 * 20, hidden), (base.config.vocab_size, hidden), "sum",  # [B*L, H] at once
                                   torch.float32, torch.float32)
    with torch.no_grad():  # without labels (generation) the model's own forward runs
        inputs = {"input_ids": batch["input_ids"]}
        assert torch.equal(cce(**inputs).logits, base(**inputs).logits)


def test_cce_loss_keeps_gemmas_softcapping_and_refuses_what_it_cannot_compute(tiny_dir, plain_torch_cce):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    from fttrain.loss import LossSetupError, use_cce_loss

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=0.3, attn_implementation="eager"))
    cce = copy.deepcopy(gemma)
    use_cce_loss(cce)
    batch = {k: v for k, v in packed_batch(300).items() if k != "position_ids"}
    assert_same(loss_and_grads(gemma, batch), loss_and_grads(cce, batch))
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               logits_scaling=8.0))
    with pytest.raises(LossSetupError, match="scales its logits"):
        use_cce_loss(granite)
    on_head = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(LossSetupError, match="plain weight matrix"):
        use_cce_loss(on_head)


def test_cce_gets_the_hidden_states_in_the_autocast_dtype_and_the_weight_as_it_is(tiny_dir, plain_torch_cce):
    """cut-cross-entropy's backward takes bf16/fp16 hidden states only, and autocast does not reach
    inside its autograd function: an fp32 model under bf16 autocast (a full fine-tune) hands it
    bf16 hidden states, as lm_head(hidden) would have used."""
    from transformers import AutoModelForCausalLM

    from fttrain.loss import use_cce_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    use_cce_loss(model)
    batch = packed_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert plain_torch_cce[-1][3:] == (torch.bfloat16, torch.float32)
    assert model.lm_head.weight.grad is not None and torch.isfinite(loss)


def test_cce_probe_checks_the_forward_with_the_chunked_loss_where_the_weights_are_not_on_a_gpu(plain_torch_cce):
    import types

    from transformers import GemmaConfig, GemmaForCausalLM

    from fttrain.loss import LossSetupError, use_cce_loss

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    own = GemmaForCausalLM.forward

    def scaled(self, *args, **kwargs):  # a family whose forward scales the logits without a config attribute
        out = own(self, *args, **kwargs)
        if out.logits is not None and kwargs.get("labels") is not None:
            out.loss = torch.nn.functional.cross_entropy(
                (out.logits * 3.0)[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                kwargs["labels"][:, 1:].reshape(-1))
        return out

    model.forward = types.MethodType(scaled, model)
    calls = len(plain_torch_cce)
    with pytest.raises(LossSetupError, match="differ on a test sequence"):
        use_cce_loss(model)
    assert len(plain_torch_cce) == calls  # the kernel itself is not called on CPU tensors
