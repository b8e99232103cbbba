"""The tasks' data: reverse_letters.jsonl beside this file, whatever the working directory.

The rows are the demo's held-out sequences (builtin:reverse_chat/eval, palindromes left
out: their two choices would be the same), so no row was trained on. For data of your
own, `dataset_path: json` with `dataset_kwargs: {data_files: {test: /abs/path.jsonl}}`
in the YAML does the same without a loader (relative paths are read from the working
directory, not from the YAML's folder).
"""

from pathlib import Path


def load(**kwargs):
    import datasets

    rows = datasets.load_dataset("json", data_files=str(Path(__file__).with_name("reverse_letters.jsonl")),
                                 split="train")
    return {"test": rows}
