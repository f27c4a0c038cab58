"""Build DeepSpeed's ops once, during set-up, so no run, test or timed step pays for the JIT compile.

The ops are cached under TORCH_EXTENSIONS_DIR, by default <venv>/torch_extensions, where every rayft process
looks for them (jobs/zero.use_prebuilt_ops). CPU Adam (ZeRO optimizer offload) is built on every machine,
a GPU host included; the shm comm op (DeepSpeed's CPU collectives) where there is no CUDA. DeepSpeed's CUDA
ops (fused Adam, ...) are not used by rayft's configs.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from jobs.zero import use_prebuilt_ops

    use_prebuilt_ops()
    if torch.cuda.is_available():
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builders = [CPUAdamBuilder()]
    else:
        from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder

        builders = [ShareMemCommBuilder(), CPUAdamBuilder()]
    for builder in builders:
        t0 = time.time()
        try:
            builder.load(verbose=False)
        except Exception as e:  # e.g. no nvcc matching torch's CUDA: offload then builds (or fails) at first use
            print(f"build_ds_ops: {builder.name} not built ({type(e).__name__}: {e}); ZeRO offload will try again at its first use")
            continue
        print(f"build_ds_ops: {builder.name} ready in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
