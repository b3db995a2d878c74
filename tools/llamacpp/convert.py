"""Convert a herd synth checkpoint to GGUF with llama.cpp's own converter, for side-by-side benchmarks.

herd's synthetic checkpoints carry a locally built BPE tokenizer whose pre-tokenizer hash llama.cpp's
converter does not know; benchmarks feed random token ids, so the tokenizer only needs to be
accepted. This wrapper tags it as Llama 4's ("llama4") and then runs the unmodified converter.

    PYTHONPATH=$LLAMA_CPP/gguf-py python tools/llamacpp/convert.py $LLAMA_CPP MODEL_DIR \
        --outtype bf16|q8_0 --outfile OUT.gguf

Nothing of llama.cpp is committed here; see docs/performance.md for how it is fetched and built.
"""

import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_cpp = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from conversion import base  # llama.cpp's converter package

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama4"
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py")] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
