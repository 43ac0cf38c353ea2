"""What the Ray cluster offers and how a model pool asks for it: GPUs when there are any
(one actor per GPU), else one multi-threaded actor per CPU node, or a custom accelerator
resource; and how a pass whose output is kept whole asks Ray Data for the CPUs
(`whole_output_pass`).

May import: Ray, `leukray.errors`, `leukray.ops.allocator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leukray.errors import ClusterError, ConfigError
from leukray.ops import allocator


def ray_node_id() -> str:
    """The Ray node this code runs on (hex), or "" outside Ray; recorded per stage in summary.json."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - outside Ray
        return ""


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def whole_output_pass(ds: Any) -> Any:
    """`ds` (a pass of one CPU operator whose every output is kept: materialised, or
    gathered in the driver) with Ray Data's per-operator resource reservation off.

    Reservation (`DataContext.op_resource_reservation_enabled`) keeps one operator from
    starving the next and bounds each one's object-store share; a pass whose output is held
    whole has neither to protect, and with it on Ray Data 2.60 ran such a pass about one task
    at a time on 2 CPUs: the benchmark's preprocessing pass (`python -m leukray.bench --skip
    extract,sweep,train,e2e`) went from 0.87x to 1.41x the plain loop on 1,600 synthetic
    cells and from 1.33x to 1.75x on 6,400, with Ray Data's tasks busy at once 0.97 -> 1.51
    and 1.31 -> 1.81 (issue 9). Passes that stream into another operator (the streaming
    stage, predict, screen) keep it.
    """
    ds.context.op_resource_reservation_enabled = False
    return ds


def wants_gpu(use_gpu: str) -> bool:
    """`use_gpu` (auto | true | false) against the cluster: true without GPUs is an error."""
    gpus = cluster_gpus()
    if use_gpu == "true" and gpus == 0:
        raise ConfigError("use_gpu is true but the Ray cluster has no GPUs")
    return use_gpu == "true" or (use_gpu == "auto" and gpus > 0)


# A GPU actor asks Ray for no CPU slot: its host-side work (handing uint8 crops to the GPU,
# copying features back) is a small fraction of a core, and a 1-CPU request made it wait
# behind the preprocessing tasks, which take every CPU slot as soon as the stream starts:
# the stages then ran one after the other instead of overlapping (issue 9).
GPU_ACTOR_CPUS = 0.0


# Crops per trunk forward pass when extract.batch_size is 0 (auto): hundreds keep a GPU
# busy (one launch per batch, 256 x 150 KB of uint8 crops per copy); on a CPU a forward pass
# is long enough at tens that a larger batch only delays the first features (issue 9).
AUTO_BATCH_SIZE = {"gpu": 256, "cpu": 32}


def extract_batch_size(requested: int, on_gpu: bool) -> int:
    """The trunk's batch size: `requested`, or for 0 (auto) 256 on a GPU and 32 on a CPU."""
    if requested > 0:
        return requested
    return AUTO_BATCH_SIZE["gpu" if on_gpu else "cpu"]


@dataclass(frozen=True)
class PoolPlan:
    """How a model actor pool asks the cluster for resources (see `plan_pool`)."""

    on_gpu: bool
    min_size: int
    max_size: int
    resources: dict[str, Any]  # map_batches' num_cpus / num_gpus / resources per actor
    threads: int = 0  # torch threads per actor on a CPU; 0 = as many as its CPU slots (OMP_NUM_THREADS)


def plan_pool(
    use_gpu: str, actors: int, accelerator_resource: str, cluster: dict[str, float], node_cpus: tuple[float, ...] = ()
) -> PoolPlan:
    """The actor pool for `cluster` (Ray's `cluster_resources()`) and the CPUs of each of its
    nodes that has any (`node_cpus`; empty: one node holding them all): no Ray needed.

    Args:
        use_gpu: auto | true | false.
        actors: a fixed pool size (1-CPU, 1-thread actors); 0 = one per GPU, or on CPUs one
            actor per CPU node running a thread per core of its node (`cpu_pool`).
        accelerator_resource: a custom resource each actor takes one of (a fixed pool of
            as many as the cluster has), when the cluster has it.
    """
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    if accelerator_resource and cluster.get(accelerator_resource, 0) > 0:
        size = actors or max(1, int(cluster[accelerator_resource]))
        return PoolPlan(False, size, size, {"num_cpus": 1, "resources": {accelerator_resource: 1}})
    if use_gpu == "true" and gpus == 0:
        raise ConfigError("use_gpu is true but the Ray cluster has no GPUs")
    if use_gpu == "true" or (use_gpu == "auto" and gpus > 0):
        size = actors or max(1, int(gpus))
        return PoolPlan(True, size, size, {"num_gpus": 1, "num_cpus": GPU_ACTOR_CPUS})
    if actors:  # asked for: exactly that many
        return PoolPlan(False, actors, actors, {"num_cpus": 1})
    return cpu_pool(node_cpus or (cpus,))


def cpu_pool(node_cpus: tuple[float, ...]) -> PoolPlan:
    """CPU-only: up to one actor per node, running a torch thread per core of the smallest
    node and holding one CPU slot fewer than that, so on nodes of equal size one actor fits
    each and a slot stays free there for the stream's other tasks (a larger node may take
    two). A pool of 1-CPU, 1-thread actors that Ray Data was to scale up to one per CPU
    stayed at one actor (its resource budget keeps slots for the tasks after it), which left
    all but one core idle: on 2 cores `leukray extract` ran at 0.69 of the trunk's speed
    (issue 9). Preprocessing is fused into the actor, and on a CPU it is ~1 % of the trunk's
    time per image."""
    threads = max(1, int(min(node_cpus)))
    # from one actor up: a pool that had to start on every node would wait forever for a node
    # whose CPUs something else holds, or that died
    return PoolPlan(False, 1, len(node_cpus), {"num_cpus": max(1, threads - 1)}, threads)


def plan_actor_pool(use_gpu: str, actors: int, accelerator_resource: str = "") -> tuple[bool, Any, dict[str, Any], int]:
    """(on GPU, compute strategy, actor resources, torch threads per actor: 0 = its CPU
    slots) for a model actor pool, asked of the cluster (`plan_pool` on
    `ray.cluster_resources()` and the alive nodes' CPUs)."""
    import ray

    node_cpus = tuple(
        float(n["Resources"]["CPU"]) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0
    )
    plan = plan_pool(use_gpu, actors, accelerator_resource, ray.cluster_resources(), node_cpus)
    if plan.min_size == plan.max_size:
        pool = ray.data.ActorPoolStrategy(size=plan.min_size)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=plan.min_size, max_size=plan.max_size)
    return plan.on_gpu, pool, {**plan.resources, **torch_actor_env()}, plan.threads


def torch_actor_env() -> dict[str, Any]:
    """Ray remote options that start a torch actor's process with `allocator.worker_env`
    (merged into the job's own runtime environment, whose other fields it inherits); empty
    where the user set the allocator themselves. The map just before a torch actor pool gets
    the same options: Ray Data fuses a map into the actor after it only when their options
    are equal (on a CPU machine the decode/crop then runs inside the actor, and the crops
    never wait in the object store)."""
    env = allocator.worker_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Attach to `address`, else RAY_ADDRESS (a cluster, or inside `ray job submit`), else
    start a local Ray (of `num_cpus` CPUs when given).

    Raises:
        ClusterError: Ray cannot start or attach (one line naming the address).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # RAY_ADDRESS (set by `ray job submit`, or by the user) attaches to that cluster; without
    # it a new local Ray starts, rather than joining whatever `ray start` left on the machine.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if num_cpus is not None and target != "local":
        raise ConfigError(f"--num-cpus bounds a local Ray; the cluster at {target} decides its own CPUs")
    extra = {"num_cpus": num_cpus} if num_cpus is not None else {}
    try:
        # The dashboard stays on locally: Ray Train's controller queries the state API it serves.
        ray.init(address=target, log_to_driver=True, logging_level="WARNING", **extra)
    except (Exception, SystemExit) as exc:  # Ray exits the process on some attach failures
        where = "start a local Ray" if target == "local" else f"attach to the Ray cluster at {target}"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ClusterError(f"cannot {where}: {type(exc).__name__}: {first}") from None


# Ray's errors that mean the cluster, not the code, failed under a job.
CLUSTER_FAILURES = (
    "ActorUnavailableError",
    "GetTimeoutError",
    "LocalRayletDiedError",
    "NodeDiedError",
    "ObjectFetchTimedOutError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "ObjectStoreFullError",
    "OutOfDiskError",
    "OutOfMemoryError",
    "OwnerDiedError",
    "RaySystemError",
    "RuntimeEnvSetupError",
    "WorkerCrashedError",
    "AuthenticationError",
)


def cluster_failure(exc: BaseException) -> str | None:
    """A one-line description when `exc` is Ray reporting cluster trouble, else None (a
    bug in the code keeps its traceback)."""
    import sys

    if "ray" not in sys.modules:  # Ray never started: not its trouble
        return None
    names = {cls.__name__ for cls in type(exc).__mro__ if cls.__module__.startswith("ray")}
    if not names & set(CLUSTER_FAILURES):
        return None
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"the Ray cluster failed under the job: {type(exc).__name__}: {first}"
