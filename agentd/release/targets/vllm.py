"""`vllm` target: an OpenAI-compatible vLLM server that loads LoRA adapters at runtime.

Routes (vllm/entrypoints/openai/api_server.py, serving_models.py `OpenAIServingModels`):
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}`
  exist only when the server runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (else 404); loading a name
  that is loaded answers 400 ("... has already been loaded"), and a same-name reload could serve stale
  prefix-cache entries (vllm #42125), so each version is loaded under its own immutable name;
- `GET /v1/models` lists the base model and every adapter as {id: lora_name, root: lora_path, parent};
- an adapter whose rank exceeds the server's --max-lora-rank is refused with 400 (PEFTHelper.validate_legal),
  and `lm_head` in modules_to_save is not servable: both are checked here before anything is copied;
- unloading does not free an adapter inside the engine (#54839): versions beyond `keep` are unloaded so the
  server stops offering them, and their files stay for a rollback.
"""
from __future__ import annotations

import re

from agentd.release import ReleaseError
from agentd.release.targets.http import Server


class Vllm(Server):
    def check(self, rel):
        if rel.get("family") != "causal_lm" or not rel.get("is_folder"):
            raise ReleaseError(f"target {self.name} (vLLM) serves PEFT adapters of causal language models; "
                               f"{rel['name']} is a {rel.get('family')} LoRA: release it to an image server (--to)",
                               "bad_request")
        cap = self.settings.max_lora_rank
        if cap is not None and (rel.get("lora_rank") or 0) > cap:
            raise ReleaseError(f"target {self.name}: {rel['name']} has rank {rel['lora_rank']}, above the server's "
                               f"--max-lora-rank {cap}: restart vLLM with --max-lora-rank {rel['lora_rank']} (and "
                               f"release.targets.{self.name}.max_lora_rank), or train with lora_rank <= {cap}",
                               "bad_request")
        if "lm_head" in (rel.get("modules_to_save") or []):
            raise ReleaseError(f"target {self.name}: {rel['name']} trains lm_head (modules_to_save), which vLLM "
                               "cannot serve from an adapter: train without it", "bad_request")

    def _lora_path(self, rel) -> str:
        return str(self.lora_dir / rel["artifact"])

    def activate(self, rel):
        status, payload = self.call("POST", "/v1/load_lora_adapter",
                                    {"lora_name": rel["artifact"], "lora_path": self._lora_path(rel)},
                                    ok=(200, 400, 404))
        if status == 404:
            raise ReleaseError(f"target {self.name}: POST /v1/load_lora_adapter answered 404: start vLLM with "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (and --enable-lora) to load adapters at runtime")
        if status == 400 and "already been loaded" not in str(payload):
            from agentd.release.targets.http import _detail

            raise ReleaseError(f"target {self.name}: vLLM refused {rel['artifact']}: {_detail(payload)}")
        self.require_listed(rel)
        if self.settings.canary_prompt:
            _, out = self.call("POST", "/v1/completions", {"model": rel["artifact"], "max_tokens": 8, "temperature": 0,
                                                           "prompt": self.settings.canary_prompt})
            if not (isinstance(out, dict) and out.get("choices")):
                raise ReleaseError(f"target {self.name}: the canary completion with {rel['artifact']} returned no "
                                   "choices: check the server's log")
        self._retire(rel)

    def _models(self) -> list[dict]:
        _, payload = self.call("GET", "/v1/models")
        return [m for m in (payload or {}).get("data", []) if isinstance(m, dict)]

    def _listed(self, rel) -> str | None:
        for m in self._models():
            if m.get("id") == rel["artifact"]:
                if m.get("root") != self._lora_path(rel):
                    return (f"{self.name}: GET /v1/models shows {rel['artifact']} with root {m.get('root')}, not "
                            f"{self._lora_path(rel)}")
                return None
        return f"{self.name}: GET /v1/models does not list {rel['artifact']}"

    def _retire(self, live: dict) -> None:
        """Unload this name's loaded versions beyond `keep` (the live one always stays)."""
        pattern = re.compile(rf"^{re.escape(live['name'])}-v(\d+)-[0-9a-f]{{12}}$")
        loaded = sorted(((int(m.group(1)), mid) for mid in (x.get("id") for x in self._models())
                         if (m := pattern.match(str(mid)))), reverse=True)
        others = [mid for _, mid in loaded if mid != live["artifact"]]
        for mid in others[self.settings.keep - 1:]:
            self.call("POST", "/v1/unload_lora_adapter", {"lora_name": mid}, ok=(200, 404))

    def remove(self, rel):
        try:
            self.call("POST", "/v1/unload_lora_adapter", {"lora_name": rel["artifact"]}, ok=(200, 404))
        except ReleaseError:
            pass  # unreachable: its copy goes below, and a restarted server does not have it
        self.remove_copy(rel)


def make(name, settings, secret):
    return Vllm(name, settings, secret, auth="bearer")
