"""The bench tooling: FLOP counts against an independent count, the report files, the sampler study."""

import json
import os

import pytest
import torch

from tfsdeploy.config import PRESETS
from tfsdeploy.errors import UserError
from tfsdeploy.model import SelfAttention, build_model
from tfsdeploy.tools.bench import BenchConfig, build_engines, run_bench
from tfsdeploy.tools.hardware import count_bytes, count_flops
from tfsdeploy.tools.study import StudyConfig, pick_sampler, sampler_study


def independent_flops(model, size):
    """2 x multiply-adds of every conv and linear layer, plus the two attention matmuls."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += 2 * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1] * out.numel()
        elif isinstance(mod, torch.nn.Linear):
            total[0] += 2 * mod.in_features * out.numel()
        elif isinstance(mod, SelfAttention):
            b, c, h, w = out.shape
            total[0] += 2 * 2 * b * c * (h * w) ** 2

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size), torch.zeros(1, 5, size, size), torch.full((1,), 0.5))
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("preset,size", [("small", 128), ("tiny", 64)])
def test_flop_count_agrees_with_an_independent_count(preset, size):
    m = build_model(PRESETS[preset]).eval()
    ours, ref = count_flops(m, 1, size), independent_flops(m, size)
    assert abs(ours - ref) / ref < 0.05


class _Devices(torch.utils._python_dispatch.TorchDispatchMode):
    """Every device an operator's tensor arguments sit on."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor):
                self.seen.add(a.device.type)
        return func(*args, **(kwargs or {}))


def test_counts_run_on_the_meta_device_and_leave_the_model_alone():
    """Counting bytes and FLOPs needs shapes only: no operator sees a real tensor (the paper model
    in fp16 on a CPU took half an hour this way), the model keeps its device, dtype and weights,
    and the bytes equal an independent count from a real fp16 call."""
    m = build_model(PRESETS["tiny"]).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with _Devices() as mode:
        nbytes = count_bytes(m, 2, 32, torch.float16)
        flops = count_flops(m, 2, 32)
    assert mode.seen == {"meta"}
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert flops == 2 * count_flops(m, 1, 32)

    ref = sum(p.numel() * 2 for p in m.parameters())
    half = build_model(PRESETS["tiny"]).eval().half()

    def hook(_m, _i, out):
        nonlocal ref
        ref += 2 * out.numel() * out.element_size()

    hs = [x.register_forward_hook(hook) for x in half.modules() if not list(x.children())]
    with torch.no_grad():
        half(torch.zeros(2, 3, 32, 32, dtype=torch.half), torch.zeros(2, 5, 32, 32, dtype=torch.half),
             torch.full((2,), 0.5))
    for h in hs:
        h.remove()
    assert nbytes == ref
    assert count_bytes(m, 2, 32) == count_bytes(m, 2, 32, torch.float32) > nbytes


def test_bench_writes_markdown_json_and_plot(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
    cfg = BenchConfig(preset="tiny", sizes=(32,), batches=(1, 2), engines=("torch-fp32", "onnx", "trt"), repeats=2,
                      warmup=1, fuse_steps=(2,), ddpm_steps=2, fuse_size=64)
    r = run_bench(None, cfg, tmp_path, log=lambda s: None)
    assert {x["engine"] for x in r["latency"]} == {"torch-fp32", "onnx"}
    assert [x["speedup_vs_torch_fp32"] for x in r["latency"] if x["engine"] == "torch-fp32"] == [1.0, 1.0]
    # batching: time per slice and call memory against batch 1 of the same engine, side by side
    rows = {(x["engine"], x["batch"]): x for x in r["batching"]}
    assert set(rows) == {(e, b) for e in ("torch-fp32", "onnx") for b in (1, 2)}
    for (e, b), x in rows.items():
        lat = next(y for y in r["latency"] if (y["engine"], y["batch"]) == (e, b))
        assert x["per_slice_ms"] == pytest.approx(lat["median_ms"] / b)
        assert x["time_vs_batch1"] == pytest.approx(x["per_slice_ms"] / rows[(e, 1)]["per_slice_ms"])
    assert all(x["time_vs_batch1"] == 1.0 for (e, b), x in rows.items() if b == 1)
    assert r["export_s"]["onnx-fp32"] > 0 and [x["size"] for x in r["onnx_pays_after"]] == [32]
    md = (tmp_path / "bench.md").read_text()
    assert "## Batching: per slice" in md and "## When an ONNX export pays for itself" in md
    if not torch.cuda.is_available():
        assert r["cpu_peak"]["what"] in md
        # peak memory per batch, from a new process each (python and torch alone hold over 100 MiB)
        assert all(x["peak_mib"] > 100 for x in rows.values())
        assert rows[("onnx", 2)]["memory_vs_batch1"] == pytest.approx(rows[("onnx", 2)]["peak_mib"] /
                                                                      rows[("onnx", 1)]["peak_mib"])
        assert all(x["fraction_of_peak"] <= 1 for x in r["latency"])
    assert "trt" in r["skipped"] or torch.cuda.is_available()
    assert all(x["gflops_per_s"] > 0 and x["fraction_of_peak"] > 0 for x in r["latency"])
    ddpm = [x for x in r["fuse"] if x["sampler"] == "ddpm"]
    assert ddpm and not ddpm[0]["measured"] and ddpm[0]["steps"] == 4000
    assert "Denoiser call" in md and r["device"]["device"] in md
    assert json.loads((tmp_path / "bench.json").read_text())["latency"]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError):
        BenchConfig(engines=("warp-drive",))


# Two cores with two threads each; the kernel lists hyper-threads as processors of their own.
FAKE_CPUINFO = "\n\n".join(
    f"processor\t: {i}\nmodel name\t: Stand-in CPU\nphysical id\t: 0\ncore id\t\t: {i % 2}\n"
    f"cpu MHz\t\t: {mhz}\nflags\t\t: fpu sse sse2 avx fma avx2"
    for i, mhz in enumerate((2800.0, 3000.0, 2900.0, 2950.0))) + "\n\n"


def test_cpu_fma_peak_from_cpuinfo():
    from tfsdeploy.tools.hardware import FMA_PORTS, cpu_fma_peak

    assert FMA_PORTS == 2
    peak = cpu_fma_peak(FAKE_CPUINFO)  # 2 physical cores x 3.0 GHz x 8 lanes x 2 flops x 2 FMA units
    assert peak["gflops"] == pytest.approx(192.0) and (peak["cores"], peak["fp32_lanes"], peak["isa"]) == (2, 8, "avx")
    assert "= 192 GFLOP/s" in peak["formula"]
    assert cpu_fma_peak(FAKE_CPUINFO, max_mhz=3500.0)["gflops"] == pytest.approx(224.0)  # cpufreq's maximum
    assert cpu_fma_peak(FAKE_CPUINFO, cpus={0, 2})["gflops"] == pytest.approx(2.9 * 8 * 2 * 2)  # one core's threads
    wide = cpu_fma_peak(FAKE_CPUINFO.replace("avx2", "avx2 avx512f"))
    assert wide["fp32_lanes"] == 16 and wide["gflops"] == pytest.approx(384.0)
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nFeatures\t: fp asimd\n"
    assert cpu_fma_peak(arm) is None and cpu_fma_peak("") is None


def test_cpu_peak_names_which_peak_it_is(monkeypatch):
    import tfsdeploy.tools.hardware as hardware

    monkeypatch.setattr(hardware, "_max_cpufreq_mhz", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(hardware, "matmul_kernels_gflops", lambda: {"torch 512": 40.0, "onnxruntime 2048": 60.0})
    p = hardware.cpu_peak(FAKE_CPUINFO)
    assert (p["peak"], p["source"]) == (pytest.approx(192.0), "fma") and "FMA throughput" in p["what"]
    # a kernel above the FMA figure means the clock was read too low: the kernel is the peak then
    monkeypatch.setattr(hardware, "matmul_kernels_gflops", lambda: {"torch 512": 40.0, "onnxruntime 2048": 250.0})
    p = hardware.cpu_peak(FAKE_CPUINFO)
    assert (p["peak"], p["source"]) == (250.0, "kernels") and "onnxruntime 2048² fp32 matmul" in p["what"]
    assert hardware.cpu_peak("")["source"] == "kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU's peak is its data sheet's")
def test_a_fraction_of_peak_over_100_percent_fails_the_bench(tmp_path, monkeypatch):
    import tfsdeploy.tools.bench as bench

    monkeypatch.setattr(bench, "cpu_peak", lambda: {"peak": 1e-3, "source": "kernels", "what": "a stand-in",
                                                   "kernels": {"torch 512": 1e-3}, "fma": None})
    cfg = BenchConfig(preset="tiny", sizes=(32,), batches=(1,), engines=("torch-fp32",), repeats=1, warmup=0,
                      fuse_steps=(1,), ddpm_steps=1, fuse_size=64)
    with pytest.raises(UserError, match=r"torch-fp32 at 32px batch 1: \d+% of peak is impossible"):
        run_bench(None, cfg, tmp_path / "report", log=lambda s: None)
    assert not (tmp_path / "report").exists()


def test_bench_names_engines_as_fuse_does(tmp_path, tiny_run):
    """"torch" is what `fuse --engine torch` runs; the eager fp32 reference has its own name. On a CPU
    the two are the same path, so asking for both measures it once."""
    from tfsdeploy.config import EngineConfig
    from tfsdeploy.pipeline import FusionPipeline

    cfg = BenchConfig(sizes=(32,), batches=(1,), engines=("torch-fp32", "torch"), fuse_size=64)
    engines, skipped = build_engines(tiny_run, cfg, tmp_path, log=lambda s: None)
    fused = FusionPipeline.load(tiny_run, 4, engine=EngineConfig(engine="torch")).denoiser.describe()
    if torch.cuda.is_available():
        assert engines["torch"].describe() == fused and engines["torch"].dtype == torch.float16
    else:
        assert list(engines) == ["torch-fp32"] and "'torch-fp32' row" in skipped["torch"]
        alone, _ = build_engines(tiny_run, BenchConfig(sizes=(32,), batches=(1,), engines=("torch",), fuse_size=64),
                                 tmp_path, log=lambda s: None)
        assert alone["torch"].describe() == fused
    assert engines["torch-fp32"].dtype == torch.float32
    with pytest.raises(UserError, match="torch-fast"):
        BenchConfig(engines=("torch-fast",))


def test_bench_of_a_trained_model_times_the_command_line(tmp_path, tiny_run):
    cfg = BenchConfig(sizes=(64,), batches=(1,), engines=("torch",), repeats=1, warmup=0, fuse_steps=(2,),
                      ddpm_steps=2, fuse_size=64, cli_repeats=1)
    r = run_bench(tiny_run, cfg, tmp_path, log=lambda s: None)
    assert r["parameters"] < 1e5  # the tiny checkpoint, not a random preset model
    assert [x["engine"] for x in r["cli_fuse"]] == ["torch", "auto"]
    # nothing is exported for it, so auto falls back to torch; a whole process takes real time
    assert all("torch" in x["ran"] and x["seconds"] > 0.3 and len(x["runs"]) == 1 for x in r["cli_fuse"])
    assert all(0 < x["inside_s"] < x["seconds"] for x in r["cli_fuse"])
    assert "One-shot fuse in a new process" in (tmp_path / "bench.md").read_text()


def test_sampler_study(tmp_path, tiny_run, synth_dataset):
    from tfsdeploy.config import EngineConfig
    from tfsdeploy.data import open_split
    from tfsdeploy.pipeline import FusionPipeline

    pipe = FusionPipeline.load(tiny_run, 4, engine=EngineConfig(engine="torch"))
    samples = open_split(synth_dataset, "test", 64).load()
    r = sampler_study(pipe, samples, StudyConfig(images=2, size=64, ddim_steps=(1, 2)), tmp_path, log=lambda s: None)
    samplers = [(x["sampler"], x["steps"]) for x in r["rows"]]
    assert samplers == [("baseline", 0), ("ddpm", 100), ("ddim", 1), ("ddim", 2)]  # DDPM over all T by default
    short = sampler_study(pipe, samples, StudyConfig(images=1, size=64, ddim_steps=(1,), ddpm_full=3), tmp_path,
                          log=lambda s: None)
    assert [(x["sampler"], x["steps"]) for x in short["rows"][1:]] == [("ddpm", 3), ("ddim", 1)]
    ddim1 = r["rows"][2]
    assert ddim1["fewer_calls_than_ddpm"] == 100
    assert ddim1["delta_psnr_vs_ddpm"] == pytest.approx(ddim1["psnr"] - r["rows"][1]["psnr"])
    for f in ("study.md", "study.json", "study.png"):
        assert (tmp_path / f).is_file()


def test_the_study_picks_the_fewest_calls_within_the_target():
    rows = [{"sampler": "baseline", "calls": 0, "psnr": 30.0}, {"sampler": "ddpm", "calls": 4000, "psnr": 35.0},
            {"sampler": "ddim", "calls": 10, "psnr": 34.9},  # 400x fewer, -0.1 dB: meets the target
            {"sampler": "ddim", "calls": 2, "psnr": 34.0},  # fewer calls, but -1.0 dB: misses it
            {"sampler": "ddim", "calls": 50, "psnr": 35.2}]  # meets it, with more calls than ddim-10
    pick = pick_sampler(rows)
    assert pick is rows[2]
    assert rows[3]["delta_psnr_vs_ddpm"] == pytest.approx(-1.0) and rows[4]["fewer_calls_than_ddpm"] == 80
    assert pick_sampler(rows[:2] + [rows[3]]) is None  # nothing within 0.3 dB
    assert pick_sampler(rows[:2] + [{"sampler": "ddim", "calls": 100, "psnr": 35.0}]) is None  # only 40x fewer
