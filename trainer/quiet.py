"""Keep the libraries' own chatter (progress bars, advisory warnings) out of the Jenkins console.

Our console shows one line per event; diffusers/transformers progress bars and deprecation notices
would bury it. Errors still surface as exceptions.
"""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers\..*")
    warnings.filterwarnings("ignore", message=r".*requires torchvision.*")
    # bitsandbytes (imported by peft when installed) warns on CPU-only machines about optional kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
