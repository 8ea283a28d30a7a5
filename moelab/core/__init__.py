"""moelab.core: what every other package stands on. Imports torch only, never another moelab package.

- `config`: `MoEConfig` (the sizes and choices of one layer) and the argument checks every config uses;
- `activations`: the gate activations by their transformers names;
- `registry`: `ExpertsInterface`, the one registry of experts backends (filled by `moelab.backends`);
- `steps`: `record_step`, the hook a backend calls to show a step (a no-op unless `moelab.inspect` listens);
- `stage`: the generation-stage channel (`prefill`, `decode n`) and `stage_label`, its one vocabulary;
- `dtypes`: dtype names to `torch.dtype`; `machine`: the CPU this runs on.

Dimension letters, declared here once and used in every shape comment, memory formula and notebook:

    T  tokens in one MoE call         S  (token, expert) pairs, S = T * k
    E  experts                        k  experts per token (top_k)
    H  hidden size (a token's width)  I  intermediate size (one expert's inner width)
    B  batch                          N  new positions in one model forward (T = B * N)
    L  positions seen so far (past + N, with a KV cache)
    V  vocabulary size                nh attention heads, hd = H / nh the head dim
    P  prompt length (generation)     Q  image patches (the vision backbone)
"""
