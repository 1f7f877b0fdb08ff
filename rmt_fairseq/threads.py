"""How many intra-op threads torch uses in a process that runs a model of this plugin on the CPU.

torch's default is one thread per core of the machine. Beside another job on the same cores that collapses:
OpenMP threads spin-wait at every parallel region for a peer that is descheduled. Measured here
(benchmarks/threads.py -> benchmarks/results/threads.json; 2 cores, beside a process doing matrix products with
torch's default threads): with two threads instead of one, every size from rmt_tiny to 28M parameters trained
1.05-5x slower beside the busy job, rmt_tiny 2.5x; alone, a second thread's gain was small and varied between runs
on this shared machine (0.7-1.7x), largest from a few million parameters. So: one thread per process below
`MIN_PARAMETERS_FOR_MORE_THREADS`, and above it the CPUs this process may run on (its affinity, not the
machine's count) shared among the ranks on this host.

`OMP_NUM_THREADS` (or `MKL_NUM_THREADS`) in the environment is the user's choice and is kept, as torch keeps it.
With CUDA the model runs on the GPU and torch's default is kept. The choice is logged once per process.
"""

import logging
import os

logger = logging.getLogger(__name__)

# below this many parameters a second intra-op thread does not pay on this project's CPUs (benchmarks/threads.py)
MIN_PARAMETERS_FOR_MORE_THREADS = 2_000_000
OVERRIDES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask: a cgroup/taskset limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Processes of this job on this host: the launcher's LOCAL_WORLD_SIZE (torchrun, deepspeed), else 1 (fairseq's
    own CPU spawn sets it for its ranks: rmt_fairseq/distributed.py)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose(num_parameters: int, cpus: int, ranks: int = 1) -> int:
    """Intra-op threads for a CPU process of `num_parameters` parameters with `cpus` CPUs shared by `ranks`
    processes: 1 below MIN_PARAMETERS_FOR_MORE_THREADS, else cpus // ranks (at least 1)."""
    if num_parameters < MIN_PARAMETERS_FOR_MORE_THREADS:
        return 1
    return max(1, cpus // max(1, ranks))


_configured = False


def configure(model, cpu: bool = None) -> int:
    """Set torch's intra-op threads for a model about to run on the CPU (once per process; a later call, e.g.
    fairseq-train building a second model, keeps the first choice) and log it. cpu: whether the run is on the
    CPU (None: no CUDA device). Returns the thread count in use."""
    global _configured
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if _configured or not cpu:
        return torch.get_num_threads()
    _configured = True
    override = next((k for k in OVERRIDES if os.environ.get(k)), None)
    if override:
        logger.info("torch threads: %d per process (%s=%s)", torch.get_num_threads(), override,
                    os.environ[override])
        return torch.get_num_threads()
    n = sum(p.numel() for p in model.parameters())
    cpus, ranks = cpus_available(), local_ranks()
    threads = choose(n, cpus, ranks)
    torch.set_num_threads(threads)
    why = (f"a model of {n / 1e6:.2f}M parameters, below {MIN_PARAMETERS_FOR_MORE_THREADS / 1e6:g}M where a "
           f"second thread pays" if n < MIN_PARAMETERS_FOR_MORE_THREADS else
           f"{cpus} CPUs available / {ranks} rank(s) on this host")
    logger.info("torch threads: %d per process (%s; OMP_NUM_THREADS=N chooses)", threads, why)
    return threads
