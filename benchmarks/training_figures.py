"""The training issue's figures: held-out max/mean load after the seeded balancing recipes (none, switch, bias) and
NMI(expert, topic) before and after `specialisation_run`. Prints; writes nothing.

    .venv/bin/python benchmarks/training_figures.py
"""

import torch, time
torch.set_num_threads(1)
from moelab.training import balancing_run, specialisation_run, specialisation_matrix, normalized_mutual_information
t=time.time()
for m in ("none","switch","bias"):
    r=balancing_run(m)
    print(m, "pairs", r.after.num_pairs, "before", [round(x,2) for x in r.before.max_mean_load()], "after", [round(x,2) for x in r.after.max_mean_load()],
          "busiest", [int(r.after.tokens_per_expert(l).argmax()) for l in range(2)])
run=specialisation_run()
for l in range(2):
    b=normalized_mutual_information(specialisation_matrix(run.before.top_k_index[l], run.before.topics,4,4,run.before.dropped[l]))
    a=normalized_mutual_information(specialisation_matrix(run.after.top_k_index[l], run.after.topics,4,4,run.after.dropped[l]))
    print("layer",l,"NMI init %.3f after %.3f"%(b,a))
print("s", time.time()-t)
