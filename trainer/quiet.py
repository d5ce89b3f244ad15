"""Keep the libraries' own chatter (progress bars, advisory warnings) out of the Jenkins console.

Our console shows one line per event; diffusers/transformers progress bars and deprecation notices
would bury it. Errors still surface as exceptions.
"""
from __future__ import annotations

import logging
import os
import warnings


# Read by the libraries when they are imported, so set before they are (unless the user set them).
LIBRARY_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "DIFFUSERS_VERBOSITY": "error"}


def quiet_libraries() -> None:
    for name, value in LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers\..*")
    warnings.filterwarnings("ignore", message=r".*requires torchvision.*")
    # bitsandbytes (imported by peft when installed) warns on CPU-only machines about optional kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
