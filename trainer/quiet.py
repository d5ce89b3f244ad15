"""Keep the libraries' own chatter (progress bars, advisory warnings) out of the Jenkins console: the one
place where third-party noise is filtered.

Our console shows one line per event; diffusers/transformers progress bars, import-time notices about
optional backends we do not use, and deprecation notices of the libraries we pin would bury it (and read
to a newcomer as "something is broken"). What is filtered, and why each is noise here:

- transformers: "`SiglipImageProcessor` requires torchvision (not installed); falling back to ..." and
  the same for CLIP (diffusers imports every pipeline's image processor; we never use them) and its
  advisory warnings: TRANSFORMERS_VERBOSITY=error before the import, `set_verbosity_error` after it.
- diffusers: the same (DIFFUSERS_VERBOSITY=error), and its FutureWarnings about its own API.
- bitsandbytes (imported by `import peft`): on a CPU with AVX512-BF16 it tries to fetch a kernel from the
  Hub at import and logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." (or, offline,
  the `kernels` package's "Skipping publisher trust check ..."): loggers `bitsandbytes` and `kernels`
  at ERROR.
- FutureWarning/DeprecationWarning raised from inside the pinned libraries (torch, transformers,
  diffusers, peft, accelerate, bitsandbytes): nothing a user of agentd can act on.

Everything else still shows: errors of those libraries (ERROR level), other warnings, our own lines.
`quiet_third_party` (no imports; the CLIs call it first, so it holds before any library loads) sets the
environment, the warning filters and the logger levels; `quiet_libraries` adds the settings that need the
libraries imported (their verbosity and progress bars) and is called where they are.
"""
from __future__ import annotations

import logging
import os
import warnings

# Read by the libraries when they are imported, so set before they are (unless the user set them).
LIBRARY_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "DIFFUSERS_VERBOSITY": "error"}
PINNED = r"(torch|transformers|diffusers|peft|accelerate|bitsandbytes)(\..*)?"
QUIET_LOGGERS = ("bitsandbytes", "kernels")


def quiet_third_party() -> None:
    for name, value in LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=PINNED)
    warnings.filterwarnings("ignore", message=r".*requires torchvision.*")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    quiet_third_party()
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
