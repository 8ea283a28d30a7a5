"""The bf16 operand-layout measurement behind `moelab.core.machine.bf16_emulation_note` and tests/test_bf16_layout.py:
C = A @ B, A [M, K], B [K, N] (M=512 tokens, K=512 in, N=1024 out), one thread: the operand layouts, bf16 and fp32,
with oneDNN on (this machine's bf16 path) and off (the cpublas fallback an AVX2-only CPU takes)."""
import sys, time, torch
torch.set_num_threads(1)
M, K, N = 512, 512, 1024
g = torch.Generator().manual_seed(0)

def layouts(dtype):
    A = torch.randn(M, K, generator=g).to(dtype)
    At = torch.randn(K, M, generator=g).to(dtype).t()        # A column-major (stride (1, M))
    B = torch.randn(K, N, generator=g).to(dtype)              # row-major [in, out]: stride (N, 1)
    Bt = torch.randn(N, K, generator=g).to(dtype).t()         # nn.Linear: W [out, in] contiguous, handed as W.t()
    return {"A row, B=[in,out] contiguous": (A, B), "A row, B=W.t() (nn.Linear)": (A, Bt),
            "A=X.t(), B=[in,out] contiguous": (At, B), "A=X.t(), B=W.t()": (At, Bt)}

def gflops(a, b, min_time=0.3):
    torch.mm(a, b)
    n, t0 = 0, time.process_time()
    while (dt := time.process_time() - t0) < min_time or n < 2:
        torch.mm(a, b); n += 1
    return 2 * M * K * N * n / dt / 1e9

for mkldnn in (True, False):
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        for dtype in (torch.float32, torch.bfloat16):
            for name, (a, b) in layouts(dtype).items():
                print(f"mkldnn={'on ' if mkldnn else 'off'} {str(dtype)[6:]:8s} {name:34s} {gflops(a, b):7.2f} GFLOP/s", flush=True)
