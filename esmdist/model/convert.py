"""Weights in and out of esmdist: fair-esm (modules and published `.pt` files) and Hugging Face
`EsmForMaskedLM` directories.

esmdist's parameter names are fair-esm's, minus the tied `lm_head.weight` and the rotary
`inv_freq` buffers (both derived, so not stored). Hugging Face uses its own names; the map is
built per layer below. Published files are read with `torch.load(weights_only=True)`: the only
non-tensor object those files hold is `argparse.Namespace` (their training arguments), so that is
the only class allowed — a file that needs anything else is refused, never executed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esmdist import alphabet
from esmdist.model.config import ModelConfig

StateDict = dict[str, Tensor]

_DERIVED_FAIR_ESM_KEYS = re.compile(r"(^lm_head\.weight$|\.rot_emb\.inv_freq$)")


# ----------------------------------------------------------------------------- fair-esm


def from_fair_esm_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """fair-esm `ESM2` / `ProteinBertModel` (ESM-1b) state dict → esmdist state dict."""
    return {k: v for k, v in state_dict.items() if not _DERIVED_FAIR_ESM_KEYS.search(k)}


def config_from_fair_esm_module(module: torch.nn.Module) -> ModelConfig:
    """The ModelConfig of an instantiated fair-esm model (ESM2 or ESM-1b ProteinBertModel)."""
    kind = type(module).__name__
    if kind == "ESM2":
        return ModelConfig(
            arch="esm2",
            num_layers=module.num_layers,
            embed_dim=module.embed_dim,
            attention_heads=module.attention_heads,
            token_dropout=module.token_dropout,
        )
    if kind == "ProteinBertModel" and module.model_version == "ESM-1b":
        return _esm1b_config(vars(module.args))
    raise ValueError(f"unsupported fair-esm model class {kind}: expected ESM2 or ESM-1b")


def _esm1b_config(args: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(
        arch="esm1b",
        num_layers=args["layers"],
        embed_dim=args["embed_dim"],
        attention_heads=args["attention_heads"],
        ffn_embed_dim=args["ffn_embed_dim"],
        token_dropout=bool(args.get("token_dropout", False)),
        max_positions=args["max_positions"],
    )


def to_fair_esm_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> StateDict:
    """esmdist state dict → what fair-esm's `ESM2` / `ProteinBertModel` `load_state_dict` takes."""
    out = dict(state_dict)
    out["lm_head.weight"] = state_dict["embed_tokens.weight"]
    if config.arch == "esm2":
        d = config.head_dim
        inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, d, 2).float() / d))
        for i in range(config.num_layers):
            out[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv_freq
    return out


def weights_only_refusal(exc: Exception) -> str:
    """The line of torch's weights-only error that names what the pickle asked for."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0]


def load_fair_esm_layout(path: Path) -> dict[str, Any]:
    """A fair-esm `.pt` file's dict (a `model` mapping of named tensors, and its `cfg` or
    `args`), read weights-only: anything else pickled is refused, naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as file:
        start = file.read(4)
    if start[:4] != b"PK\x03\x04" and start[:1] != b"\x80":  # torch.save's zip, or a pickle
        raise ValueError(f"{path}: not a readable torch checkpoint (starts with {start!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to load — it holds pickled objects other than tensors and "
            f"argparse.Namespace, and loading those could run arbitrary code "
            f"({weights_only_refusal(exc)})"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), Mapping):
        raise ValueError(f"{path}: not a fair-esm checkpoint (no 'model' state dict)")
    bad = [
        k for k, v in data["model"].items() if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if bad:
        raise ValueError(f"{path}: its 'model' holds {bad[0]!r}, not a named tensor")
    return data


def _field(obj: Any, name: str, path: Path) -> Any:
    value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    if value is None:
        raise ValueError(f"{path}: fair-esm config has no '{name}'")
    return value


def _strip_prefixes(state: Mapping[str, Tensor]) -> StateDict:
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    return {prefix.sub("", k): v for k, v in state.items()}


def load_fair_esm_checkpoint(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read a published fair-esm checkpoint (`esm2_t6_8M_UR50D.pt`, `esm1b_t33_650M_UR50S.pt`)
    and its `-contact-regression.pt` companion when it sits beside it.

    Returns the esmdist config and state dict. Without the companion (ESM-1v's files are
    published so) the contact regression is zero — predicted contacts are then meaningless, as
    fair-esm warns, until `esmdist eval contacts-fit` fits one — and everything else loads.
    """
    path = Path(path)
    data = load_fair_esm_layout(path)
    state = dict(data["model"])
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    has_regression = regression_path.exists()
    if has_regression:
        state.update(load_fair_esm_layout(regression_path)["model"])
    try:
        config, state = _fair_esm_architecture(data, state, path)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        raise ValueError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
    if not has_regression:
        heads = config.num_layers * config.attention_heads
        state["contact_head.regression.weight"] = torch.zeros(1, heads)
        state["contact_head.regression.bias"] = torch.zeros(1)
    config.check_shapes({k: tuple(v.shape) for k, v in state.items()}, str(path))
    return config, state


def _fair_esm_architecture(data: dict, state: StateDict,
                           path: Path) -> tuple[ModelConfig, StateDict]:  # fmt: skip
    """The config (cfg: ESM-2; args: ESM-1b) and esmdist's names of a fair-esm file's state."""
    if "cfg" in data:  # ESM-2: fairseq-style cfg with the model arguments under "model"
        cfg = _field(data["cfg"], "model", path)
        config = ModelConfig(
            arch="esm2",
            num_layers=_field(cfg, "encoder_layers", path),
            embed_dim=_field(cfg, "encoder_embed_dim", path),
            attention_heads=_field(cfg, "encoder_attention_heads", path),
            token_dropout=bool(_field(cfg, "token_dropout", path)),
        )
        state = _strip_prefixes(state)
    elif "args" in data:  # ESM-1 family: training arguments as an argparse.Namespace
        args = vars(data["args"]) if isinstance(data["args"], argparse.Namespace) else data["args"]
        if not isinstance(args, Mapping):
            raise ValueError(f"{path}: its 'args' are neither a Namespace nor a mapping")
        if args.get("arch") != "roberta_large":
            raise ValueError(
                f"{path}: architecture {args.get('arch')!r} is not supported; esmdist reads "
                "ESM-2 and ESM-1b ('roberta_large') checkpoints"
            )
        args = {re.sub(r"^encoder_", "", str(k)): v for k, v in args.items()}
        try:
            config = _esm1b_config(args)
        except KeyError as exc:
            raise ValueError(f"{path}: fair-esm args have no {exc.args[0]!r}") from None
        state = _strip_prefixes(state)
        if not any(k.startswith("emb_layer_norm_before") for k in state):
            raise ValueError(f"{path}: ESM-1b checkpoint without emb_layer_norm_before")
        # fair-esm zeroes the <mask> embedding on load: token dropout treats <mask> as dropped.
        if "embed_tokens.weight" in state:
            state["embed_tokens.weight"] = state["embed_tokens.weight"].clone()
            state["embed_tokens.weight"][alphabet.MASK].zero_()
    else:
        raise ValueError(f"{path}: not a fair-esm checkpoint (neither 'cfg' nor 'args')")
    return config, from_fair_esm_state_dict(state)


def _fairseq_names(state: Mapping[str, Tensor]) -> StateDict:
    """Published files keep fairseq's module paths: the LM head under `encoder.`, the rest
    under `encoder.sentence_encoder.`."""
    return {
        (f"encoder.{k}" if k.startswith("lm_head") else f"encoder.sentence_encoder.{k}"): v
        for k, v in state.items()
    }


def save_fair_esm_checkpoint(
    state_dict: Mapping[str, Tensor], config: ModelConfig, path: str | Path
) -> None:
    """Write `path` (+ `-contact-regression.pt`) in the published layout, loadable by
    `esm.pretrained.load_model_and_alphabet_local`. Name ESM-2 files `esm2_*.pt`: fair-esm
    picks the format from the file name."""
    path = Path(path)
    # fair-esm reads a file as ESM-2 exactly when its name starts with "esm2": any other name
    # loads, and then fails in fair-esm (KeyError: 'args').
    if (config.arch == "esm2") != path.name.startswith("esm2"):
        wanted = ("start with esm2 (e.g. esm2_t6_8M_mine.pt)" if config.arch == "esm2"
                  else "not start with esm2 (e.g. esm1b_t33_650M_mine.pt)")  # fmt: skip
        raise ValueError(f"{path}: fair-esm picks the format from the file name; the name of "
                         f"an {config.arch} file must {wanted}")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    full = to_fair_esm_state_dict(state_dict, config)
    regression = {k: full.pop(k) for k in list(full) if k.startswith("contact_head.")}
    if config.arch == "esm2":
        cfg = argparse.Namespace(
            encoder_layers=config.num_layers,
            encoder_embed_dim=config.embed_dim,
            encoder_ffn_embed_dim=config.ffn_dim,
            encoder_attention_heads=config.attention_heads,
            token_dropout=config.token_dropout,
        )
        torch.save({"model": _fairseq_names(full), "cfg": {"model": cfg}}, path)
    else:
        args = argparse.Namespace(
            arch="roberta_large",
            layers=config.num_layers,
            embed_dim=config.embed_dim,
            ffn_embed_dim=config.ffn_dim,
            attention_heads=config.attention_heads,
            max_positions=config.max_positions,
            token_dropout=config.token_dropout,
        )
        torch.save({"model": _fairseq_names(full), "args": args}, path)
    torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))


# ----------------------------------------------------------------------- Hugging Face

_HF_LAYER = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
_HF_TOP = {
    "embed_tokens": "esm.embeddings.word_embeddings",
    "embed_positions": "esm.embeddings.position_embeddings",
    "emb_layer_norm_before": "esm.embeddings.layer_norm",
    "emb_layer_norm_after": "esm.encoder.emb_layer_norm_after",
    "contact_head.regression": "esm.contact_head.regression",
    "lm_head.dense": "lm_head.dense",
    "lm_head.layer_norm": "lm_head.layer_norm",
    "lm_head": "lm_head",
}


def _hf_name(name: str) -> str:
    layer = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if layer:
        index, module, kind = layer.groups()
        return f"esm.encoder.layer.{index}.{_HF_LAYER[module]}.{kind}"
    module, kind = name.rsplit(".", 1)
    return f"{_HF_TOP[module]}.{kind}"


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` of the equivalent `EsmForMaskedLM`."""
    return {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.attention_heads,
        "intermediate_size": config.ffn_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": config.max_positions + alphabet.PAD + 1,
        "position_embedding_type": "rotary" if config.arch == "esm2" else "absolute",
        "emb_layer_norm_before": config.arch == "esm1b",
        "token_dropout": config.token_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": alphabet.PAD,
        "mask_token_id": alphabet.MASK,
        "initializer_range": 0.02,
        "is_folding_model": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> StateDict:
    out = {_hf_name(k): v for k, v in state_dict.items()}
    if config.arch == "esm2":
        d = config.head_dim
        out["esm.rotary_embeddings.inv_freq"] = 1.0 / (
            config.rotary_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        )
    return out


def save_hf(state_dict: Mapping[str, Tensor], config: ModelConfig, out_dir: str | Path) -> Path:
    """Write an `EsmForMaskedLM` directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state_dict(state_dict, config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    (out / "vocab.txt").write_text("\n".join(alphabet.TOKENS) + "\n")
    tokenizer = {
        "tokenizer_class": "EsmTokenizer",
        "model_max_length": config.max_positions,
        "cls_token": "<cls>", "pad_token": "<pad>", "eos_token": "<eos>",
        "unk_token": "<unk>", "mask_token": "<mask>",
    }  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
    return out


def _hf_architecture(config_file: Path) -> ModelConfig:
    """The architecture a Hugging Face config.json describes, every value checked."""
    try:
        hf = json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    kind = hf.get("position_embedding_type", "absolute")
    if kind not in ("rotary", "absolute"):
        raise ValueError(f"{config_file}: position_embedding_type {kind!r} is not supported")
    try:
        positions = hf["max_position_embeddings"]
        if not isinstance(positions, int) or isinstance(positions, bool):
            raise ValueError(f"max_position_embeddings must be an integer, got {positions!r}")
        return ModelConfig(
            arch="esm2" if kind == "rotary" else "esm1b",
            num_layers=hf["num_hidden_layers"],
            embed_dim=hf["hidden_size"],
            attention_heads=hf["num_attention_heads"],
            ffn_embed_dim=hf["intermediate_size"],
            token_dropout=hf.get("token_dropout", False),
            max_positions=positions - alphabet.PAD - 1,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            vocab_size=hf.get("vocab_size", alphabet.VOCAB_SIZE),
        )
    except KeyError as exc:
        raise ValueError(f"{config_file}: no {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{config_file}: {exc}") from None


def load_hf(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read an `EsmForMaskedLM` directory written by esmdist or by transformers: its config
    checked, then every tensor's shape in the safetensors header against the config's, and
    only then the tensors read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing from the Hugging Face model directory")
    config = _hf_architecture(config_file)
    reverse = {_hf_name(k): k for k in config.parameter_shapes()}
    try:
        with safe_open(weights_file, framework="pt") as opened:
            names = [k for k in opened.keys() if k in reverse]  # noqa: SIM118 (no __iter__)
            shapes = {reverse[k]: tuple(opened.get_slice(k).get_shape()) for k in names}
            config.check_shapes(shapes, f"{config_file} and {weights_file.name}")
            state = {reverse[k]: opened.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    return config, state
