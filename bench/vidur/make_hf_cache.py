"""Install local profile CSVs into vidur's HF-hub cache layout so that
snapshot_download(..., HF_HUB_OFFLINE=1) resolves them without network.
usage: make_hf_cache.py <vidur_cache_dir> <compute_src_dir> <compute_repo_id> <network_repo_id> <model> <device> <network_device>"""
import sys, os, json, shutil, pandas as pd
cache, src, crepo, nrepo, model, dev, ndev = sys.argv[1:8]
REV = "0" * 40
def snap(sub, repo):
    root = f"{cache}/profiling_data/{sub}/datasets--{repo.replace('/', '--')}"
    os.makedirs(f"{root}/refs", exist_ok=True)
    open(f"{root}/refs/main", "w").write(REV)
    d = f"{root}/snapshots/{REV}"; os.makedirs(d, exist_ok=True); return d
d = snap("compute", crepo)
json.dump({"model": model, "device_sku": dev}, open(f"{d}/config.json", "w"))
for f in ["mlp", "attention"]:
    pd.read_csv(f"{src}/{f}.csv").to_csv(f"{d}/{f}.csv.xz", index=False, compression="xz")
d = snap("network", nrepo)
json.dump({"sku": ndev}, open(f"{d}/config.json", "w"))
# TP=1, PP=1 runs never read the network CSVs; write header-only placeholders.
for f, cols in [("all_reduce", "size,num_workers,devices_per_node,collective,time_stats.all_reduce.median"),
                ("send_recv", "size,num_workers,devices_per_node,collective,time_stats.send_recv.median")]:
    pd.DataFrame(columns=cols.split(",")).to_csv(f"{d}/{f}.csv.xz", index=False, compression="xz")
print("installed into", cache)
