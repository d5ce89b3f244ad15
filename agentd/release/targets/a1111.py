"""`a1111` target (AUTOMATIC1111 stable-diffusion-webui, and Forge, which keeps the same Lora API).

Its built-in Lora extension (extensions-builtin/Lora/scripts/lora_script.py, `api_networks`) serves
`POST /sdapi/v1/refresh-loras` (re-scan the LoRA folder) and `GET /sdapi/v1/loras` (a list of
{name, alias, path, metadata}; name is the file name without its extension). The webui caches a loaded
LoRA by name and skips re-patching a name it already has, so a new version under an old name would not be
picked up: each version gets its own immutable name, and is checked in the listing after the refresh.
The credential is `user:password` of the webui's --api-auth (HTTP basic).
"""
from __future__ import annotations

from agentd.release import ReleaseError
from agentd.release.targets.http import Server


class A1111(Server):
    def check(self, rel):
        self.check_safetensors_lora(rel)

    def activate(self, rel):
        self.call("POST", "/sdapi/v1/refresh-loras")
        self.require_listed(rel)

    def remove(self, rel):
        self.remove_copy(rel)
        try:
            self.call("POST", "/sdapi/v1/refresh-loras")
        except ReleaseError:
            pass  # the file is gone; the listing catches up at the server's next refresh

    def _listed(self, rel) -> str | None:
        stem = rel["artifact"].removesuffix(".safetensors")
        _, loras = self.call("GET", "/sdapi/v1/loras")
        if not any(isinstance(x, dict) and x.get("name") == stem for x in loras or []):
            return (f"{self.name}: GET /sdapi/v1/loras does not list {stem} after a refresh: check that the "
                    f"webui's --lora-dir is {self.lora_dir} (release.targets.{self.name}.lora_dir)")
        return None


def make(name, settings, secret):
    return A1111(name, settings, secret, auth="basic")
