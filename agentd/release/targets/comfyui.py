"""`comfyui` target.

ComfyUI lists a model folder at `GET /models/{folder}` (app/model_manager.py, ModelFileManager.add_routes:
`folder_paths.get_filename_list(folder)`, 404 for an unknown folder), so after the copy into its
models/loras folder `GET /models/loras` must list the file. Its LoraLoader node keeps the loaded state
dict per file path, so a changed file under an old name would keep serving the old weights: each version
has its own immutable name. ComfyUI has no authentication of its own; a credential is sent as a bearer
token for the reverse proxy in front of it.
"""
from __future__ import annotations

from agentd.release.targets.http import Server


class ComfyUI(Server):
    def check(self, rel):
        self.check_safetensors_lora(rel)

    def activate(self, rel):
        self.require_listed(rel)

    def remove(self, rel):
        self.remove_copy(rel)

    def _listed(self, rel) -> str | None:
        _, files = self.call("GET", "/models/loras")
        if rel["artifact"] not in (files or []):
            return (f"{self.name}: GET /models/loras does not list {rel['artifact']}: check that ComfyUI's loras "
                    f"folder is {self.lora_dir} (extra_model_paths.yaml; release.targets.{self.name}.lora_dir)")
        return None


def make(name, settings, secret):
    return ComfyUI(name, settings, secret, auth="bearer")
