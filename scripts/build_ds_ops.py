"""Build DeepSpeed's CPU ops once, during set-up, so no test or timed step pays for the JIT compile.

The ops are cached under TORCH_EXTENSIONS_DIR (the Makefile points it into .venv). On a CUDA machine
DeepSpeed builds its CUDA ops on first use instead.
"""

import time


def main() -> None:
    import torch

    if torch.cuda.is_available():
        print("build_ds_ops: CUDA present; DeepSpeed builds its CUDA ops on first use")
        return
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder

    # shm comm: DeepSpeed's CPU collectives; cpu_adam: optimizer offload.
    for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):
        t0 = time.time()
        builder.load(verbose=False)
        print(f"build_ds_ops: {builder.name} ready in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
