"""The CUDA paths' logic, on the CPU, with stand-ins that behave as the CUDA pieces do: a capture
whose end raises, a package runner that refuses to be recorded unless loaded single-threaded, a
TensorRT module object with the Python API of TensorRT 10 / 11, the rules a CUDA graph imposes
(checked by CaptureRules on the meta device), and the fallbacks to the torch engine."""

import contextlib
import dataclasses
import math

import pytest
import torch

from conftest import EXPORT_SPEC, RecordingGraphs
from engines.aoti_engine import AotiDenoiser, device_identity
from engines.torch_engine import TorchDenoiser
from tfsdeploy.checkpoint import build_from_checkpoint, load_checkpoint
from tfsdeploy.config import DiffusionConfig, SampleConfig
from tfsdeploy.diffusion import Diffusion
from tfsdeploy.errors import UserError
from tfsdeploy.loopgraph import MAX_GRAPHS, CaptureRuleError, CaptureRules, CudaGraphs, WholeFuseGraphs
from tfsdeploy.pipeline import FusionPipeline


def recordable(ckpt, **kw):
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0], **kw)
    engine.capturable = True  # as on CUDA
    return engine


def plain(ckpt, sample, configs=None):
    return FusionPipeline(TorchDenoiser(build_from_checkpoint(ckpt)[0]), configs or load_checkpoint(ckpt).configs,
                          4, sample)


# ------------------------------------------------------------------ a capture that fails


class StandInCuda:
    """torch.cuda as CudaGraphs uses it: streams made current and restored, graph pools with their
    reference counts and allocator routing, and a capture_end that can raise (as
    cudaStreamEndCapture does for an invalidated capture)."""

    class _Stream:
        def wait_stream(self, other):
            pass

    def __init__(self, fail_end=False):
        self.default = self.current = StandInCuda._Stream()
        self.fail_end, self.pools, self.routing, self.next_pool = fail_end, {}, set(), 0
        cuda = self

        class Graph:
            pool = None

            def capture_begin(self, pool):
                assert cuda.current is not cuda.default, "a capture on the default stream"
                self.pool, self.stream = pool, cuda.current
                cuda.pools[pool] = cuda.pools.get(pool, 0) + 1
                cuda.routing.add(pool)

            def capture_end(self):
                assert cuda.current is self.stream, "capture must end on the stream it began on"
                if cuda.fail_end:  # torch's capture_end raises before the allocator stops routing
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
                cuda.routing.discard(self.pool)
                self.ended = True

            def replay(self):
                pass

            def reset(self):
                if getattr(self, "ended", False):  # torch releases the pool only after a good capture
                    cuda.pools[self.pool] -= 1

        self.CUDAGraph = Graph

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        return StandInCuda._Stream()

    def stream(self, s):
        @contextlib.contextmanager
        def ctx():
            before, self.current = self.current, s
            try:
                yield
            finally:
                self.current = before
        return ctx()

    def current_stream(self, device):
        return self.current

    def synchronize(self, device):
        pass

    def pool_handle(self):
        self.next_pool += 1
        return (0, self.next_pool)

    def end_pool(self, device, pool):
        self.routing.discard(pool)

    def release_pool(self, device, pool):
        self.pools[pool] -= 1


def test_a_failed_capture_end_leaves_the_default_stream_and_a_sane_allocator_and_the_next_fuse_runs(ckpt):
    cuda = StandInCuda(fail_end=True)
    notices = []
    sample = SampleConfig(steps=3, seed=2)
    pipe = FusionPipeline(recordable(ckpt), load_checkpoint(ckpt).configs, 4, sample,
                          graphs=CudaGraphs(cuda=cuda), notice=notices.append)
    cond = torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = plain(ckpt, sample)
    assert torch.equal(pipe(cond), reference(cond))
    assert cuda.current is cuda.default  # not left on the capture's stream
    assert cuda.routing == set() and set(cuda.pools.values()) == {0}  # no pool routed to, none kept
    assert len(notices) == 1 and "failed" in notices[0] and pipe.loop is None
    cond2 = torch.rand(1, 5, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pipe(cond2), reference(cond2)) and len(notices) == 1


def test_a_capture_that_raises_inside_is_ended_and_its_stream_left(ckpt):
    cuda = StandInCuda()

    def refuses():
        raise RuntimeError("operation not permitted when stream is capturing")

    ended = []
    real_end = cuda.CUDAGraph.capture_end
    cuda.CUDAGraph.capture_end = lambda self: (ended.append(1), real_end(self))
    with pytest.raises(RuntimeError, match="not permitted"):
        CudaGraphs(warmups=0, cuda=cuda).capture(refuses, torch.device("cpu"))
    assert ended == [1] and cuda.current is cuda.default and cuda.routing == set()
    assert set(cuda.pools.values()) == {0}


def test_a_good_capture_keeps_its_pool_until_the_cache_releases_it(ckpt):
    cuda = StandInCuda()
    out = torch.ones(2)
    replay = CudaGraphs(cuda=cuda).capture(lambda: out, torch.device("cpu"))
    assert replay() is out and cuda.current is cuda.default and list(cuda.pools.values()) == [1]
    replay.release()
    assert list(cuda.pools.values()) == [0]


# ------------------------------------------------------------------ bounded graph caches


def test_whole_fuse_graphs_are_bounded_and_evicted_ones_released(ckpt):
    graphs = RecordingGraphs()
    pipe = FusionPipeline(recordable(ckpt), load_checkpoint(ckpt).configs, 4, SampleConfig(steps=1), graphs=graphs)
    sizes = [16, 20, 24, 28, 32, 36]
    for size in sizes:
        pipe(torch.rand(1, 5, size, size))
    assert len(pipe.loop.graphs) == MAX_GRAPHS and graphs.released == len(sizes) - MAX_GRAPHS
    pipe(torch.rand(1, 5, 36, 36))  # the most recent is kept
    pipe(torch.rand(1, 5, 16, 16))  # the oldest was dropped: recorded again
    assert graphs.captures == len(sizes) + 1


def test_the_torch_engines_per_call_graphs_are_bounded_too(ckpt):
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0])
    engine.cuda_graph, engine.backend = True, RecordingGraphs()
    for size in (32, 36, 40, 44, 48, 52):
        x = torch.randn(1, 3, size, size)
        out = engine(x, torch.rand(1, 5, size, size), torch.tensor([0.5]))
        assert out.shape == x.shape
    assert len(engine.graphs) == MAX_GRAPHS and engine.backend.released == 2


# ------------------------------------------------------------------ the rules of a recorded region


@pytest.mark.parametrize("fn, message", [
    (lambda x: x.sum().item(), "synchronises with the host"),
    (lambda x: x + 1 if bool(x.sum() > 0) else x, "synchronises with the host"),
    (lambda x: torch.nonzero(x), "depends on the data"),
    (lambda x: x[x > 0], "depends on the data"),
    (lambda x: x + torch.randn(x.shape, device=x.device), "random numbers"),
    (lambda x: x.cpu(), "copy between host and device"),
    (lambda x: x + torch.tensor([1.0, 2.0, 3.0]).to(x.device), "copy between host and device"),
])
def test_capture_rules_refuse_what_a_cuda_graph_cannot_hold(fn, message):
    x = torch.empty(3, device="meta")
    with pytest.raises(CaptureRuleError, match=message), CaptureRules("meta"):
        fn(x)


def test_capture_rules_allow_what_a_sampler_does():
    x = torch.empty(2, 3, device="meta")
    with CaptureRules("meta"):
        y = (x * 0.5 + torch.full((2,), 0.3, device="meta")[:, None]).clamp(0, 1).sqrt()
        torch.maximum(y, torch.zeros_like(y)).sum(dim=1)


CAPTURABLE_PATHS = {
    "torch fp32": dict(),
    "torch fp16": dict(dtype=torch.float16),
    "torch fp16 channels-last, native GroupNorm": dict(dtype=torch.float16, channels_last=True, upcast_norms=False),
}


@pytest.mark.parametrize("path", list(CAPTURABLE_PATHS))
@pytest.mark.parametrize("objective", ["diffusion", "regression"])
def test_every_capturable_engine_path_records_a_whole_fuse_within_the_rules(ckpt, path, objective):
    """The meta device stands in for CUDA: any tensor on the host inside the region is a copy."""
    configs = load_checkpoint(ckpt).configs
    if objective == "regression":
        configs = dataclasses.replace(configs, diffusion=DiffusionConfig(prediction="x0", target="residual",
                                                                         objective="regression"))
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0], device="meta", **CAPTURABLE_PATHS[path])
    graphs = RecordingGraphs(rules="meta")
    loop = WholeFuseGraphs(Diffusion.from_configs(configs), engine, graphs)
    out = loop.fuse(torch.rand(2, 5, 32, 32).to("meta"), SampleConfig(steps=3), seeds=[1, 2])
    assert out.shape == (2, 3, 32, 32) and out.device.type == "meta" and graphs.captures == 1


def test_the_aoti_engines_calls_keep_the_rules(ckpt, monkeypatch):
    engine = standin_package(ckpt, monkeypatch, device="meta")
    graphs = RecordingGraphs(rules="meta")
    loop = WholeFuseGraphs(Diffusion.from_configs(load_checkpoint(ckpt).configs), engine, graphs)
    assert loop.fuse(torch.rand(1, 5, 32, 32).to("meta"), SampleConfig(steps=2)).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------ an AOTInductor package in a graph


class StandInRunner:
    """A package runner: the tiny model's forward. Loaded multi-threaded, it checks with an event
    query that its previous call finished, which a stream being captured refuses."""

    def __init__(self, model, single_threaded, graphs):
        self.model, self.single_threaded, self.graphs = model, single_threaded, graphs

    def __call__(self, x, c, n):
        if not self.single_threaded and self.graphs is not None and self.graphs.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (cudaEventQuery)")
        return self.model(x, c, n)


def standin_package(ckpt, monkeypatch, graphs=None, single_threaded_api=True, device="cpu"):
    """An AotiDenoiser whose package loader is a stand-in (with or without torch's
    run_single_threaded parameter) and whose runner runs the tiny model."""
    model = build_from_checkpoint(ckpt)[0].eval().to(device)
    loads = []

    def load(path, run_single_threaded=False, device_index=-1):
        loads.append(run_single_threaded)
        return StandInRunner(model, run_single_threaded, graphs)

    def old_load(path):
        loads.append(False)
        return StandInRunner(model, False, graphs)

    monkeypatch.setattr(torch._inductor, "aoti_load_package", load if single_threaded_api else old_load)
    meta = {"kind": "aoti", "precision": "fp32", "torch": torch.__version__, **device_identity("cpu"),
            "io": EXPORT_SPEC.to_json(), "configs": load_checkpoint(ckpt).configs.to_json()}
    engine = AotiDenoiser("stand-in.pt2", meta=meta)
    engine.loads = loads
    engine.capturable = True  # as on CUDA (on a CPU a package is never recorded)
    if device != "cpu":
        engine.device = torch.device(device)
    return engine


def test_a_package_is_loaded_single_threaded_and_recorded_whole(ckpt, monkeypatch):
    graphs = RecordingGraphs()
    engine = standin_package(ckpt, monkeypatch, graphs)
    assert engine.loads == [True] and engine.single_threaded
    notices = []
    sample = SampleConfig(steps=3)
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, sample, graphs=graphs, notice=notices.append)
    cond = torch.rand(2, 5, 32, 32)
    assert torch.equal(pipe(cond), plain(ckpt, sample)(cond))
    assert notices == [] and graphs.captures == 1 and pipe.denoiser is engine


def test_a_package_that_cannot_be_recorded_hands_over_to_the_torch_engine_and_says_so_once(ckpt, monkeypatch):
    graphs = RecordingGraphs()
    engine = standin_package(ckpt, monkeypatch, graphs, single_threaded_api=False)
    assert not engine.single_threaded
    notices = []
    sample = SampleConfig(steps=3, seed=4)
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, sample, graphs=graphs, notice=notices.append,
                          fallback=lambda: recordable(ckpt))
    reference = plain(ckpt, sample)
    for seed in range(2):
        cond = torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pipe(cond), reference(cond))
    assert len(notices) == 1 and notices[0].startswith("warning: recording the whole fuse as one CUDA graph failed")
    assert notices[0].endswith("running the torch engine instead")
    assert pipe.denoiser.name == "torch" and pipe.loop is not None and graphs.captures == 1  # the torch engine's


def test_a_cuda_package_without_a_single_threaded_runner_goes_to_torch_before_any_work(ckpt, monkeypatch):
    engine = standin_package(ckpt, monkeypatch, single_threaded_api=False)
    engine.capturable = False  # what the engine says on CUDA without a single-threaded runner
    engine.device = torch.device("cuda")  # (never used: the pipeline switches before any work)
    notices = []
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, SampleConfig(), notice=notices.append,
                          fallback=lambda: TorchDenoiser(build_from_checkpoint(ckpt)[0]))
    assert pipe.denoiser.name == "torch" and len(notices) == 1 and "cannot be recorded" in notices[0]


# ------------------------------------------------------------------ a request outside a package's range


def test_a_request_outside_the_packages_range_runs_on_torch_said_once(ckpt, monkeypatch):
    engine = standin_package(ckpt, monkeypatch)
    engine.capturable = False
    notices = []
    sample = SampleConfig(steps=2)
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, sample, notice=notices.append,
                          fallback=lambda: TorchDenoiser(build_from_checkpoint(ckpt)[0]))
    inside = torch.rand(1, 5, 64, 64)
    assert torch.equal(pipe(inside), plain(ckpt, sample)(inside)) and pipe.denoiser is engine
    big = torch.rand(1, 5, 160, 160)  # the package covers 32..128
    assert torch.equal(pipe(big), plain(ckpt, sample)(big))
    pipe(torch.rand(4, 5, 32, 32))  # a batch beyond the package's 3: already on torch, nothing more said
    assert len(notices) == 1 and notices[0] == ("warning: height 160 is outside the exported range 32..128 of engine "
                                                "aoti fp32 (cpu, " + engine.meta["cpu_isa"] + "); running the torch "
                                                "engine instead")


def test_without_a_fallback_a_request_outside_the_range_is_refused(ckpt, monkeypatch):
    engine = standin_package(ckpt, monkeypatch)
    pipe = FusionPipeline(engine, load_checkpoint(ckpt).configs, 4, SampleConfig(steps=2), whole_loop=False)
    with pytest.raises(UserError, match="height 160 is outside the exported range 32..128"):
        pipe(torch.rand(1, 5, 160, 160))


# ------------------------------------------------------------------ TensorRT, through a stand-in module


class StandInTrt:
    """The parts of the TensorRT 10 / 11 Python API the engine uses. Its engine's context doubles
    its input into its output, refuses shapes beyond `max_batch` (set_input_shape returns False), and
    reports the I/O dtypes given."""

    __version__ = "10.9.0.34"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class DataType:
        FLOAT, HALF = "DataType.FLOAT", "DataType.HALF"

    class TensorIOMode:
        INPUT, OUTPUT = "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"

    def __init__(self, dtypes=None, max_batch=3):
        from tfsdeploy.iospec import INPUTS, OUTPUT

        trt = self
        names = [*INPUTS, OUTPUT]

        class Context:
            owner = None

            def set_input_shape(self, name, shape):
                return shape[0] <= max_batch

            def set_tensor_address(self, name, ptr):
                return True

            def execute_async_v3(self, stream):
                buffers = self.owner._buffers
                buffers[OUTPUT].copy_(buffers["x_t"] * 2)
                return True

        class Engine:
            num_io_tensors = 4

            def get_tensor_name(self, i):
                return names[i]

            def get_tensor_mode(self, name):
                return trt.TensorIOMode.INPUT if name in INPUTS else trt.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return (dtypes or {}).get(name, trt.DataType.FLOAT)

            def create_execution_context(self):
                return Context()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine()

        self.Runtime = Runtime


def standin_trt_engine(monkeypatch, tmp_path, trt, cuda_graph=False, backend=None):
    import engines.trt_engine as te

    gpu = {"gpu": "Stand-in GPU", "compute_capability": "9.0"}
    monkeypatch.setattr(te, "tensorrt_status", lambda: (trt, ""))
    monkeypatch.setattr(te, "gpu_identity", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    path = tmp_path / "denoiser-fp16-stand-in.plan"
    path.write_bytes(b"plan")
    meta = {"kind": "tensorrt", "tensorrt": trt.__version__, **gpu, "io": EXPORT_SPEC.to_json()}
    engine = te.TrtDenoiser(path, cuda_graph=cuda_graph, meta=meta)
    engine.device = torch.device("cpu")  # the buffers live on the CPU here
    engine._stream = lambda: 0
    engine.context.owner = engine
    if backend is not None:
        engine.backend = backend
    return engine


def trt_inputs(batch, size=32):
    return torch.randn(batch, 3, size, size), torch.rand(batch, 5, size, size), torch.rand(batch)


def test_a_trt_engine_with_io_dtypes_other_than_the_specs_is_refused(monkeypatch, tmp_path):
    trt = StandInTrt(dtypes={"x_t": StandInTrt.DataType.HALF})
    with pytest.raises(UserError, match=r"engine tensor x_t is DataType.HALF, the I/O spec's is fp32"):
        standin_trt_engine(monkeypatch, tmp_path, trt)


def test_a_shape_the_trt_context_refuses_is_an_error_not_a_wrong_answer(monkeypatch, tmp_path):
    engine = standin_trt_engine(monkeypatch, tmp_path, StandInTrt(max_batch=2))
    x, c, n = trt_inputs(2)
    assert torch.equal(engine(x, c, n), x * 2)
    with pytest.raises(UserError, match=r"TensorRT refused input x_t of shape \(3, 3, 32, 32\)"):
        engine(*trt_inputs(3))  # inside the spec (max 3), refused by the context


def test_a_trt_graph_capture_that_fails_runs_on_without_a_graph(monkeypatch, tmp_path):
    engine = standin_trt_engine(monkeypatch, tmp_path, StandInTrt(), cuda_graph=True,
                                backend=RecordingGraphs(fail=True))
    x, c, n = trt_inputs(1)
    assert torch.equal(engine(x, c, n), x * 2)
    assert not engine.cuda_graph and "capturing" in engine.graph_error and "CUDA graph" not in engine.describe()


def test_trt_graphs_are_kept_per_shape_with_their_buffers_and_bounded(monkeypatch, tmp_path):
    graphs = RecordingGraphs()
    engine = standin_trt_engine(monkeypatch, tmp_path, StandInTrt(), cuda_graph=True, backend=graphs)
    for size in (32, 36, 40, 44, 48, 32):
        x, c, n = trt_inputs(1, size)
        assert torch.equal(engine(x, c, n), x * 2)
    assert len(engine.graphs) == MAX_GRAPHS and graphs.released == 2 and graphs.captures == 6


def test_artifacts_for_a_gpu_take_the_gpus_scan_batch_by_default():
    from export.checkpoint_export import ExportConfig, default_max_batch
    from tfsdeploy.config import MAX_BATCH

    assert default_max_batch(ExportConfig(trt=True)) == MAX_BATCH["cuda"] == 64
    assert default_max_batch(ExportConfig()) == MAX_BATCH["cpu"]
    assert default_max_batch(ExportConfig(aoti=True)) == MAX_BATCH["cuda" if torch.cuda.is_available() else "cpu"]


# ------------------------------------------------------------------ the parity gate


def test_the_parity_gate_calls_at_more_than_one_batch(ckpt):
    """An engine right at batch 1 and wrong for the other slices of a batch fails the gate."""
    from export.parity import call_parity

    reference = TorchDenoiser(build_from_checkpoint(ckpt)[0])

    class FirstSliceOnly:
        device = torch.device("cpu")

        def __call__(self, x, c, n):
            out = reference(x, c, n).clone()
            out[1:] = 0
            return out

    assert call_parity(reference, reference, EXPORT_SPEC) == 0.0
    assert call_parity(reference, FirstSliceOnly(), EXPORT_SPEC) > 0.1

    class Overflows:
        device = torch.device("cpu")

        def __call__(self, x, c, n):
            return torch.full_like(x, float("nan"))

    assert math.isnan(call_parity(reference, Overflows(), EXPORT_SPEC))


# ------------------------------------------------------------------ the same, on a real GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_a_capture_that_syncs_leaves_the_default_stream_and_the_next_capture_works():
    x = torch.ones(4, device="cuda")
    default = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        CudaGraphs(warmups=0).capture(lambda: x * float(x.sum().item()), x.device)  # a host sync inside
    assert torch.cuda.current_stream() == default
    torch.cuda.empty_cache()  # the allocator holds no capture
    replay = CudaGraphs().capture(lambda: x * 2, x.device)
    x.fill_(3)
    assert torch.equal(replay(), torch.full((4,), 6.0, device="cuda"))
    replay.release()


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_the_whole_fuse_graph_matches_eager_and_stays_bounded(ckpt):
    sample = SampleConfig(steps=3, seed=1)
    configs = load_checkpoint(ckpt).configs
    engine = TorchDenoiser(build_from_checkpoint(ckpt)[0], "cuda", torch.float16, cuda_graph=True)
    pipe = FusionPipeline(engine, configs, 4, sample)
    eager = FusionPipeline(TorchDenoiser(build_from_checkpoint(ckpt)[0], "cuda", torch.float16), configs, 4, sample,
                           whole_loop=False)
    for size in (32, 40, 48, 56, 64, 32):
        cond = torch.rand(2, 5, size, size, generator=torch.Generator().manual_seed(size))
        assert float((pipe(cond) - eager(cond)).abs().max()) < 2e-3
    assert pipe.loop is not None and len(pipe.loop.graphs) == MAX_GRAPHS
