"""Same as `python -m vidur.main`, but reports setup vs. simulation-loop wall time."""
import json, os, resource, sys, time
t0 = time.perf_counter()
from vidur.config import SimulationConfig
from vidur.simulator import Simulator
from vidur.utils.random import set_seeds
t1 = time.perf_counter()
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
sim = Simulator(config)          # predictor load/train, request generation, event queue init
t2 = time.perf_counter()
n_events = None
if os.environ.get("VIDUR_COUNT_EVENTS"):   # count events popped by the main loop
    cnt = [0]; _st = sim._set_time
    def _set_time(t):
        cnt[0] += 1; _st(t)
    sim._set_time = _set_time
sim.run()                        # event loop + (disabled) metrics output
t3 = time.perf_counter()
if os.environ.get("VIDUR_COUNT_EVENTS"):
    n_events = cnt[0]
n = config.request_generator_config.num_requests
print("VIDUR_TIMING " + json.dumps(dict(
    num_requests=n, num_replicas=config.cluster_config.num_replicas,
    import_s=round(t1 - t0, 3), setup_s=round(t2 - t1, 3), run_s=round(t3 - t2, 3),
    total_s=round(t3 - t0, 3), sim_time_s=round(sim._time, 3), events=n_events,
    req_per_wall_s_run=round(n / (t3 - t2), 1), req_per_wall_s_total=round(n / (t3 - t0), 1),
    maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))), flush=True)
