"""The quantized base model: saved once, reloaded without quantizing, close to the original."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chroma_pipeline.lora_adapter as adapter_step
import chroma_pipeline.quantize as quantize_module
import chroma_pipeline.quantized_base as base_step
from chroma_pipeline import flow
from chroma_pipeline.config import KEEP_FULL_PRECISION, config_from_dict, load_config
from chroma_pipeline.device import detect_device
from chroma_pipeline.layout import Layout
from chroma_pipeline.lora import lora_config, target_modules
from chroma_pipeline.memory import AUTO_ORDER, choose_precision, estimate
from chroma_pipeline.models import load_transformer
from chroma_pipeline.quantize import QuantizationUnavailable
from chroma_pipeline.quantized_base import build_quantized
from tests.conftest import CACHE_STEPS

# Relative error of the transformer's output against fp32, per precision, on the tiny model.
TOLERANCE = {"int8-quanto": 0.02, "fp8-quanto": 0.05, "int4-quanto": 0.1, "int2-quanto": 0.8}


def _forward(transformer):
    generator = torch.Generator().manual_seed(0)
    noisy, embeds = torch.randn(1, 16, 64, generator=generator), torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        return flow.predict_velocity(transformer, noisy, torch.tensor([0.5]), embeds, torch.ones(1, 8),
                                     flow.image_position_ids(8, 8))


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_saved_model_reloads_without_quantizing_and_stays_close(precision, tiny_model_dir, tmp_path, monkeypatch):
    reference = _forward(load_transformer(tiny_model_dir, torch.float32))
    manifest = quantize_module.save_quantized(load_transformer(tiny_model_dir, torch.float32), precision,
                                              tmp_path / "q", source={"source": "tiny"})
    assert manifest["quantized_layers"] > 0 and "distilled_guidance_layer*" in manifest["kept_full_precision"]

    def no_quantizing(*args, **kwargs):
        raise AssertionError("reloading must not quantize again")

    monkeypatch.setattr(quantize_module, "quantize_model", no_quantizing)
    reloaded = quantize_module.load_quantized(tmp_path / "q", "cpu")
    error = ((_forward(reloaded) - reference).norm() / reference.norm()).item()
    assert error < TOLERANCE[precision]
    assert type(reloaded.distilled_guidance_layer.in_proj) is torch.nn.Linear  # kept in full precision

    # LoRA trains on top of the reloaded quantized layers.
    reloaded.add_adapter(lora_config(4, 4, "all", reloaded.config.num_single_layers))
    reloaded.train()
    generator = torch.Generator().manual_seed(1)
    velocity = flow.predict_velocity(reloaded, torch.randn(1, 16, 64, generator=generator), torch.tensor([0.5]),
                                     torch.randn(1, 8, 32, generator=generator), torch.ones(1, 8),
                                     flow.image_position_ids(8, 8))
    velocity.pow(2).mean().backward()
    grads = [p.grad for p in reloaded.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_half_written_model_is_not_reused(tiny_model_dir, tmp_path):
    folder = tmp_path / "q"
    quantize_module.save_quantized(load_transformer(tiny_model_dir, torch.float32), "int8-quanto", folder, {})
    (folder / "manifest.json").unlink()  # as if the process died before the last write
    with pytest.raises(FileNotFoundError, match="materialize quantized_base_model"):
        quantize_module.load_quantized(folder, "cpu")


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_block_by_block_gives_exactly_what_quantizing_the_loaded_model_gives(precision, tiny_model_dir, tmp_path):
    whole = quantize_module.save_quantized(load_transformer(tiny_model_dir, torch.float32), precision, tmp_path / "whole", {})
    streamed = quantize_module.quantize_to_folder(tiny_model_dir / "transformer", precision, tmp_path / "streamed", {},
                                                  dtype=torch.float32)
    a, b = _saved_tensors(tmp_path / "streamed"), _saved_tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert json.loads((tmp_path / "streamed" / "quantization_map.json").read_text()) == json.loads(
        (tmp_path / "whole" / "quantization_map.json").read_text())
    assert streamed["quantized_parameters"] == whole["quantized_parameters"]
    assert streamed["quantized_parameters"] + streamed["kept_parameters"] == sum(
        p.numel() for p in load_transformer(tiny_model_dir, torch.float32).parameters())
    assert "distilled_guidance_layer.in_proj" in streamed["kept_layers"] and "proj_out" in streamed["kept_layers"]


def test_block_by_block_keeps_the_requested_dtype(tiny_model_dir, tmp_path):
    # The skeleton is built in fp32; the kept layers must still be saved in bf16, as the whole-model path does.
    quantize_module.save_quantized(load_transformer(tiny_model_dir, torch.bfloat16), "int8-quanto", tmp_path / "whole", {})
    quantize_module.quantize_to_folder(tiny_model_dir / "transformer", "int8-quanto", tmp_path / "streamed", {},
                                       dtype=torch.bfloat16)
    a, b = _saved_tensors(tmp_path / "streamed"), _saved_tensors(tmp_path / "whole")
    assert a["proj_out.weight"].dtype == torch.bfloat16
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _saved_tensors(folder):
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def test_the_kept_layers_are_configurable(tiny_model_dir, tmp_path):
    keep = ("transformer_blocks.0.attn*", "proj_out")
    manifest = quantize_module.quantize_to_folder(tiny_model_dir / "transformer", "int8-quanto", tmp_path / "q", {},
                                                  dtype=torch.float32, keep=keep)
    reloaded = quantize_module.load_quantized(tmp_path / "q", "cpu")
    assert type(reloaded.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert type(reloaded.transformer_blocks[0].ff.net[2]) is not torch.nn.Linear  # quantized (quanto's QLinear)
    assert type(reloaded.distilled_guidance_layer.in_proj) is not torch.nn.Linear  # no longer in the kept list
    assert "transformer_blocks.0.attn.to_q" in manifest["kept_layers"]


@pytest.mark.parametrize("precision", ["nf4-bnb", "int8-bnb"])
def test_bitsandbytes_without_a_gpu_stops_before_any_work_and_names_what_works(precision, small_project):
    config = load_config(small_project, base_model_precision=precision)  # accepted: it is the device that decides
    with pytest.raises(QuantizationUnavailable) as error:
        build_quantized(config, Layout(Path(config.output_dir)), detect_device("cpu"))
    message = str(error.value)
    assert precision in message and "CUDA or ROCm" in message and "int4-quanto" in message and "int8-quanto" in message


def test_bf16_means_the_checkpoint_as_it_is():
    assert config_from_dict({"base_model_precision": "bf16"}).base_model_precision == "no_change"


CHROMA1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56], approximator_num_channels=64,
               approximator_hidden_dim=5120, approximator_layers=5)


def test_memory_estimate_from_the_real_shapes_on_the_meta_device():
    estimates = {p: estimate(CHROMA1, p, keep=KEEP_FULL_PRECISION, lora_pattern=target_modules("all", 38))
                 for p in ("no_change", "int8-quanto", "int4-quanto")}
    gib = 2**30
    assert 16.0 < estimates["no_change"].weights / gib < 17.0  # 8.9B parameters in bf16
    assert 8.0 < estimates["int8-quanto"].weights / gib < 9.5
    assert 4.0 < estimates["int4-quanto"].weights / gib < 5.5
    assert 0.0 < estimates["int8-quanto"].lora < 1 * gib
    # Streaming: the host holds the result plus one bf16 block, never the 16.6 GiB model.
    assert estimates["int8-quanto"].quantize_host_peak < estimates["int8-quanto"].weights + 2.5 * gib


def test_auto_takes_the_most_precise_precision_that_fits_and_says_why():
    estimates = {p: estimate(CHROMA1, p, keep=KEEP_FULL_PRECISION, lora_pattern=target_modules("all", 38))
                 for p in AUTO_ORDER}
    gib = 2**30
    assert choose_precision("auto", estimates, "cuda", 80 * gib)[0] == "no_change"
    precision, reason = choose_precision("auto", estimates, "cuda", 16 * gib)
    assert precision == "int8-quanto" and "16.0 GiB free on cuda" in reason
    assert choose_precision("auto", estimates, "cuda", 11 * gib)[0] == "int4-quanto"
    with pytest.raises(MemoryError, match="Free memory, lower resolution"):
        choose_precision("auto", estimates, "cuda", 2 * gib)


def test_a_machine_that_cannot_hold_the_quantization_is_told_before_anything_loads(small_project, monkeypatch):
    config = load_config(small_project)
    monkeypatch.setattr(base_step, "host_available", lambda: 1024)
    monkeypatch.setattr(quantize_module, "quantize_to_folder", lambda *a, **k: pytest.fail("must stop before this"))
    with pytest.raises(MemoryError, match=r"quantizing to int8-quanto needs about .* GiB but only 0.0 GiB"):
        build_quantized(config, Layout(Path(config.output_dir)), detect_device("cpu"))


def test_the_asset_reports_precision_size_parameters_peak_memory_and_time(small_project):
    config = load_config(small_project, base_model_precision="auto")
    result = build_quantized(config, Layout(Path(config.output_dir)), detect_device("cpu"))
    stats = result.stats
    assert stats["precision"] == "no_change" and stats["reason"].startswith("auto: no_change")  # tiny fits anywhere
    config = load_config(small_project, base_model_precision="int4-quanto")
    stats = build_quantized(config, Layout(Path(config.output_dir)), detect_device("cpu")).stats
    assert stats["bytes"] > 0 and stats["quantized_parameters"] > 0 and stats["kept_parameters"] > 0
    # The process peak (what a machine must have) and the rise quantizing added, both named.
    assert stats["peak_host_bytes"] > stats["host_rise_bytes"] >= 0 and stats["seconds"] > 0


def test_auto_decides_once_and_later_steps_read_the_decision_whatever_memory_is_free_then(small_project, monkeypatch):
    """Training leaves tensors in the CUDA cache; the adapter and grid keys must not move because of it."""
    from chroma_pipeline.device import DeviceInfo
    from chroma_pipeline.quantized_base import base_model_key

    config = load_config(small_project, base_model_precision="auto")
    layout, device = Layout(Path(config.output_dir)), detect_device("cpu")
    monkeypatch.setattr(DeviceInfo, "free_memory_bytes", lambda self: 64 * 2**30)
    decided = build_quantized(config, layout, device).stats["precision"]
    before = base_model_key(config, layout, device)
    monkeypatch.setattr(DeviceInfo, "free_memory_bytes", lambda self: 2**20)  # later: almost nothing free
    assert base_model_key(config, layout, device) == before  # read, not decided again (which would fail here)
    assert decided == "no_change"
    # A training setting changed since: only lora_adapter re-runs, and it still finds the decision.
    retrained = config.model_copy(update={"network_rank": 4})
    assert base_model_key(retrained, layout, device) == before


def test_training_that_cannot_fit_is_refused_before_the_model_loads(small_project, monkeypatch):
    from dagster import DagsterInstance

    from assets.definitions import materialize_chain
    from chroma_pipeline.device import DeviceInfo

    assert materialize_chain(str(small_project), DagsterInstance.ephemeral(), selection=CACHE_STEPS, device="cpu").success
    monkeypatch.setattr(DeviceInfo, "free_memory_bytes", lambda self: 2**20)
    monkeypatch.setattr(adapter_step, "load_base_transformer", lambda *a, **k: pytest.fail("must stop before loading"))
    config = load_config(small_project)
    with pytest.raises(MemoryError, match=r"training a rank-8 LoRA at int8-quanto needs about .* GiB but only 0.0 GiB"):
        adapter_step.build_adapter(config, Layout(Path(config.output_dir)), detect_device("cpu"))


def test_the_training_estimate_uses_the_largest_training_bucket_not_the_preview_size(tmp_path):
    """A 512 preview of 1024 training must not size activations for 512: that underestimates them 4x."""
    from chroma_pipeline.quantized_base import estimates_for, largest_training_bucket

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "backend.json").write_text(json.dumps([
        {"id": "small", "instance_data_dir": "a", "resolution": 512}, {"id": "large", "instance_data_dir": "b",
                                                                      "resolution": 1024}]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "backend.json", "validation_resolution": 512,
                                                      "base_model_precision": "int8-quanto", "output_dir": "out"}))
    config = load_config(tmp_path / "config.json")
    width, height = largest_training_bucket(config)  # nothing scanned: the larger dataset's square bucket
    assert (width, height) == (1024, 1024)
    device = detect_device("cpu")
    ours = estimates_for(config, CHROMA1, device)["int8-quanto"]
    at = lambda bucket: estimate(CHROMA1, "int8-quanto", keep=KEEP_FULL_PRECISION, lora_pattern=target_modules("all", 38),  # noqa: E731
                                 bucket=bucket, bytes_per_kept=4).activations
    assert ours.activations == at((width, height)) > 2.5 * at((512, 512))  # 4x the image tokens, plus 512 text


def test_scanned_images_decide_the_largest_bucket_and_a_dataset_not_scanned_yet_counts_too(tmp_path):
    from chroma_pipeline.dataset import ManifestRow, write_manifest
    from chroma_pipeline.quantized_base import largest_training_bucket

    for folder in ("wide", "new"):
        (tmp_path / folder).mkdir()
    (tmp_path / "backend.json").write_text(json.dumps([
        {"id": "wide", "instance_data_dir": "wide", "resolution": 512, "resolution_type": "pixel"},
        {"id": "new", "instance_data_dir": "new", "resolution": 512}]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "backend.json", "output_dir": "out"}))
    config = load_config(tmp_path / "config.json")
    layout = Layout(tmp_path / "out")
    layout.manifest.parent.mkdir(parents=True)
    write_manifest([ManifestRow("wide/a.png", "ok", width=1600, height=800, dataset="wide")], layout.manifest)
    assert largest_training_bucket(config, layout) == (1024, 512)  # a 2:1 image at pixel 512
    (tmp_path / "backend.json").write_text(json.dumps([
        {"id": "wide", "instance_data_dir": "wide", "resolution": 512, "resolution_type": "pixel"},
        {"id": "new", "instance_data_dir": "new", "resolution": 1024}]))
    assert largest_training_bucket(load_config(tmp_path / "config.json"), layout) == (1024, 1024)  # not scanned yet


class _RecordingCuda:
    """Stands in for torch.cuda's memory queries and records which device each was asked about."""

    def __init__(self):
        self.asked = []

    def mem_get_info(self, device=None):
        self.asked.append(("mem_get_info", device))
        return 8 * 2**30, 16 * 2**30

    def reset_peak_memory_stats(self, device=None):
        self.asked.append(("reset_peak_memory_stats", device))

    def max_memory_allocated(self, device=None):
        self.asked.append(("max_memory_allocated", device))
        return 0


def test_memory_queries_ask_the_pinned_gpu_not_gpu_zero(monkeypatch):
    from chroma_pipeline.device import DeviceInfo

    cuda = _RecordingCuda()
    for name in ("mem_get_info", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    pinned = DeviceInfo("cuda", "GPU 1", "cuda:1")  # CHROMA_DEVICE=cuda:1
    pinned.free_memory_bytes(), pinned.reset_peak_memory(), pinned.peak_memory_bytes()
    assert cuda.asked == [("mem_get_info", "cuda:1"), ("reset_peak_memory_stats", "cuda:1"),
                          ("max_memory_allocated", "cuda:1")]


def test_quantizing_on_the_cpu_for_a_gpu_run_stores_the_gpus_compute_dtype(small_project, monkeypatch):
    """offload_during_startup: the CPU quantizes, but training runs on the GPU in bf16: store bf16, not fp32."""
    from safetensors import safe_open

    from chroma_pipeline.device import DeviceInfo

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    gpu = DeviceInfo("cuda", "a GPU", "cuda:0")
    config = load_config(small_project, base_model_precision="int8-quanto", offload_during_startup=True)
    result = build_quantized(config, Layout(Path(config.output_dir)), gpu)
    dtypes = set()
    for shard in Path(result.path).rglob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            dtypes |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert "F32" not in dtypes and "BF16" in dtypes  # int8 data with bf16 scales and kept layers


def test_bitsandbytes_keeps_the_layers_quanto_keeps_and_quantizes_every_blocks_proj_out(monkeypatch):
    """diffusers' own replacement decides which layers bitsandbytes converts; only its kernels are faked here,
    so no GPU (or bitsandbytes) is needed to see which of the real Chroma1's layers it would convert."""
    import types

    from accelerate import init_empty_weights
    from diffusers import BitsAndBytesConfig, ChromaTransformer2DModel
    from diffusers.quantizers.bitsandbytes import utils as bnb_utils

    class FakeLinear4bit(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    fake = types.SimpleNamespace(nn=types.SimpleNamespace(Linear4bit=FakeLinear4bit, Linear8bitLt=FakeLinear4bit))
    monkeypatch.setattr(bnb_utils, "bnb", fake, raising=False)
    skip, quantized_anyway = quantize_module.bnb_skip_modules(KEEP_FULL_PRECISION, quantize_module.linear_names(CHROMA1))
    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(CHROMA1)
    # int8's path (nf4 adds the same name check); a 4-bit config would look for bitsandbytes' version here.
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    bnb_utils._replace_with_bnb_linear(model, modules_to_not_convert=list(skip), quantization_config=config)
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    single_outputs = {f"single_transformer_blocks.{i}.proj_out" for i in range(38)}
    assert single_outputs.isdisjoint(linear)  # all 38 quantized (1.8 B parameters not left in bf16)
    assert linear == {n for n in quantize_module.linear_names(CHROMA1) if quantize_module.is_kept(n, KEEP_FULL_PRECISION)
                      } - set(quantized_anyway)  # exactly quanto's kept layers, less what cannot be named alone
    assert quantized_anyway == ["proj_out"]  # the final output layer: 0.2 M parameters, put back after loading


def test_bitsandbytes_model_gets_its_output_layer_back_from_the_checkpoint(monkeypatch, tiny_model_dir, tmp_path):
    """The final proj_out cannot be kept through diffusers' skip list, so it is put back after loading: the model
    then keeps exactly quanto's layers, and the restored layer holds the checkpoint's own weights."""
    import types

    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes import utils as bnb_utils
    from safetensors import safe_open

    class FakeLinear8bit(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.int8), requires_grad=False)

    fake = types.SimpleNamespace(nn=types.SimpleNamespace(Linear4bit=FakeLinear8bit, Linear8bitLt=FakeLinear8bit))
    monkeypatch.setattr(bnb_utils, "bnb", fake, raising=False)
    transformer_dir = tiny_model_dir / "transformer"
    model = load_transformer(tiny_model_dir, torch.bfloat16)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    skip, shared_names = quantize_module.bnb_skip_modules(KEEP_FULL_PRECISION, names)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    bnb_utils._replace_with_bnb_linear(model, modules_to_not_convert=list(skip), quantization_config=config)
    assert isinstance(model.proj_out, FakeLinear8bit)  # what diffusers alone leaves

    kept_file = tmp_path / quantize_module.KEPT_LAYERS_FILE
    quantize_module.save_kept_layers(transformer_dir, shared_names, kept_file, torch.bfloat16)
    quantize_module.restore_kept_layers(model, kept_file)

    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear == {n for n in names if quantize_module.is_kept(n, KEEP_FULL_PRECISION)}
    assert "proj_out" in linear and not any(n.startswith("single_transformer_blocks") for n in linear)
    with safe_open(str(quantize_module.checkpoint_files(transformer_dir)["proj_out.weight"]), "pt") as handle:
        assert torch.equal(model.proj_out.weight, handle.get_tensor("proj_out.weight").to(torch.bfloat16))
    assert model.proj_out.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("keep", [("transformer_blocks.0*",), ("*to_out*",), ("x_embedder", "single_transformer_blocks.3")])
def test_a_bitsandbytes_skip_list_keeps_exactly_the_listed_layers_under_diffusers_rule(keep):
    names = quantize_module.linear_names(CHROMA1)
    skip, quantized_anyway = quantize_module.bnb_skip_modules(keep, names)
    kept_by_diffusers = {n for n in names if quantize_module.diffusers_would_skip(n, skip)}
    assert kept_by_diffusers == {n for n in names if quantize_module.is_kept(n, keep)} and not quantized_anyway
