"""A cohort on a Ray cluster: each participant a task on an actor that keeps its pipeline loaded.

- Each worker is a Ray actor (`CohortWorker`) asking for one GPU where the cluster has GPUs (and the
  engine may use one), else for `threads` CPUs (1 by default). It loads its pipeline on its first
  participant and keeps it for the rest.
- The driver hands each worker one participant at a time, the next as soon as one returns, so a slow
  participant never holds up the others.
- A worker that dies (killed, out of memory, its node lost) is restarted by Ray and its participant
  retried on it, up to RETRIES times. Fusing a participant is idempotent: the retry first checks
  whether the participant was finished (tfsdeploy.tools.cohort.finished), and outputs are published
  all at once, so every participant is written exactly once and nothing partial is left.
- Workers write straight into OUTPUT_DIR, which must be one filesystem that every node sees. The
  driver checks it before any work: it writes a marker file there that every worker must read back.

Ray comes with the optional extra `tfsdeploy[ray]` and is imported only here.
"""

from __future__ import annotations

import collections
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from tfsdeploy.errors import UserError
from tfsdeploy.fileio import atomic_path
from tfsdeploy.tools.cohort import RAY_EXTRA, CohortSpec, ModelId, Result, Unit, fuse_unit

# A dead worker's participant is retried this many times (on the restarted worker) before it fails.
RETRIES = 3
# How long the driver waits for the workers to start and answer (seconds): loading torch takes a while.
START_TIMEOUT_S = 600
ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})$")


def check_address(address: str) -> str:
    """`--ray`: auto (the cluster this machine belongs to) or a head's HOST:PORT (ray://HOST:PORT for
    Ray Client), checked before anything connects."""
    if not ADDRESS.match(address or ""):
        raise UserError(f"--ray takes auto or the head node's HOST:PORT (e.g. 10.0.0.1:6379), got {address!r}")
    return address


def connect(address: str):
    """Ray, connected to the cluster at `address` (checked first by check_address): before any work, so
    a missing extra or an unreachable cluster is one line and writes nothing."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001 - Ray reports a cluster it cannot reach with several error types
        raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({type(e).__name__}: "
                        f"{' '.join(str(e).split())})") from None
    return ray


def plan_workers(ray, address: str, spec: CohortSpec, workers: int) -> tuple[dict, int]:
    """What each worker asks of the cluster (one GPU where it has GPUs and the engine may use one, else
    `threads` CPUs, at least 1) and how many such workers it holds; refuses more `workers` than that."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = gpus > 0 and spec.engine.device != "cpu"
    ask = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": max(1, spec.engine.threads or 1)}
    fit = gpus if use_gpu else cpus // ask["num_cpus"]
    if fit < 1 or workers > fit:
        each = "1 GPU" if use_gpu else f"{ask['num_cpus']} CPU(s)"
        raise UserError(f"--ray {address}: the cluster has {cpus} CPUs and {gpus} GPUs, room for {fit} worker(s) "
                        f"of {each} each; --workers {workers} asks for more")
    return ask, fit


class CohortWorker:
    """One Ray actor: a pipeline loaded once, fusing the participants it is handed into `out`."""

    def __init__(self, out: str, marker: str, token: str, model, spec: CohortSpec, model_id: ModelId):
        self.out, self.marker, self.token = Path(out), marker, token
        self.model, self.spec, self.model_id = model, spec, model_id
        self.pipe = None

    def where(self) -> tuple[str, bool]:
        """This worker's host, and whether it sees the driver's marker in OUTPUT_DIR."""
        try:
            seen = (self.out / self.marker).read_text() == self.token
        except OSError:
            seen = False
        return socket.gethostname(), seen

    def fuse(self, unit: Unit, force: bool, started: float) -> Result:
        from tfsdeploy.pipeline import FusionPipeline

        if self.pipe is None:
            try:
                self.pipe = FusionPipeline.load(self.model, self.spec.scale, self.spec.sample, self.spec.engine)
            except UserError as e:
                return Result(unit.key, unit.label, unit.session, "failed",
                              f"the worker on {socket.gethostname()} cannot load the model: {e}")
        return fuse_unit(self.pipe, unit, self.out, self.model_id, self.spec, force, started=started)


def run_on_ray(ray, address: str, units: list[Unit], out: Path, model, model_id: ModelId, spec: CohortSpec,
               workers: int = 0, force: bool = False, on_start: Callable[[str], None] = lambda s: None,
               on_result: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Fuse `units` on the Ray cluster `connect` joined (`ray`, at `address`) with `workers` actors (0: one
    per GPU, else as many as the cluster's CPUs hold); returns one Result per unit, in the order they
    finished. `on_start` hears what was started, `on_result` each Result as it comes."""
    results: list[Result] = []
    started = time.time()

    def record(res: Result) -> None:
        results.append(res)
        on_result(res)

    for u in units:  # what cannot be fused never leaves the driver
        if u.skip:
            record(fuse_unit(None, u, out, model_id, spec))
    todo = collections.deque(u for u in units if not u.skip)
    if not todo:
        ray.shutdown()
        return results
    token = uuid.uuid4().hex
    marker = out / f".tfsdeploy-cohort-{token[:12]}"
    actors: list = []
    try:
        with atomic_path(marker) as tmp:
            tmp.write_text(token)
        ask, fit = plan_workers(ray, address, spec, workers)
        use_gpu = "num_gpus" in ask
        n = min(workers or fit, len(todo))
        actor_class = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(CohortWorker)
        actors = [actor_class.options(**ask).remote(str(out), marker.name, token, model, spec, model_id)
                  for _ in range(n)]
        try:
            seen = ray.get([a.where.remote() for a in actors], timeout=START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a worker that could not start (an import, no resources)
            raise UserError(f"--ray {address}: the workers did not start ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None
        blind = sorted({host for host, ok in seen if not ok})
        if blind:
            raise UserError(f"{out}: not visible from the worker(s) on {', '.join(blind)}; OUTPUT_DIR must be a "
                            f"filesystem every node of the cluster shares")
        on_start(f"{n} Ray worker(s) on {', '.join(sorted({h for h, _ in seen}))}, each with "
                 f"{'1 GPU' if use_gpu else str(ask['num_cpus']) + ' CPU(s)'}")
        inflight: dict = {}

        def hand(actor) -> None:
            if todo:
                unit = todo.popleft()
                inflight[actor.fuse.remote(unit, force, started)] = (actor, unit)

        for a in actors:
            hand(a)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, unit = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # died RETRIES + 1 times: this worker is gone for good
                res = Result(unit.key, unit.label, unit.session, "failed",
                             f"its worker died {RETRIES + 1} times ({type(e).__name__})")
                actors.remove(actor)
                if not actors:
                    for u in todo:
                        record(Result(u.key, u.label, u.session, "failed", "every Ray worker died"))
                    todo.clear()
            except ray.exceptions.RayError as e:
                res = Result(unit.key, unit.label, unit.session, "failed",
                             f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            else:
                hand(actor)
            record(res)
    finally:
        for a in actors:
            ray.kill(a)
        marker.unlink(missing_ok=True)
        ray.shutdown()
    return results


__all__ = ["run_on_ray", "check_address", "connect", "plan_workers", "CohortWorker", "RETRIES"]
