"""PyTorch checkpoints (the authors' .pth, HuggingFace transformers) -> DeformableDETR.

Two steps, each a table of key patterns:
  1. HuggingFace names -> the authors' names (the inverse of the published
     renaming; q/k/v projections fused back into in_proj), so both layouts
     share one path from here on;
  2. the authors' names -> this package's module paths, with the tensor
     transforms (Linear weights transposed, conv weights OIHW -> HWIO, the
     fused attention in_proj split into q/k/v).
The variant (levels, refinement, two-stage, classes, depths, widths) is
inferred from the keys, and what they cannot tell (dilation, heads, points,
queries) from the 'args' of the authors' main.py checkpoints; a model config
that contradicts the checkpoint is refused with every mismatching key and
shape listed at once.

    python -m ddetr_jax.convert SRC.pth DEST_DIR [--dilation --num_queries 300 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import zipfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx, traverse_util

from ddetr_jax.models import DeformableDETR, ModelConfig
from ddetr_jax.models.backbone import FrozenStat

# The variables a checkpoint holds: parameters and frozen batch-norm terms
# (nnx.Param, FrozenStat); dropout RNG state is not part of it.
WEIGHTS = (nnx.Param, FrozenStat)
IGNORED = re.compile(r"(total_params|total_ops|num_batches_tracked)$")

# (pattern, replacement) applied in order to every HuggingFace key.
HF_TO_AUTHORS = [
    (r"^model\.backbone\.(?:conv_encoder\.)?model\.embedder\.embedder\.convolution\.",
     "backbone.0.body.conv1."),
    (r"^model\.backbone\.(?:conv_encoder\.)?model\.embedder\.embedder\.normalization\.",
     "backbone.0.body.bn1."),
    (r"^model\.backbone\.(?:conv_encoder\.)?model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}."),
    (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),  # timm = torchvision names
    (r"(backbone\.0\.body\.layer\d\.\d+\.)shortcut\.convolution\.", r"\1downsample.0."),
    (r"(backbone\.0\.body\.layer\d\.\d+\.)shortcut\.normalization\.", r"\1downsample.1."),
    (r"(backbone\.0\.body\.layer\d\.\d+\.)layer\.(\d)\.convolution\.",
     lambda m: f"{m[1]}conv{int(m[2]) + 1}."),
    (r"(backbone\.0\.body\.layer\d\.\d+\.)layer\.(\d)\.normalization\.",
     lambda m: f"{m[1]}bn{int(m[2]) + 1}."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(level_embed|reference_points|enc_output_norm|enc_output|pos_trans_norm|pos_trans)",
     r"transformer.\1"),
    (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
    (r"(encoder\.layers\.\d+\.)self_attn_layer_norm\.", r"\1norm1."),
    (r"(encoder\.layers\.\d+\.)final_layer_norm\.", r"\1norm2."),
    (r"(decoder\.layers\.\d+\.)encoder_attn_layer_norm\.", r"\1norm1."),
    (r"(decoder\.layers\.\d+\.)self_attn_layer_norm\.", r"\1norm2."),
    (r"(decoder\.layers\.\d+\.)final_layer_norm\.", r"\1norm3."),
    (r"(decoder\.layers\.\d+\.)encoder_attn\.", r"\1cross_attn."),
    (r"(coder\.layers\.\d+\.)(?:mlp\.)?fc([12])\.", r"\1linear\2."),
    (r"(decoder\.layers\.\d+\.self_attn\.)o_proj\.", r"\1out_proj."),
]

# (pattern over the authors' names, target path template, transform).
AUTHORS_TO_JAX = [
    (r"backbone\.0\.body\.conv1\.weight", "backbone.stem.conv.kernel", "conv"),
    (r"backbone\.0\.body\.bn1\.(\w+)", r"backbone.stem.bn.\1", None),
    (r"backbone\.0\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight",
     lambda m: f"backbone.layers.{int(m[1]) - 1}.{m[2]}.conv{m[3]}.conv.kernel", "conv"),
    (r"backbone\.0\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
     lambda m: f"backbone.layers.{int(m[1]) - 1}.{m[2]}.conv{m[3]}.bn.{m[4]}", None),
    (r"backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight",
     lambda m: f"backbone.layers.{int(m[1]) - 1}.{m[2]}.downsample.conv.kernel", "conv"),
    (r"backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
     lambda m: f"backbone.layers.{int(m[1]) - 1}.{m[2]}.downsample.bn.{m[3]}", None),
    (r"input_proj\.(\d+)\.0\.weight", r"input_proj.\1.conv.kernel", "conv"),
    (r"input_proj\.(\d+)\.0\.bias", r"input_proj.\1.conv.bias", None),
    (r"input_proj\.(\d+)\.1\.weight", r"input_proj.\1.norm.scale", None),
    (r"input_proj\.(\d+)\.1\.bias", r"input_proj.\1.norm.bias", None),
    (r"query_embed\.weight", "query_embed.embedding", None),
    (r"transformer\.level_embed", "level_embed", None),
    (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])\.(weight|bias)",
     r"\1.layers.\2.ffn.linear\3.\4", "linear"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     r"decoder.layers.\1.self_attn.in_proj.\2", "in_proj"),
    (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(norm\d)\.weight",
     r"\1.layers.\2.\3.scale", None),
    (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(norm\d)\.bias", r"\1.layers.\2.\3.bias",
     None),
    (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(\w+)\.(weight|bias)",
     r"\1.layers.\2.\3.\4.\5", "linear"),
    (r"transformer\.(reference_points|enc_output|pos_trans)\.(weight|bias)", r"\1.\2", "linear"),
    (r"transformer\.(enc_output_norm|pos_trans_norm)\.weight", r"\1.scale", None),
    (r"transformer\.(enc_output_norm|pos_trans_norm)\.bias", r"\1.bias", None),
    (r"class_embed\.(\d+)\.(weight|bias)", r"class_embed.\1.\2", "linear"),
    (r"bbox_embed\.(\d+)\.layers\.(\d)\.(weight|bias)", r"bbox_embed.\1.layers.\2.\3", "linear"),
]


# Per-layer module paths -> the model's stacked ones (models/stack.py): row i
# of 'encoder.layers.x' is 'encoder.layers.i.x'; the same for the decoder and,
# with box refinement, the per-layer heads.
PER_LAYER = re.compile(r"^((?:encoder|decoder)\.layers|class_embed|bbox_embed)\.(\d+)\.(.+)$")


def stack_layers(weights: Mapping[str, np.ndarray], problems: list[str]) -> dict:
    """{per-layer path: array} -> {stacked path: (layers, ...) array}; a layer
    missing in the middle or layers of different shapes are problems."""
    stacked, rows = {}, {}
    for path, value in weights.items():
        match = PER_LAYER.match(path)
        if match is None:
            stacked[path] = value
        else:
            rows.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = value
    for path, by_index in rows.items():
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        shapes = sorted({tuple(v.shape) for v in by_index.values()})
        if missing:
            problems.append(f"{path}: layers {missing} missing from the checkpoint")
        elif len(shapes) > 1:
            problems.append(f"{path}: its layers have different shapes {shapes}")
        else:
            stacked[path] = np.stack([by_index[i] for i in range(len(by_index))])
    return stacked


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the requested model; lists every problem."""


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'huggingface' or 'authors' from the key names."""
    if any(k.startswith("model.") for k in state_dict):
        return "huggingface"
    if any(k.startswith(("backbone.0.body.", "transformer.")) for k in state_dict):
        return "authors"
    raise CheckpointMismatch(
        "checkpoint: neither the authors' layout (backbone.0.body.*, transformer.*) nor "
        "HuggingFace DeformableDetrForObjectDetection (model.*); first keys: "
        f"{sorted(state_dict)[:5]}")


def to_authors_layout(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HuggingFace keys -> the authors' keys (q/k/v fused back into in_proj)."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        name = _rename(key, HF_TO_AUTHORS)
        match = re.fullmatch(r"(.*\.self_attn\.)([qkv])_proj\.(weight|bias)", name)
        if match and "decoder" in name:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            out[name] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(sd: Mapping[str, np.ndarray]) -> dict:
    """Model config values that the checkpoint's keys and shapes determine."""
    keys = list(sd)
    blocks = tuple(_count(keys, rf"backbone\.0\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in keys if k.startswith("backbone."))
    depths = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
              (3, 4, 23, 3, True): 101}
    inferred = {
        "num_feature_levels": _count(keys, r"input_proj\.(\d+)\."),
        "enc_layers": _count(keys, r"transformer\.encoder\.layers\.(\d+)\."),
        "dec_layers": _count(keys, r"transformer\.decoder\.layers\.(\d+)\."),
        "two_stage": "transformer.enc_output.weight" in sd,
        "with_box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in keys),
    }
    if (blocks + (bottleneck,)) in depths:
        inferred["backbone_depth"] = depths[blocks + (bottleneck,)]
    if "class_embed.0.weight" in sd:
        inferred["num_classes"] = int(sd["class_embed.0.weight"].shape[0])
    if "transformer.level_embed" in sd:
        inferred["dim"] = int(sd["transformer.level_embed"].shape[1])
    if "query_embed.weight" in sd:
        inferred["num_queries"] = int(sd["query_embed.weight"].shape[0])
    if "transformer.encoder.layers.0.linear1.weight" in sd:
        inferred["ffn_dim"] = int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0])
    return inferred


def _transform(kind, value: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)
    if kind in ("linear", "in_proj") and value.ndim == 2:
        return value.T  # (out, in) -> (in, out)
    return value


def to_jax_names(sd: Mapping[str, np.ndarray], config) -> tuple[dict, list[str], list[str]]:
    """Authors' keys -> ({module path: array}, unused keys, problems).

    Shared heads (no refinement) appear once per decoder layer in the authors'
    files, and refined heads twice (also under transformer.decoder.): every
    duplicate must equal the copy that is loaded, else it is a problem.
    """
    out, unused, problems = {}, [], []
    for key, value in sd.items():
        if IGNORED.search(key):
            continue
        original = _duplicated_key(key, config)
        if original is not None:
            if original not in sd or not np.array_equal(value, sd[original]):
                problems.append(f"{key}: differs from {original}, which it must duplicate")
            continue
        for pattern, repl, kind in AUTHORS_TO_JAX:
            match = re.fullmatch(pattern, key)
            if not match:
                continue
            path = match.expand(repl) if isinstance(repl, str) else repl(match)
            if not config.with_box_refine:
                path = re.sub(r"^(class_embed|bbox_embed)\.0\.", r"\1.", path)
            if kind == "in_proj":
                prefix = path.rsplit(".in_proj.", 1)[0]
                leaf = "kernel" if path.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3)):
                    out[f"{prefix}.{name}.{leaf}"] = _transform(kind, part)
            else:
                out[path.replace(".weight", ".kernel") if kind == "linear" else path] = (
                    _transform(kind, value))
            break
        else:
            unused.append(key)
    return out, unused, problems


def _duplicated_key(key: str, config) -> str | None:
    """The key that `key` must duplicate, or None if it holds weights of its own."""
    if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
        return key[len("transformer.decoder."):]
    match = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
    if match and not config.with_box_refine and match[2] != "0":
        return f"{match[1]}.0.{match[3]}"
    return None


# What the weights cannot tell (convert's flags, their help): taken from the
# authors' args, else from these flags or the caller's defaults, else ModelConfig's.
NOT_IN_WEIGHTS = {
    "dilation": "DC5 checkpoint (dilated last ResNet stage); default: off",
    "num_queries": "object queries of a two-stage checkpoint; default: 300",
    "heads": "attention heads; default: 8",
    "enc_points": "encoder sampling points; default: 4",
    "dec_points": "decoder sampling points; default: 4",
}

# The authors' main.py arguments (the 'args' Namespace of their checkpoints)
# -> ModelConfig fields; 'backbone' ("resnet50") gives backbone_depth.
AUTHORS_ARGS = {
    "dilation": "dilation", "nheads": "heads", "enc_n_points": "enc_points",
    "dec_n_points": "dec_points", "num_queries": "num_queries",
    "num_feature_levels": "num_feature_levels", "enc_layers": "enc_layers",
    "dec_layers": "dec_layers", "dim_feedforward": "ffn_dim", "hidden_dim": "dim",
    "dropout": "dropout", "with_box_refine": "with_box_refine", "two_stage": "two_stage",
}


def config_from_args(args: Mapping[str, Any]) -> dict:
    """ModelConfig values from the authors' main.py arguments (vars of the Namespace)."""
    config = {field: args[name] for name, field in AUTHORS_ARGS.items() if name in args}
    match = re.fullmatch(r"resnet(\d+)", str(args.get("backbone", "")))
    if match:
        config["backbone_depth"] = int(match[1])
    return config


def _torch_load_reason(err: Exception) -> str:
    """torch.load's error without its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not any(
        word in line for word in ("weights_only", "torch.load", "file an issue"))]
    return " ".join(kept) or type(err).__name__


def _written_by_torch_save(path: str) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or (the legacy
    format) a pickle, whose first byte is the protocol opcode 0x80."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """A .pth / .bin / .safetensors file -> ({key: numpy array}, the authors' args or None).

    .pth / .bin are read weights-only: tensors, plain containers and
    argparse.Namespace (the 'args' of the authors' main.py checkpoints); any
    other global is refused before it can run. A dict with 'model' is the
    authors' training checkpoint: its 'optimizer', 'lr_scheduler' and 'epoch'
    are ignored, its 'args' returned as a dict.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path)), None
    if not _written_by_torch_save(path):
        raise CheckpointMismatch(
            f"checkpoint: {path} is not a PyTorch weights file (torch.save writes a zip "
            "archive or a pickle; this is neither), nor .safetensors")
    import torch  # only the .pth reader needs torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointMismatch(
            f"checkpoint: cannot read {path} as a PyTorch weights file (read weights-only: "
            f"tensors, containers and argparse.Namespace): {_torch_load_reason(err)}") from err
    args = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else None
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointMismatch(f"checkpoint: {path} holds a {type(obj).__name__}, "
                                 "expected a state dict or a dict with 'model'")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in obj.items() if hasattr(v, "numpy")}, args


# The authors' argument behind each ModelConfig field that config_from_args sets.
_ARG_OF_FIELD = {field: name for name, field in AUTHORS_ARGS.items()} | {
    "backbone_depth": "backbone"}


def _model_config(inferred: dict, from_args: dict, overrides: Mapping[str, Any],
                  defaults: Mapping[str, Any]):
    """(ModelConfig, {field: (args value, override)}).

    Precedence: the caller's overrides, then what the weights (inferred) and
    the authors' args say, then `defaults`, then ModelConfig's own defaults.
    Raises CheckpointMismatch listing every contradiction between the weights
    and the args or the overrides, and every unknown field.
    """
    problems = [f"args.{_ARG_OF_FIELD[f]}: {v!r}, but the weights have config.{f} = "
                f"{inferred[f]!r}" for f, v in sorted(from_args.items())
                if f in inferred and inferred[f] != v]
    problems += [f"config.{k}: checkpoint has {inferred[k]!r}, requested {v!r}"
                 for k, v in overrides.items() if k in inferred and inferred[k] != v]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    problems += [f"config.{k}: not a ModelConfig field"
                 for k in sorted((set(overrides) | set(defaults)) - fields)]
    if problems:
        raise CheckpointMismatch("checkpoint does not match the model config:\n  "
                                 + "\n  ".join(problems))
    overridden = {k: (from_args[k], v) for k, v in overrides.items()
                  if k in from_args and from_args[k] != v}
    return ModelConfig(**{**defaults, **inferred, **from_args, **overrides}), overridden


def load_torch_checkpoint(path_or_state_dict, defaults: Mapping[str, Any] | None = None,
                          **model_overrides):
    """Converts an authors' or HuggingFace checkpoint into a DeformableDETR.

    path_or_state_dict: a .pth / .bin / .safetensors path, or a state dict of
    torch tensors or numpy arrays. The variant comes from the keys and shapes
    and, in the authors' main.py checkpoints, from their 'args' (dilation,
    heads, points, num_queries, ...); args that contradict the weights are
    refused. defaults: ModelConfig fields used only where neither tells.
    model_overrides: ModelConfig fields that win over the args (reported in
    info['overridden']) and insist on a value (refused if the weights
    contradict it).

    Returns (model, info) with info = {'layout', 'config', 'inferred',
    'from_args', 'overridden': {field: (args value, override)}, 'unused_keys'}.
    """
    args = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        raw, args = read_checkpoint(os.fspath(path_or_state_dict))
    else:
        raw = {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
               for k, v in path_or_state_dict.items()}
    layout = detect_layout(raw)
    sd = to_authors_layout(raw) if layout == "huggingface" else dict(raw)
    inferred = infer_config(sd)
    from_args = config_from_args(args) if args is not None else {}
    config, overridden = _model_config(inferred, from_args, model_overrides, defaults or {})
    weights, unused, problems = to_jax_names(sd, config)
    weights = stack_layers(weights, problems)
    model = DeformableDETR(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, WEIGHTS)
    _check_and_fill(state, weights, problems)
    nnx.update(model, state)
    info = {"layout": layout, "config": config, "inferred": inferred, "from_args": from_args,
            "overridden": overridden, "unused_keys": unused}
    return model, info


def _check_and_fill(state, weights: Mapping[str, np.ndarray], problems: list[str],
                    prefix: str = "") -> None:
    """Fills nnx State `state` from {path: array}; every missing, extra or
    mis-shaped entry (and the given problems) raised together as CheckpointMismatch."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))  # {(key, ...): array}
    keys = {".".join(map(str, key)): key for key in flat}  # "a.0.b" -> ("a", 0, "b")
    expected = {name: flat[key] for name, key in keys.items()}
    for path in sorted(set(expected) - set(weights)):
        problems.append(f"{prefix}{path}: missing from the checkpoint (expected shape "
                        f"{tuple(expected[path].shape)})")
    for path in sorted(set(weights) - set(expected)):
        problems.append(f"{prefix}{path}: in the checkpoint (shape {weights[path].shape}) but "
                        "not in the model")
    for path in sorted(set(weights) & set(expected)):
        if tuple(weights[path].shape) != tuple(expected[path].shape):
            problems.append(f"{prefix}{path}: checkpoint shape {tuple(weights[path].shape)}, "
                            f"model expects {tuple(expected[path].shape)}")
    if problems:
        raise CheckpointMismatch(f"checkpoint does not match the model ({len(problems)} "
                                 "problems):\n  " + "\n  ".join(problems))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({
        keys[p]: jax.numpy.asarray(w, dtype=expected[p].dtype) for p, w in weights.items()}))


def load_backbone_weights(model: DeformableDETR, path_or_state_dict) -> list[str]:
    """ImageNet ResNet weights into model.backbone (frozen batch norm), in place.

    path_or_state_dict: a torchvision ResNet state dict (conv1.weight,
    bn1.*, layer1.0.conv1.weight, ...; a .pth or .safetensors path or a dict of
    arrays), as the authors start from. The classifier (fc.*) is ignored.
    Returns the ignored keys; any mismatch raises CheckpointMismatch.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        raw, _ = read_checkpoint(os.fspath(path_or_state_dict))
    else:
        raw = {k: np.asarray(v) for k, v in path_or_state_dict.items()}
    sd = {f"backbone.0.body.{k}": v for k, v in raw.items() if not k.startswith("fc.")}
    weights, unused, problems = to_jax_names(sd, model.config)
    weights = {k[len("backbone."):]: v for k, v in weights.items()}
    state = nnx.state(model.backbone, WEIGHTS)
    _check_and_fill(state, weights, problems, prefix="backbone.")
    nnx.update(model.backbone, state)
    return [k[len("backbone.0.body."):] for k in unused] + [k for k in raw if k.startswith("fc.")]


def save_converted(model, config, dest: str) -> None:
    """DEST/state (orbax PyTree of the model state) and DEST/model_config.json."""
    import orbax.checkpoint as ocp

    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(dest, "state"), state)
    with open(os.path.join(dest, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The flags are needed only for a bare state dict or HF weights: the authors' "
               "main.py checkpoints carry these settings in their 'args'; a flag given wins "
               "over the args and is reported.")
    parser.add_argument("src", help="authors' .pth (main.py checkpoint or bare state dict), HF "
                                    "pytorch_model.bin or model.safetensors")
    parser.add_argument("dest", help="output directory (orbax state/ and model_config.json)")
    for field, help in NOT_IN_WEIGHTS.items():
        if field == "dilation":
            parser.add_argument("--dilation", action="store_true", default=None, help=help)
        else:
            parser.add_argument(f"--{field}", type=int, help=help)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("src", "dest") and v is not None}
    try:
        model, info = load_torch_checkpoint(args.src, **overrides)
    except (CheckpointMismatch, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_converted(model, info["config"], args.dest)
    print(f"layout: {info['layout']}\nconfig: {info['config']}")
    if info["from_args"]:
        print(f"from the checkpoint's args: {info['from_args']}")
    for field, (from_args, override) in info["overridden"].items():
        print(f"override: {field} = {override!r} (the checkpoint's args say {from_args!r})")
    if info["unused_keys"]:
        print(f"unused keys ({len(info['unused_keys'])}): {info['unused_keys']}")
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
