"""A release target's secret: from a systemd credential ($CREDENTIALS_DIRECTORY/NAME, `LoadCredential=` in
the unit, as the Jenkins token) or a file only the daemon may read. Read once at daemon start; an unreadable
one stops the daemon with exit 78 naming the field. The value lives in a `Secret` (shown as ***)."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from agentd.jenkins.settings import Secret, TokenError, _read_token_file


class CredentialError(Exception):
    """The message names the target's field and path, never the secret."""


def read_credential(target: str, settings, environ: Optional[Mapping[str, str]] = None) -> Optional[Secret]:
    env = os.environ if environ is None else environ
    where = f"release.targets.{target}"
    try:
        if settings.credential_file is not None:
            text = _read_token_file(settings.credential_file, f"{where}.credential_file")
        elif settings.credential is not None:
            folder = env.get("CREDENTIALS_DIRECTORY")
            if not folder:
                raise CredentialError(f"{where}.credential {settings.credential}: $CREDENTIALS_DIRECTORY is not "
                                      f"set: run agentd under systemd with LoadCredential={settings.credential}:"
                                      "/path/to/secret, or use credential_file")
            from pathlib import Path

            text = _read_token_file(Path(folder) / settings.credential, f"{where}.credential")
        else:
            return None
    except TokenError as e:
        raise CredentialError(str(e)) from None
    lines = text.strip().splitlines()
    value = lines[0].strip() if lines else ""
    if not value:
        raise CredentialError(f"{where}: the credential is empty: put the secret on its first line")
    return Secret(value)
