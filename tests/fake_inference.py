"""Fake inference servers over real HTTP (127.0.0.1, a free port) for the release targets, in tests only.

None of these servers can run here (they need a GPU and gigabytes of weights), so each fake answers the
routes agentd calls the way the real server does, including the traps a naive publisher falls into.

**AUTOMATIC1111 / Forge** (stable-diffusion-webui, extensions-builtin/Lora/scripts/lora_script.py `api_networks`,
networks.py `list_available_networks`):
* `GET /sdapi/v1/loras` -> a list of `{"name", "alias", "path", "metadata"}` (name: the file name without
  extension) of what the last scan found; the folder is scanned at start and on `POST /sdapi/v1/refresh-loras`
  only, so a file copied in is not listed until a refresh;
* a LoRA is loaded once per name and kept (networks.py `load_networks` reuses a loaded network whose name
  matches and skips re-reading it): `use(name)` here returns the sha256 first loaded under that name, so a
  file overwritten under the same name keeps serving the old weights;
* `--api-auth user:password`: HTTP basic on every /sdapi route, 401 without or with wrong credentials
  (modules/api/api.py `auth`).

**ComfyUI** (app/model_manager.py `ModelFileManager.add_routes`, folder_paths.get_filename_list):
* `GET /models` -> the folder names; `GET /models/{folder}` -> the file names in it (a fresh scan: the list
  cache is invalidated by the folder's mtime), 404 for an unknown folder;
* LoraLoader keeps the last loaded state dict per path (nodes.py `LoraLoader.loaded_lora`): `use(path)` returns
  the sha256 first seen for it.
ComfyUI has no authentication; `token` emulates a reverse proxy that answers 401 without the bearer token.

**vLLM** (vllm/entrypoints/openai/api_server.py, serving_models.py `OpenAIServingModels`, lora/peft_helper.py):
* `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` exist only with
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (`runtime_updates=False`: 404);
* load `{"lora_name", "lora_path"}`: 400 "The lora adapter '{name}' has already been loaded." for a loaded
  name (same-name reloads are refused, #42125); 400 when the adapter's rank (adapter_config.json `r`) is above
  --max-lora-rank ("LoRA rank {r} is greater than max_lora_rank {max}"); 400 when lora_path has no
  adapter_config.json; 200 "Success: LoRA adapter '{name}' added successfully.";
* unload: 404 "The lora adapter '{name}' cannot be found." for an unknown name;
* `GET /v1/models` -> `{"object": "list", "data": [{"id": base}, {"id": lora_name, "root": lora_path,
  "parent": base}, ...]}`;
* `POST /v1/completions` with `model` = a loaded adapter: a completion (greedy text is deterministic);
* `--api-key`: 401 `{"error": "Unauthorized"}` without `Authorization: Bearer KEY`.

Every fake can be told to fail: `fail_status` (every request answers it), `delay_s` (each request waits).
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Fake:
    def __init__(self, lora_dir: Path):
        self.lora_dir = Path(lora_dir)
        self.fail_status: int | None = None
        self.delay_s = 0.0
        self.requests: list[tuple[str, str, dict | None]] = []
        self.auth_headers: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                fake.requests.append((method, self.path, body))
                fake.auth_headers.append(self.headers.get("Authorization") or "")
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if fake.fail_status:
                    status, payload = fake.fail_status, {"detail": "injected failure"}
                else:
                    status, payload = fake.route(method, self.path, body, self.headers.get("Authorization"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, method, path, body, auth):
        raise NotImplementedError


class FakeA1111(_Fake):
    def __init__(self, lora_dir: Path, api_auth: str | None = None):
        super().__init__(lora_dir)
        self.api_auth = api_auth
        self.available: dict[str, Path] = {}
        self.loaded: dict[str, str] = {}
        self._scan()

    def _scan(self):
        self.available = {p.stem: p for p in sorted(self.lora_dir.glob("*.safetensors"))}

    def use(self, name: str) -> str:
        """The weights a prompt with <lora:name:1> gets: loaded once per name, then reused."""
        if name not in self.loaded:
            self.loaded[name] = _sha(self.available[name])
        return self.loaded[name]

    def route(self, method, path, body, auth):
        if self.api_auth and auth != "Basic " + base64.b64encode(self.api_auth.encode()).decode():
            return 401, {"detail": "Incorrect username or password"}
        if method == "POST" and path == "/sdapi/v1/refresh-loras":
            self._scan()
            return 200, None
        if method == "GET" and path == "/sdapi/v1/loras":
            return 200, [{"name": n, "alias": n, "path": str(p), "metadata": {}} for n, p in self.available.items()]
        return 404, {"detail": "Not Found"}


class FakeComfyUI(_Fake):
    def __init__(self, lora_dir: Path, token: str | None = None):
        super().__init__(lora_dir)
        self.token = token
        self.loaded: dict[str, str] = {}

    def use(self, filename: str) -> str:
        path = self.lora_dir / filename
        self.loaded.setdefault(str(path), _sha(path))
        return self.loaded[str(path)]

    def route(self, method, path, body, auth):
        if self.token and auth != f"Bearer {self.token}":
            return 401, {"error": "Unauthorized"}
        if method == "GET" and path == "/models":
            return 200, ["checkpoints", "loras", "vae"]
        if method == "GET" and path.startswith("/models/"):
            if path != "/models/loras":
                return 404, None
            return 200, sorted(p.name for p in self.lora_dir.iterdir() if p.suffix == ".safetensors")
        return 404, None


class FakeVllm(_Fake):
    def __init__(self, lora_dir: Path, base: str = "tiny-lm", max_lora_rank: int = 16, api_key: str | None = None,
                 runtime_updates: bool = True):
        super().__init__(lora_dir)
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.api_key = api_key
        self.runtime_updates = runtime_updates
        self.adapters: dict[str, str] = {}

    def route(self, method, path, body, auth):
        if self.api_key and auth != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and not self.runtime_updates:
            return 404, {"detail": "Not Found"}
        if method == "POST" and path == "/v1/load_lora_adapter":
            name, lora_path = body.get("lora_name"), body.get("lora_path")
            if not name or not lora_path:
                return 400, {"object": "error", "message": "Both 'lora_name' and 'lora_path' must be provided.",
                             "type": "InvalidUserInput", "code": 400}
            if name in self.adapters:
                return 400, {"object": "error", "message": f"The lora adapter '{name}' has already been loaded.",
                             "type": "InvalidUserInput", "code": 400}
            cfg = Path(lora_path) / "adapter_config.json"
            if not cfg.is_file():
                return 400, {"object": "error", "message": f"No adapter found for {lora_path}",
                             "type": "NotFoundError", "code": 404}
            rank = json.loads(cfg.read_text()).get("r", 8)
            if rank > self.max_lora_rank:
                return 400, {"object": "error", "message": f"LoRA rank {rank} is greater than max_lora_rank "
                                                           f"{self.max_lora_rank}.", "type": "BadRequestError",
                             "code": 400}
            self.adapters[name] = lora_path
            return 200, f"Success: LoRA adapter '{name}' added successfully."
        if method == "POST" and path == "/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if name not in self.adapters:
                return 404, {"object": "error", "message": f"The lora adapter '{name}' cannot be found.",
                             "type": "NotFoundError", "code": 404}
            del self.adapters[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        if method == "GET" and path == "/v1/models":
            data = [{"id": self.base, "object": "model", "root": self.base, "parent": None}]
            data += [{"id": n, "object": "model", "root": p, "parent": self.base} for n, p in self.adapters.items()]
            return 200, {"object": "list", "data": data}
        if method == "POST" and path == "/v1/completions":
            if body.get("model") not in self.adapters and body.get("model") != self.base:
                return 404, {"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                             "type": "NotFoundError", "code": 404}
            return 200, {"object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}]}
        return 404, {"detail": "Not Found"}
