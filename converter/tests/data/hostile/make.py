"""Writes the hostile and benign torch.save payloads the integration tests use.

Run with the reference venv (torch): python make.py [OUT_DIR]. Each hostile file
holds a pickle whose __reduce__ calls os.system: loading it with torch.load
(weights_only=False) or pickle.loads would run `touch /tmp/ckpt-pwned`. Nothing
here is ever loaded; the files are only written.
"""
import io
import os
import pickle
import sys

import torch


class Pwn:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckpt-pwned",))


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def main(out):
    os.makedirs(out, exist_ok=True)
    files = {
        # An _extra_state payload (MCore saves torch.save([data])) calling os.system.
        "extra_state_os_system.pt": save([Pwn()]),
        # TransformerEngine FP8 metadata is pickle.dumps(state) in a uint8 tensor,
        # which TE's set_extra_state pickle.loads.
        "extra_state_uint8_os_system.pt": save(
            [torch.frombuffer(bytearray(pickle.dumps(Pwn())), dtype=torch.uint8)]
        ),
        # Older TransformerEngine saved an io.BytesIO that set_extra_state torch.loads.
        "extra_state_bytesio_os_system.pt": save([io.BytesIO(save(Pwn()))]),
        # What real checkpoints hold: TE without FP8, local (non-TE) layers, an
        # older TE BytesIO of plain tensors.
        "extra_state_te_empty.pt": save([torch.empty(0, dtype=torch.uint8)]),
        "extra_state_none.pt": save([None]),
        "extra_state_bytesio_tensors.pt": save(
            [io.BytesIO(save({"scale_fwd": torch.ones(3), "amax": torch.zeros(2, 2)}))]
        ),
        # TE FP8 metadata of plain data only.
        "extra_state_uint8_plain.pt": save(
            [torch.frombuffer(bytearray(pickle.dumps({"recipe": "delayed", "step": 3})), dtype=torch.uint8)]
        ),
    }
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
