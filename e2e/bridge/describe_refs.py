#!/usr/bin/env python3
"""Describe a generated references directory as Markdown (the appendix of BRIDGE_NOTES.md).

    python e2e/bridge/describe_refs.py REFS_DIR > facts.md

Reads only with torch / safetensors / pickletools / PyYAML (no megatron): for every iteration
directory its files, every .metadata key with dtype, global shape and chunks, the pickle globals
of every bytes item, common.pt, train_state.pt, metadata.json, the run_config.yaml ``model:``
and ``peft:`` sections with value types; for every HF directory its files, tensors and config.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import zipfile

import torch


def pickle_globals(data: bytes) -> list:
    """The module.name of every class/function the pickle references (resolved by a recording
    Unpickler; persistent ids, i.e. torch storages, are answered with None)."""
    found = set()

    class Rec(pickle.Unpickler):
        def find_class(self, module, name):
            found.add(f"{module}.{name}")
            return super().find_class(module, name)

        def persistent_load(self, pid):
            return None

    try:
        Rec(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001  (storages answered with None may not rebuild)
        pass
    return sorted(found)


def torch_save_globals(path_or_bytes) -> list:
    data = open(path_or_bytes, "rb").read() if isinstance(path_or_bytes, str) else path_or_bytes
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        return pickle_globals(z.read(name))


def dcp_items(iter_dir: str):
    with open(os.path.join(iter_dir, ".metadata"), "rb") as f:
        md = pickle.load(f)
    return md


def read_bytes_item(iter_dir: str, md, key: str) -> bytes:
    for idx, sd in md.storage_data.items():
        if idx.fqn == key:
            with open(os.path.join(iter_dir, sd.relative_path), "rb") as f:
                f.seek(sd.offset)
                return f.read(sd.length)
    raise KeyError(key)


def describe_iter(iter_dir: str, rel: str) -> list:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    L = [f"#### `{rel}`", ""]
    files = sorted(os.listdir(iter_dir))
    L.append("files: " + ", ".join(f"`{f}`" + (f" ({os.path.getsize(os.path.join(iter_dir, f))} B)"
                                                 if os.path.isfile(os.path.join(iter_dir, f)) else "/")
                                    for f in files))
    L.append("")
    raw = open(os.path.join(iter_dir, ".metadata"), "rb").read()
    md = dcp_items(iter_dir)
    L.append(f"`.metadata`: pickle protocol {raw[1]}, {len(raw)} B, globals: "
             + ", ".join(f"`{g}`" for g in pickle_globals(raw)))
    L.append("")
    L.append("| key | dtype | global shape | chunks (offsets/sizes) |")
    L.append("|---|---|---|---|")
    byte_globals = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, BytesStorageMetadata):
            payload = read_bytes_item(iter_dir, md, k)
            g = tuple(torch_save_globals(payload))
            try:
                val = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
                val = repr(val)
            except Exception as e:  # noqa: BLE001
                val = f"<{type(e).__name__}>"
            if len(val) > 60:
                val = val[:57] + "..."
            L.append(f"| `{k}` | bytes ({len(payload)} B) | | value `{val}`; globals {', '.join(g) or 'none'} |")
            byte_globals.setdefault(g, 0)
            byte_globals[g] += 1
        else:
            chunks = v.chunks
            if len(chunks) > 4:
                cs = f"{len(chunks)} chunks, first {list(chunks[0].offsets)}/{list(chunks[0].sizes)}"
            else:
                cs = "; ".join(f"{list(c.offsets)}/{list(c.sizes)}" for c in chunks)
            L.append(f"| `{k}` | {str(v.properties.dtype)[6:]} | {list(v.size)} | {cs} |")
    L.append("")
    for name in ("common.pt", "train_state.pt"):
        p = os.path.join(iter_dir, name)
        if os.path.exists(p):
            val = torch.load(p, map_location="cpu", weights_only=False)
            L.append(f"`{name}`: `{val!r}`; globals: {', '.join(torch_save_globals(p)) or 'none'}")
            L.append("")
    p = os.path.join(iter_dir, "metadata.json")
    if os.path.exists(p):
        L.append(f"`metadata.json`: `{open(p).read()}`")
        L.append("")
    return L


def yaml_types(d, prefix="") -> list:
    out = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and set(v) != {"_target_"} and "_target_" not in v:
            out += yaml_types(v, name + ".")
        else:
            t = type(v).__name__
            s = json.dumps(v, default=lambda o: sorted(o) if isinstance(o, set) else repr(o))
            if len(s) > 70:
                s = s[:67] + "..."
            out.append(f"| `{name}` | {t} | `{s}` |")
    return out


def describe_run_config(path: str, rel: str, sections=("model", "peft")) -> list:
    import yaml

    with open(path) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    L = [f"#### `{rel}` ({len(text.splitlines())} lines; top-level keys: "
         + ", ".join(f"`{k}`" for k in cfg) + ")", ""]
    tags = sorted({w for line in text.splitlines() for w in line.split() if w.startswith("!!")})
    L.append("tags used: " + (", ".join(f"`{t}`" for t in tags) or "none"))
    L.append("")
    for sec in sections:
        if cfg.get(sec) is None:
            continue
        L.append(f"`{sec}:` section")
        L.append("")
        L.append("| field | Python type after yaml.safe_load | value |")
        L.append("|---|---|---|")
        L += yaml_types(cfg[sec])
        L.append("")
    return L


def describe_hf(d: str, rel: str) -> list:
    from safetensors import safe_open

    L = [f"#### `{rel}`", ""]
    L.append("files: " + ", ".join(f"`{f}` ({os.path.getsize(os.path.join(d, f))} B, mode "
                                    f"{oct(os.stat(os.path.join(d, f)).st_mode & 0o777)})"
                                    for f in sorted(os.listdir(d))))
    L.append("")
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as sf:
                meta = sf.metadata()
                L.append(f"`{f}` metadata `{meta}`; tensors in file order:")
                L.append("")
                L.append("| tensor | dtype | shape |")
                L.append("|---|---|---|")
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    L.append(f"| `{k}` | {sl.get_dtype()} | {sl.get_shape()} |")
                L.append("")
    return L


def main(refs: str) -> int:
    out = []
    for case in sorted(os.listdir(refs)):
        cdir = os.path.join(refs, case)
        if not os.path.isdir(cdir):
            continue
        out += [f"### {case}", ""]
        for sub in sorted(os.listdir(cdir)):
            sdir = os.path.join(cdir, sub)
            if not os.path.isdir(sdir):
                continue
            if os.path.exists(os.path.join(sdir, "config.json")):
                out += describe_hf(sdir, f"{case}/{sub}")
            for it in sorted(os.listdir(sdir)):
                idir = os.path.join(sdir, it)
                if it.startswith("iter_") and os.path.isdir(idir):
                    top = sorted(f for f in os.listdir(sdir))
                    out.append(f"run dir `{case}/{sub}`: " + ", ".join(f"`{f}`" for f in top)
                               + f"; latest_checkpointed_iteration.txt = "
                               f"`{open(os.path.join(sdir, 'latest_checkpointed_iteration.txt')).read()}`")
                    out.append("")
                    out += describe_iter(idir, f"{case}/{sub}/{it}")
                    rc = os.path.join(idir, "run_config.yaml")
                    if os.path.exists(rc) and sub == "bridge_import":
                        out += describe_run_config(rc, f"{case}/{sub}/{it}/run_config.yaml", ("model",))
                    elif os.path.exists(rc) and sub.startswith("lora"):
                        out += describe_run_config(rc, f"{case}/{sub}/{it}/run_config.yaml", ("peft", "checkpoint"))
    print("\n".join(out).replace(os.path.abspath(refs), "$CKPT_BRIDGE_REFS"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
