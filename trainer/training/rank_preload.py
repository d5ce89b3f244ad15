"""Imported once by the forkserver that starts data-parallel ranks (`trainer.training.distributed`).

The whole training stack (torch, every family's diffusers/transformers/peft stack, matplotlib) is imported
here, in the forkserver, so each rank of each job is a fork of a process that already has it: ~10 s of CPU
per rank saved (`python -c 'from trainer.training.preload import preload_all; preload_all()'` on the 2-core
box), and on a daemon the forkserver lives as long as the daemon, so its W-device jobs after the first start
without any import. The forkserver never touches a GPU (importing torch does not create a CUDA context), so
forking it is safe for NCCL ranks too.
"""
from trainer.training.preload import preload_all

preload_all()
